//! Command line and environment: every setting of PRODUCT.md as a clap flag
//! with its environment variable, parsed into typed values and validated
//! before anything binds. Nothing else in the crate reads `std::env`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub mod tenancy;

use crate::policy::Priority;
pub use crate::policy::Routing;
use tenancy::TenantMap;

/// corral: one stable Ollama address in front of a changing fleet of Ollama servers.
#[derive(Debug, Parser)]
#[command(
    name = "corral",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to run; plain `corral` is `corral serve`.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Settings of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,

    /// Log verbosity: DEBUG, INFO, WARNING, ERROR, or a RUST_LOG-style filter.
    #[arg(long, env = "LOG_LEVEL", default_value = "INFO", global = true)]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Run simulated Ollama backends on consecutive ports.
    Sim(SimArgs),
    /// Run the proxy and a small simulated fleet in one process.
    Demo(DemoArgs),
    /// Register a job's Ollama with a corral, renew it, and leave cleanly on SIGTERM.
    Register(RegisterArgs),
}

/// Settings of the proxy. Variable names are kept exactly from ollama_proxy.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Bind address.
    #[arg(long = "host", env = "PROXY_HOST", default_value = "0.0.0.0")]
    pub proxy_host: IpAddr,

    /// Bind port.
    #[arg(long = "port", env = "PROXY_PORT", default_value_t = 11434)]
    pub proxy_port: u16,

    /// Host of the port-range backends.
    #[arg(long, env = "BACKEND_HOST", default_value = "127.0.0.1")]
    pub backend_host: String,

    /// First port scanned (inclusive).
    #[arg(long, env = "BACKEND_PORT_START", default_value_t = 24000)]
    pub backend_port_start: u16,

    /// Last port scanned (inclusive).
    #[arg(long, env = "BACKEND_PORT_END", default_value_t = 24100)]
    pub backend_port_end: u16,

    /// Extra backends, comma-separated: `http://gpu7:11434`, `dns+http://name:port`
    /// (every A/AAAA address), `dnssrv+http://_ollama._tcp.name` (SRV records).
    #[arg(long, env = "BACKENDS", value_delimiter = ',', value_parser = parse_backend_source)]
    pub backends: Vec<BackendSource>,

    /// DNS servers for `dns+`/`dnssrv+` BACKENDS entries, `host:port,...`; empty: the system's.
    #[arg(long, env = "DNS_SERVERS", value_delimiter = ',')]
    pub dns_servers: Vec<SocketAddr>,

    /// Seconds between scans.
    #[arg(long = "scan-interval", env = "SCAN_INTERVAL_SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub scan_interval: Duration,

    /// Timeout of one probe, in seconds.
    #[arg(long = "probe-timeout", env = "PROBE_TIMEOUT_SECONDS", default_value = "1.0", value_parser = parse_seconds)]
    pub probe_timeout: Duration,

    /// Extra attempts after the first failure.
    #[arg(long, env = "MAX_RETRIES", default_value_t = 2)]
    pub max_retries: u32,

    /// Requests in flight per backend; 0 = no cap.
    #[arg(long, env = "MAX_CONCURRENT_PER_BACKEND", default_value_t = 1)]
    pub max_concurrent_per_backend: u32,

    /// Placement: `cache-aware` (prefix, session and model warmth, bounded by
    /// load) or `least-busy` (loaded model, fewest in flight, lowest port).
    #[arg(long, env = "ROUTING", value_enum, default_value_t = Routing::CacheAware)]
    pub routing: Routing,

    /// How long a request may wait for a free backend, in seconds.
    #[arg(long = "queue-timeout", env = "QUEUE_TIMEOUT_SECONDS", default_value = "3600", value_parser = parse_seconds)]
    pub queue_timeout: Duration,

    /// Waiting requests at most; past that, 503 at once.
    #[arg(long, env = "MAX_QUEUE", default_value_t = 100_000)]
    pub max_queue: usize,

    /// Request bytes held by waiting requests at most; past that, 503 at once.
    #[arg(long, env = "MAX_QUEUE_BYTES", default_value_t = 1 << 30)]
    pub max_queue_bytes: usize,

    /// Waiting requests of one tenant at most; past that, 503 for that tenant.
    #[arg(long, env = "MAX_QUEUE_PER_TENANT")]
    pub max_queue_per_tenant: Option<usize>,

    /// Tenant weights, `name=weight,...`; tenants not named weigh 1.
    #[arg(long, env = "TENANT_WEIGHTS", default_value = "", value_parser = tenancy::parse_weights)]
    pub tenant_weights: TenantMap<f64>,

    /// Default priority of tenants, `name=interactive|batch,...`; others: interactive.
    #[arg(long, env = "TENANT_PRIORITIES", default_value = "", value_parser = tenancy::parse_priorities)]
    pub tenant_priorities: TenantMap<Priority>,

    /// Percent of freed slots batch requests keep while they wait (0-100).
    #[arg(long, env = "BATCH_FLOOR_PERCENT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub batch_floor_percent: u32,

    /// TCP connect timeout to a backend, in seconds.
    #[arg(long = "backend-connect-timeout", env = "BACKEND_CONNECT_TIMEOUT_SECONDS", default_value = "2.0", value_parser = parse_seconds)]
    pub backend_connect_timeout: Duration,

    /// Longest silence from a backend while a response is awaited, in seconds.
    #[arg(long = "backend-read-timeout", env = "BACKEND_READ_TIMEOUT_SECONDS", default_value = "600.0", value_parser = parse_seconds)]
    pub backend_read_timeout: Duration,

    /// Refuse `"stream": true` with 400 and default a missing `stream` to false.
    #[arg(long, env = "REJECT_STREAMING", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub reject_streaming: bool,

    /// Larger request bodies get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 100 << 20)]
    pub max_body_bytes: usize,

    /// Client keys, comma-separated, each `name:key` or a bare key; when set,
    /// requests need `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "PROXY_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Key for the POST actions under /__proxy/; when empty they are loopback-only.
    #[arg(
        long,
        env = "PROXY_ADMIN_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_key: String,

    /// Bearer key for backend self-registration (`POST /__proxy/backends`); PROXY_ADMIN_KEY also works.
    #[arg(
        long,
        env = "REGISTRATION_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub registration_key: String,

    /// Seconds that in-flight requests get to finish after SIGTERM or SIGINT.
    #[arg(long = "shutdown-grace", env = "SHUTDOWN_GRACE_SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// Longest time a client may take to send its request headers, in seconds.
    #[arg(long = "client-header-timeout", env = "CLIENT_HEADER_TIMEOUT_SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub client_header_timeout: Duration,

    /// `redis://host:port/db`: several instances share slots through Redis.
    #[arg(long = "shared-state", env = "SHARED_STATE", value_parser = parse_shared_state)]
    pub shared_state: Option<String>,
}

