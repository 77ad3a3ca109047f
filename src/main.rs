//! The `corral` binary: parse the command line, set up logging, bind, run
//! until a signal, exit 0. Everything else lives in the library.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, error::ErrorKind};
use corral::config::{Cli, Command, ServeArgs};
use corral::{demo, logging, proxy, register, shutdown, sim};

/// jemalloc rather than glibc's malloc: it keeps its bookkeeping out of the
/// blocks, so the 8 KiB buffers hyper gives each connection cost no memory
/// until written; with 10,000 parked clients the peak RSS is lower at the
/// same CPU per request (bench/results.md, "Parked connections"). The static
/// musl build keeps musl's allocator (no C toolchain needed for it).
#[cfg(not(target_env = "musl"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(message) = logging::init(&cli.log_level, cli.log_format) {
        Cli::command()
            .error(ErrorKind::InvalidValue, message)
            .exit();
    }
    let result = match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Sim(args)) => sim::run(args, shutdown::signal())
            .await
            .map_err(|e| e.to_string()),
        Some(Command::Demo(args)) => demo::run(args, shutdown::signal())
            .await
            .map_err(|e| e.to_string()),
        Some(Command::Register(args)) => register::run(args, shutdown::signal()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("corral: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    if let Err(message) = args.validate() {
        Cli::command()
            .error(ErrorKind::ArgumentConflict, message)
            .exit();
    }
    // Every client connection and every backend connection is a descriptor;
    // the usual soft limit of 1024 would refuse clients long before memory runs out.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let addr = std::net::SocketAddr::new(args.proxy_host, args.proxy_port);
    let listener = proxy::listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    proxy::serve(listener, args, shutdown::signal())
        .await
        .map_err(|e| e.to_string())
}
