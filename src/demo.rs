//! `corral demo`: the proxy and a small simulated fleet in one process.

use std::future::Future;

use crate::config::DemoArgs;

/// Runs the demo until `shutdown` completes.
pub async fn run(_args: DemoArgs, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    shutdown.await;
    Ok(())
}
