//! Inference handlers: `/api/generate`, `/api/chat`, `/api/embed`,
//! `/api/embeddings` and their `/v1` twins. Each validates as Ollama does
//! (exact error strings of OLLAMA_API.md §5), applies the fault plan, takes
//! a slot, and hands over to [`Completion`] or answers embeddings itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{MethodRouter, post};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::cache::Lease;
use super::completion::{Api, Completion, Job};
use super::faults::Fault;
use super::generate::{NativeChunk, count_tokens, expected_embedding, raw_embedding};
use super::generation::{Generation, Held, asked_delay, slot_unless};
use super::reply::{self, BUSY, MID_STREAM, Shape, native_json, text_of, v1_json};
use super::sched::Slot;
use super::spec::parse_go_duration;
use super::state::{Kind, ServerState, SharedState};
use super::stats::InferenceGuard;
use super::tokens::Token;
use super::tokens::{render_chat, render_prompt};

#[derive(Deserialize, Default)]
struct Options {
    num_predict: Option<i64>,
    num_ctx: Option<i64>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: Option<String>,
    content: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Every field any inference endpoint reads; unknown fields are ignored.
#[derive(Deserialize)]
struct InferenceRequest {
    model: Option<String>,
    prompt: Option<Value>,
    system: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    input: Option<Value>,
    stream: Option<bool>,
    raw: Option<bool>,
    keep_alive: Option<Value>,
    options: Option<Options>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stream_options: Option<StreamOptions>,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

/// The request's model (as sent), its index and the keep-alive asked for,
/// or the error Ollama answers for either.
#[expect(
    clippy::result_large_err,
    reason = "the error is the answer, built once per failed request"
)]
fn model_and_keep_alive(
    state: &ServerState,
    req: &InferenceRequest,
    kind: Kind,
    shape: Shape,
) -> Result<(String, usize, Option<Option<Duration>>), Response> {
    let model = req.model.clone().unwrap_or_default();
    let index = state
        .resolve(&model, kind)
        .map_err(|(status, msg)| reply::error(shape, status, &msg))?;
    let keep_alive = keep_alive(&req.keep_alive)
        .map_err(|msg| reply::error(Shape::Native, StatusCode::BAD_REQUEST, &msg))?;
    Ok((model, index, keep_alive))
}

/// `None`: not given; `Some(None)`: forever; `Some(Some(d))`: `d`.
fn keep_alive(v: &Option<Value>) -> Result<Option<Option<Duration>>, String> {
    let secs = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(Value::String(s)) => parse_go_duration(s).ok_or_else(|| {
            if s.chars().all(|c| c.is_ascii_digit()) {
                format!("time: missing unit in duration \"{s}\"")
            } else {
                format!("time: invalid duration \"{s}\"")
            }
        })?,
        Some(_) => return Err("invalid keep_alive".into()),
    };
    Ok(Some(if secs < 0.0 {
        None
    } else {
        Some(Duration::from_secs_f64(secs.min(1e12)))
    }))
}

/// What an admitted inference request holds.
struct Admitted {
    guard: InferenceGuard,
    fault: Option<Fault>,
    slot: Slot,
    /// The fault plan's request count just after this request's pick.
    seq: u64,
}

/// Counts the request in flight and picks its fault, waits any asked
/// delay, answers the faults that strike before any byte, then takes a
/// slot. `Err` is the answer.
async fn admit(
    state: &ServerState,
    headers: &HeaderMap,
    shape: Shape,
    (index, keep_alive, ctx): (usize, Option<Option<Duration>>, Option<u64>),
) -> Result<Admitted, Response> {
    let guard = state.counters.inference();
    let fault = state.pick_fault(headers);
    let seq = state.inference_seq.load(Ordering::Relaxed);
    asked_delay(headers).await;
    let resp = match fault {
        Some(Fault::Garbage) => reply::stream(
            "application/json; charset=utf-8",
            axum::body::Body::from("<html>this is not json {"),
        ),
        _ => match slot_unless(state, fault, index, keep_alive, ctx).await {
            Ok(slot) => {
                return Ok(Admitted {
                    guard,
                    fault,
                    slot,
                    seq,
                });
            }
            Err((status, msg)) => reply::error(shape, status, msg),
        },
    };
    guard.abandon();
    Err(resp)
}

fn num_predict(req: &InferenceRequest) -> Option<usize> {
    let n = req
        .options
        .as_ref()
        .and_then(|o| o.num_predict)
        .or(req.max_tokens)
        .or(req.max_completion_tokens)?;
    usize::try_from(n).ok()
}