/// A SHARED_STATE URL: checked for form here, connected later.
fn parse_shared_state(s: &str) -> Result<String, String> {
    redis::Client::open(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("SHARED_STATE must be redis://host:port/db: {e}"))
}

impl ServeArgs {
    /// Cross-field checks that clap cannot express; the message is for the user.
    pub fn validate(&self) -> Result<(), String> {
        if self.backend_port_start > self.backend_port_end {
            return Err(format!(
                "BACKEND_PORT_START ({}) is greater than BACKEND_PORT_END ({})",
                self.backend_port_start, self.backend_port_end
            ));
        }
        if self.scan_interval.is_zero() {
            return Err("SCAN_INTERVAL_SECONDS must be greater than 0".into());
        }
        if self.probe_timeout.is_zero() {
            return Err("PROBE_TIMEOUT_SECONDS must be greater than 0".into());
        }
        // An empty key (from `PROXY_API_KEYS=a,,b`) would let anyone in with `Bearer `.
        if tenancy::api_keys(&self.api_keys)
            .iter()
            .any(|k| k.key.is_empty())
        {
            return Err("PROXY_API_KEYS contains an empty key".into());
        }
        Ok(())
    }

    /// The settings as an empty command line gives them (environment included),
    /// for tests and the demo to adjust.
    pub fn defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Only::try_parse_from(["corral"])
            .expect("every serve setting has a default")
            .serve
    }
}

