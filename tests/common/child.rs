//! Child processes: `corral` serving on a port it binds itself (started
//! with `PROXY_PORT=0` and JSON logs on a pipe, its address read from its
//! "corral listening" line, so no port is ever freed and bound again; its
//! log lines kept for the test, warnings and errors echoed), signals sent
//! by PID, and a bounded wait for a child's exit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

/// A `corral` child serving on `addr`; killed (SIGKILL) and reaped when dropped.
pub struct Corral {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub url: String,
    /// Every line it wrote to stderr so far (JSON).
    pub lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

/// A `corral` command with a clean environment (only `PATH`).
pub fn corral() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_corral"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

/// The address in a "corral listening" log line, if `line` is one.
fn listening_at(line: &str) -> Option<SocketAddr> {
    let v: Value = serde_json::from_str(line).ok()?;
    if !v["message"].as_str()?.contains("listening") {
        return None;
    }
    v["addr"].as_str()?.parse().ok()
}

/// Starts `command` (a `corral` that serves; its log level must let the
/// "corral listening" info line through) on 127.0.0.1, port 0, and waits
/// until it says where it listens.
pub async fn spawn(mut command: Command) -> Corral {
    command
        .env("PROXY_HOST", "127.0.0.1")
        .env("PROXY_PORT", "0")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("corral starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn({
        let lines = Arc::clone(&lines);
        move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listening_at(&line)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
                if line.contains(r#""level":"WARN""#) || line.contains(r#""level":"ERROR""#) {
                    eprintln!("corral: {line}");
                }
                lines.lock().unwrap().push(line);
            }
        }
    });
    let addr = super::unhung("corral says where it listens", rx)
        .await
        .unwrap_or_else(|_| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "corral exited before listening: {:?}",
                lines.lock().unwrap()
            )
        });
    Corral {
        child,
        addr,
        url: format!("http://{addr}"),
        lines,
        reader: Some(reader),
    }
}

impl Corral {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Kills it (SIGKILL), reaps it and reads its last log lines.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Sends it SIGTERM, by its PID.
    pub fn terminate(&self) {
        signal(&self.child, "TERM");
    }
}

/// Sends SIG`name` (`TERM`, `USR1`) to a child we started, by its PID.
pub fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {}", child.id());
}

/// Kills and reaps the child unless it was seen to exit (a failed wait).
struct KillUnlessExited<'a> {
    child: &'a mut Child,
    status: Option<ExitStatus>,
}

impl Drop for KillUnlessExited<'_> {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `child` exits, up to `deadline`; past it the child is
/// killed and the test fails, naming `what`.
pub async fn wait_exit(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    let mut wait = KillUnlessExited {
        child,
        status: None,
    };
    super::eventually(deadline, what, || {
        wait.status = wait.child.try_wait().unwrap();
        let exited = wait.status.is_some();
        async move { exited }
    })
    .await;
    wait.status.unwrap()
}

/// [`wait_exit`], then what the child wrote to its piped stdout and stderr.
pub async fn exited(mut child: Child, deadline: Duration, what: &str) -> Output {
    wait_exit(&mut child, deadline, what).await;
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

impl Drop for Corral {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child that is killed and reaped if the test ends, or panics, before
/// handing it to [`exited`]: a failed assertion leaves no process behind.
pub struct Reaped(Option<Child>);

impl Reaped {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The child, no longer guarded (for [`exited`]).
    pub fn take(mut self) -> Child {
        self.0.take().expect("taken once")
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("not taken")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
