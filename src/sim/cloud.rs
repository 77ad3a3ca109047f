//! Cloud models and the request-body layer of a simulated server
//! (OLLAMA_API_ADDENDUM.md §3): the `:cloud` / `-cloud` / `:local` name rules
//! with their conflict error, the server's cloud access (signed in, signed
//! out, disabled, rate limited) and its errors, `GET /api/status`, the cloud
//! stubs of `/api/tags`, zstd request bodies on `/v1/*`, and native
//! `/api/chat`, `/api/generate` and `/v1/chat/completions` answers for cloud
//! names, which ollama.com gives without a local slot. `/v1/messages` and
//! `/v1/responses` answer cloud names themselves, also without a slot;
//! `/v1/completions` and the embedding routes have no cloud answer here
//! (their handlers answer 404 for the name).

use std::io::Read;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::completion::{Api, v1_delta, v1_head, v1_usage};
use super::generate::{Metrics, NativeChunk, SSE_DONE, sse_event};
use super::generation::{Ask, Generation, Step};
use super::reply::{native_json, respond, v1_json};
use super::spec::CloudAccess;
use super::state::{ServerState, SharedState};

/// Where a model name says it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// No suffix: a local name.
    Unspecified,
    /// `:local`.
    Local,
    /// `:cloud` or a `-cloud` tag.
    Cloud,
}

/// Splits a raw model name into its base and source; `Err` is the 400
/// message of a conflicting pair.
pub(crate) fn parse(raw: &str) -> Result<(String, Source), String> {
    let name = raw.trim();
    let conflict = || format!("use either :local or :cloud, not both: {}", json!(raw));
    let explicit = |n: &str| -> Option<(String, Source)> {
        let (base, tag) = n.rsplit_once(':')?;
        if tag.contains('/') {
            return None;
        }
        let lower = tag.to_ascii_lowercase();
        if lower == "cloud" {
            Some((base.to_string(), Source::Cloud))
        } else if lower == "local" {
            Some((base.to_string(), Source::Local))
        } else if lower.ends_with("-cloud") {
            Some((format!("{base}:{}", &tag[..tag.len() - 6]), Source::Cloud))
        } else {
            None
        }
    };
    match explicit(name) {
        None => Ok((name.to_string(), Source::Unspecified)),
        Some((base, source)) => match explicit(&base) {
            Some((_, inner)) if inner != Source::Unspecified => Err(conflict()),
            _ => Ok((base, source)),
        },
    }
}

/// Whether the name asks for a cloud model (conflicts included: they are
/// answered by [`layer`]).
pub(crate) fn is_cloud(raw: &str) -> bool {
    !matches!(parse(raw), Ok((_, Source::Unspecified | Source::Local)))
}

/// The error this server gives a cloud request, if any.
pub(crate) fn refusal(state: &ServerState) -> Option<Response> {
    match state.spec.cloud {
        CloudAccess::SignedIn => None,
        CloudAccess::Disabled => Some(native_json(
            StatusCode::FORBIDDEN,
            &json!({"error": "ollama cloud is disabled: remote model is unavailable"}),
        )),
        CloudAccess::SignedOut => Some(native_json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "unauthorized", "signin_url": signin_url(state)}),
        )),
        // ollama.com's own answer, passed through; its text is not in the
        // source Ollama publishes, so this one is the simulator's.
        CloudAccess::RateLimited => Some(native_json(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": "rate limit exceeded: too many requests to ollama.com, try again later"}),
        )),
    }
}

fn signin_url(state: &ServerState) -> String {
    use base64::Engine;
    let key =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(state.spec.seed.to_be_bytes());
    format!("https://ollama.com/connect?name=corral-sim&key={key}")
}

/// `GET /api/status`.
pub(crate) async fn status(State(state): SharedState) -> Response {
    let disabled = state.spec.cloud == CloudAccess::Disabled;
    let source = if disabled { "config" } else { "none" };
    native_json(
        StatusCode::OK,
        &json!({"cloud": {"disabled": disabled, "source": source}}),
    )
}

