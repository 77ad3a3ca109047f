//! The placement benchmark (`bench/run.sh placement`): four workloads
//! (chat, batch with shared prefixes, mixed models, control), each through
//! corral `cache-aware`, corral `least-busy` and (with `--nginx-url`) an
//! nginx `least_conn` over the same ports, side by side in one run, with the
//! bound an oracle would reach. Prints a Markdown table per workload, then
//! one JSON object of ratios (above 1: cache-aware is better) as its last line.
//!
//! ```text
//! cargo run --release --example placement -- --seed 7 --scale 1.0 \
//!     --port-start 31200 --nginx-url http://127.0.0.1:31190
//! ```

mod workload;

use clap::Parser;
use corral::config::Routing;
use serde_json::json;
use workload::{Kind, Measured, Target, measure};

#[derive(Parser)]
struct Cli {
    /// Workload seed (PLACEMENT_SEED).
    #[arg(long, env = "PLACEMENT_SEED", default_value_t = 1)]
    seed: u64,
    /// Factor on every workload's size (PLACEMENT_SCALE).
    #[arg(long, env = "PLACEMENT_SCALE", default_value_t = 1.0)]
    scale: f64,
    /// First port of the simulated fleet; 0 = any free block (then no nginx).
    #[arg(long, default_value_t = 0)]
    port_start: u16,
    /// An nginx least_conn over the fleet's ports.
    #[arg(long)]
    nginx_url: Option<String>,
    /// Only these workloads (chat, batch, mixed, control), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn row(t: &Target, m: &Measured) -> String {
    format!(
        "| {} | {:.3} | {:.3} | {:.2} | {:.2} | {} | {} | {} |",
        t.name(),
        m.ttft_p50,
        m.ttft_p99,
        m.makespan,
        m.throughput,
        m.prompt_tokens,
        m.loads,
        m.errors
    )
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1000.0).round() / 1000.0
    } else {
        f64::NAN
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if cli.nginx_url.is_some() && cli.port_start == 0 {
        eprintln!("--nginx-url needs --port-start (the ports nginx points at)");
        std::process::exit(2);
    }
    let mut targets = vec![
        Target::Corral(Routing::CacheAware),
        Target::Corral(Routing::LeastBusy),
    ];
    if let Some(u) = &cli.nginx_url {
        targets.push(Target::Nginx(u.clone()));
    }
    let mut ratios = serde_json::Map::new();
    for kind in Kind::ALL {
        if !cli.only.is_empty() && !cli.only.iter().any(|o| o == kind.name()) {
            continue;
        }
        let mut results = Vec::new();
        for t in &targets {
            let m = measure(kind, t, cli.seed, cli.scale, cli.port_start).await;
            eprintln!("{} / {}: {m:?}", kind.name(), t.name());
            results.push((t.clone(), m));
        }
        let oracle = &results[0].1;
        println!(
            "\n### {} (seed {}, scale {})\n",
            kind.name(),
            cli.seed,
            cli.scale
        );
        println!(
            "| target | TTFT p50 s | TTFT p99 s | makespan s | req/s | prompt tokens evaluated | model loads | errors |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (t, m) in &results {
            println!("{}", row(t, m));
        }
        println!(
            "| oracle bound | | | | | {} | {} | |",
            oracle.oracle_tokens, oracle.oracle_loads
        );
        let (ca, lb) = (&results[0].1, &results[1].1);
        match kind {
            Kind::Chat => {
                ratios.insert(
                    "chat_ttft_p50_ratio".into(),
                    json!(ratio(lb.ttft_p50, ca.ttft_p50)),
                );
                ratios.insert(
                    "chat_ttft_p99_ratio".into(),
                    json!(ratio(lb.ttft_p99, ca.ttft_p99)),
                );
                ratios.insert(
                    "chat_prompt_tokens_ratio".into(),
                    json!(ratio(lb.prompt_tokens as f64, ca.prompt_tokens as f64)),
                );
            }
            Kind::Batch => {
                ratios.insert(
                    "batch_prompt_tokens_ratio".into(),
                    json!(ratio(lb.prompt_tokens as f64, ca.prompt_tokens as f64)),
                );
                ratios.insert(
                    "batch_makespan_ratio".into(),
                    json!(ratio(lb.makespan, ca.makespan)),
                );
            }
            Kind::Mixed => {
                ratios.insert(
                    "mixed_loads_ratio".into(),
                    json!(ratio(lb.loads as f64, ca.loads as f64)),
                );
                ratios.insert(
                    "mixed_ttft_p50_ratio".into(),
                    json!(ratio(lb.ttft_p50, ca.ttft_p50)),
                );
            }
            Kind::Control => {
                ratios.insert(
                    "control_throughput_ratio".into(),
                    json!(ratio(ca.throughput, lb.throughput)),
                );
                ratios.insert(
                    "control_ttft_ratio".into(),
                    json!(ratio(lb.ttft_p50, ca.ttft_p50)),
                );
            }
        }
    }
    println!("{}", serde_json::Value::Object(ratios));
}
