//! One simulated server: its own accept loop (so that `kill` can drop
//! every live connection at once) and the [`SimServer`] handle. Each
//! connection task is owned by a `TaskTracker` and stops when the server's
//! `CancellationToken` fires.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::routes;
use super::spec::{FaultSpec, ServerSpec};
use super::state::ServerState;
use super::stats::Stats;

/// One life of a server, from listen to kill.
struct Life {
    state: Arc<ServerState>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    listening: Arc<AtomicBool>,
}

struct Shared {
    addr: SocketAddr,
    life: Mutex<Life>,
}

/// A cheap handle on a running (or killed) simulated server.
#[derive(Clone)]
pub struct SimServer {
    shared: Arc<Shared>,
}

impl SimServer {
    /// Serves `spec` on `listener`. With `faults.start_delay` the listener is
    /// closed at once and opened again on the same port after the delay
    /// (connections are refused meanwhile); with `faults.lifetime` the server
    /// kills itself after that long.
    pub async fn start(listener: TcpListener, spec: ServerSpec) -> std::io::Result<SimServer> {
        let addr = listener.local_addr()?;
        let life = Self::launch(Some(listener), addr, spec);
        Ok(SimServer {
            shared: Arc::new(Shared {
                addr,
                life: Mutex::new(life),
            }),
        })
    }

    fn launch(listener: Option<TcpListener>, addr: SocketAddr, spec: ServerSpec) -> Life {
        let start_delay = spec.faults.start_delay.filter(|d| !d.is_zero());
        let lifetime = spec.faults.lifetime;
        let state = Arc::new(ServerState::new(spec, addr));
        let listener = listener.filter(|_| start_delay.is_none());
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let listening = Arc::new(AtomicBool::new(listener.is_some()));
        let life = Life {
            state: state.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            listening: listening.clone(),
        };
        tracker.clone().spawn(async move {
            let listener = match listener {
                Some(l) => l,
                None => {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(start_delay.unwrap_or_default()) => {}
                    }
                    match TcpListener::bind(addr).await {
                        Ok(l) => {
                            listening.store(true, Ordering::SeqCst);
                            l
                        }
                        Err(e) => {
                            tracing::warn!(%addr, error = %e, "sim: cannot listen again");
                            return;
                        }
                    }
                }
            };
            if let Some(lifetime) = lifetime {
                let cancel = cancel.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = tokio::time::sleep(lifetime) => cancel.cancel(),
                    }
                });
            }
            accept_loop(listener, state, cancel, &tracker).await;
            listening.store(false, Ordering::SeqCst);
        });
        life
    }

    fn life<T>(&self, f: impl FnOnce(&Life) -> T) -> T {
        f(&self.shared.life.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// A snapshot of the counters of the current (or last) life.
    pub fn stats(&self) -> Stats {
        self.life(|l| l.state.counters.snapshot())
    }

    /// Replaces the fault rates of the running server (`lifetime` and
    /// `start_delay` are ignored here).
    pub fn set_faults(&self, faults: FaultSpec) {
        self.life(|l| l.state.set_faults(faults));
    }

    /// Like the process dying: the listener closes and every open connection
    /// is dropped at once. Returns when all of them are gone.
    pub async fn kill(&self) {
        let (cancel, tracker) = self.life(|l| (l.cancel.clone(), l.tracker.clone()));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    /// Kills the server if it runs, then listens again on the same port with
    /// `spec`; counters start afresh.
    pub async fn restart(&self, spec: ServerSpec) -> std::io::Result<()> {
        self.kill().await;
        let listener = if spec.faults.start_delay.is_some_and(|d| !d.is_zero()) {
            None
        } else {
            Some(bind_again(self.shared.addr).await?)
        };
        let life = Self::launch(listener, self.shared.addr, spec);
        *self.shared.life.lock().unwrap_or_else(|e| e.into_inner()) = life;
        Ok(())
    }

    /// True while the server accepts connections.
    pub fn is_running(&self) -> bool {
        self.life(|l| l.listening.load(Ordering::SeqCst) && !l.cancel.is_cancelled())
    }

    /// Same as [`SimServer::kill`], for cleanup.
    pub async fn shutdown(&self) {
        self.kill().await;
    }
}

async fn bind_again(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // Connections just dropped may hold the port for a moment on some systems.
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("cannot bind")))
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<ServerState>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    let router = routes::router(state);
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::debug!(error = %e, "sim: accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            // Dropping `conn` closes the socket and drops any handler future or
            // response body in progress: that is how a kill cuts everything.
            tokio::select! {
                _ = conn => {}
                () = cancel.cancelled() => {}
            }
        });
    }
}
