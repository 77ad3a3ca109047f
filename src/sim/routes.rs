//! The router of a simulated server, the counting and Host-check
//! middleware, and the endpoints that need no slot: `/`, version, tags, ps,
//! show, `/v1/models`, model management and `/__sim/stats`.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::completion::Api;
use super::generate::local_rfc3339;
use super::inference::{answer, embed};
use super::name::Name;
use super::reply::{self, Shape, native_json, text, v1_json};
use super::spec::ModelSpec;
use super::state::{Kind, ServerState, SharedState};
use super::{audio, cloud, messages, responses};

/// Every route of a simulated Ollama server.
pub(crate) fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/generate", answer(Api::Generate))
        .route("/api/chat", answer(Api::Chat))
        .route("/api/embed", embed(Kind::Embed, Shape::Native))
        .route("/api/embeddings", embed(Kind::Embeddings, Shape::Native))
        .route("/api/pull", post(progress))
        .route("/api/push", post(progress))
        .route("/api/create", post(progress))
        .route("/api/copy", post(empty_ok))
        .route("/api/delete", axum::routing::delete(empty_ok))
        .route("/v1/chat/completions", answer(Api::V1Chat))
        .route("/v1/completions", answer(Api::V1Completions))
        .route("/v1/embeddings", embed(Kind::Embed, Shape::OpenAi))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/audio/transcriptions", post(audio::transcriptions))
        .route("/v1/audio/speech", post(audio::speech))
        .route("/api/status", get(cloud::status))
        .route("/v1/models", get(v1_models))
        .route("/v1/models/{model}", get(v1_model))
        .route("/__sim/stats", get(sim_stats))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "404 page not found") })
        .method_not_allowed_fallback(|| async {
            text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed")
        })
        .layer(middleware::from_fn_with_state(state.clone(), cloud::layer))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_and_check,
        ))
        .with_state(state)
}

async fn count_and_check(State(state): SharedState, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path != "/__sim/stats" {
        state.counters.request(path);
    }
    if state.check_host && !is_local_host(req.headers()) {
        return StatusCode::FORBIDDEN.into_response();
    }
    next.run(req).await
}

/// Host header allowed by Ollama's check: loopback or private IP,
/// `localhost`, `*.localhost`, `*.local`, `*.internal` (or no header).
fn is_local_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
            }
        };
    }
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || [".localhost", ".local", ".internal"]
            .iter()
            .any(|s| name.ends_with(s))
}

async fn root() -> Response {
    text(StatusCode::OK, "Ollama is running")
}

async fn version(State(state): SharedState) -> Response {
    native_json(StatusCode::OK, &json!({ "version": state.spec.version }))
}

async fn sim_stats(State(state): SharedState) -> Response {
    native_json(StatusCode::OK, &state.counters.snapshot())
}

/// Fixed per-model facts derived from the name.
fn digest(name: &str) -> String {
    (0..4u8)
        .map(|i| {
            let mut h = DefaultHasher::new();
            (i, name).hash(&mut h);
            format!("{:016x}", h.finish())
        })
        .collect()
}

