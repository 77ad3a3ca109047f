//! `POST /v1/responses`, OpenAI Responses as Ollama speaks it
//! (OLLAMA_API_ADDENDUM.md §5 and, for state, §10): the whole response in Go
//! struct order, the streamed events with sorted keys, `sequence_number`
//! and no `[DONE]`, status always `completed`, temperature 1 by default;
//! and the later versions' per-server history: a response is kept 30
//! minutes (at most 1024), keyed by its id and the request's
//! `Authorization`, so a `previous_response_id` this server did not produce
//! gets Ollama's 404. A mid-stream failure is lost: the stream ends without
//! `response.completed`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::cloud;
use super::reply::{self, Shape};
use super::state::{ServerState, SharedState};
use super::turn::{self, Ask, J, Step, Turn, event_stream, respond, sorted, sse, v};

/// The 404 for an unknown or expired `previous_response_id`.
pub(crate) const NOT_FOUND: &str = r#"{"error":{"type":"invalid_request_error","code":"previous_response_not_found","param":"previous_response_id","message":"previous_response_id was not found or has expired; resend the full conversation"}}"#;

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The last user text and all the text of `input`, and whether its last
/// item is a function call's output.
fn read_input(input: &Value) -> (String, String, bool) {
    match input {
        Value::String(s) => (s.clone(), s.clone(), false),
        Value::Array(items) => {
            let mut last_user = String::new();
            let mut all = Vec::new();
            for item in items {
                let text = if item["type"] == "function_call_output" {
                    match &item["output"] {
                        Value::String(s) => s.clone(),
                        other => text_of(other),
                    }
                } else {
                    text_of(&item["content"])
                };
                if item["role"] == "user" {
                    last_user = text.clone();
                }
                all.push(text);
            }
            let answered = items
                .last()
                .is_some_and(|i| i["type"] == "function_call_output");
            (last_user, all.join(" "), answered)
        }
        _ => (String::new(), String::new(), false),
    }
}

