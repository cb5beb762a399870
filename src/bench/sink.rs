//! The load tool's receiver: cheap enough that it is not what a benchmark measures.
//!
//! [`crate::receiver`] keeps every request (headers, body) for tests to inspect, and finds
//! repeats by scanning its log; at 100,000 requests both cost too much. This one keeps, per
//! request, only the `webhook-id` (as a number), the time it arrived and whether it was answered
//! with a 2xx, in a vector behind one lock. The behaviour can be switched while it runs, which
//! is how the backlog scenario turns the partner off and on again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Behaviour {
    /// `200` at once.
    Fast,
    /// `200` after `--slow-ms`.
    Slow,
    /// `503` to the first request of each `webhook-id`, `200` to the next.
    Failing,
    /// Reads the request and never answers.
    BlackHole,
    /// `503` to everything (the backlog scenario's "partner down").
    Down,
}

/// One request that the receiver answered with a 2xx.
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrival {
    pub(super) id: u128,
    pub(super) at: Instant,
    /// Whether it carried a `webhook-signature` header.
    pub(super) signed: bool,
}

/// A running receiver on one or more loopback ports; stops when dropped.
pub(super) struct Sink {
    ports: Vec<u16>,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

struct Shared {
    behaviour: AtomicU8,
    slow: Duration,
    delivered: Mutex<Vec<Arrival>>,
    delivered_count: AtomicUsize,
    failed_once: Mutex<HashSet<u128>>,
}

const BEHAVIOURS: [Behaviour; 5] = [
    Behaviour::Fast,
    Behaviour::Slow,
    Behaviour::Failing,
    Behaviour::BlackHole,
    Behaviour::Down,
];

impl Sink {
    /// Listens on `listeners` free ports of 127.0.0.1 (one per endpoint).
    pub(super) async fn start(
        listeners: usize,
        behaviour: Behaviour,
        slow: Duration,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            behaviour: AtomicU8::new(0),
            slow,
            delivered: Mutex::new(Vec::with_capacity(1 << 16)),
            delivered_count: AtomicUsize::new(0),
            failed_once: Mutex::new(HashSet::new()),
        });
        let stop = CancellationToken::new();
        let mut ports = Vec::with_capacity(listeners);
        for _ in 0..listeners.max(1) {
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            ports.push(listener.local_addr()?.port());
            let app = Router::new().fallback(answer).with_state(shared.clone());
            let until = stop.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(until.cancelled_owned())
                    .await;
            });
        }
        let sink = Self {
            ports,
            shared,
            stop,
        };
        sink.set(behaviour);
        Ok(sink)
    }

    pub(super) fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Switches the behaviour for the requests that arrive from now on.
    pub(super) fn set(&self, behaviour: Behaviour) {
        let index = BEHAVIOURS.iter().position(|b| *b == behaviour).unwrap_or(0);
        self.shared.behaviour.store(index as u8, Ordering::Relaxed);
    }

    /// Requests answered with a 2xx so far.
    pub(super) fn delivered_count(&self) -> usize {
        self.shared.delivered_count.load(Ordering::Relaxed)
    }

    /// Takes the arrivals recorded so far and starts a fresh log.
    pub(super) fn take(&self) -> Vec<Arrival> {
        self.shared.delivered_count.store(0, Ordering::Relaxed);
        self.shared.failed_once.lock().expect("sink lock").clear();
        std::mem::take(&mut *self.shared.delivered.lock().expect("sink lock"))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The numeric form of a `webhook-id` (`msg_` and 32 hex digits); 0 when absent or malformed.
pub(super) fn parse_id(text: &str) -> u128 {
    let hex = text.strip_prefix("msg_").unwrap_or(text);
    u128::from_str_radix(hex, 16).unwrap_or(0)
}

async fn answer(State(shared): State<Arc<Shared>>, headers: HeaderMap, _body: Bytes) -> StatusCode {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .map_or(0, parse_id);
    let behaviour = BEHAVIOURS[usize::from(shared.behaviour.load(Ordering::Relaxed))];
    match behaviour {
        Behaviour::Fast => {}
        Behaviour::Slow => tokio::time::sleep(shared.slow).await,
        Behaviour::Down => return StatusCode::SERVICE_UNAVAILABLE,
        Behaviour::BlackHole => std::future::pending::<()>().await,
        Behaviour::Failing => {
            if shared.failed_once.lock().expect("sink lock").insert(id) {
                return StatusCode::SERVICE_UNAVAILABLE;
            }
        }
    }
    let at = Instant::now();
    let signed = headers.contains_key("webhook-signature");
    shared
        .delivered
        .lock()
        .expect("sink lock")
        .push(Arrival { id, at, signed });
    shared.delivered_count.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_notification_ids_as_numbers() {
        assert_eq!(
            parse_id("msg_000000000000000000000000000000ff"),
            255,
            "hex after msg_"
        );
        assert_eq!(parse_id("not an id"), 0, "malformed ids map to 0");
    }
}
