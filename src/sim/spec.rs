//! What a simulated server is: its models, limits, timing and faults, and the
//! TOML fleet file that describes many of them. Plain data; imports nothing
//! from the rest of the crate.
//!
//! # Fleet file
//!
//! Top-level keys are the defaults of every server; each `[[server]]` table
//! overrides them for `count` servers (default 1) on the next ports. Without
//! any `[[server]]` table the file describes `count` identical servers.
//! Durations are seconds (`1.5`) or Go-style strings (`"500ms"`, `"5m"`).
//! Models are names (`"llama3.2"`) or tables
//! (`{ name = "nomic-embed-text", embedding_only = true }`).
//!
//! ```toml
//! parallel = 2
//! token_interval = "20ms"
//! models = ["llama3.2", "all-minilm"]
//!
//! [[server]]
//! count = 2
//!
//! [[server]]
//! models = ["qwen3:8b"]
//! load_time = 2.0
//! [server.faults]
//! error_rate = 0.1
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// One simulated Ollama server.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSpec {
    /// Models the server has (listed by `/api/tags`).
    pub models: Vec<ModelSpec>,
    /// Models loaded at start.
    pub loaded: Vec<String>,
    /// Concurrent requests per loaded model, like `OLLAMA_NUM_PARALLEL`
    /// (embedding-only models always get 1, as in Ollama).
    pub parallel: usize,
    /// Requests waiting for a model load at most, like `OLLAMA_MAX_QUEUE`.
    pub max_queue: usize,
    /// Time to load a model that is not loaded (a model's own `load_time`
    /// overrides it).
    #[serde(deserialize_with = "de_duration")]
    pub load_time: Duration,
    /// Models in memory at most, like `OLLAMA_MAX_LOADED_MODELS`; 0 = no limit.
    pub max_loaded: usize,
    /// Prompt tokens evaluated per second before the first output token;
    /// 0 = at once.
    pub prompt_speed: f64,
    /// Size in tokens of the host-memory cache of earlier prompts.
    pub prompt_cache: usize,
    /// Default keep-alive, like `OLLAMA_KEEP_ALIVE`; `None` keeps models forever.
    #[serde(deserialize_with = "de_keep_alive")]
    pub keep_alive: Option<Duration>,
    /// Time per generated token; zero answers at once.
    #[serde(deserialize_with = "de_duration")]
    pub token_interval: Duration,
    /// Answer length in tokens unless `num_predict` / `max_tokens` says otherwise.
    pub tokens: usize,
    /// Length of the embedding vectors.
    pub embedding_dim: usize,
    /// Seed of the deterministic output.
    pub seed: u64,
    /// What `/api/version` reports.
    pub version: String,
    /// Answer 403 with an empty body when the `Host` header is not local
    /// (only while listening on a loopback address, as Ollama does).
    pub check_host: bool,
    /// Injected faults.
    pub faults: FaultSpec,
    /// Cloud stubs `/api/tags` lists (`gpt-oss:120b-cloud`), with `remote_host`.
    pub cloud_models: Vec<String>,
    /// What the server answers for cloud models.
    pub cloud: CloudAccess,
}

/// A server's access to ollama.com.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CloudAccess {
    /// Signed in: cloud models answer (without a local slot).
    #[default]
    SignedIn,
    /// Not signed in: 401 `unauthorized` with a `signin_url`.
    SignedOut,
    /// `OLLAMA_NO_CLOUD` or `disable_ollama_cloud`: 403.
    Disabled,
    /// ollama.com answers 429.
    RateLimited,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            models: vec![ModelSpec::named("llama3.2"), ModelSpec::named("all-minilm")],
            loaded: Vec::new(),
            parallel: 1,
            max_queue: 512,
            load_time: Duration::ZERO,
            max_loaded: 0,
            prompt_speed: 2000.0,
            prompt_cache: 65_536,
            keep_alive: Some(Duration::from_secs(300)),
            token_interval: Duration::ZERO,
            tokens: 16,
            embedding_dim: 16,
            seed: 0,
            version: "0.33.0-rc2".into(),
            check_host: true,
            faults: FaultSpec::default(),
            cloud_models: Vec::new(),
            cloud: CloudAccess::default(),
        }
    }
}

/// One model of a simulated server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelSpec {
    /// Name as stored (`llama3.2`, `user/model:q4`); matched per Ollama's rules.
    pub name: String,
    /// Embedding-only: generate and chat answer 400 "does not support".
    pub embedding_only: bool,
    /// `details.family`.
    pub family: String,
    /// `details.parameter_size`, e.g. `3.2B`.
    pub parameter_size: String,
    /// `details.quantization_level`, e.g. `Q4_K_M`.
    pub quantization: String,
    /// Bytes on disk and in memory.
    pub size: u64,
    /// Context length reported by `/api/show`, and by `/api/ps` for a
    /// runner loaded without `num_ctx`.
    pub context_length: u64,
    /// Time to load this model; `None` = the server's `load_time`.
    pub load_time: Option<Duration>,
}

