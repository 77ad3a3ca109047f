//! Slots, the load queue and keep-alive of one simulated server, as Ollama's
//! scheduler behaves (OLLAMA_API.md §7): `parallel` slots per loaded model
//! with an unbounded FIFO wait, a bounded load queue processed one entry at a
//! time, and idle models unloaded when their keep-alive runs out (checked
//! lazily, so no timer task is needed). At most `max_loaded` models are in
//! memory (OLLAMA_MAX_LOADED_MODELS): a load evicts the least recently used
//! idle one, or waits for one to become idle. A request whose `num_ctx`
//! differs from the runner's context waits for the runner to be idle and
//! reloads it (addendum §9). Each load is a new runner number, which the
//! prompt cache uses to forget what an old runner held.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::stats::Counters;

/// The load queue is full: answer 503.
#[derive(Debug)]
pub(crate) struct QueueFull;

/// Per-server scheduler.
pub(crate) struct Scheduler {
    parallel: usize,
    max_queue: usize,
    /// 0 = no limit.
    max_loaded: usize,
    default_keep_alive: Option<Duration>,
    counters: Counters,
    /// Notified whenever a model becomes idle or is unloaded.
    idle: Notify,
    // A std Mutex: short critical sections, never held across `.await`.
    state: Mutex<State>,
    // Fair (FIFO) async mutex: the load queue handles one entry at a time.
    loader: tokio::sync::Mutex<()>,
}

struct State {
    models: Vec<ModelState>,
    pending_loads: usize,
    next_runner: u64,
}

/// What the scheduler knows of one model at start.
pub(crate) struct ModelInit {
    /// Slots at most (1 for embedding models).
    pub cap: usize,
    pub loaded: bool,
    pub load_time: Duration,
    /// Context length of a runner loaded without `num_ctx`.
    pub default_ctx: u64,
}

struct ModelState {
    cap: usize,
    loaded: bool,
    load_time: Duration,
    default_ctx: u64,
    /// Context length of the loaded runner.
    ctx: u64,
    /// Which load this runner is (0 = loaded at start).
    runner: u64,
    last_used: Instant,
    busy: usize,
    waiters: VecDeque<oneshot::Sender<Slot>>,
    /// `None` = forever.
    keep_alive: Option<Duration>,
    /// `None` = never (forever), or busy since the first load.
    expires_at: Option<Instant>,
    unload_when_idle: bool,
}

/// A model as `/api/ps` shows it.
pub(crate) struct Loaded {
    pub index: usize,
    /// The runner's context length.
    pub context_length: u64,
    /// `None` = never expires.
    pub remaining: Option<Duration>,
}

/// A taken slot; dropping it frees the slot or hands it to the oldest waiter.
pub(crate) struct Slot {
    sched: Arc<Scheduler>,
    index: usize,
    runner: u64,
    armed: bool,
}

