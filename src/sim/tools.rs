//! The simulated tool call of Messages and Responses: when a request
//! declares a tool, the answer calls it with the generated text as the
//! argument of its first parameter.

use serde_json::{Value, json};

/// The parameter a simulated tool call fills: the first required one of a
/// JSON schema, else its first property.
pub(crate) fn first_param(schema: &Value) -> Option<String> {
    schema["required"][0]
        .as_str()
        .or_else(|| {
            schema["properties"]
                .as_object()?
                .keys()
                .next()
                .map(String::as_str)
        })
        .map(str::to_string)
}

/// The call's arguments: `{param: text}`, or `{}` for a tool without one.
pub(crate) fn arguments(param: &Option<String>, text: &str) -> Value {
    match param {
        Some(p) => json!({ p: text.trim() }),
        None => json!({}),
    }
}

/// Ollama's tool-call id: `call_` and 8 of `[a-z0-9]`.
pub(crate) fn call_id() -> String {
    const ABC: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..8)
        .map(|_| char::from(ABC[rand::random::<u32>() as usize % ABC.len()]))
        .collect();
    format!("call_{tail}")
}