fn uuid() -> String {
    let h = turn::hex(32);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// What the response object echoes of the request.
struct Echo {
    id: String,
    model: String,
    previous: Value,
    instructions: Value,
    tools: Value,
    temperature: Value,
    top_p: Value,
    max_output_tokens: Value,
    store: bool,
    created_at: i64,
}

fn usage(input: u64, output: u64) -> J {
    J::O(vec![
        ("input_tokens", v(input)),
        ("output_tokens", v(output)),
        ("total_tokens", v(input + output)),
        ("input_tokens_details", J::O(vec![("cached_tokens", v(0))])),
        (
            "output_tokens_details",
            J::O(vec![("reasoning_tokens", v(0))]),
        ),
    ])
}

/// The response object in Go struct order.
fn response(e: &Echo, status: &str, completed: bool, output: Vec<J>, usage: J) -> J {
    J::O(vec![
        ("id", v(e.id.clone())),
        ("object", v("response")),
        ("created_at", v(e.created_at)),
        (
            "completed_at",
            if completed {
                v(chrono::Utc::now().timestamp())
            } else {
                v(Value::Null)
            },
        ),
        ("status", v(status)),
        ("incomplete_details", v(Value::Null)),
        ("model", v(e.model.clone())),
        ("previous_response_id", v(e.previous.clone())),
        ("instructions", v(e.instructions.clone())),
        ("output", J::A(output)),
        ("error", v(Value::Null)),
        ("tools", v(e.tools.clone())),
        ("tool_choice", v("auto")),
        ("truncation", v("disabled")),
        ("parallel_tool_calls", v(true)),
        (
            "text",
            J::O(vec![("format", J::O(vec![("type", v("text"))]))]),
        ),
        ("top_p", v(e.top_p.clone())),
        ("presence_penalty", v(0)),
        ("frequency_penalty", v(0)),
        ("top_logprobs", v(0)),
        ("temperature", v(e.temperature.clone())),
        ("reasoning", v(Value::Null)),
        ("usage", usage),
        ("max_output_tokens", v(e.max_output_tokens.clone())),
        ("max_tool_calls", v(Value::Null)),
        ("store", v(e.store)),
        ("background", v(false)),
        ("service_tier", v("default")),
        ("metadata", v(json!({}))),
        ("safety_identifier", v(Value::Null)),
        ("prompt_cache_key", v(Value::Null)),
    ])
}

fn text_part(text: &str) -> J {
    J::O(vec![
        ("type", v("output_text")),
        ("text", v(text)),
        ("annotations", v(json!([]))),
        ("logprobs", v(json!([]))),
    ])
}

fn message_item(id: &str, status: &str, text: Option<&str>) -> J {
    J::O(vec![
        ("id", v(id)),
        ("type", v("message")),
        ("status", v(status)),
        ("role", v("assistant")),
        ("content", J::A(text.map(text_part).into_iter().collect())),
    ])
}

fn call_item(id: &str, call_id: &str, name: &str, args: &str, done: bool) -> J {
    J::O(vec![
        ("id", v(id)),
        ("type", v("function_call")),
        ("status", v(if done { "completed" } else { "in_progress" })),
        ("call_id", v(call_id)),
        ("name", v(name)),
        ("arguments", v(if done { args } else { "" })),
    ])
}

/// The function to call, if the request has function tools and its input
/// does not end with a call's output.
fn tool_to_call(req: &Value, answered: bool) -> Option<(String, Option<String>)> {
    if answered {
        return None;
    }
    let tool = req["tools"]
        .as_array()?
        .iter()
        .find(|t| t["type"] == "function")?;
    let name = tool["name"].as_str()?.to_string();
    let param = turn::first_param(&tool["parameters"]);
    Some((name, param))
}

fn arguments(param: &Option<String>, text: &str) -> String {
    match param {
        Some(p) => json!({ p: text.trim() }).to_string(),
        None => "{}".into(),
    }
}

fn openai_error(status: StatusCode, msg: &str) -> Response {
    reply::error(Shape::OpenAi, status, msg)
}

/// `POST /v1/responses`.
pub(crate) async fn responses(
    State(state): SharedState,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: Value = match reply::parse::<Value>(Shape::OpenAi, &body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return openai_error(StatusCode::BAD_REQUEST, "invalid request body"),
        Err(resp) => return resp,
    };
    if req["background"] == json!(true) || !req["conversation"].is_null() {
        let msg = "background and conversation are not supported; use previous_response_id for continuation";
        return openai_error(StatusCode::BAD_REQUEST, msg);
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let history = match req["previous_response_id"].as_str() {
        None => String::new(),
        Some(prev) => match state.responses.get(prev, &auth) {
            Some(text) => text,
            None => {
                let mut body = NOT_FOUND.as_bytes().to_vec();
                body.push(b'\n');
                return respond(StatusCode::NOT_FOUND, "application/json", body);
            }
        },
    };
    let model = req["model"].as_str().unwrap_or_default().to_string();
    let (last_user, text, answered) = read_input(&req["input"]);
    let instructions = req["instructions"].as_str().unwrap_or_default();
    let all = format!("{history} {instructions} {text}");
    let input = format!("{history} {last_user}");
    let ask = Ask {
        model: &model,
        input: input.trim(),
        all_text: &all,
        limit: req["max_output_tokens"].as_u64().map(|n| n as usize),
        cloud: cloud::is_cloud(&model),
    };
    let mut turn = match Turn::start(&state, &headers, ask).await {
        Ok(t) => t,
        Err((status, msg)) => return openai_error(status, &msg),
    };
    let tool = tool_to_call(&req, answered);
    let echo = Echo {
        id: format!("resp_{}", uuid()),
        model,
        previous: req["previous_response_id"].clone(),
        instructions: req["instructions"].clone(),
        tools: if req["tools"].is_array() {
            req["tools"].clone()
        } else {
            json!([])
        },
        temperature: if req["temperature"].is_number() {
            req["temperature"].clone()
        } else {
            json!(1)
        },
        top_p: if req["top_p"].is_number() {
            req["top_p"].clone()
        } else {
            json!(1)
        },
        max_output_tokens: req["max_output_tokens"].clone(),
        store: req["store"] != json!(false),
        created_at: chrono::Utc::now().timestamp(),
    };
    let msg_id = format!("msg_{}", rand::random::<u32>() % 999_999);
    let keep = move |state: &ServerState, echo: &Echo, out: &str| {
        if echo.store {
            state
                .responses
                .put(echo.id.clone(), auth.clone(), format!("{all} {out}"));
        }
    };
    if req["stream"] != json!(true) {
        let out = match turn.whole().await {
            Ok(t) => t,
            Err(_) => {
                let msg = "an error was encountered while running the model: simulated fault";
                return openai_error(StatusCode::INTERNAL_SERVER_ERROR, msg);
            }
        };
        let output = match &tool {
            Some((name, param)) => {
                let id = format!("fc_{}_0", echo.id);
                vec![call_item(
                    &id,
                    &turn::call_id(),
                    name,
                    &arguments(param, &out),
                    true,
                )]
            }
            None => vec![message_item(&msg_id, "completed", Some(&out))],
        };
        keep(&state, &echo, &out);
        let whole = response(
            &echo,
            "completed",
            true,
            output,
            usage(turn.prompt_tokens, turn.emitted()),
        );
        let mut bytes = turn::bytes(&whole);
        bytes.push(b'\n');
        return respond(StatusCode::OK, "application/json", bytes);
    }
    event_stream(move |tx| async move {
        let mut seq = 0u64;
        let mut frame = |kind: &str, mut data: Value| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            seq += 1;
            sse(kind, &serde_json::to_vec(&sorted(data)).unwrap_or_default())
        };
        let value = |j: J| serde_json::to_value(&j).unwrap_or_default();
        let mut text = String::new();
        let mut opened = false;
        loop {
            let step = turn.next().await;
            let last = !matches!(step, Step::Token(_));
            let mut out = Vec::new();
            if !opened && matches!(step, Step::Token(_) | Step::Done) {
                opened = true;
                let r = value(response(&echo, "in_progress", false, vec![], J::V(Value::Null)));
                out.push(frame("response.created", json!({ "response": r })));
                out.push(frame("response.in_progress", json!({ "response": r })));
                if tool.is_none() {
                    let item = value(message_item(&msg_id, "in_progress", None));
                    out.push(frame("response.output_item.added", json!({"item": item, "output_index": 0})));
                    let part = value(text_part(""));
                    out.push(frame(
                        "response.content_part.added",
                        json!({"content_index": 0, "item_id": msg_id, "output_index": 0, "part": part}),
                    ));
                }
            }
            match step {
                Step::Token(t) => {
                    text.push_str(&t);
                    if tool.is_none() {
                        out.push(frame(
                            "response.output_text.delta",
                            json!({"content_index": 0, "delta": t, "item_id": msg_id, "logprobs": [], "output_index": 0}),
                        ));
                    }
                }
                Step::Done => {
                    let item = match &tool {
                        Some((name, param)) => {
                            let (id, call) = (format!("fc_{}_0", turn::hex(8)), turn::call_id());
                            let args = arguments(param, &text);
                            out.push(frame(
                                "response.output_item.added",
                                json!({"item": value(call_item(&id, &call, name, &args, false)), "output_index": 0}),
                            ));
                            out.push(frame(
                                "response.function_call_arguments.delta",
                                json!({"delta": args, "item_id": id, "output_index": 0}),
                            ));
                            out.push(frame(
                                "response.function_call_arguments.done",
                                json!({"arguments": args, "item_id": id, "output_index": 0}),
                            ));
                            let done = value(call_item(&id, &call, name, &args, true));
                            out.push(frame("response.output_item.done", json!({"item": done, "output_index": 0})));
                            done
                        }
                        None => {
                            out.push(frame(
                                "response.output_text.done",
                                json!({"content_index": 0, "item_id": msg_id, "logprobs": [], "output_index": 0, "text": text}),
                            ));
                            out.push(frame(
                                "response.content_part.done",
                                json!({"content_index": 0, "item_id": msg_id, "output_index": 0, "part": value(text_part(&text))}),
                            ));
                            let done = value(message_item(&msg_id, "completed", Some(&text)));
                            out.push(frame("response.output_item.done", json!({"item": done, "output_index": 0})));
                            done
                        }
                    };
                    keep(&state, &echo, &text);
                    let r = value(response(&echo, "completed", true, vec![J::V(item)], usage(turn.prompt_tokens, turn.emitted())));
                    out.push(frame("response.completed", json!({ "response": r })));
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
