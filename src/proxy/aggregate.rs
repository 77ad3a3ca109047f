//! Answers from the fleet as a whole, built from the last scan: `/api/tags`
//! and `/v1/models` (every model of the healthy backends, once), `/api/ps`
//! (every loaded model, once), `/api/version`, and `GET /`.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::App;
use super::endpoint::Api;
use super::error::ProxyError;
use crate::model::ModelName;

/// `GET /` and `HEAD /`, as Ollama answers them.
pub async fn root() -> Response {
    let content_type = [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    (content_type, "Ollama is running").into_response()
}

/// The entries of every healthy backend, each model once (first backend by id wins).
fn union(app: &App, pick: fn(&crate::fleet::ProbeReport) -> &Vec<Value>) -> Vec<Value> {
    app.fleet.read(|s| {
        let mut seen = HashSet::new();
        let healthy = s.backends().values().filter(|b| b.healthy);
        healthy
            .flat_map(|b| pick(&b.report))
            .filter(|e| entry_id(e).is_some_and(|n| seen.insert(ModelName::parse(n))))
            .cloned()
            .collect()
    })
}

/// Every model of the fleet, newest-modified first, as Ollama lists them.
fn listed(app: &App) -> Vec<Value> {
    let mut models = union(app, |r| &r.tags);
    sort_by_modified(&mut models);
    models
}

/// Newest-modified first.
fn sort_by_modified(entries: &mut [Value]) {
    entries.sort_by_key(|e| std::cmp::Reverse(modified_unix(e)));
}

fn modified_unix(entry: &Value) -> i64 {
    entry
        .get("modified_at")
        .and_then(Value::as_str)
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or(0, |t| t.timestamp())
}

/// `GET /api/tags`.
pub async fn tags(State(app): State<Arc<App>>) -> Response {
    Json(json!({ "models": listed(&app) })).into_response()
}

/// `GET /api/ps`.
pub async fn ps(State(app): State<Arc<App>>) -> Response {
    Json(json!({ "models": union(&app, |r| &r.ps) })).into_response()
}

/// A `/api/tags` entry as an OpenAI model object, under the id `id`.
fn openai_model(entry: &Value, id: &str) -> Value {
    let owner = id
        .rsplit_once('/')
        .map_or("library", |(ns, _)| ns.rsplit('/').next().unwrap_or(ns));
    json!({ "id": id, "object": "model", "created": modified_unix(entry), "owned_by": owner })
}

fn entry_id(entry: &Value) -> Option<&str> {
    entry.get("model").or_else(|| entry.get("name"))?.as_str()
}

/// `GET /v1/models`, in OpenAI's list shape.
pub async fn v1_models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<Value> = listed(&app)
        .iter()
        .filter_map(|e| Some(openai_model(e, entry_id(e)?)))
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/models/{model}`: one model of the fleet; the id echoes the path.
pub async fn v1_model(State(app): State<Arc<App>>, Path(model): Path<String>) -> Response {
    let wanted = ModelName::parse(&model);
    let models = union(&app, |r| &r.tags);
    match models
        .iter()
        .find(|e| entry_id(e).is_some_and(|id| ModelName::parse(id) == wanted))
    {
        Some(entry) => Json(openai_model(entry, &model)).into_response(),
        None => ProxyError::UnknownModel(model).render(Api::OpenAi),
    }
}

/// `GET /api/version`: the version of a healthy backend.
pub async fn version(State(app): State<Arc<App>>) -> Result<Response, ProxyError> {
    let version = app.fleet.read(|s| {
        let mut healthy = s.backends().values().filter(|b| b.healthy);
        healthy.find_map(|b| b.report.version.clone())
    });
    let version = version.ok_or(ProxyError::NoHealthyBackend)?;
    Ok(Json(json!({ "version": version })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_modified_comes_first_whatever_the_offset() {
        let mut v = vec![
            json!({"model": "a", "modified_at": "2025-05-04T10:00:00-07:00"}),
            json!({"model": "b", "modified_at": "2025-05-04T18:00:00Z"}),
            json!({"model": "c"}),
        ];
        sort_by_modified(&mut v);
        let order: Vec<&str> = v.iter().map(|e| e["model"].as_str().unwrap()).collect();
        assert_eq!(order, ["b", "a", "c"]);
    }
}
