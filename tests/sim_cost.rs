//! Black-box tests of the simulator's cost model: the per-slot prompt cache
//! and its host-memory cache, prompt evaluation time, `max_loaded` with
//! least-recently-used eviction, and `num_ctx` reloads, seen through the
//! answers, `/api/ps` and `/__sim/stats`.

use std::time::Duration;

use corral::sim::{ModelSpec, ServerSpec, SimServer, Stats};
use serde_json::{Value, json};
use tokio::net::TcpListener;

async fn start(spec: ServerSpec) -> SimServer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimServer::start(l, spec).await.unwrap()
}

async fn post(s: &SimServer, path: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("http://{}{path}", s.addr()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn get(s: &SimServer, path: &str) -> Value {
    reqwest::get(format!("http://{}{path}", s.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn stats(s: &SimServer) -> Stats {
    serde_json::from_value(get(s, "/__sim/stats").await).unwrap()
}

fn words(n: usize, tag: &str) -> String {
    (0..n)
        .map(|i| format!("{tag}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn chat(messages: &[(&str, &str)], options: Value) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    json!({"model": "llama3.2", "messages": messages, "stream": false, "options": options})
}

fn spec() -> ServerSpec {
    ServerSpec {
        token_interval: Duration::ZERO,
        prompt_speed: 1_000_000.0,
        ..ServerSpec::default()
    }
}

#[tokio::test]
async fn the_next_turn_on_the_same_slot_evaluates_only_the_new_tokens() {
    let s = start(spec()).await;
    let system = words(300, "s");
    let first = chat(&[("system", &system), ("user", "hello there")], json!({}));
    let a = post(&s, "/api/chat", first).await;
    // Markers of system, user and assistant, 300 + 2 words.
    assert_eq!(a["prompt_eval_count"], 305, "{a}");
    let answer = a["message"]["content"].as_str().unwrap().to_owned();
    let answer_tokens = answer.split_whitespace().count() as u64;

    let second = chat(
        &[
            ("system", &system),
            ("user", "hello there"),
            ("assistant", &answer),
            ("user", "and three more"),
        ],
        json!({}),
    );
    let b = post(&s, "/api/chat", second).await;
    // Only the user marker, three words and the assistant marker are new.
    assert_eq!(b["prompt_eval_count"], 5, "{b}");

    let st = stats(&s).await;
    assert_eq!(st.prompt_tokens_evaluated, 305 + 5);
    assert_eq!(st.prompt_tokens_reused, 305 + answer_tokens);
    assert_eq!((st.loads, st.reloads, st.evictions), (1, 0, 0));
}

#[tokio::test]
async fn an_identical_prompt_evaluates_one_token_and_reports_the_time() {
    let s = start(ServerSpec {
        prompt_speed: 10_000.0,
        ..spec()
    })
    .await;
    let body = json!({"model": "llama3.2", "prompt": words(999, "w"), "stream": false});
    let a = post(&s, "/api/generate", body.clone()).await;
    assert_eq!(a["prompt_eval_count"], 1001);
    // 1001 tokens at 10,000 per second.
    assert_eq!(a["prompt_eval_duration"], 100_100_000u64, "{a}");
    let b = post(&s, "/api/generate", body).await;
    assert_eq!(b["prompt_eval_count"], 1);
    assert_eq!(b["prompt_eval_duration"], 100_000u64);
}

#[tokio::test]
async fn another_prompt_between_turns_is_found_in_host_memory() {
    let s = start(spec()).await;
    let job_a = words(200, "a");
    let job_b = words(200, "b");
    let ask = |system: &str, prompt: &str| json!({"model": "llama3.2", "system": system, "prompt": prompt, "stream": false});
    post(&s, "/api/generate", ask(&job_a, "first")).await;
    post(&s, "/api/generate", ask(&job_b, "first")).await;
    let again = post(&s, "/api/generate", ask(&job_a, "second")).await;
    // The system marker is shared by all: 1 + 200 + user marker are reused.
    assert_eq!(again["prompt_eval_count"], 2, "{again}");

    let small = start(ServerSpec {
        prompt_cache: 0,
        ..spec()
    })
    .await;
    post(&small, "/api/generate", ask(&job_a, "first")).await;
    post(&small, "/api/generate", ask(&job_b, "first")).await;
    let again = post(&small, "/api/generate", ask(&job_a, "second")).await;
    assert_eq!(
        again["prompt_eval_count"], 203,
        "without host memory: {again}"
    );
}

#[tokio::test]
async fn a_num_ctx_change_reloads_the_runner() {
    let s = start(spec()).await;
    let ps_ctx = |ps: &Value| ps["models"][0]["context_length"].clone();
    let turn = chat(&[("user", &words(50, "x"))], json!({}));
    post(&s, "/api/chat", turn.clone()).await;
    assert_eq!(ps_ctx(&get(&s, "/api/ps").await), 4096);
    // No num_ctx: whatever is loaded is used, and the cache still holds.
    let b = post(&s, "/api/chat", turn).await;
    assert_eq!(b["prompt_eval_count"], 1);

    let big = chat(&[("user", &words(50, "x"))], json!({"num_ctx": 8192}));
    let c = post(&s, "/api/chat", big.clone()).await;
    assert_eq!(ps_ctx(&get(&s, "/api/ps").await), 8192);
    assert_eq!(
        c["prompt_eval_count"], 52,
        "a new runner has an empty cache"
    );
    post(&s, "/api/chat", big).await;
    let st = stats(&s).await;
    assert_eq!((st.loads, st.reloads), (2, 1));
}

#[tokio::test]
async fn max_loaded_evicts_the_least_recently_used_idle_model() {
    let s = start(ServerSpec {
        models: ["llama3.2", "qwen3", "gemma3"]
            .map(ModelSpec::named)
            .to_vec(),
        max_loaded: 2,
        ..spec()
    })
    .await;
    let ask = |model: &str| json!({"model": model, "prompt": "hi", "stream": false});
    for m in ["llama3.2", "qwen3", "llama3.2", "gemma3"] {
        post(&s, "/api/generate", ask(m)).await;
    }
    let ps = get(&s, "/api/ps").await;
    let mut names: Vec<&str> = ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["gemma3:latest", "llama3.2:latest"], "{ps}");
    let st = stats(&s).await;
    assert_eq!((st.loads, st.evictions, st.reloads), (3, 1, 0));
}

#[tokio::test]
async fn each_model_has_its_own_load_time() {
    let slow = ModelSpec {
        load_time: Some(Duration::from_millis(300)),
        ..ModelSpec::named("qwen3")
    };
    let s = start(ServerSpec {
        models: vec![ModelSpec::named("llama3.2"), slow],
        ..spec()
    })
    .await;
    let ask = |model: &str| json!({"model": model, "prompt": "hi", "stream": false});
    let fast = post(&s, "/api/generate", ask("llama3.2")).await;
    let slow = post(&s, "/api/generate", ask("qwen3")).await;
    assert!(
        fast["load_duration"].as_u64().unwrap() < 300_000_000,
        "{fast}"
    );
    assert!(
        slow["load_duration"].as_u64().unwrap() >= 300_000_000,
        "{slow}"
    );
}
