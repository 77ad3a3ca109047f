//! `POST /v1/messages`, Anthropic Messages as Ollama v0.33 speaks it
//! (OLLAMA_API_ADDENDUM.md §4): the validation texts, Anthropic error bodies
//! with `req_` ids, `msg_` ids, the non-streamed message in Go struct order,
//! and the streamed event sequence (no `ping`, no `[DONE]`, estimated input
//! tokens in `message_start`, real counts in `message_delta`). A mid-stream
//! failure is lost, as in Ollama: the stream just ends without
//! `message_stop`. Tools: when the request declares tools and its last turn
//! is not a tool result, the answer is one call of the first tool.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::cloud;
use super::events::{Moment, event_stream, feed, sse};
use super::generation::{Ask, Generation};
use super::reply::{self, MID_STREAM, Ordered, native_json, plain, text_of, v1_json};
use super::state::SharedState;
use super::tools::{self, arguments};

/// An Anthropic error body; `gin` is the middleware's rendering (charset,
/// no trailing newline), else the handler's (`application/json` + `\n`).
pub(crate) fn error(status: StatusCode, message: &str, gin: bool) -> Response {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    let body = typed(
        "error",
        vec![
            ("error", typed(kind, vec![("message", plain(message))])),
            ("request_id", plain(format!("req_{}", reply::hex(24)))),
        ],
    );
    if gin {
        native_json(status, &body)
    } else {
        v1_json(status, &body)
    }
}

/// The tool to call, if the request declares tools and its last turn is not
/// a tool result.
fn tool_to_call(req: &Value) -> Option<(String, Option<String>)> {
    let tool = req["tools"].as_array()?.first()?;
    let last = req["messages"].as_array()?.last()?;
    let answered = last["content"]
        .as_array()
        .is_some_and(|b| b.iter().any(|b| b["type"] == "tool_result"));
    if answered {
        return None;
    }
    let name = tool["name"].as_str()?.to_string();
    let param = tools::first_param(&tool["input_schema"]);
    Some((name, param))
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): SharedState,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "invalid request body", true),
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string(), true),
    };
    let model = req["model"].as_str().unwrap_or_default().to_string();
    if model.is_empty() {
        return error(StatusCode::BAD_REQUEST, "model is required", true);
    }
    if req["max_tokens"].as_i64().unwrap_or(0) <= 0 {
        let msg = "max_tokens is required and must be positive";
        return error(StatusCode::BAD_REQUEST, msg, true);
    }
    let Some(msgs) = req["messages"].as_array().filter(|m| !m.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "messages is required", true);
    };
    let input = msgs
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .unwrap_or_default();
    let mut all = text_of(&req["system"]);
    for m in msgs {
        all.push(' ');
        all.push_str(&text_of(&m["content"]));
    }
    let estimate = ((all.chars().count() / 4) as u64).max(1);
    let ask = Ask {
        model: &model,
        input: &input,
        all_text: &all,
        limit: req["max_tokens"].as_u64().map(|n| n as usize),
        cloud: cloud::is_cloud(&model),
    };
    let mut turn = match Generation::start(&state, &headers, ask).await {
        Ok(t) => t,
        Err((status, msg)) => return error(status, &msg, false),
    };
    let tool = tool_to_call(&req);
    let id = format!("msg_{}", reply::hex(24));
    if req["stream"] != json!(true) {
        let text = match turn.whole().await {
            Ok(t) => t,
            Err(_) => {
                return error(StatusCode::INTERNAL_SERVER_ERROR, MID_STREAM, false);
            }
        };
        let (content, stop) = match &tool {
            Some((name, param)) => (
                Ordered::Array(vec![tool_block(name, param, &text, true)]),
                "tool_use",
            ),
            None if text.is_empty() => (plain(Value::Null), stop_reason(&turn)),
            None => (
                Ordered::Array(vec![typed("text", vec![("text", plain(text))])]),
                stop_reason(&turn),
            ),
        };
        let message = Ordered::Object(vec![
            ("id", plain(id)),
            ("type", plain("message")),
            ("role", plain("assistant")),
            ("model", plain(model)),
            ("content", content),
            ("stop_reason", plain(stop)),
            ("usage", usage(turn.prompt_tokens, turn.emitted())),
        ]);
        return v1_json(StatusCode::OK, &message);
    }
    let mut text = String::new();
    event_stream(move |tx| {
        feed(tx, turn, move |moment, turn| match moment {
            Moment::Open => {
                let message = Ordered::Object(vec![
                    ("id", plain(id.clone())),
                    ("type", plain("message")),
                    ("role", plain("assistant")),
                    ("model", plain(model.clone())),
                    ("content", Ordered::Array(vec![])),
                    ("usage", usage(estimate, 0)),
                ]);
                let mut out = vec![event("message_start", vec![("message", message)])];
                if tool.is_none() {
                    out.push(block_start(typed("text", vec![("text", plain(""))])));
                }
                out
            }
            Moment::Token(t) if tool.is_some() => {
                text.push_str(&t);
                vec![]
            }
            Moment::Token(t) => vec![block_delta(typed("text_delta", vec![("text", plain(t))]))],
            Moment::Done => {
                let mut out = Vec::new();
                let stop = match &tool {
                    Some((name, param)) => {
                        out.push(block_start(tool_block(name, param, &text, false)));
                        let json = arguments(param, &text).to_string();
                        let delta = typed("input_json_delta", vec![("partial_json", plain(json))]);
                        out.push(block_delta(delta));
                        "tool_use"
                    }
                    None => stop_reason(turn),
                };
                out.push(event("content_block_stop", vec![("index", plain(0))]));
                let delta = Ordered::Object(vec![("stop_reason", plain(stop))]);
                let usage = usage(turn.prompt_tokens, turn.emitted());
                out.push(event(
                    "message_delta",
                    vec![("delta", delta), ("usage", usage)],
                ));
                out.push(event("message_stop", vec![]));
                out
            }
        })
    })
    .await
}

/// An object whose `type` comes first, then `fields`.
fn typed(kind: &'static str, mut fields: Vec<(&'static str, Ordered)>) -> Ordered {
    fields.insert(0, ("type", plain(kind)));
    Ordered::Object(fields)
}

/// One event: its name is its `type`.
fn event(kind: &'static str, fields: Vec<(&'static str, Ordered)>) -> Bytes {
    sse(kind, &typed(kind, fields).to_vec())
}

fn block_start(block: Ordered) -> Bytes {
    let fields = vec![("index", plain(0)), ("content_block", block)];
    event("content_block_start", fields)
}

fn block_delta(delta: Ordered) -> Bytes {
    let fields = vec![("index", plain(0)), ("delta", delta)];
    event("content_block_delta", fields)
}

fn stop_reason(turn: &Generation) -> &'static str {
    if turn.length_limited {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn usage(input: u64, output: u64) -> Ordered {
    Ordered::Object(vec![
        ("input_tokens", plain(input)),
        ("output_tokens", plain(output)),
    ])
}

fn tool_block(name: &str, param: &Option<String>, text: &str, whole: bool) -> Ordered {
    let input = if whole {
        arguments(param, text)
    } else {
        json!({})
    };
    let fields = vec![
        ("id", plain(tools::call_id())),
        ("name", plain(name)),
        ("input", plain(input)),
    ];
    typed("tool_use", fields)
}
