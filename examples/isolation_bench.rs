//! Partner isolation benchmark: how fast a healthy partner's notifications are delivered alone,
//! and again while another partner's endpoint accepts connections and never answers.
//!
//! Run: `cargo run --release --example isolation_bench -- [COUNT]` (default 5,000 per run).
//! Embedded mode (SQLite) on loopback; prints both rates and their ratio for docs/benchmarks.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_notify::config::{Config, Secret};
use api_notify::receiver::{self, Receiver, Reply};
use api_notify::server::{self, Roles};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5_000);
    let alone = run(count, false).await?;
    let beside = run(count, true).await?;
    println!("healthy partner alone:                  {alone:>8.0} notifications/s");
    println!("healthy partner beside a black hole:    {beside:>8.0} notifications/s");
    println!(
        "ratio:                                  {:>8.1} %",
        100.0 * beside / alone
    );
    Ok(())
}

/// Delivers `count` notifications to a healthy partner and returns the end-to-end rate.
async fn run(count: usize, black_hole: bool) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.database.url = Secret::new(format!("sqlite://{}", dir.path().join("b.db").display()));
    config.outbound.allow_cidrs = vec!["127.0.0.0/8".parse()?];
    config.outbound.request_timeout_ms = 5_000;
    config.dispatch.poll_interval_ms = 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(server::run(
        config,
        Roles::ALL,
        Some(listener),
        stop.clone(),
    ));
    let good =
        Receiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), receiver::always_ok()).await?;
    let hole = Receiver::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::new(|_: &receiver::Received| Reply::Hang),
    )
    .await?;
    let client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(300)).await;

    if black_hole {
        post_all(&client, &base, "blackhole", hole.addr(), 1_000).await;
    }
    let start = Instant::now();
    post_all(&client, &base, "healthy", good.addr(), count).await;
    let done = good
        .wait_until(Duration::from_secs(300), |log| log.len() >= count)
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    anyhow::ensure!(done, "not every healthy notification arrived");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), gateway).await;
    Ok(count as f64 / elapsed)
}

async fn post_all(
    client: &reqwest::Client,
    base: &str,
    partner: &str,
    target: SocketAddr,
    count: usize,
) {
    let body = "x".repeat(1000);
    futures::stream::iter(0..count)
        .map(|i| {
            let n = json!({"request_id": format!("{partner}-{i}"), "partner_id": partner,
                "endpoints": [{"ip": "127.0.0.1", "port": target.port()}], "body": {"pad": body}});
            let request = client
                .post(format!("{base}/v1/notifications"))
                .json(&n)
                .send();
            async move { request.await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(64)
        .for_each(|_| async {})
        .await;
}
