//! The proxy: its shared state ([`App`]), the accept loop with graceful
//! shutdown, and the modules of the request path.
//!
//! `serve(listener, args, shutdown)` takes a bound socket and a future that
//! says when to stop, so the binary passes a real port and a signal while
//! tests bind `127.0.0.1:0`.

mod admin;
mod aggregate;
mod auth;
mod body;
mod connection;
mod context;
mod course;
mod dashboard;
mod endpoint;
pub mod error;
mod forward;
mod headers;
pub mod history;
mod inspect;
mod ledger;
mod outbound;
mod passthrough;
mod relay;
pub mod responses;
mod routes;
pub mod tenant;
pub mod upstream;

pub use connection::listen;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use futures_util::FutureExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::ServeArgs;
use crate::fleet::discovery::Discovery;
use crate::fleet::registry::Registry;
use crate::fleet::shared::SharedState;
use crate::fleet::{Fleet, Limits};
use crate::metrics::Metrics;
use history::History;

/// What every request handler shares.
pub struct App {
    pub args: ServeArgs,
    /// The backends, slots and queue.
    pub fleet: Fleet,
    /// The tenant settings (API keys and their tenants among them).
    pub tenancy: tenant::Tenancy,
    pub metrics: Arc<Metrics>,
    /// When the proxy started, for the dashboard's uptime.
    pub started: tokio::time::Instant,
    /// The last five minutes, one sample a second, for the dashboard.
    pub history: Arc<History>,
    /// Backends that registered themselves, and their leases.
    pub registry: Arc<Registry>,
    /// Which backend produced which Responses answer.
    pub responses: responses::Owners,
}

impl App {
    /// The state for these settings, with an empty fleet.
    pub fn new(args: ServeArgs) -> Self {
        let limits = Limits {
            cap: args.max_concurrent_per_backend,
            max_queue: args.max_queue,
            max_queue_bytes: args.max_queue_bytes,
        };
        let fleet = Fleet::with_policy(limits, tenant::Tenancy::policy(&args), args.queue_timeout);
        fleet.update(|s| s.set_routing(args.routing));
        Self {
            fleet,
            tenancy: tenant::Tenancy::new(&args),
            metrics: Arc::new(Metrics::new()),
            started: tokio::time::Instant::now(),
            history: Arc::new(History::default()),
            registry: Arc::default(),
            responses: responses::Owners::default(),
            args,
        }
    }
}

/// A running proxy, for tests and the demo.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    /// The shared state, to look at the fleet.
    pub app: Arc<App>,
    /// Cancelled after the first scan.
    pub ready: CancellationToken,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl ProxyHandle {
    /// Stops accepting, turns queued requests away, lets in-flight ones
    /// finish (up to the grace period), and waits until all is done.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the proxy on `listener`, its discovery loop and the dashboard's
/// sampler; returns at once.
pub fn start(listener: TcpListener, args: ServeArgs) -> std::io::Result<ProxyHandle> {
    let addr = listener.local_addr()?;
    let app = Arc::new(App::new(args));
    if let Some(url) = &app.args.shared_state {
        let state = SharedState::new(url, app.args.max_concurrent_per_backend)
            .map_err(std::io::Error::other)?;
        tracing::info!(
            instance = state.instance(),
            "sharing slots through SHARED_STATE"
        );
        app.fleet.attach_shared(state);
    }
    let discovery = Discovery::try_new(app.fleet.clone(), &app.args, Arc::clone(&app.registry))
        .map_err(std::io::Error::other)?;
    let stop = CancellationToken::new();
    let ready = CancellationToken::new();
    let task = tokio::spawn(run(
        listener,
        Arc::clone(&app),
        discovery,
        stop.clone(),
        ready.clone(),
    ));
    Ok(ProxyHandle {
        addr,
        app,
        ready,
        stop,
        task,
    })
}

/// Serves until `shutdown` completes, then shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    args: ServeArgs,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let handle = start(listener, args)?;
    tracing::info!(addr = %handle.addr, "corral listening");
    shutdown.await;
    handle.shutdown().await;
    tracing::info!("corral stopped");
    Ok(())
}

async fn run(
    listener: TcpListener,
    app: Arc<App>,
    discovery: Discovery,
    stop: CancellationToken,
    ready: CancellationToken,
) {
    let tasks = TaskTracker::new();
    // Stops the loops that run beside the connections: discovery and the sampler.
    let background = CancellationToken::new();
    tasks.spawn(discovery.run(background.clone(), ready));
    if let Some(shared) = app.fleet.shared_state() {
        shared.start(&app.fleet, Arc::clone(&app.registry), &tasks, &background);
    }
    tasks.spawn(history::sample(
        app.fleet.clone(),
        Arc::clone(&app.metrics),
        Arc::clone(&app.history),
        background.clone(),
    ));

    let router = routes::router(Arc::clone(&app));
    let mut auto = auto::Builder::new(TokioExecutor::new());
    auto.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.args.client_header_timeout);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(app.args.client_header_timeout);
    let builders = Arc::new((http1, auto));
    let graceful = GracefulShutdown::new();
    let accept = |stream: tokio::net::TcpStream, peer: SocketAddr| {
        let _ = stream.set_nodelay(true);
        let service =
            router
                .clone()
                .map_request(move |request: http::Request<hyper::body::Incoming>| {
                    let mut request = request.map(axum::body::Body::new);
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                });
        // Shutdown waits for this connection from now on; its first bytes
        // are awaited on its own task, not here.
        let (builders, watcher, stop) = (Arc::clone(&builders), graceful.watcher(), stop.clone());
        tasks.spawn(async move {
            let (http1, auto) = &*builders;
            let service = TowerToHyperService::new(service);
            // A client that has sent nothing yet is not waited for at shutdown.
            let opening = tokio::select! {
                opening = connection::opening(&stream) => opening,
                () = stop.cancelled() => return,
            };
            let served: Result<(), Box<dyn std::error::Error + Send + Sync>> = match opening {
                connection::Opening::Http1 => {
                    let connection = http1.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(connection).await.map_err(Into::into)
                }
                // Rare (h2c clients): boxed, so that it does not size
                // every HTTP/1 connection's task.
                connection::Opening::MaybeHttp2 => {
                    let connection = auto.serve_connection(TokioIo::new(stream), service);
                    Box::pin(watcher.watch(connection)).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    };
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        accept(stream, peer);
        // A storm of clients: take every connection already waiting before
        // the next turn (an error is met there).
        while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
            accept(stream, peer);
        }
    }
    drop(listener);
    tracing::info!(
        in_flight = app
            .fleet
            .read(|s| s.backends().values().map(|b| b.in_flight).sum::<u32>()),
        waiting = app.fleet.read(|s| s.queue_len()),
        "shutting down: no new connections, queued requests turned away"
    );
    app.fleet.update(|s| s.close());
    crate::shutdown::with_grace(app.args.shutdown_grace, graceful.shutdown()).await;
    background.cancel();
    tasks.close();
    // Connections past the grace period are cut; the scan loop and the sampler end at once.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), tasks.wait()).await;
}
