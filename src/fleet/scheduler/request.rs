//! What a request brings to the scheduler and what it gets back: its
//! [`Want`] and [`Ticket`], a [`Decision`] or an [`Outcome`], and the
//! [`Grant`] on a slot it gives back when done.

use std::sync::Arc;

use tokio::time::Instant;

use crate::fleet::backend::{BackendId, Target};
use crate::fleet::placement::Signature;
use crate::model::ModelName;
use crate::policy::Priority;

/// A tenant's number, never reused while the scheduler lives.
pub type TenantId = u64;

/// What a request needs from a backend.
#[derive(Debug, Clone, Default)]
pub struct Want {
    /// The model it names; `None` fits any backend.
    pub model: Option<ModelName>,
    /// Backends it already failed on, not to be tried again.
    pub tried: Vec<BackendId>,
    /// The one backend it may go to (a continued response goes where the
    /// response it continues was produced): it waits for that backend, and
    /// is turned away when it is gone.
    pub pin: Option<BackendId>,
    /// What cache-aware placement knows of it; `None` under
    /// ROUTING=least-busy or for a body that is not a JSON object.
    pub signature: Option<Arc<Signature>>,
}

impl Want {
    /// Whether the request may go to `id`: not tried yet, and the one it is
    /// pinned to, if it is.
    pub fn may_use(&self, id: &BackendId) -> bool {
        !self.tried.contains(id) && self.pin.as_ref().is_none_or(|pin| pin == id)
    }
}

/// Who asks, how urgently, and (for a retry) its original arrival.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub tenant: Arc<str>,
    pub priority: Priority,
    /// Set by the first [`Scheduler::enqueue`](super::Scheduler::enqueue); a retry passes it back to
    /// keep its place.
    pub arrival: Option<u64>,
    /// When the request first arrived.
    pub since: Instant,
}

impl Ticket {
    /// A fresh ticket for a request arriving at `now`.
    pub fn new(tenant: Arc<str>, priority: Priority, now: Instant) -> Self {
        Self {
            tenant,
            priority,
            arrival: None,
            since: now,
        }
    }
}

/// Why a request is turned away: the scheduler's word for it, the fleet's
/// (a wait that ran out) and the proxy's, one vocabulary from which the
/// `reason` label of `corral_queue_rejections_total` and the client's
/// answer (`ProxyError`) derive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No backend has listed the model since start, while some backend is healthy.
    UnknownModel,
    /// A retry with no healthy untried backend left that has the model.
    Exhausted,
    /// MAX_QUEUE requests are already waiting.
    QueueFull,
    /// MAX_QUEUE_BYTES of request bodies are already waiting.
    QueueBytesFull,
    /// MAX_QUEUE_PER_TENANT requests of this tenant are already waiting.
    TenantQueueFull,
    /// Waited QUEUE_TIMEOUT_SECONDS without a backend.
    QueueTimeout,
    /// The proxy is shutting down and takes nothing new.
    ShuttingDown,
    /// The backend that produced a continued response is gone.
    PreviousResponseGone,
    /// No healthy backend can relay a request that takes no slot.
    NoHealthyBackend,
}

impl Rejection {
    /// Every rejection.
    pub const ALL: [Self; 9] = [
        Self::UnknownModel,
        Self::Exhausted,
        Self::QueueFull,
        Self::QueueBytesFull,
        Self::TenantQueueFull,
        Self::QueueTimeout,
        Self::ShuttingDown,
        Self::PreviousResponseGone,
        Self::NoHealthyBackend,
    ];

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::UnknownModel => "unknown_model",
            Self::Exhausted => "exhausted",
            Self::QueueFull => "queue_full",
            Self::QueueBytesFull => "queue_bytes_full",
            Self::TenantQueueFull => "tenant_queue_full",
            Self::QueueTimeout => "queue_timeout",
            Self::ShuttingDown => "shutting_down",
            Self::PreviousResponseGone => "previous_response_gone",
            Self::NoHealthyBackend => "no_healthy_backend",
        }
    }

    /// The setting whose limit a full queue hit, as the client is told it.
    pub const fn limit(self) -> Option<&'static str> {
        match self {
            Self::QueueFull => Some("MAX_QUEUE"),
            Self::QueueBytesFull => Some("MAX_QUEUE_BYTES"),
            Self::TenantQueueFull => Some("MAX_QUEUE_PER_TENANT"),
            _ => None,
        }
    }
}

/// The scheduler's grant of a slot, held until it is given back with [`Scheduler::release`](super::Scheduler::release) (done) or
/// [`Scheduler::abandon`](super::Scheduler::abandon) (cut off mid-request).
#[derive(Debug)]
pub struct Grant {
    /// The backend the slot is on.
    pub target: Arc<Target>,
    pub(super) tenant: TenantId,
    pub(super) model: Option<ModelName>,
    pub(super) granted_at: Instant,
    /// Slot-nanoseconds charged to the tenant up front (the model's usual
    /// service time), corrected when the slot comes back.
    pub(super) charged: u64,
}

/// What a waiter is told when it leaves the queue.
#[derive(Debug)]
pub enum Outcome {
    /// A slot on this backend is now the waiter's.
    Granted(Grant),
    /// The request cannot be served.
    Rejected(Rejection),
}

/// The answer to a request that asks for a slot now.
#[derive(Debug)]
pub enum Decision {
    /// A slot is taken for the request.
    Granted(Grant),
    /// No eligible backend has a free slot: the request should wait.
    Wait,
    /// Placement would rather wait for a busy backend (it holds the
    /// request's prompt or model) than take a free one: the request should
    /// wait, and be offered the free backends again at this instant (see
    /// [`Scheduler::hold`](super::Scheduler::hold)).
    Hold(Instant),
    /// The request cannot be served.
    Rejected(Rejection),
}