/// Settings of `corral sim`.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Address the simulated servers listen on.
    #[arg(long, env = "SIM_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port of the first simulated server; the others follow consecutively.
    #[arg(long, env = "SIM_PORT_START", default_value_t = 24000)]
    pub port_start: u16,

    /// How many simulated servers to run.
    #[arg(long, env = "SIM_COUNT", default_value_t = 1)]
    pub count: u16,

    /// A TOML fleet file describing each server; flags give the defaults.
    #[arg(long, env = "SIM_FLEET")]
    pub fleet: Option<PathBuf>,

    /// Models every server has, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "llama3.2,all-minilm")]
    pub models: Vec<String>,

    /// Models loaded at start, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub loaded: Vec<String>,

    /// Concurrent requests per loaded model (like OLLAMA_NUM_PARALLEL).
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,

    /// Requests waiting for a model load at most (like OLLAMA_MAX_QUEUE).
    #[arg(long, default_value_t = 512)]
    pub max_queue: usize,

    /// Seconds to load a model that is not loaded.
    #[arg(long, default_value = "0", value_parser = parse_seconds)]
    pub load_time: Duration,

    /// Models in memory at most (like OLLAMA_MAX_LOADED_MODELS); 0 = no limit.
    #[arg(long, default_value_t = 0)]
    pub max_loaded: usize,

    /// Prompt tokens evaluated per second (the part not in the prompt cache); 0 = at once.
    #[arg(long, default_value_t = 2000.0)]
    pub prompt_speed: f64,

    /// Size in tokens of the host-memory cache of earlier prompts.
    #[arg(long, default_value_t = 65_536)]
    pub prompt_cache: usize,

    /// Tokens generated per second; 0 answers at once.
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_second: f64,

    /// Tokens in an answer unless `num_predict` asks otherwise.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,

    /// Seed of the deterministic output.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Fraction of requests answered with 500.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,

    /// Seconds after which a server dies (its listener and connections close).
    #[arg(long, value_parser = parse_seconds)]
    pub lifetime: Option<Duration>,

    /// Seconds before a server starts listening.
    #[arg(long, value_parser = parse_seconds)]
    pub start_delay: Option<Duration>,

    /// Fraction of requests answered with 503 server busy.
    #[arg(long, default_value_t = 0.0)]
    pub busy_rate: f64,

    /// Fraction of requests whose connection is reset after the first tokens.
    #[arg(long, default_value_t = 0.0)]
    pub reset_rate: f64,

    /// Fraction of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,

    /// Fraction of requests answered 200 with a body that is not JSON.
    #[arg(long, default_value_t = 0.0)]
    pub garbage_rate: f64,

    /// Fraction of streams ending in an `{"error"}` line after some tokens.
    #[arg(long, default_value_t = 0.0)]
    pub mid_stream_error_rate: f64,

    /// Seconds an idle model stays loaded (like OLLAMA_KEEP_ALIVE); negative = forever.
    #[arg(long, default_value_t = 300.0, allow_negative_numbers = true)]
    pub keep_alive: f64,

    /// Length of embedding vectors.
    #[arg(long, default_value_t = 16)]
    pub embedding_dim: usize,

    /// Accept any Host header (no 403 for non-local hosts).
    #[arg(long)]
    pub no_host_check: bool,

    /// What `/api/version` reports.
    #[arg(long, env = "SIM_OLLAMA_VERSION", default_value = "0.33.0-rc2")]
    pub ollama_version: String,

    /// Cloud stubs listed by `/api/tags` (`gpt-oss:120b-cloud`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub cloud_models: Vec<String>,

    /// Access to ollama.com: signed-in, signed-out, disabled, rate-limited.
    #[arg(long, default_value = "signed-in", value_parser = ["signed-in", "signed-out", "disabled", "rate-limited"])]
    pub cloud: String,
}

