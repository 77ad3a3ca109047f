//! Simulated Ollama servers (`corral sim`). Placeholder until the simulator lands.

use std::future::Future;

use crate::config::SimArgs;

/// Runs `corral sim` until `shutdown` completes.
pub async fn run(_args: SimArgs, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    shutdown.await;
    Ok(())
}