/// The `/api/tags` entries of the server's cloud stubs.
pub(crate) fn tag_entries(state: &ServerState) -> Vec<Value> {
    state
        .spec
        .cloud_models
        .iter()
        .map(|name| {
            let base = parse(name).map(|(b, _)| b).unwrap_or_else(|_| name.clone());
            json!({
                "name": name, "model": name,
                "remote_model": base, "remote_host": "https://ollama.com:443",
                "modified_at": "2025-08-05T10:11:12.123456789Z", "size": 384,
                "digest": format!("{:064x}", name.len()),
                "details": {"parent_model": "", "format": "", "family": "", "families": null,
                            "parameter_size": "", "quantization_level": ""},
            })
        })
        .collect()
}

/// The routes that carry a model in a JSON body.
const MODEL_ROUTES: [&str; 9] = [
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
];

/// Bodies of model routes: zstd decoded on `/v1/*` (400 `failed to
/// decompress request body`), then cloud names checked: a conflict is 400,
/// a refused cloud request gets this server's cloud error, and native
/// chat/generate on a cloud name are answered here without a slot.
pub(crate) async fn layer(State(state): SharedState, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if req.method() != Method::POST || !MODEL_ROUTES.contains(&path.as_str()) {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let Ok(mut bytes) = axum::body::to_bytes(body, 256 << 20).await else {
        return bad_request("failed to read request body");
    };
    let zstd = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"zstd"));
    if zstd && path.starts_with("/v1/") {
        let mut out = Vec::new();
        let decoded = zstd::stream::read::Decoder::new(&bytes[..])
            .and_then(|d| d.take(20 << 20).read_to_end(&mut out));
        if decoded.is_err() {
            return bad_request("failed to decompress request body");
        }
        bytes = Bytes::from(out);
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    #[derive(Deserialize)]
    struct ModelField {
        model: Option<Value>,
    }
    // Only a body that mentions `cloud` (any case) can name a cloud model:
    // the others are not parsed twice.
    let mentions_cloud = bytes.windows(5).any(|w| w.eq_ignore_ascii_case(b"cloud"));
    let model = mentions_cloud
        .then(|| serde_json::from_slice::<ModelField>(&bytes).ok())
        .flatten()
        .and_then(|m| m.model)
        .and_then(|m| m.as_str().map(str::to_string));
    if let Some(model) = model.filter(|m| is_cloud(m)) {
        if let Err(msg) = parse(&model) {
            return bad_request(&msg);
        }
        if let Some(refused) = refusal(&state) {
            return refused;
        }
        let api = match path.as_str() {
            "/api/chat" => Some(Api::Chat),
            "/api/generate" => Some(Api::Generate),
            "/v1/chat/completions" => Some(Api::V1Chat),
            _ => None,
        };
        if let Some(api) = api {
            return answer(&state, &parts.headers, &bytes, &model, api).await;
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn bad_request(msg: &str) -> Response {
    native_json(StatusCode::BAD_REQUEST, &json!({ "error": msg }))
}

/// A chat, generate or `/v1/chat/completions` answer from "ollama.com": no
/// slot, no load, the whole body at once.
async fn answer(
    state: &ServerState,
    headers: &HeaderMap,
    body: &[u8],
    model: &str,
    api: Api,
) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or_default();
    let input = match api {
        Api::Generate => req["prompt"].as_str(),
        _ => req["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str()),
    };
    let input = input.unwrap_or_default();
    let limit = match api {
        Api::V1Chat => req["max_tokens"]
            .as_u64()
            .or(req["max_completion_tokens"].as_u64()),
        _ => req["options"]["num_predict"].as_u64(),
    };
    let ask = Ask {
        model,
        input,
        all_text: input,
        limit: limit.map(|n| n as usize),
        cloud: true,
    };
    let turn = match Generation::start(state, headers, ask).await {
        Ok(t) => t,
        Err((status, msg)) => return native_json(status, &json!({ "error": msg })),
    };
    match api {
        Api::V1Chat => v1_chat(turn, model, req["stream"] == json!(true)).await,
        _ => native(turn, model, api == Api::Chat, req["stream"] != json!(false)).await,
    }
}

/// The `/v1/chat/completions` answer.
async fn v1_chat(mut turn: Generation, model: &str, stream: bool) -> Response {
    let id = format!("chatcmpl-{}", rand::random::<u16>() % 999);
    let created = chrono::Utc::now().timestamp();
    let head = |object: &str| v1_head(&id, object, created, model);
    if !stream {
        let text = turn.whole().await.unwrap_or_default();
        let reason = turn.done_reason();
        let mut v = head("chat.completion");
        v["choices"] = json!([{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": reason}]);
        v["usage"] = v1_usage(turn.prompt_tokens, turn.emitted());
        return v1_json(StatusCode::OK, &v);
    }
    let mut out = Vec::new();
    let mut first = true;
    while let Step::Token(t) = turn.next().await {
        let mut v = head("chat.completion.chunk");
        v["choices"] = json!([v1_delta(std::mem::take(&mut first), &t)]);
        out.extend_from_slice(&sse_event(&v));
    }
    let reason = turn.done_reason();
    let mut v = head("chat.completion.chunk");
    v["choices"] = json!([{"index": 0, "delta": {}, "finish_reason": reason}]);
    out.extend_from_slice(&sse_event(&v));
    out.extend_from_slice(SSE_DONE);
    respond(StatusCode::OK, "text/event-stream", out)
}

/// The native chat or generate answer, with fixed metrics.
async fn native(mut turn: Generation, model: &str, chat: bool, stream: bool) -> Response {
    let chunk = |text: &str, done: bool, turn: &Generation| {
        let metrics = Metrics {
            total_duration: 1,
            load_duration: 0,
            prompt_eval_count: turn.prompt_tokens,
            prompt_eval_duration: 1,
            eval_count: turn.emitted(),
            eval_duration: 1,
        };
        let reason = done.then_some(turn.done_reason());
        let chunk = NativeChunk {
            metrics: done.then_some(metrics),
            ..NativeChunk::new(model, chat, text, reason)
        };
        serde_json::to_vec(&chunk).unwrap_or_default()
    };
    if !stream {
        let text = turn.whole().await.unwrap_or_default();
        let line = chunk(&text, true, &turn);
        return respond(StatusCode::OK, "application/json; charset=utf-8", line);
    }
    let mut lines = Vec::new();
    while let Step::Token(t) = turn.next().await {
        lines.extend(chunk(&t, false, &turn));
        lines.push(b'\n');
    }
    lines.extend(chunk("", true, &turn));
    lines.push(b'\n');
    respond(StatusCode::OK, "application/x-ndjson", lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_follow_ollamas_rules() {
        let ok = |raw: &str, base: &str, source: Source| {
            assert_eq!(parse(raw).unwrap(), (base.to_string(), source), "{raw}");
        };
        ok("gpt-oss:120b:cloud", "gpt-oss:120b", Source::Cloud);
        ok("qwen3:cloud", "qwen3", Source::Cloud);
        ok("gpt-oss:120b-cloud", "gpt-oss:120b", Source::Cloud);
        ok("gpt-oss:20b:local", "gpt-oss:20b", Source::Local);
        ok("QWEN3:CLOUD", "QWEN3", Source::Cloud);
        ok("model-cloud", "model-cloud", Source::Unspecified);
        ok(
            "host:5000/ns/m-cloud",
            "host:5000/ns/m-cloud",
            Source::Unspecified,
        );
        for bad in ["x:cloud:local", "x:8b-cloud:local", "x:local:cloud"] {
            assert_eq!(
                parse(bad).unwrap_err(),
                format!("use either :local or :cloud, not both: \"{bad}\"")
            );
        }
    }
}
