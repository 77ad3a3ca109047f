//! The proxy's HTTP server.

use std::future::Future;

use tokio::net::TcpListener;

use crate::config::ServeArgs;

/// Serves the proxy on `listener` until `shutdown` completes.
pub async fn serve(
    _listener: TcpListener,
    _args: ServeArgs,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    shutdown.await;
    Ok(())
}
