//! `corral demo`: the proxy and a small simulated fleet in one process, so a
//! newcomer sees corral work with one command and no GPU. The fleet has two
//! chat models and an embedding model spread over backends of different
//! speeds, one of which fails now and then. Unless `--quiet`, a little
//! traffic runs and batch jobs come and go ([`motion`]).
//!
//! ```text
//! cargo run --release -- demo
//! curl http://127.0.0.1:11434/api/generate -d '{"model":"llama3.2","prompt":"Why is the sky blue?"}'
//! ```

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod motion;

use crate::config::{DemoArgs, ServeArgs};
use crate::proxy::{self, ProxyHandle};
use crate::sim::{FaultSpec, ModelSpec, ServerSpec, SimServer};

/// A running demo.
pub struct Demo {
    pub proxy: ProxyHandle,
    pub backends: Vec<SimServer>,
}

/// The demo fleet: backend `i` of `n`.
fn backend_spec(i: usize) -> ServerSpec {
    let mut models = vec![ModelSpec::named("llama3.2"), ModelSpec::named("all-minilm")];
    if i % 2 == 1 {
        models.push(ModelSpec::named("mistral"));
    }
    // 20, 40, 60, 80 tokens per second, round and round.
    let tokens_per_second = 20 * (i % 4 + 1) as u64;
    ServerSpec {
        models,
        loaded: if i == 0 {
            vec!["llama3.2".into()]
        } else {
            Vec::new()
        },
        parallel: 2,
        load_time: Duration::from_millis(500),
        token_interval: Duration::from_millis(1000 / tokens_per_second),
        tokens: 24,
        seed: i as u64,
        faults: FaultSpec {
            error_rate: if i == 2 { 0.05 } else { 0.0 },
            ..FaultSpec::default()
        },
        ..ServerSpec::default()
    }
}

/// Starts the fleet and the proxy (on 127.0.0.1:`args.port`; 0 picks one).
pub async fn start(args: &DemoArgs) -> std::io::Result<Demo> {
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let listeners = crate::sim::bind_consecutive(
        loopback,
        args.backend_port_start,
        usize::from(args.backends),
    )
    .await?;
    let first = listeners[0].local_addr()?.port();
    let specs = (0..listeners.len()).map(backend_spec).collect();
    let backends = crate::sim::start_fleet(listeners, specs).await?;
    let mut serve = ServeArgs::defaults();
    serve.proxy_host = "127.0.0.1".parse().expect("an IP address");
    serve.proxy_port = args.port;
    serve.backend_port_start = first;
    serve.backend_port_end = first + args.backends - 1;
    serve.backends.clear();
    serve.scan_interval = Duration::from_secs(1);
    serve.max_concurrent_per_backend = 2;
    serve.api_keys.clear();
    let addr = SocketAddr::new(serve.proxy_host, serve.proxy_port);
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e} (try --port)"),
        )
    })?;
    let proxy = proxy::start(listener, serve)?;
    Ok(Demo { proxy, backends })
}

/// What to try, printed once the demo runs.
pub fn banner(demo: &Demo, quiet: bool) -> String {
    let url = format!("http://{}", demo.proxy.addr);
    let first = demo.backends.first().map_or(0, SimServer::port);
    let last = demo.backends.last().map_or(0, SimServer::port);
    format!(
        "corral demo: {n} simulated Ollama backends on 127.0.0.1:{first}-{last}, proxy on {url}\n\
         \n\
         Try:\n\
         \x20 curl {url}/api/generate -d '{{\"model\":\"llama3.2\",\"prompt\":\"Why is the sky blue?\"}}'\n\
         \x20 curl {url}/api/chat -d '{{\"model\":\"mistral\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":false}}'\n\
         \x20 curl {url}/v1/chat/completions -d '{{\"model\":\"llama3.2\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'\n\
         \x20 curl {url}/api/tags\n\
         \x20 curl {url}/__proxy/backends\n\
         \x20 dashboard: {url}/__proxy/\n\
         \x20 metrics:   {url}/metrics\n\
         \n\
         Or point any Ollama client at it: OLLAMA_HOST={url}\n\
         {motion}\n\
         Ctrl-C stops everything.",
        n = demo.backends.len(),
        motion = if quiet {
            "The fleet stands still (--quiet)."
        } else {
            "Two clients send a little traffic, and batch jobs come and go every few seconds\n\
             (registering with corral register); --quiet stops that."
        },
    )
}

/// Runs the demo until `shutdown` completes.
pub async fn run(args: DemoArgs, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    if args.backends == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "--backends must be at least 1",
        ));
    }
    let demo = start(&args).await?;
    // A closed stdout (`corral demo | head -1`) must not stop the demo.
    let _ = writeln!(std::io::stdout(), "{}", banner(&demo, args.quiet));
    let stop = CancellationToken::new();
    let motion = (!args.quiet).then(|| tokio::spawn(motion::run(demo.proxy.addr, stop.clone())));
    shutdown.await;
    stop.cancel();
    if let Some(motion) = motion {
        let _ = motion.await;
    }
    demo.proxy.shutdown().await;
    for b in &demo.backends {
        b.kill().await;
    }
    Ok(())
}
