//! What makes `corral demo` move (unless `--quiet`): a little traffic from
//! two clients, and batch "jobs" that come and go. Each job is a simulated
//! backend that joins the way a real cluster job does, with
//! [`crate::register::run`] (register, renew, and at its end drain, wait,
//! deregister), so the dashboard shows a fleet at work the moment it opens.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RegisterArgs;
use crate::sim::SimServer;

/// How often a job starts or ends.
const CHURN_EVERY: Duration = Duration::from_secs(6);

/// Jobs running at most; at least one is kept.
const MAX_JOBS: usize = 4;

/// What the demo's clients ask.
const PROMPTS: [(&str, &str); 4] = [
    ("llama3.2", "Why is the sky blue?"),
    ("llama3.2", "Write a haiku about queues."),
    ("mistral", "What is a load balancer?"),
    ("llama3.2", "Explain backpressure in one sentence."),
];

/// A running job: its backend and the way to end it.
struct Job {
    server: SimServer,
    end: oneshot::Sender<()>,
    helper: JoinHandle<Result<(), String>>,
}

impl Job {
    async fn start(proxy: SocketAddr, index: usize) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let server = SimServer::start(listener, super::backend_spec(index)).await?;
        let args = RegisterArgs {
            proxy: format!("http://{proxy}")
                .parse()
                .expect("an address is a URL"),
            url: format!("http://127.0.0.1:{}", server.port())
                .parse()
                .expect("an address is a URL"),
            lease: Duration::from_secs(5),
            check: None,
            grace: Duration::from_secs(10),
            key: String::new(),
        };
        let (end, ended) = oneshot::channel::<()>();
        let helper = tokio::spawn(crate::register::run(args, async {
            let _ = ended.await;
        }));
        Ok(Self {
            server,
            end,
            helper,
        })
    }

    /// Ends the job as a batch job ends: drained, finished, deregistered, gone.
    async fn stop(self) {
        let _ = self.end.send(());
        if let Ok(Err(e)) = self.helper.await {
            tracing::warn!(error = %e, "demo job: leaving the fleet failed");
        }
        self.server.kill().await;
    }
}

/// Runs the traffic and the jobs until `stop` is cancelled, then ends every job.
pub async fn run(proxy: SocketAddr, stop: CancellationToken) {
    let clients: Vec<_> = (0..2)
        .map(|_| tokio::spawn(traffic(proxy, stop.clone())))
        .collect();
    let mut jobs: Vec<Job> = Vec::new();
    let mut started = 0usize;
    let mut ticker = tokio::time::interval(CHURN_EVERY);
    for tick in 0u64.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        // Two jobs, then one leaves and one joins in turn: the fleet is seen
        // to move within the first few ticks, every time.
        let grow = jobs.len() < 2 || (jobs.len() < MAX_JOBS && tick % 2 == 1);
        if grow {
            match Job::start(proxy, 100 + started).await {
                Ok(job) => {
                    started += 1;
                    jobs.push(job);
                }
                Err(e) => tracing::warn!(error = %e, "demo job: cannot start"),
            }
        } else {
            jobs.remove(0).stop().await;
        }
    }
    for job in jobs {
        job.stop().await;
    }
    for c in clients {
        let _ = c.await;
    }
}

/// One client: a request, a pause of up to a second and a half, again.
async fn traffic(proxy: SocketAddr, stop: CancellationToken) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri: http::Uri = format!("http://{proxy}/api/generate")
        .parse()
        .expect("an address is a URL");
    loop {
        let (model, prompt) = PROMPTS[rand::random_range(0..PROMPTS.len())];
        let body = serde_json::json!({ "model": model, "prompt": prompt, "stream": false });
        let request = http::Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a valid request");
        let exchange = async {
            if let Ok(response) = client.request(request).await {
                let _ = response.into_body().collect().await;
            }
        };
        let pause = Duration::from_millis(rand::random_range(200..1500));
        tokio::select! {
            () = stop.cancelled() => return,
            () = async { exchange.await; tokio::time::sleep(pause).await } => {}
        }
    }
}