fn modified_at(index: usize) -> String {
    let base = chrono::DateTime::parse_from_rfc3339("2025-05-04T17:37:44.706015396Z")
        .expect("constant timestamp");
    let t = base - chrono::Duration::hours(index as i64);
    t.with_timezone(&chrono::Local)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn details(m: &ModelSpec) -> Value {
    json!({
        "parent_model": "", "format": "gguf", "family": m.family, "families": [m.family],
        "parameter_size": m.parameter_size, "quantization_level": m.quantization,
    })
}

fn capabilities(m: &ModelSpec) -> Value {
    if m.embedding_only {
        json!(["embedding"])
    } else {
        json!(["completion", "tools"])
    }
}

async fn tags(State(state): SharedState) -> Response {
    let models: Vec<Value> = state
        .spec
        .models
        .iter()
        .zip(&state.names)
        .enumerate()
        .map(|(i, (m, n))| {
            let display = n.display();
            let mut d = details(m);
            d["context_length"] = json!(m.context_length);
            json!({
                "name": display, "model": display, "modified_at": modified_at(i),
                "size": m.size, "digest": digest(&n.key()), "details": d,
                "capabilities": capabilities(m),
            })
        })
        .chain(cloud::tag_entries(&state))
        .collect();
    native_json(StatusCode::OK, &json!({ "models": models }))
}

async fn ps(State(state): SharedState) -> Response {
    let models: Vec<Value> = state
        .sched
        .loaded()
        .into_iter()
        .map(|l| {
            let (m, n) = (state.model(l.index), &state.names[l.index]);
            let offset = match l.remaining {
                Some(r) => chrono::Duration::from_std(r).unwrap_or_default(),
                None => chrono::Duration::days(292 * 365),
            };
            json!({
                "name": n.display(), "model": n.display(), "size": m.size,
                "digest": digest(&n.key()), "details": details(m),
                "expires_at": local_rfc3339(offset), "size_vram": m.size,
                "context_length": l.context_length,
            })
        })
        .collect();
    native_json(StatusCode::OK, &json!({ "models": models }))
}

#[derive(Deserialize)]
struct NameReq {
    model: Option<String>,
    name: Option<String>,
}

async fn show(State(state): SharedState, body: Bytes) -> Response {
    let req: NameReq = match reply::parse(Shape::Native, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let raw = req.model.or(req.name).unwrap_or_default();
    if raw.is_empty() {
        return reply::error(Shape::Native, StatusCode::BAD_REQUEST, "model is required");
    }
    let Some(name) = Name::parse(&raw) else {
        return reply::error(Shape::Native, StatusCode::BAD_REQUEST, "invalid model name");
    };
    let Some(i) = state.find(&name) else {
        let msg = format!("model '{}' not found", name.display());
        return reply::error(Shape::Native, StatusCode::NOT_FOUND, &msg);
    };
    let m = state.model(i);
    let arch = if m.embedding_only { "bert" } else { "llama" };
    native_json(
        StatusCode::OK,
        &json!({
            "license": "simulated", "modelfile": format!("# Modelfile generated by corral sim\nFROM {raw}\n"),
            "parameters": "stop \"<|eot_id|>\"", "template": "{{ .Prompt }}",
            "details": details(m),
            "model_info": {
                "general.architecture": arch, "general.parameter_count": m.size / 2,
                format!("{arch}.context_length"): m.context_length,
                format!("{arch}.embedding_length"): state.spec.embedding_dim,
            },
            "capabilities": capabilities(m), "modified_at": modified_at(i),
        }),
    )
}

async fn progress(body: Bytes) -> Response {
    #[derive(Deserialize)]
    struct Progress {
        stream: Option<bool>,
    }
    let req: Progress = match reply::parse(Shape::Native, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if req.stream == Some(false) {
        return native_json(StatusCode::OK, &json!({ "status": "success" }));
    }
    reply::stream(
        "application/x-ndjson",
        Body::from("{\"status\":\"pulling manifest\"}\n{\"status\":\"success\"}\n"),
    )
}

async fn empty_ok() -> StatusCode {
    StatusCode::OK
}

fn v1_entry(state: &ServerState, i: usize, id: String) -> Value {
    let created = chrono::DateTime::parse_from_rfc3339(&modified_at(i))
        .map(|t| t.timestamp())
        .unwrap_or_default();
    json!({ "id": id, "object": "model", "created": created,
            "owned_by": state.names[i].namespace() })
}

async fn v1_models(State(state): SharedState) -> Response {
    let data: Vec<Value> = (0..state.names.len())
        .map(|i| v1_entry(&state, i, state.names[i].display()))
        .collect();
    // No models: `data` is null, as Ollama's nil slice is.
    let data = (!data.is_empty()).then_some(data);
    v1_json(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

async fn v1_model(State(state): SharedState, Path(model): Path<String>) -> Response {
    match Name::parse(&model).and_then(|n| state.find(&n)) {
        Some(i) => v1_json(StatusCode::OK, &v1_entry(&state, i, model)),
        None => reply::error(
            Shape::OpenAi,
            StatusCode::NOT_FOUND,
            &format!("model '{model}' not found"),
        ),
    }
}
