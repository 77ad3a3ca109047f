//! Simulated Ollama servers (`corral sim`): every test and benchmark of the
//! proxy stands on these. Imports nothing from `proxy`, `fleet` or `model`.
//!
//! # Layout
//!
//! Imports point one way: `server` → `routes` → the handlers → the
//! generator, the framing helpers and `state`.
//!
//! - [`spec`]: what a server is ([`ServerSpec`], [`ModelSpec`], [`FaultSpec`])
//!   and the TOML fleet file ([`FleetSpec`]).
//! - [`server`]: the accept loop and the [`SimServer`] handle (kill, restart);
//!   `state`: what the handlers of one server share.
//! - `routes`: the router, Host check, listing endpoints; `inference`: the
//!   generate/chat/embed handlers, answered by `completion`.
//! - `messages` (Anthropic), `responses` (OpenAI Responses, with per-server
//!   history), `audio` (transcriptions, speech): the endpoints Ollama layers
//!   on chat; `cloud`: cloud names and access, zstd bodies, `/api/status`
//!   and the cloud answers.
//! - `generation`: the one token generator every answer runs (pacing,
//!   mid-stream faults, the slot it holds). `reply`: wire shapes and error
//!   texts; `events`: SSE streams; `tools`: the simulated tool call.
//! - `sched`: slots, load queue, keep-alive, `max_loaded` and reloads.
//!   `cache`: the per-slot and host-memory prompt cache; `tokens`: the
//!   deterministic tokenizer and prompt rendering. `name`: model-name matching.
//! - [`generate`]: deterministic tokens and embeddings, wire shapes.
//! - [`faults`]: the deterministic fault plan. [`stats`]: the counters.
//!
//! A request: count it and check `Host` → parse and validate (exact Ollama
//! errors) → pick a fault → take a slot (loading the model through the load
//! queue if needed) → evaluate the prompt tokens the cache lacks (at
//! `prompt_speed`) → generate paced tokens → send the first byte only with
//! the first token. Dropping the handler future or body (client gone) frees
//! the slot and counts a cancel.

mod audio;
mod cache;
mod cloud;
mod completion;
mod events;
pub mod faults;
pub mod generate;
mod generation;
mod inference;
mod messages;
mod name;
mod reply;
mod responses;
mod routes;
mod sched;
pub mod server;
pub mod spec;
mod state;
pub mod stats;
pub mod tokens;
mod tools;

use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::SimArgs;

pub use faults::Fault;
pub use generate::{expected_embedding, expected_text, expected_tokens};
pub use server::SimServer;
pub use spec::{CloudAccess, FaultSpec, FleetSpec, ModelSpec, ServerSpec};
pub use stats::Stats;

/// Starts one server per listener, `specs[i]` on `listeners[i]`.
pub async fn start_fleet(
    listeners: Vec<TcpListener>,
    specs: Vec<ServerSpec>,
) -> std::io::Result<Vec<SimServer>> {
    if listeners.len() != specs.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} listeners for {} specs", listeners.len(), specs.len()),
        ));
    }
    let mut out = Vec::with_capacity(specs.len());
    for (l, s) in listeners.into_iter().zip(specs) {
        out.push(SimServer::start(l, s).await?);
    }
    Ok(out)
}

/// The server settings the command-line flags describe.
pub fn spec_from_args(args: &SimArgs) -> ServerSpec {
    let token_interval = if args.tokens_per_second > 0.0 && args.tokens_per_second.is_finite() {
        Duration::from_secs_f64(1.0 / args.tokens_per_second)
    } else {
        Duration::ZERO
    };
    ServerSpec {
        models: args.models.iter().map(|m| ModelSpec::named(m)).collect(),
        loaded: args.loaded.clone(),
        parallel: args.parallel,
        max_queue: args.max_queue,
        load_time: args.load_time,
        max_loaded: args.max_loaded,
        prompt_speed: args.prompt_speed,
        prompt_cache: args.prompt_cache,
        keep_alive: if args.keep_alive < 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(args.keep_alive))
        },
        token_interval,
        tokens: args.tokens,
        embedding_dim: args.embedding_dim,
        seed: args.seed,
        check_host: !args.no_host_check,
        faults: FaultSpec {
            error_rate: args.error_rate,
            busy_rate: args.busy_rate,
            reset_rate: args.reset_rate,
            hang_rate: args.hang_rate,
            garbage_rate: args.garbage_rate,
            mid_stream_error_rate: args.mid_stream_error_rate,
            lifetime: args.lifetime,
            start_delay: args.start_delay,
        },
        version: args.ollama_version.clone(),
        cloud_models: args.cloud_models.clone(),
        cloud: match args.cloud.as_str() {
            "signed-out" => CloudAccess::SignedOut,
            "disabled" => CloudAccess::Disabled,
            "rate-limited" => CloudAccess::RateLimited,
            _ => CloudAccess::SignedIn,
        },
    }
}

/// Binds `n` consecutive ports on `host` from `start`. With `start` 0 it
/// picks a free block at random between 20000 and 30000 (below Linux's
/// ephemeral range, so client sockets do not take them), trying up to 200
/// blocks: parallel tests and the demo each get a race-free block.
pub async fn bind_consecutive(
    host: IpAddr,
    start: u16,
    n: usize,
) -> std::io::Result<Vec<TcpListener>> {
    let tries = if start == 0 { 200 } else { 1 };
    let mut last_error = std::io::Error::other(format!("no block of {n} free consecutive ports"));
    for _ in 0..tries {
        let base = if start == 0 {
            20_000 + (rand::random::<u16>() % 10_000)
        } else {
            start
        };
        let mut listeners = Vec::with_capacity(n);
        for i in 0..n {
            let Some(port) = u16::try_from(i).ok().and_then(|i| base.checked_add(i)) else {
                return Err(std::io::Error::other("port range beyond 65535"));
            };
            let addr = SocketAddr::new(host, port);
            match TcpListener::bind(addr).await {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    last_error =
                        std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
                    break;
                }
            }
        }
        if listeners.len() == n {
            return Ok(listeners);
        }
    }
    Err(last_error)
}

/// Runs `corral sim` until `shutdown` completes: binds consecutive ports,
/// prints one line per server, and kills them all at the end.
pub async fn run(args: SimArgs, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let base = spec_from_args(&args);
    let specs = match &args.fleet {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            FleetSpec::from_toml(&text, &base)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
                .servers
        }
        None => vec![base; usize::from(args.count)],
    };
    let listeners = bind_consecutive(args.host, args.port_start, specs.len()).await?;
    for (listener, spec) in listeners.iter().zip(&specs) {
        let addr = listener.local_addr()?;
        let models: Vec<&str> = spec.models.iter().map(|m| m.name.as_str()).collect();
        // A closed stdout (`corral sim | head -1`) must not stop the servers.
        let _ = writeln!(
            std::io::stdout(),
            "sim: listening on http://{addr} models={}",
            models.join(",")
        );
    }
    let servers = start_fleet(listeners, specs).await?;
    shutdown.await;
    for s in &servers {
        s.kill().await;
    }
    Ok(())
}
