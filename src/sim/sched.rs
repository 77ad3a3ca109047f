//! Slots, the load queue and keep-alive of one simulated server, as Ollama's
//! scheduler behaves (OLLAMA_API.md §7): `parallel` slots per loaded model
//! with an unbounded FIFO wait, a bounded load queue processed one entry at a
//! time, and idle models unloaded when their keep-alive runs out (checked
//! lazily, so no timer task is needed).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// The load queue is full: answer 503.
#[derive(Debug)]
pub(crate) struct QueueFull;

/// Per-server scheduler.
pub(crate) struct Scheduler {
    parallel: usize,
    max_queue: usize,
    load_time: Duration,
    default_keep_alive: Option<Duration>,
    // A std Mutex: short critical sections, never held across `.await`.
    state: Mutex<State>,
    // Fair (FIFO) async mutex: the load queue handles one entry at a time.
    loader: tokio::sync::Mutex<()>,
}

struct State {
    models: Vec<ModelState>,
    pending_loads: usize,
}

struct ModelState {
    cap: usize,
    loaded: bool,
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
    /// `None` = never expires.
    pub remaining: Option<Duration>,
}

/// A taken slot; dropping it frees the slot or hands it to the oldest waiter.
pub(crate) struct Slot {
    sched: Arc<Scheduler>,
    index: usize,
    armed: bool,
}

impl Scheduler {
    pub(crate) fn new(
        caps: Vec<usize>,
        loaded: Vec<bool>,
        parallel: usize,
        max_queue: usize,
        load_time: Duration,
        keep_alive: Option<Duration>,
    ) -> Arc<Scheduler> {
        let now = Instant::now();
        let models = caps
            .into_iter()
            .zip(loaded)
            .map(|(cap, loaded)| ModelState {
                cap,
                loaded,
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
            load_time,
            default_keep_alive: keep_alive,
            state: Mutex::new(State {
                models,
                pending_loads: 0,
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
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        index: usize,
        keep_alive: Option<Option<Duration>>,
        on_wait: impl FnOnce(),
    ) -> Result<Slot, QueueFull> {
        let mut on_wait = Some(on_wait);
        loop {
            let rx = {
                let mut s = self.lock();
                let m = &mut s.models[index];
                if m.loaded {
                    if let Some(k) = keep_alive {
                        m.keep_alive = k;
                    }
                    if m.busy < m.cap.min(self.parallel) {
                        m.busy += 1;
                        return Ok(self.slot(index));
                    }
                    let (tx, rx) = oneshot::channel();
                    m.waiters.push_back(tx);
                    if let Some(f) = on_wait.take() {
                        f();
                    }
                    Some(rx)
                } else {
                    None
                }
            };
            if let Some(rx) = rx {
                // A dropped sender cannot happen while a waiter is queued;
                // treat it as a retry rather than panic.
                if let Ok(slot) = rx.await {
                    return Ok(slot);
                }
                continue;
            }
            if let Some(slot) = self.load(index, keep_alive, true).await? {
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
        self.load(index, keep_alive, false).await.map(drop)
    }

    /// Through the load queue; with `take_slot` the loader takes the first
    /// slot atomically with marking the model loaded. `None` when someone
    /// else loaded it meanwhile (the caller retries the normal path).
    async fn load(
        self: &Arc<Self>,
        index: usize,
        keep_alive: Option<Option<Duration>>,
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
        if !self.load_time.is_zero() {
            tokio::time::sleep(self.load_time).await;
        }
        let mut s = self.lock();
        let m = &mut s.models[index];
        m.loaded = true;
        m.unload_when_idle = false;
        m.keep_alive = keep_alive.unwrap_or(self.default_keep_alive);
        m.expires_at = m.keep_alive.map(|k| Instant::now() + k);
        if take_slot {
            m.busy += 1;
            return Ok(Some(self.slot(index)));
        }
        Ok(None)
    }

    /// The unload shortcut: now if idle, else when its requests end.
    pub(crate) fn unload(&self, index: usize) {
        let mut s = self.lock();
        let m = &mut s.models[index];
        if m.busy == 0 {
            m.loaded = false;
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
                remaining: m.expires_at.map(|t| t.saturating_duration_since(now)),
            })
            .collect();
        out.sort_by_key(|l| std::cmp::Reverse(l.remaining.unwrap_or(Duration::MAX)));
        out
    }

    fn slot(self: &Arc<Self>, index: usize) -> Slot {
        Slot {
            sched: self.clone(),
            index,
            armed: true,
        }
    }

    fn release(self: &Arc<Self>, index: usize) {
        let mut s = self.lock();
        let m = &mut s.models[index];
        while let Some(tx) = m.waiters.pop_front() {
            match tx.send(self.slot(index)) {
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
        }
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
