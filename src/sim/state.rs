//! What the handlers of one server incarnation share: the spec, the parsed
//! model names, the live fault rates and the fault plan's request count,
//! the counters, the scheduler, the prompt cache and the Responses history.
//! Handlers take it as [`SharedState`]; it imports no handler.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use super::cache::PromptCache;
use super::faults::{self, Fault};
use super::name::Name;
use super::sched::{ModelInit, QueueFull, Scheduler, Slot};
use super::spec::{FaultSpec, ModelSpec, ServerSpec};
use super::stats::Counters;

/// What a request asks of its model: the errors for a missing or unfit one differ.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Generate,
    Chat,
    Embed,
    Embeddings,
}

/// A handler's view of its server.
pub(crate) type SharedState = State<Arc<ServerState>>;

/// What the handlers of one server incarnation share.
pub(crate) struct ServerState {
    pub spec: ServerSpec,
    /// Parsed names of `spec.models`, same order.
    pub names: Vec<Name>,
    /// Faults can change at run time (`set_faults`); read once per request.
    pub faults: Mutex<FaultSpec>,
    pub counters: Counters,
    /// Inference requests seen, the `n` of the fault plan.
    pub inference_seq: AtomicU64,
    pub sched: Arc<Scheduler>,
    pub prompt_cache: Arc<PromptCache>,
    /// Host check applies (check_host and a loopback listener).
    pub check_host: bool,
    /// The Responses this server keeps for `previous_response_id`.
    pub responses: History,
}

impl ServerState {
    pub(crate) fn new(spec: ServerSpec, addr: SocketAddr) -> ServerState {
        let names: Vec<Name> = spec
            .models
            .iter()
            .map(|m| Name::parse(&m.name).unwrap_or_else(|| Name::parse("invalid").expect("valid")))
            .collect();
        let models = spec
            .models
            .iter()
            .zip(&names)
            .map(|(m, n)| ModelInit {
                cap: if m.embedding_only { 1 } else { usize::MAX },
                loaded: spec
                    .loaded
                    .iter()
                    .filter_map(|l| Name::parse(l))
                    .any(|l| l.matches(n)),
                load_time: m.load_time.unwrap_or(spec.load_time),
                default_ctx: m.context_length,
            })
            .collect();
        let counters = Counters::default();
        let sched = Scheduler::new(
            models,
            spec.parallel,
            spec.max_queue,
            spec.max_loaded,
            spec.keep_alive,
            counters.clone(),
        );
        ServerState {
            check_host: spec.check_host && addr.ip().is_loopback(),
            faults: Mutex::new(spec.faults.clone()),
            names,
            prompt_cache: PromptCache::new(spec.parallel, spec.prompt_cache),
            counters,
            inference_seq: AtomicU64::new(0),
            sched,
            responses: Default::default(),
            spec,
        }
    }

    /// The index of the model `name` matches.
    pub fn find(&self, name: &Name) -> Option<usize> {
        self.names.iter().position(|n| n.matches(name))
    }

    /// The index of the model `raw` names, or the status and message Ollama
    /// answers for `kind` when there is none or it cannot do `kind`.
    pub fn resolve(&self, raw: &str, kind: Kind) -> Result<usize, (StatusCode, String)> {
        let bad = |msg: &str| (StatusCode::BAD_REQUEST, msg.to_string());
        if raw.is_empty() {
            return Err(match kind {
                Kind::Chat | Kind::Embeddings => bad("model is required"),
                Kind::Generate | Kind::Embed => {
                    (StatusCode::NOT_FOUND, "model '' not found".into())
                }
            });
        }
        let name = Name::parse(raw).ok_or_else(|| bad("invalid model name"))?;
        let Some(index) = self.find(&name) else {
            let msg = match kind {
                Kind::Generate | Kind::Chat => format!("model '{raw}' not found"),
                Kind::Embed | Kind::Embeddings => {
                    format!("model \"{raw}\" not found, try pulling it first")
                }
            };
            return Err((StatusCode::NOT_FOUND, msg));
        };
        match kind {
            Kind::Generate if self.model(index).embedding_only => {
                Err(bad(&format!("\"{raw}\" does not support generate")))
            }
            Kind::Chat if self.model(index).embedding_only => {
                Err(bad(&format!("\"{raw}\" does not support chat")))
            }
            _ => Ok(index),
        }
    }

    /// The spec of model `index`.
    pub fn model(&self, index: usize) -> &ModelSpec {
        &self.spec.models[index]
    }

    /// Current fault rates.
    pub fn faults(&self) -> FaultSpec {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the fault rates.
    pub fn set_faults(&self, faults: FaultSpec) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// A slot on model `index` for an inference request (see
    /// [`Scheduler::acquire`]), counting an arrival that finds every slot taken.
    pub async fn acquire(
        &self,
        index: usize,
        keep_alive: Option<Option<Duration>>,
        ctx: Option<u64>,
    ) -> Result<Slot, QueueFull> {
        let oversubscribed = || self.counters.oversubscribed();
        self.sched
            .acquire(index, keep_alive, ctx, oversubscribed)
            .await
    }

    /// The fault of this inference request, counted: the `x-sim-fault`
    /// header, else the plan for the next request number.
    pub fn pick_fault(&self, headers: &HeaderMap) -> Option<Fault> {
        let n = self.inference_seq.fetch_add(1, Ordering::Relaxed);
        let header = headers
            .get("x-sim-fault")
            .and_then(|v| v.to_str().ok())
            .and_then(Fault::parse);
        let fault = header.or_else(|| faults::planned(&self.faults(), n));
        if let Some(f) = fault {
            self.counters.fault(f.name());
        }
        fault
    }
}

/// How long a response is kept.
const TTL: Duration = Duration::from_secs(30 * 60);
/// Responses kept at most.
const CAPACITY: usize = 1024;

/// The Responses one server keeps: the conversation text so far, by
/// (response id, `Authorization`), each for [`TTL`], at most [`CAPACITY`].
#[derive(Default)]
pub(crate) struct History {
    inner: Mutex<Kept>,
}

/// The kept conversations and their keys, oldest first.
#[derive(Default)]
struct Kept {
    by_key: HashMap<(String, String), (String, Instant)>,
    order: VecDeque<(String, String)>,
}

impl History {
    pub(crate) fn get(&self, id: &str, auth: &str) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (text, at) = inner.by_key.get(&(id.to_string(), auth.to_string()))?;
        (at.elapsed() < TTL).then(|| text.clone())
    }

    pub(crate) fn put(&self, id: String, auth: String, text: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (id, auth);
        inner.order.push_back(key.clone());
        inner.by_key.insert(key, (text, Instant::now()));
        while inner.by_key.len() > CAPACITY {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            inner.by_key.remove(&old);
        }
    }
}