/// Settings of `corral demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Port of the proxy.
    #[arg(long, env = "PROXY_PORT", default_value_t = 11434)]
    pub port: u16,

    /// Simulated backends to start.
    #[arg(long, default_value_t = 4)]
    pub backends: u16,

    /// Port of the first simulated backend.
    #[arg(long, default_value_t = 24000)]
    pub backend_port_start: u16,

    /// No traffic and no jobs coming and going: a fleet that stands still.
    #[arg(long)]
    pub quiet: bool,
}

/// Settings of `corral register`.
#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// The corral to register with, `http://proxyhost:11434`.
    #[arg(long, env = "CORRAL_PROXY", value_parser = parse_backend_url)]
    pub proxy: http::Uri,

    /// This backend's URL as the proxy reaches it, `http://$(hostname):PORT`.
    #[arg(long, env = "CORRAL_BACKEND_URL", value_parser = parse_backend_url)]
    pub url: http::Uri,

    /// Lease in seconds; renewed three times a lease while the local Ollama answers.
    #[arg(long, env = "CORRAL_LEASE_SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub lease: Duration,

    /// Where to check that the local Ollama answers (default: --url).
    #[arg(long, env = "CORRAL_CHECK_URL", value_parser = parse_backend_url)]
    pub check: Option<http::Uri>,

    /// Seconds that in-flight requests get to finish after SIGTERM before deregistering.
    #[arg(long, env = "CORRAL_GRACE_SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub grace: Duration,

    /// Bearer key: the proxy's REGISTRATION_KEY (or PROXY_ADMIN_KEY).
    #[arg(
        long,
        env = "REGISTRATION_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub key: String,
}

impl RegisterArgs {
    /// Where the local Ollama is checked.
    pub fn check_url(&self) -> String {
        self.check.as_ref().unwrap_or(&self.url).to_string()
    }
}

/// Parses seconds as Python's float() would accept them ("5", "1.5") into a Duration.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| {
        format!("'{s}' is not a valid number of seconds (must be finite and not negative)")
    })
}

/// Where a `BACKENDS` entry finds its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSource {
    /// One backend at this base URL.
    Url(http::Uri),
    /// `dns+http://name:port`: every A/AAAA address of `name`, at `port`.
    Dns {
        /// The name to resolve.
        host: String,
        /// The port of every address (11434 when not given).
        port: u16,
    },
    /// `dnssrv+http://_ollama._tcp.name`: every target and port of the SRV records.
    Srv {
        /// The SRV name.
        name: String,
    },
}

impl std::fmt::Display for BackendSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(u) => write!(f, "{u}"),
            Self::Dns { host, port } => write!(f, "dns+http://{host}:{port}"),
            Self::Srv { name } => write!(f, "dnssrv+http://{name}"),
        }
    }
}

/// Ollama's port, for `dns+` entries that name none.
const OLLAMA_PORT: u16 = 11434;

/// Parses one `BACKENDS` entry.
pub fn parse_backend_source(s: &str) -> Result<BackendSource, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("dns+") {
        let uri = parse_backend_url(rest)?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!("'{s}': a dns+ entry takes no path"));
        }
        let host = uri.host().unwrap_or_default().to_owned();
        return Ok(BackendSource::Dns {
            host,
            port: uri.port_u16().unwrap_or(OLLAMA_PORT),
        });
    }
    if let Some(rest) = s.strip_prefix("dnssrv+") {
        let uri = parse_backend_url(rest)?;
        if uri.port().is_some() || (uri.path() != "/" && !uri.path().is_empty()) {
            return Err(format!(
                "'{s}': a dnssrv+ entry is a name only (the SRV records give the ports)"
            ));
        }
        return Ok(BackendSource::Srv {
            name: uri.host().unwrap_or_default().to_owned(),
        });
    }
    parse_backend_url(s).map(BackendSource::Url)
}

