//! A recording HTTP receiver on loopback, scripted per request.
//!
//! The demo, the integration tests and the load tool use it as "the partner": it records every
//! request (path, headers, exact body bytes, `webhook-id`) and answers as its [`Script`] says:
//! any status, a `Retry-After`, or no answer at all (a black hole).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub webhook_id: Option<String>,
    pub request_id: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// How many times this `webhook-id` had been seen before (0 for the first).
    pub seen_before: usize,
    pub at: Instant,
}

/// How to answer one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// A status with a `Retry-After` header.
    RetryAfter(u16, String),
    /// A 3xx status with a `Location` header.
    Redirect(u16, String),
    /// A status after a delay (a slow receiver).
    Delayed(u16, Duration),
    /// Accept the request and never answer.
    Hang,
}

/// Decides the reply from the request.
pub type Script = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// Always `200`.
pub fn always_ok() -> Script {
    Arc::new(|_| Reply::Status(200))
}

/// `status` for the first `n` requests of each `webhook-id`, then `200`.
pub fn fail_first(n: usize, status: u16) -> Script {
    Arc::new(move |r| Reply::Status(if r.seen_before < n { status } else { 200 }))
}

struct Shared {
    log: Mutex<Vec<Received>>,
    script: Script,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Receiver {
    /// Listens on `addr` (use port 0 for a free port).
    pub async fn start(addr: SocketAddr, script: Script) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            script,
        });
        let stop = CancellationToken::new();
        let app = Router::new().fallback(record).with_state(shared.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Ok(Self { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.log.lock().expect("receiver log lock").clone()
    }

    /// Number of requests per `webhook-id`.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.shared.log.lock().expect("receiver log lock").iter() {
            *counts
                .entry(r.webhook_id.clone().unwrap_or_default())
                .or_insert(0) += 1;
        }
        counts
    }

    /// Waits until `done` holds for the log, checking every 20 ms, for at most `limit`.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.shared.log.lock().expect("receiver log lock")) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn record(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let webhook_id = header("webhook-id");
    let received = {
        let mut log = shared.log.lock().expect("receiver log lock");
        let seen_before = log
            .iter()
            .filter(|r| r.webhook_id == webhook_id && webhook_id.is_some())
            .count();
        let received = Received {
            path: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_string(), |p| p.to_string()),
            request_id: header("api-notify-request-id"),
            webhook_id,
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
            seen_before,
            at: Instant::now(),
        };
        log.push(received.clone());
        received
    };
    match (shared.script)(&received) {
        Reply::Status(code) => status(code).into_response(),
        Reply::RetryAfter(code, after) => (status(code), [("retry-after", after)]).into_response(),
        Reply::Redirect(code, to) => (status(code), [("location", to)]).into_response(),
        Reply::Delayed(code, delay) => {
            tokio::time::sleep(delay).await;
            status(code).into_response()
        }
        Reply::Hang => std::future::pending().await,
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
