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
use super::events::{Moment, event_stream, feed, sse};
use super::generation::{Ask, Generation};
use super::reply::{self, MID_STREAM, Ordered, Shape, plain, respond, text_of, v1_json};
use super::state::{ServerState, SharedState};
use super::tools;

/// The 404 for an unknown or expired `previous_response_id`.
pub(crate) const NOT_FOUND: &str = r#"{"error":{"type":"invalid_request_error","code":"previous_response_not_found","param":"previous_response_id","message":"previous_response_id was not found or has expired; resend the full conversation"}}"#;

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
    let h = reply::hex(32);
    [&h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]].join("-")
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

fn usage(input: u64, output: u64) -> Ordered {
    Ordered::Object(vec![
        ("input_tokens", plain(input)),
        ("output_tokens", plain(output)),
        ("total_tokens", plain(input + output)),
        ("input_tokens_details", plain(json!({"cached_tokens": 0}))),
        (
            "output_tokens_details",
            plain(json!({"reasoning_tokens": 0})),
        ),
    ])
}

/// The response object in Go struct order.
fn response(
    e: &Echo,
    status: &str,
    completed: bool,
    output: Vec<Ordered>,
    usage: Ordered,
) -> Ordered {
    Ordered::Object(vec![
        ("id", plain(e.id.clone())),
        ("object", plain("response")),
        ("created_at", plain(e.created_at)),
        (
            "completed_at",
            if completed {
                plain(chrono::Utc::now().timestamp())
            } else {
                plain(Value::Null)
            },
        ),
        ("status", plain(status)),
        ("incomplete_details", plain(Value::Null)),
        ("model", plain(e.model.clone())),
        ("previous_response_id", plain(e.previous.clone())),
        ("instructions", plain(e.instructions.clone())),
        ("output", Ordered::Array(output)),
        ("error", plain(Value::Null)),
        ("tools", plain(e.tools.clone())),
        ("tool_choice", plain("auto")),
        ("truncation", plain("disabled")),
        ("parallel_tool_calls", plain(true)),
        ("text", plain(json!({"format": {"type": "text"}}))),
        ("top_p", plain(e.top_p.clone())),
        ("presence_penalty", plain(0)),
        ("frequency_penalty", plain(0)),
        ("top_logprobs", plain(0)),
        ("temperature", plain(e.temperature.clone())),
        ("reasoning", plain(Value::Null)),
        ("usage", usage),
        ("max_output_tokens", plain(e.max_output_tokens.clone())),
        ("max_tool_calls", plain(Value::Null)),
        ("store", plain(e.store)),
        ("background", plain(false)),
        ("service_tier", plain("default")),
        ("metadata", plain(json!({}))),
        ("safety_identifier", plain(Value::Null)),
        ("prompt_cache_key", plain(Value::Null)),
    ])
}

fn text_part(text: &str) -> Ordered {
    Ordered::Object(vec![
        ("type", plain("output_text")),
        ("text", plain(text)),
        ("annotations", plain(json!([]))),
        ("logprobs", plain(json!([]))),
    ])
}

fn message_item(id: &str, status: &str, text: Option<&str>) -> Ordered {
    Ordered::Object(vec![
        ("id", plain(id)),
        ("type", plain("message")),
        ("status", plain(status)),
        ("role", plain("assistant")),
        (
            "content",
            Ordered::Array(text.map(text_part).into_iter().collect()),
        ),
    ])
}

fn call_item(id: &str, call_id: &str, name: &str, args: &str, done: bool) -> Ordered {
    Ordered::Object(vec![
        ("id", plain(id)),
        ("type", plain("function_call")),
        (
            "status",
            plain(if done { "completed" } else { "in_progress" }),
        ),
        ("call_id", plain(call_id)),
        ("name", plain(name)),
        ("arguments", plain(if done { args } else { "" })),
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
    let param = tools::first_param(&tool["parameters"]);
    Some((name, param))
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
                let body = format!("{NOT_FOUND}\n");
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
    let mut turn = match Generation::start(&state, &headers, ask).await {
        Ok(t) => t,
        Err((status, msg)) => return openai_error(status, &msg),
    };
    let tool = tool_to_call(&req, answered);
    let echo = Echo {
        id: format!("resp_{}", uuid()),
        model,
        previous: req["previous_response_id"].clone(),
        instructions: req["instructions"].clone(),
        tools: Some(&req["tools"])
            .filter(|t| t.is_array())
            .map_or(json!([]), Value::clone),
        temperature: number_or_one(&req["temperature"]),
        top_p: number_or_one(&req["top_p"]),
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
                return openai_error(StatusCode::INTERNAL_SERVER_ERROR, MID_STREAM);
            }
        };
        let output = match &tool {
            Some((name, param)) => {
                let id = format!("fc_{}_0", echo.id);
                vec![call_item(
                    &id,
                    &tools::call_id(),
                    name,
                    &tools::arguments(param, &out).to_string(),
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
        return v1_json(StatusCode::OK, &whole);
    }
    let mut seq = 0u64;
    let mut text = String::new();
    event_stream(move |tx| {
        feed(tx, turn, move |moment, turn| {
            let mut frame = |kind: &str, data: Value| numbered(&mut seq, kind, data);
            let mut out = Vec::new();
            match moment {
                Moment::Open => {
                    let r = value(response(&echo, "in_progress", false, vec![], plain(Value::Null)));
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
                Moment::Token(t) => {
                    text.push_str(&t);
                    if tool.is_none() {
                        out.push(frame(
                            "response.output_text.delta",
                            json!({"content_index": 0, "delta": t, "item_id": msg_id, "logprobs": [], "output_index": 0}),
                        ));
                    }
                }
                Moment::Done => {
                    let item = match &tool {
                        Some((name, param)) => {
                            let (id, call) = (format!("fc_{}_0", reply::hex(8)), tools::call_id());
                            let args = tools::arguments(param, &text).to_string();
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
                    let usage = usage(turn.prompt_tokens, turn.emitted());
                    let r = value(response(&echo, "completed", true, vec![plain(item)], usage));
                    out.push(frame("response.completed", json!({ "response": r })));
                }
            }
            out
        })
    })
    .await
}

/// A sampling setting as sent, or Ollama's default of 1.
fn number_or_one(v: &Value) -> Value {
    if v.is_number() { v.clone() } else { json!(1) }
}

/// One streamed event: `type` and `sequence_number` added, keys sorted.
fn numbered(seq: &mut u64, kind: &str, mut data: Value) -> Bytes {
    data["type"] = json!(kind);
    data["sequence_number"] = json!(*seq);
    *seq += 1;
    data.sort_all_objects();
    sse(kind, &serde_json::to_vec(&data).unwrap_or_default())
}

/// An ordered value as a plain one, to be sorted.
fn value(ordered: Ordered) -> Value {
    serde_json::to_value(&ordered).unwrap_or_default()
}