/// Accepts `http://host:port` (a path prefix is kept); refuses anything else.
pub fn parse_backend_url(s: &str) -> Result<http::Uri, String> {
    let s = s.trim();
    let uri: http::Uri = s.parse().map_err(|e| format!("'{s}' is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(uri),
        (Some(other), _) if other != "http" => Err(format!(
            "'{s}': only http:// backends are supported (put TLS in front of corral, not behind it)"
        )),
        _ => Err(format!("'{s}' is not an absolute http:// URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("corral").chain(args.iter().copied()))
    }

    #[test]
    fn plain_corral_is_serve_with_the_documented_defaults() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        let s = cli.serve;
        assert_eq!(s.proxy_port, 11434);
        assert_eq!((s.backend_port_start, s.backend_port_end), (24000, 24100));
        assert_eq!(s.scan_interval, Duration::from_secs(5));
        assert_eq!(s.probe_timeout, Duration::from_secs(1));
        assert_eq!(s.max_retries, 2);
        assert_eq!(s.max_concurrent_per_backend, 1);
        assert_eq!(s.max_queue, 100_000);
        assert_eq!(s.max_body_bytes, 104_857_600);
        assert!(!s.reject_streaming);
    }

    #[test]
    fn seconds_accept_fractions_and_refuse_negatives() {
        assert_eq!(parse_seconds("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("inf").is_err());
    }

    #[test]
    fn backend_urls_must_be_http() {
        let cli = parse(&["--backends", "http://gpu7:11434,http://10.0.0.2:11434"]).unwrap();
        assert_eq!(cli.serve.backends.len(), 2);
        assert!(parse(&["--backends", "https://gpu7:11434"]).is_err());
        assert!(parse(&["--backends", "gpu7:11434"]).is_err());
    }

    #[test]
    fn dns_entries_name_a_host_and_port_or_an_srv_name() {
        let cli = parse(&[
            "--backends",
            "dns+http://ollama.svc:8080,dns+http://gpus,dnssrv+http://_ollama._tcp.gpus.example",
            "--dns-servers",
            "127.0.0.1:5353,[::1]:53",
        ])
        .unwrap();
        assert_eq!(
            cli.serve.backends,
            vec![
                BackendSource::Dns {
                    host: "ollama.svc".into(),
                    port: 8080
                },
                BackendSource::Dns {
                    host: "gpus".into(),
                    port: 11434
                },
                BackendSource::Srv {
                    name: "_ollama._tcp.gpus.example".into()
                },
            ]
        );
        assert_eq!(cli.serve.dns_servers.len(), 2);
        assert!(parse(&["--backends", "dnssrv+http://_ollama._tcp.x:80"]).is_err());
        assert!(parse(&["--backends", "dns+https://x:80"]).is_err());
        assert!(parse(&["--backends", "dns+http://x:80/ollama"]).is_err());
        assert!(parse(&["--dns-servers", "localhost"]).is_err());
    }

    #[test]
    fn reversed_port_range_fails_validation() {
        let cli = parse(&[
            "--backend-port-start",
            "24100",
            "--backend-port-end",
            "24000",
        ])
        .unwrap();
        assert!(
            cli.serve
                .validate()
                .unwrap_err()
                .contains("BACKEND_PORT_START")
        );
    }

    #[test]
    fn reject_streaming_reads_true_and_false_words() {
        assert!(
            parse(&["--reject-streaming", "true"])
                .unwrap()
                .serve
                .reject_streaming
        );
        assert!(
            !parse(&["--reject-streaming", "0"])
                .unwrap()
                .serve
                .reject_streaming
        );
    }

    #[test]
    fn subcommands_parse() {
        assert!(
            matches!(parse(&["sim", "--count", "3"]).unwrap().command, Some(Command::Sim(a)) if a.count == 3)
        );
        assert!(matches!(
            parse(&["demo"]).unwrap().command,
            Some(Command::Demo(_))
        ));
        assert!(
            matches!(parse(&["serve", "--port", "1"]).unwrap().command, Some(Command::Serve(a)) if a.proxy_port == 1)
        );
        let register = parse(&[
            "register",
            "--proxy",
            "http://proxyhost:11434",
            "--url",
            "http://node7:11500",
        ])
        .unwrap();
        assert!(
            matches!(register.command, Some(Command::Register(a)) if a.lease == Duration::from_secs(30) && a.check_url() == "http://node7:11500/")
        );
        assert!(
            parse(&["register", "--proxy", "http://p:1"]).is_err(),
            "--url is needed"
        );
    }
}
