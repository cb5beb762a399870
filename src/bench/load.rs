//! The load generator: many keep-alive HTTP requests in flight, closed or open loop.
//!
//! `concurrency` workers share one reqwest client (one connection each, reused). Without a rate
//! every worker sends its next request as soon as the last one was answered; with a rate,
//! request `i` is due at `start + i / rate` and its latency counts from that moment, not from
//! when a worker got round to it, so a stalled server shows up in the percentiles instead of
//! silently lowering the offered load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

use super::sink::parse_id;

/// Where requests go.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    /// `POST /v1/notifications` on the gateway.
    Gateway(SocketAddr),
    /// The delivery body straight to the receiver, with a made-up `webhook-id`: the ceiling.
    Direct,
}

/// What to send.
#[derive(Debug, Clone)]
pub(super) struct LoadSpec {
    /// Stop after this many requests…
    pub(super) count: u64,
    /// …or after this long, whichever comes first.
    pub(super) duration: Duration,
    /// Requests per second; 0 sends as fast as answers come back.
    pub(super) rate_per_sec: f64,
    pub(super) concurrency: usize,
    pub(super) partners: usize,
    /// Receiver ports; notification `i` goes to `ports[i % len]`.
    pub(super) ports: Vec<u16>,
    pub(super) body_bytes: usize,
    /// Makes request ids unique across runs against the same database.
    pub(super) run_id: String,
}

/// One accepted notification: its id and when the caller started sending it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sent {
    pub(super) id: u128,
    pub(super) at: Instant,
}

/// What the load generator saw.
#[derive(Debug, Default)]
pub(super) struct LoadResult {
    pub(super) accepted: Vec<Sent>,
    /// Answers other than 202 (or 2xx for the ceiling), and transport errors.
    pub(super) refused: u64,
    pub(super) first_refusal: Option<String>,
    /// Request latencies of accepted requests, in microseconds.
    pub(super) latency_us: Vec<u32>,
    pub(super) started: Option<Instant>,
    pub(super) elapsed: Duration,
}

#[derive(Deserialize)]
struct AcceptedIn {
    id: String,
}

/// Sends per `spec` to `target` and returns what happened.
pub(super) async fn run(spec: &LoadSpec, target: Target) -> anyhow::Result<LoadResult> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(spec.concurrency)
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the load client")?;
    let spec = Arc::new(spec.clone());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..spec.concurrency.max(1) {
        let (client, spec, next) = (client.clone(), spec.clone(), next.clone());
        workers.spawn(async move { worker(&client, &spec, target, &next, started).await });
    }
    let mut total = LoadResult {
        started: Some(started),
        ..LoadResult::default()
    };
    while let Some(joined) = workers.join_next().await {
        let part = joined.context("a load worker panicked")?;
        total.accepted.extend(part.accepted);
        total.latency_us.extend(part.latency_us);
        total.refused += part.refused;
        total.first_refusal = total.first_refusal.or(part.first_refusal);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

async fn worker(
    client: &reqwest::Client,
    spec: &LoadSpec,
    target: Target,
    next: &AtomicU64,
    started: Instant,
) -> LoadResult {
    let mut out = LoadResult::default();
    let pad = "x".repeat(spec.body_bytes.saturating_sub(40));
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= spec.count || started.elapsed() >= spec.duration {
            return out;
        }
        let at = if spec.rate_per_sec > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / spec.rate_per_sec);
            tokio::time::sleep_until(due.into()).await;
            due
        } else {
            Instant::now()
        };
        match send_one(client, spec, target, i, &pad).await {
            Ok(id) => {
                let micros = at.elapsed().as_micros();
                out.latency_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
                out.accepted.push(Sent { id, at });
            }
            Err(e) => {
                out.refused += 1;
                out.first_refusal.get_or_insert(e);
            }
        }
    }
}

/// Sends request `i`; the id the receiver will see, or why it was not accepted.
async fn send_one(
    client: &reqwest::Client,
    spec: &LoadSpec,
    target: Target,
    i: u64,
    pad: &str,
) -> Result<u128, String> {
    let partner = i as usize % spec.partners.max(1);
    let port = spec.ports[i as usize % spec.ports.len()];
    let body = format!("{{\"seq\":{i},\"partner\":{partner},\"pad\":\"{pad}\"}}");
    let request = match target {
        Target::Gateway(addr) => {
            let document = format!(
                "{{\"request_id\":\"{run}-{i}\",\"partner_id\":\"p{partner}\",\
                 \"endpoints\":[{{\"ip\":\"127.0.0.1\",\"port\":{port},\"path\":\"/p{partner}\"}}],\
                 \"headers\":{{\"content-type\":\"application/json\"}},\"body\":{body}}}",
                run = spec.run_id
            );
            client
                .post(format!("http://{addr}/v1/notifications"))
                .body(document)
        }
        Target::Direct => client
            .post(format!("http://127.0.0.1:{port}/p{partner}"))
            .header("webhook-id", format!("msg_{:032x}", u128::from(i) + 1))
            .body(body),
    };
    let response = request
        .header("content-type", "application/json")
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    match target {
        Target::Gateway(_) if status == reqwest::StatusCode::ACCEPTED => {
            let answer: AcceptedIn = serde_json::from_slice(&bytes)
                .map_err(|e| format!("202 without a readable id: {e}"))?;
            Ok(parse_id(&answer.id))
        }
        Target::Direct if status.is_success() => Ok(u128::from(i) + 1),
        _ => Err(format!("{status}: {}", String::from_utf8_lossy(&bytes))),
    }
}
