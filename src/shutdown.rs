//! Shutdown: a future that completes on SIGINT or SIGTERM, and the
//! grace-period wrapper that keeps one hung request from holding the exit.

use std::future::Future;
use std::time::Duration;

/// Completes when the process receives SIGINT (ctrl-c) or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = term => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}

/// Runs `drain` for at most `grace`; returns false (and warns) when the grace
/// period ran out first.
pub async fn with_grace(grace: Duration, drain: impl Future<Output = ()>) -> bool {
    match tokio::time::timeout(grace, drain).await {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(
                grace_seconds = grace.as_secs_f64(),
                "grace period over, in-flight requests cut off"
            );
            false
        }
    }
}