impl ModelSpec {
    /// A model with plausible details; names containing `embed`, `minilm` or
    /// `bge` are embedding-only.
    pub fn named(name: &str) -> ModelSpec {
        let lower = name.to_ascii_lowercase();
        let embedding_only = ["embed", "minilm", "bge"].iter().any(|k| lower.contains(k));
        let (family, parameter_size, quantization, size, context_length) = if embedding_only {
            ("bert", "23M", "F16", 45_960_996, 512)
        } else {
            ("llama", "3.2B", "Q4_K_M", 2_019_393_189, 4096)
        };
        ModelSpec {
            name: name.into(),
            embedding_only,
            family: family.into(),
            parameter_size: parameter_size.into(),
            quantization: quantization.into(),
            size,
            context_length,
            load_time: None,
        }
    }
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            name: String,
            embedding_only: Option<bool>,
            family: Option<String>,
            parameter_size: Option<String>,
            quantization: Option<String>,
            size: Option<u64>,
            context_length: Option<u64>,
            #[serde(default, deserialize_with = "de_opt_duration")]
            load_time: Option<Duration>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Name(String),
            Table(Table),
        }
        Ok(match Either::deserialize(d)? {
            Either::Name(n) => ModelSpec::named(&n),
            Either::Table(t) => {
                let mut m = ModelSpec::named(&t.name);
                if let Some(e) = t.embedding_only {
                    m = ModelSpec {
                        name: t.name.clone(),
                        ..ModelSpec::named(if e { "embed" } else { "llm" })
                    };
                }
                m.family = t.family.unwrap_or(m.family);
                m.parameter_size = t.parameter_size.unwrap_or(m.parameter_size);
                m.quantization = t.quantization.unwrap_or(m.quantization);
                m.size = t.size.unwrap_or(m.size);
                m.context_length = t.context_length.unwrap_or(m.context_length);
                m.load_time = t.load_time;
                m
            }
        })
    }
}

/// Injected faults. Rates are fractions of inference requests (0.0..=1.0),
/// spread evenly: request `n` (from 0) faults when
/// `floor((n+1)*rate) > floor(n*rate)`, so 0.25 hits requests 3, 7, 11, ….
/// When several rates pick the same request, the first kind in field order wins.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSpec {
    /// 500 `{"error": …}` before any byte.
    pub error_rate: f64,
    /// 503 `server busy, please try again.  maximum pending requests exceeded`.
    pub busy_rate: f64,
    /// The first token(s) are sent, then the connection is reset.
    pub reset_rate: f64,
    /// No answer at all until the client goes away.
    pub hang_rate: f64,
    /// 200 with a body that is not JSON.
    pub garbage_rate: f64,
    /// Some tokens, then an `{"error": …}` line, then a clean end.
    pub mid_stream_error_rate: f64,
    /// The server dies (listener and connections closed) this long after start.
    #[serde(deserialize_with = "de_opt_duration")]
    pub lifetime: Option<Duration>,
    /// The server refuses connections for this long after start.
    #[serde(deserialize_with = "de_opt_duration")]
    pub start_delay: Option<Duration>,
}

/// Many simulated servers, on consecutive ports.
#[derive(Clone, Debug, Default)]
pub struct FleetSpec {
    /// One entry per server, in port order.
    pub servers: Vec<ServerSpec>,
}

impl FleetSpec {
    /// Parses a fleet file (see the module doc) over `defaults`.
    pub fn from_toml(text: &str, defaults: &ServerSpec) -> Result<FleetSpec, String> {
        let mut top: toml::Table = text.parse().map_err(|e| format!("fleet file: {e}"))?;
        let servers = match top.remove("server") {
            None => None,
            Some(toml::Value::Array(a)) => Some(a),
            Some(_) => return Err("fleet file: `server` must be an array of tables".into()),
        };
        let top_count = take_count(&mut top)?;
        let base = overlay(defaults, &top)?;
        let mut out = Vec::new();
        match servers {
            None => out.extend(std::iter::repeat_n(base, top_count)),
            Some(tables) => {
                for t in tables {
                    let toml::Value::Table(mut t) = t else {
                        return Err("fleet file: each [[server]] must be a table".into());
                    };
                    let n = take_count(&mut t)?;
                    let spec = overlay(&base, &t)?;
                    out.extend(std::iter::repeat_n(spec, n));
                }
            }
        }
        Ok(FleetSpec { servers: out })
    }
}

fn take_count(t: &mut toml::Table) -> Result<usize, String> {
    match t.remove("count") {
        None => Ok(1),
        Some(toml::Value::Integer(n)) if n >= 0 => Ok(n as usize),
        Some(v) => Err(format!("fleet file: bad count {v}")),
    }
}

