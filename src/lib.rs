//! corral: a load-balancing proxy that makes a changing fleet of Ollama
//! servers look like one Ollama server, and a simulator of such servers.
//!
//! # Layout
//!
//! - [`config`]: every setting, as flag and environment variable.
//! - [`model`]: model names as Ollama compares them.
//! - [`policy`], [`failure`], [`pool`]: leaves under `fleet` and `proxy`:
//!   the routing and priority words, the kinds of backend failure, and
//!   corral's connections to one backend.
//! - [`fleet`]: the backends, their health and models, the slots and the wait
//!   queue, and discovery (the scan loop over the range, BACKENDS URLs, DNS
//!   entries and self-registered backends). One lock, never held across `.await`.
//! - [`proxy`]: the HTTP server: routes, forwarding, retries, streaming,
//!   fleet-wide answers, admin endpoints, errors.
//! - [`sim`]: simulated Ollama servers (`corral sim`); shares no code with the
//!   proxy, so that it cannot share its bugs.
//! - [`demo`]: the proxy and a small simulated fleet in one process.
//! - [`register`]: `corral register`, the job-side helper that registers a
//!   job's Ollama, renews its lease and leaves cleanly on SIGTERM.
//!
//! # The request path
//!
//! 1. `proxy::routes` matches the path to a `proxy::endpoint::Endpoint` (all
//!    corral knows of each API); auth and body-size limits apply.
//! 2. `proxy::tenant` names its tenant and priority; `proxy::body` reads the
//!    body once and peeks `model` and `stream` (`proxy::inspect` for zstd
//!    `/v1` bodies and multipart audio forms);
//!    `fleet::placement::Signature` hashes its prompt into prefix blocks.
//! 3. `fleet` admits the request: 404 for a model no backend ever listed,
//!    503 when the queue (or its tenant's share of it) is full.
//! 4. The request takes a `Slot` on the best eligible backend (with
//!    ROUTING=cache-aware, `fleet::placement` weighs which backend holds its
//!    prompt prefix and model against their queues), or waits in the fair
//!    queue (by tenant, priority and arrival) until a freed slot is handed to
//!    it (`proxy::course`: a cloud model takes no slot, a continued Responses
//!    answer goes to the backend that produced it, a backend that answered
//!    `server busy` stays healthy and is tried again after a pause).
//! 5. `proxy::forward` sends it (`proxy::upstream`, on a kept connection of
//!    that backend from `pool`, checked out on the request's own
//!    task); a failure before the first byte reached the client (a
//!    `failure::FailureKind`) marks the backend unhealthy and goes
//!    back to step 4 elsewhere, at its old place in the queue.
//! 6. The response streams back chunk by chunk; the `Slot` is released when
//!    the body ends or the client goes away (which closes the backend
//!    connection, cancelling the backend call; a body read to its end gives
//!    the connection back for the next request).
//!    An answer that ends without its terminal event is counted as broken.

pub mod config;
pub mod demo;
pub mod failure;
pub mod fleet;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod pool;
pub mod proxy;
pub mod register;
pub mod shutdown;
pub mod sim;