impl Scheduler {
    pub(crate) fn new(
        models: Vec<ModelInit>,
        parallel: usize,
        max_queue: usize,
        max_loaded: usize,
        keep_alive: Option<Duration>,
        counters: Counters,
    ) -> Arc<Scheduler> {
        let now = Instant::now();
        let models = models
            .into_iter()
            .map(|m| ModelState {
                cap: m.cap,
                loaded: m.loaded,
                load_time: m.load_time,
                default_ctx: m.default_ctx,
                ctx: m.default_ctx,
                runner: 0,
                last_used: now,
                busy: 0,
                waiters: VecDeque::new(),
                keep_alive,
                expires_at: keep_alive.map(|k| now + k),
                unload_when_idle: false,
            })
            .collect();
        Arc::new(Scheduler {
            parallel: parallel.max(1),
            max_queue,
            max_loaded,
            default_keep_alive: keep_alive,
            counters,
            idle: Notify::new(),
            state: Mutex::new(State {
                models,
                pending_loads: 0,
                next_runner: 1,
            }),
            loader: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for m in &mut s.models {
            if m.loaded && m.busy == 0 && m.expires_at.is_some_and(|t| t <= now) {
                m.loaded = false;
            }
        }
        s
    }

    /// Takes a slot on model `index`, loading it first if needed; `on_wait`
    /// runs if every slot is taken on arrival (oversubscription).
    /// `keep_alive`: `None` = not in the request; `Some(None)` = forever.
    /// `ctx`: the request's `num_ctx`, `None` = the automatic default.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        index: usize,
        keep_alive: Option<Option<Duration>>,
        ctx: Option<u64>,
        on_wait: impl FnOnce(),
    ) -> Result<Slot, QueueFull> {
        let mut on_wait = Some(on_wait);
        loop {
            let idle = self.idle.notified();
            let rx = {
                let mut s = self.lock();
                let m = &mut s.models[index];
                let draining = m.loaded && needs_reload(m, ctx) && m.busy > 0;
                if m.loaded && needs_reload(m, ctx) && m.busy == 0 {
                    m.loaded = false;
                    self.counters.reload();
                }
                if draining {
                    // The runner is reloaded once its requests end.
                    Some(None)
                } else if m.loaded {
                    if let Some(k) = keep_alive {
                        m.keep_alive = k;
                    }
                    if m.busy < m.cap.min(self.parallel) {
                        m.busy += 1;
                        m.last_used = Instant::now();
                        return Ok(self.slot(index, m.runner));
                    }
                    let (tx, rx) = oneshot::channel();
                    m.waiters.push_back(tx);
                    if let Some(f) = on_wait.take() {
                        f();
                    }
                    Some(Some(rx))
                } else {
                    None
                }
            };
            if rx.as_ref().is_some_and(Option::is_none) {
                idle.await;
                continue;
            }
            if let Some(Some(rx)) = rx {
                // A dropped sender cannot happen while a waiter is queued;
                // treat it as a retry rather than panic.
                if let Ok(slot) = rx.await {
                    return Ok(slot);
                }
                continue;
            }
            if let Some(slot) = self.load(index, keep_alive, ctx, true).await? {
                return Ok(slot);
            }
        }
    }

    /// Loads model `index` if needed and refreshes its keep-alive (the
    /// preload shortcut).
    pub(crate) async fn preload(
        self: &Arc<Self>,
        index: usize,
        keep_alive: Option<Option<Duration>>,
    ) -> Result<(), QueueFull> {
        {
            let mut s = self.lock();
            let m = &mut s.models[index];
            if m.loaded {
                if let Some(k) = keep_alive {
                    m.keep_alive = k;
                }
                if m.busy == 0 {
                    m.expires_at = m.keep_alive.map(|k| Instant::now() + k);
                }
                return Ok(());
            }
        }
        self.load(index, keep_alive, None, false).await.map(drop)
    }

    /// Through the load queue; with `take_slot` the loader takes the first
    /// slot atomically with marking the model loaded. `None` when someone
    /// else loaded it meanwhile (the caller retries the normal path).
    async fn load(
        self: &Arc<Self>,
        index: usize,
        keep_alive: Option<Option<Duration>>,
        ctx: Option<u64>,
        take_slot: bool,
    ) -> Result<Option<Slot>, QueueFull> {
        {
            let mut s = self.lock();
            if s.pending_loads >= self.max_queue {
                return Err(QueueFull);
            }
            s.pending_loads += 1;
        }
        let _pending = PendingLoad(self.clone());
        let _turn = self.loader.lock().await;
        if self.lock().models[index].loaded {
            return Ok(None);
        }
        self.make_room(index).await;
        let load_time = self.lock().models[index].load_time;
        if !load_time.is_zero() {
            tokio::time::sleep(load_time).await;
        }
        self.counters.load();
        let mut s = self.lock();
        let runner = s.next_runner;
        s.next_runner += 1;
        let m = &mut s.models[index];
        m.loaded = true;
        m.runner = runner;
        m.ctx = ctx.unwrap_or(m.default_ctx);
        m.last_used = Instant::now();
        m.unload_when_idle = false;
        m.keep_alive = keep_alive.unwrap_or(self.default_keep_alive);
        m.expires_at = m.keep_alive.map(|k| Instant::now() + k);
        if take_slot {
            m.busy += 1;
            return Ok(Some(self.slot(index, runner)));
        }
        Ok(None)
    }

    /// With `max_loaded` models in memory, evicts the least recently used
    /// idle one other than `index`, waiting for one to become idle if need be.
    async fn make_room(&self, index: usize) {
        if self.max_loaded == 0 {
            return;
        }
        loop {
            let idle = self.idle.notified();
            {
                let mut s = self.lock();
                let loaded = s.models.iter().filter(|m| m.loaded).count();
                if loaded < self.max_loaded {
                    return;
                }
                let victim = s
                    .models
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, m)| *i != index && m.loaded && m.busy == 0)
                    .min_by_key(|(_, m)| m.last_used);
                if let Some((_, m)) = victim {
                    m.loaded = false;
                    self.counters.eviction();
                    continue;
                }
            }
            idle.await;
        }
    }

    /// The unload shortcut: now if idle, else when its requests end.
    pub(crate) fn unload(&self, index: usize) {
        let mut s = self.lock();
        let m = &mut s.models[index];
        if m.busy == 0 {
            m.loaded = false;
            self.idle.notify_waiters();
        } else {
            m.unload_when_idle = true;
        }
    }

    /// Loaded models, longest remaining keep-alive first.
    pub(crate) fn loaded(&self) -> Vec<Loaded> {
        let s = self.lock();
        let now = Instant::now();
        let mut out: Vec<Loaded> = s
            .models
            .iter()
            .enumerate()
            .filter(|(_, m)| m.loaded)
            .map(|(index, m)| Loaded {
                index,
                context_length: m.ctx,
                remaining: m.expires_at.map(|t| t.saturating_duration_since(now)),
            })
            .collect();
        out.sort_by_key(|l| std::cmp::Reverse(l.remaining.unwrap_or(Duration::MAX)));
        out
    }

    fn slot(self: &Arc<Self>, index: usize, runner: u64) -> Slot {
        Slot {
            sched: self.clone(),
            index,
            runner,
            armed: true,
        }
    }

    fn release(self: &Arc<Self>, index: usize) {
        let mut s = self.lock();
        let m = &mut s.models[index];
        m.last_used = Instant::now();
        while let Some(tx) = m.waiters.pop_front() {
            match tx.send(self.slot(index, m.runner)) {
                Ok(()) => return,
                // That waiter gave up: the slot comes back unused.
                Err(mut slot) => slot.armed = false,
            }
        }
        debug_assert!(m.busy > 0, "slot count underflow");
        m.busy = m.busy.saturating_sub(1);
        if m.busy == 0 {
            m.expires_at = m.keep_alive.map(|k| Instant::now() + k);
            if m.unload_when_idle || m.keep_alive == Some(Duration::ZERO) {
                m.loaded = false;
                m.unload_when_idle = false;
            }
            self.idle.notify_waiters();
        }
    }
}

/// The request's `num_ctx` differs from the runner's. A request without one
/// uses whatever is loaded (Ollama does not compare automatic defaults).
fn needs_reload(m: &ModelState, ctx: Option<u64>) -> bool {
    ctx.is_some_and(|c| c != m.ctx)
}

impl Slot {
    /// The runner this slot belongs to (see the prompt cache).
    pub(crate) fn runner(&self) -> u64 {
        self.runner
    }
}

struct PendingLoad(Arc<Scheduler>);

impl Drop for PendingLoad {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.pending_loads = s.pending_loads.saturating_sub(1);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            self.sched.release(self.index);
        }
    }
}