/// `base` with the keys of `table` replacing its fields (`faults` key by key).
fn overlay(base: &ServerSpec, table: &toml::Table) -> Result<ServerSpec, String> {
    let mut spec = base.clone();
    for (key, value) in table {
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        let wrap = |e: toml::de::Error| format!("fleet file: `{key}`: {}", e.message());
        if key == "faults" {
            let toml::Value::Table(ft) = value else {
                return Err("fleet file: `faults` must be a table".into());
            };
            for (fk, fv) in ft {
                let mut f = toml::Table::new();
                f.insert(fk.clone(), fv.clone());
                let partial: FaultSpec = f.try_into().map_err(wrap)?;
                merge_fault(&mut spec.faults, fk, partial);
            }
            continue;
        }
        let partial: ServerSpec = one.try_into().map_err(wrap)?;
        match key.as_str() {
            "models" => spec.models = partial.models,
            "loaded" => spec.loaded = partial.loaded,
            "parallel" => spec.parallel = partial.parallel,
            "max_queue" => spec.max_queue = partial.max_queue,
            "load_time" => spec.load_time = partial.load_time,
            "max_loaded" => spec.max_loaded = partial.max_loaded,
            "prompt_speed" => spec.prompt_speed = partial.prompt_speed,
            "prompt_cache" => spec.prompt_cache = partial.prompt_cache,
            "keep_alive" => spec.keep_alive = partial.keep_alive,
            "token_interval" => spec.token_interval = partial.token_interval,
            "tokens" => spec.tokens = partial.tokens,
            "embedding_dim" => spec.embedding_dim = partial.embedding_dim,
            "seed" => spec.seed = partial.seed,
            "version" => spec.version = partial.version,
            "check_host" => spec.check_host = partial.check_host,
            _ => unreachable!("deny_unknown_fields refused `{key}`"),
        }
    }
    Ok(spec)
}

fn merge_fault(into: &mut FaultSpec, key: &str, p: FaultSpec) {
    match key {
        "error_rate" => into.error_rate = p.error_rate,
        "busy_rate" => into.busy_rate = p.busy_rate,
        "reset_rate" => into.reset_rate = p.reset_rate,
        "hang_rate" => into.hang_rate = p.hang_rate,
        "garbage_rate" => into.garbage_rate = p.garbage_rate,
        "mid_stream_error_rate" => into.mid_stream_error_rate = p.mid_stream_error_rate,
        "lifetime" => into.lifetime = p.lifetime,
        "start_delay" => into.start_delay = p.start_delay,
        _ => {}
    }
}

/// Parses a Go duration string (`"300ms"`, `"1h30m"`, `"-1m"`, `"0"`) into
/// signed seconds.
pub fn parse_go_duration(s: &str) -> Option<f64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += value * scale;
    }
    Some(if neg { -total } else { total })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(f64),
    Text(String),
}

fn raw_to_secs<E: serde::de::Error>(raw: RawDuration) -> Result<f64, E> {
    match raw {
        RawDuration::Seconds(s) => Ok(s),
        RawDuration::Text(t) => parse_go_duration(&t)
            .ok_or_else(|| E::custom(format!("`{t}` is not a duration like \"1.5s\" or \"5m\""))),
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let secs = raw_to_secs(RawDuration::deserialize(d)?)?;
    Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_keep_alive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let secs = raw_to_secs(RawDuration::deserialize(d)?)?;
    Ok(if secs < 0.0 {
        None
    } else {
        Some(Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("10m"), Some(600.0));
        assert_eq!(parse_go_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_go_duration("-1m"), Some(-60.0));
        assert_eq!(parse_go_duration("0"), Some(0.0));
        assert_eq!(parse_go_duration("300"), None);
    }

    #[test]
    fn fleet_file_overrides_top_level_defaults_per_server() {
        let text = r#"
            parallel = 2
            token_interval = "20ms"
            [[server]]
            count = 2
            [[server]]
            models = ["qwen3:8b", { name = "nomic-embed-text", embedding_only = true }]
            load_time = 1.5
            [server.faults]
            error_rate = 0.1
        "#;
        let fleet = FleetSpec::from_toml(text, &ServerSpec::default()).unwrap();
        assert_eq!(fleet.servers.len(), 3);
        assert_eq!(fleet.servers[0].parallel, 2);
        assert_eq!(fleet.servers[0].token_interval, Duration::from_millis(20));
        assert_eq!(fleet.servers[2].models[0].name, "qwen3:8b");
        assert!(fleet.servers[2].models[1].embedding_only);
        assert_eq!(fleet.servers[2].load_time, Duration::from_millis(1500));
        assert_eq!(fleet.servers[2].faults.error_rate, 0.1);
        assert_eq!(fleet.servers[2].parallel, 2);
    }

    #[test]
    fn example_fleet_file_parses() {
        let text = include_str!("../../examples/fleet.toml");
        let fleet = FleetSpec::from_toml(text, &ServerSpec::default()).unwrap();
        assert_eq!(fleet.servers.len(), 5);
        assert_eq!(
            fleet.servers[4].faults.start_delay,
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn fleet_file_refuses_unknown_keys() {
        assert!(FleetSpec::from_toml("paralel = 2", &ServerSpec::default()).is_err());
    }
}
