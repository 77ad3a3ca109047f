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
use super::state::SharedState;
use super::turn::{self, Ask, J, Step, Turn, event_stream, respond, sse, v};

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
    let body = J::O(vec![
        ("type", v("error")),
        (
            "error",
            J::O(vec![("type", v(kind)), ("message", v(message))]),
        ),
        ("request_id", v(format!("req_{}", turn::hex(24)))),
    ]);
    let mut bytes = turn::bytes(&body);
    if gin {
        respond(status, "application/json; charset=utf-8", bytes)
    } else {
        bytes.push(b'\n');
        respond(status, "application/json", bytes)
    }
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
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
    let param = turn::first_param(&tool["input_schema"]);
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
    let mut turn = match Turn::start(&state, &headers, ask).await {
        Ok(t) => t,
        Err((status, msg)) => return error(status, &msg, false),
    };
    let tool = tool_to_call(&req);
    let id = format!("msg_{}", turn::hex(24));
    if req["stream"] != json!(true) {
        let text = match turn.whole().await {
            Ok(t) => t,
            Err(_) => {
                let msg = "an error was encountered while running the model: simulated fault";
                return error(StatusCode::INTERNAL_SERVER_ERROR, msg, false);
            }
        };
        let (content, stop) = match &tool {
            Some((name, param)) => (J::A(vec![tool_block(name, param, &text, true)]), "tool_use"),
            None if text.is_empty() => (J::V(Value::Null), stop_reason(&turn)),
            None => (
                J::A(vec![J::O(vec![("type", v("text")), ("text", v(text))])]),
                stop_reason(&turn),
            ),
        };
        let message = J::O(vec![
            ("id", v(id)),
            ("type", v("message")),
            ("role", v("assistant")),
            ("model", v(model)),
            ("content", content),
            ("stop_reason", v(stop)),
            ("usage", usage(turn.prompt_tokens, turn.emitted())),
        ]);
        let mut bytes = turn::bytes(&message);
        bytes.push(b'\n');
        return respond(StatusCode::OK, "application/json", bytes);
    }
    event_stream(move |tx| async move {
        let send = |name: &str, j: J| sse(name, &turn::bytes(&j));
        let start = J::O(vec![
            ("type", v("message_start")),
            (
                "message",
                J::O(vec![
                    ("id", v(id)),
                    ("type", v("message")),
                    ("role", v("assistant")),
                    ("model", v(model)),
                    ("content", J::A(vec![])),
                    ("usage", usage(estimate, 0)),
                ]),
            ),
        ]);
        let start = sse("message_start", &turn::bytes(&start));
        let mut opened = false;
        let mut text = String::new();
        loop {
            let step = turn.next().await;
            let last = !matches!(step, Step::Token(_));
            let mut out = Vec::new();
            if !opened && matches!(step, Step::Token(_) | Step::Done) {
                opened = true;
                out.push(start.clone());
                if tool.is_none() {
                    out.push(send(
                        "content_block_start",
                        J::O(vec![
                            ("type", v("content_block_start")),
                            ("index", v(0)),
                            (
                                "content_block",
                                J::O(vec![("type", v("text")), ("text", v(""))]),
                            ),
                        ]),
                    ));
                }
            }
            match step {
                Step::Token(t) if tool.is_some() => text.push_str(&t),
                Step::Token(t) => out.push(send(
                    "content_block_delta",
                    J::O(vec![
                        ("type", v("content_block_delta")),
                        ("index", v(0)),
                        (
                            "delta",
                            J::O(vec![("type", v("text_delta")), ("text", v(t))]),
                        ),
                    ]),
                )),
                Step::Done => {
                    let stop = match &tool {
                        Some((name, param)) => {
                            out.push(send(
                                "content_block_start",
                                J::O(vec![
                                    ("type", v("content_block_start")),
                                    ("index", v(0)),
                                    ("content_block", tool_block(name, param, &text, false)),
                                ]),
                            ));
                            out.push(send(
                                "content_block_delta",
                                J::O(vec![
                                    ("type", v("content_block_delta")),
                                    ("index", v(0)),
                                    (
                                        "delta",
                                        J::O(vec![
                                            ("type", v("input_json_delta")),
                                            (
                                                "partial_json",
                                                v(arguments(param, &text).to_string()),
                                            ),
                                        ]),
                                    ),
                                ]),
                            ));
                            "tool_use"
                        }
                        None => stop_reason(&turn),
                    };
                    out.push(send(
                        "content_block_stop",
                        J::O(vec![("type", v("content_block_stop")), ("index", v(0))]),
                    ));
                    out.push(send(
                        "message_delta",
                        J::O(vec![
                            ("type", v("message_delta")),
                            ("delta", J::O(vec![("stop_reason", v(stop))])),
                            ("usage", usage(turn.prompt_tokens, turn.emitted())),
                        ]),
                    ));
                    out.push(send(
                        "message_stop",
                        J::O(vec![("type", v("message_stop"))]),
                    ));
                }
                Step::Lost => {}
                Step::Reset => return turn::reset(&tx).await,
            }
            if !turn::send_all(&tx, out).await || last {
                return;
            }
        }
    })
    .await
}

fn stop_reason(turn: &Turn) -> &'static str {
    if turn.length_limited {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn usage(input: u64, output: u64) -> J {
    J::O(vec![
        ("input_tokens", v(input)),
        ("output_tokens", v(output)),
    ])
}

fn arguments(param: &Option<String>, text: &str) -> Value {
    match param {
        Some(p) => json!({ p: text.trim() }),
        None => json!({}),
    }
}

fn tool_block(name: &str, param: &Option<String>, text: &str, whole: bool) -> J {
    let input = if whole {
        arguments(param, text)
    } else {
        json!({})
    };
    J::O(vec![
        ("type", v("tool_use")),
        ("id", v(turn::call_id())),
        ("name", v(name)),
        ("input", J::V(input)),
    ])
}