async fn text_answer(
    state: Arc<ServerState>,
    headers: HeaderMap,
    body: Bytes,
    api: Api,
) -> Response {
    let start = Instant::now();
    let shape = api.shape();
    let req: InferenceRequest = match reply::parse(shape, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let kind = if matches!(api, Api::Generate | Api::V1Completions) {
        Kind::Generate
    } else {
        Kind::Chat
    };
    let (model, index, ka) = match model_and_keep_alive(&state, &req, kind, shape) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    let bad_request = |msg: &str| reply::error(shape, StatusCode::BAD_REQUEST, msg);
    let messages = req.messages.as_deref().unwrap_or_default();
    let (input, rendered) = match api {
        Api::Generate | Api::V1Completions => {
            let p = match &req.prompt {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(_) if api == Api::V1Completions => {
                    return bad_request("invalid type for 'prompt' field");
                }
                Some(_) => return bad_request("json: cannot unmarshal prompt"),
            };
            let rendered = render_prompt(req.system.as_deref(), &p);
            (p, rendered)
        }
        Api::Chat | Api::V1Chat => {
            let last_user = messages
                .iter()
                .rev()
                .find(|m| m.role.as_deref() == Some("user"))
                .map(|m| text_of(m.content.as_ref().unwrap_or(&Value::Null)))
                .unwrap_or_default();
            let all: Vec<(&str, String)> = messages
                .iter()
                .map(|m| {
                    (
                        m.role.as_deref().unwrap_or("user"),
                        text_of(m.content.as_ref().unwrap_or(&Value::Null)),
                    )
                })
                .collect();
            let rendered = render_chat(all.iter().map(|(r, c)| (*r, c.as_str())));
            (last_user, rendered)
        }
    };
    if api == Api::V1Chat && messages.is_empty() {
        return bad_request("[] is too short - 'messages'");
    }
    let is_shortcut = match api {
        Api::Generate => input.is_empty(),
        Api::Chat => messages.is_empty(),
        _ => false,
    };
    if is_shortcut {
        return shortcut(&state, index, &model, ka, api == Api::Chat).await;
    }
    let limit = num_predict(&req);
    let mut job = Job {
        api,
        model,
        prompt_eval_count: 0,
        prompt_eval_ns: 0,
        stream: match api {
            Api::Generate | Api::Chat => req.stream != Some(false),
            _ => req.stream == Some(true),
        },
        include_usage: req.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true),
        raw: req.raw == Some(true),
        keep_alive: ka,
    };
    let asked = (index, job.keep_alive, num_ctx(&req));
    let admitted = match admit(&state, &headers, shape, asked).await {
        Ok(admitted) => admitted,
        Err(resp) => return resp,
    };
    let lease = evaluate_prompt(&state, index, &admitted.slot, &rendered, &mut job).await;
    let held = Held {
        guard: admitted.guard,
        lease: Some(lease),
        slot: Some(admitted.slot),
    };
    let words = (job.model.as_str(), input.as_str());
    let prompt_tokens = rendered.len() as u64;
    let fault = admitted.fault;
    let generation = Generation::new(&state, words, limit, prompt_tokens, fault, held);
    let stream = job.stream;
    let answer = Completion::new(job, generation, start, admitted.seq);
    if stream {
        answer.stream().await
    } else {
        answer.whole().await
    }
}

/// The request's `options.num_ctx`, raised to at least 4 as Ollama does.
fn num_ctx(req: &InferenceRequest) -> Option<u64> {
    let n = req.options.as_ref()?.num_ctx?;
    Some(u64::try_from(n.max(4)).unwrap_or(4))
}

/// Takes the slot's prompt memory and spends the time evaluating what it
/// lacks, before the first output token.
async fn evaluate_prompt(
    state: &ServerState,
    index: usize,
    slot: &Slot,
    prompt: &[Token],
    job: &mut Job,
) -> Lease {
    let mut lease = state.prompt_cache.take(index, slot.runner(), prompt);
    let evaluated = (prompt.len() - lease.reused) as u64;
    state.counters.prompt(evaluated, lease.reused as u64);
    let speed = state.spec.prompt_speed;
    let eval = if speed > 0.0 && speed.is_finite() {
        Duration::from_secs_f64(evaluated as f64 / speed)
    } else {
        Duration::ZERO
    };
    if !eval.is_zero() {
        tokio::time::sleep(eval).await;
    }
    lease.evaluated(prompt);
    job.prompt_eval_count = evaluated;
    job.prompt_eval_ns = eval.as_nanos() as u64;
    lease
}

/// Load (or, with `keep_alive: 0`, unload) shortcut: one JSON object.
async fn shortcut(
    state: &ServerState,
    index: usize,
    model: &str,
    ka: Option<Option<Duration>>,
    chat: bool,
) -> Response {
    let reason = if ka == Some(Some(Duration::ZERO)) {
        state.sched.unload(index);
        "unload"
    } else {
        if state.sched.preload(index, ka).await.is_err() {
            return reply::error(Shape::Native, StatusCode::SERVICE_UNAVAILABLE, BUSY);
        }
        "load"
    };
    native_json(
        StatusCode::OK,
        &NativeChunk::new(model, chat, "", Some(reason)),
    )
}

