//! The job scripts of `examples/cluster/` run end to end, as a batch
//! scheduler would run them, with `corral sim` standing in for `ollama
//! serve` (`sim-ollama.sh`): the backend registers with a corral and serves;
//! the scheduler's warning signal (TERM for Slurm, USR1 for SGE's soft
//! limit) makes the job drain, deregister, stop its Ollama and exit 0.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestFleet, TestProxy, child, eventually, generate, start_proxy};
use serde_json::Value;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/cluster")
}

/// Starts a job script the way the scheduler would, pointed at `proxy`.
fn submit(script: &str, proxy: &TestProxy) -> Child {
    let dir = examples();
    Command::new("bash")
        .arg(dir.join(script))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("CORRAL_EXAMPLES", &dir)
        .env("CORRAL_PROXY", &proxy.url)
        .env("CORRAL_BIN", env!("CARGO_BIN_EXE_corral"))
        .env("OLLAMA_BIN", dir.join("sim-ollama.sh"))
        .env("CORRAL_NODE", "127.0.0.1")
        .env("OLLAMA_BIND", "127.0.0.1")
        .env("CORRAL_LEASE_SECONDS", "1")
        .env("CORRAL_GRACE_SECONDS", "10")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The registered backends' ids.
async fn registered(proxy: &TestProxy) -> Vec<String> {
    let v = proxy.get_json("/__proxy/backends").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["healthy"] == true)
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn run_job(script: &'static str, signal: &'static str) {
    let empty = TestFleet::start(Vec::new(), 1).await;
    let proxy = start_proxy(&empty, |a| a.scan_interval = Duration::from_millis(200)).await;
    let job = submit(script, &proxy);
    eventually(
        Duration::from_secs(20),
        "the job's backend registered and healthy",
        || async { registered(&proxy).await.len() == 1 },
    )
    .await;
    let id = registered(&proxy).await.remove(0);
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], id.as_str());
    let body: Value = r.json().await.unwrap();
    assert!(!body["response"].as_str().unwrap().is_empty());

    child::signal(&job, signal);
    let out = child::exited(
        job,
        Duration::from_secs(30),
        &format!("{script} ends within 30 s of SIG{signal}"),
    )
    .await;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script}: {:?}\n{log}", out.status);
    assert!(log.contains("run-backend: done (exit 0)"), "{log}");
    let rows = proxy.get_json("/__proxy/backends").await;
    assert_eq!(
        rows["backends"],
        serde_json::json!([]),
        "deregistered: {log}"
    );
    // Its Ollama stopped too: nothing answers on its port any more.
    let port: u16 = id.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the simulated ollama still listens on {port}"
    );
}

#[tokio::test]
async fn the_slurm_job_serves_and_leaves_cleanly_on_term() {
    run_job("slurm-job.sh", "TERM").await;
}

#[tokio::test]
async fn the_sge_job_serves_and_leaves_cleanly_on_the_soft_limit_signal() {
    run_job("sge-job.sh", "USR1").await;
}