/// The route of generate, chat or their `/v1` twin, answered as `api`.
pub(crate) fn answer(api: Api) -> MethodRouter<Arc<ServerState>> {
    post(move |State(s): SharedState, h: HeaderMap, b: Bytes| text_answer(s, h, b, api))
}

/// The route of an embedding endpoint: `kind` of request, errors in `shape`.
pub(crate) fn embed(kind: Kind, shape: Shape) -> MethodRouter<Arc<ServerState>> {
    post(move |State(s): SharedState, h: HeaderMap, b: Bytes| embed_answer(s, h, b, kind, shape))
}

async fn embed_answer(
    state: Arc<ServerState>,
    headers: HeaderMap,
    body: Bytes,
    kind: Kind,
    shape: Shape,
) -> Response {
    let start = Instant::now();
    let req: InferenceRequest = match reply::parse(shape, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (model, index, ka) = match model_and_keep_alive(&state, &req, kind, shape) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    let source = if kind == Kind::Embeddings {
        &req.prompt
    } else {
        &req.input
    };
    let bad_request = |msg: &str| reply::error(shape, StatusCode::BAD_REQUEST, msg);
    let inputs: Vec<String> = match source {
        None | Some(Value::Null) if shape == Shape::OpenAi => {
            return bad_request("invalid input");
        }
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() && shape == Shape::Native => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let strings: Option<Vec<String>> =
                a.iter().map(|v| v.as_str().map(str::to_owned)).collect();
            match strings {
                Some(s) if s.is_empty() && shape == Shape::OpenAi => {
                    return bad_request("invalid input");
                }
                Some(s) => s,
                None => return bad_request("invalid input type"),
            }
        }
        Some(_) => return bad_request("invalid input type"),
    };
    let format = req.encoding_format.as_deref().unwrap_or("float");
    if shape == Shape::OpenAi && format != "float" && format != "base64" {
        let msg = format!(
            "Invalid value for 'encoding_format' = {format}. Supported values: ['float', 'base64']."
        );
        return bad_request(&msg);
    }
    if inputs.is_empty() {
        if state.sched.preload(index, ka).await.is_err() {
            return reply::error(shape, StatusCode::SERVICE_UNAVAILABLE, BUSY);
        }
        return match kind {
            Kind::Embeddings => native_json(StatusCode::OK, &json!({ "embedding": [] })),
            _ => native_json(StatusCode::OK, &json!({ "model": model, "embeddings": [] })),
        };
    }
    let admitted = match admit(&state, &headers, shape, (index, ka, None)).await {
        Ok(admitted) => admitted,
        Err(resp) => return resp,
    };
    let load_ns = (start.elapsed().as_nanos() as u64).max(1);
    if !state.spec.token_interval.is_zero() {
        tokio::time::sleep(state.spec.token_interval).await;
    }
    if matches!(admitted.fault, Some(Fault::Reset | Fault::MidStreamError)) {
        drop(admitted.slot);
        admitted.guard.abandon();
        return reply::error(shape, StatusCode::INTERNAL_SERVER_ERROR, MID_STREAM);
    }
    let dim = req
        .dimensions
        .filter(|&d| d > 0)
        .unwrap_or(state.spec.embedding_dim);
    let seed = state.spec.seed;
    let tokens: u64 = inputs.iter().map(|i| count_tokens(i)).sum();
    let total_ns = (start.elapsed().as_nanos() as u64).max(1);
    let resp = match (kind, shape) {
        (Kind::Embeddings, _) => native_json(
            StatusCode::OK,
            &json!({ "embedding": raw_embedding(seed, &model, &inputs[0], dim) }),
        ),
        (_, Shape::Native) => {
            let vectors: Vec<Vec<f32>> = inputs
                .iter()
                .map(|i| expected_embedding(seed, &model, i, dim))
                .collect();
            native_json(
                StatusCode::OK,
                &json!({ "model": model, "embeddings": vectors, "total_duration": total_ns,
                         "load_duration": load_ns, "prompt_eval_count": tokens }),
            )
        }
        (_, Shape::OpenAi) => {
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    let v = expected_embedding(seed, &model, text, dim);
                    let embedding = if format == "base64" {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    } else {
                        json!(v)
                    };
                    json!({ "object": "embedding", "embedding": embedding, "index": i })
                })
                .collect();
            v1_json(
                StatusCode::OK,
                &json!({ "object": "list", "data": data, "model": model,
                         "usage": { "prompt_tokens": tokens, "total_tokens": tokens } }),
            )
        }
    };
    drop(admitted.slot);
    admitted.guard.complete();
    resp
}
