//! One delivery attempt: POST to the endpoints in order until one answers.
//!
//! Failover: a transport failure (refused, reset, timeout, TLS) moves on to the next endpoint in
//! the same attempt; an HTTP answer ends the attempt, whatever its status. Success is 2xx only;
//! `410 Gone` ends the notification; 3xx is a failure and is never followed (a redirect could
//! lead past the address guard). Every endpoint is re-checked by the guard right before connect.

use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};

use super::backoff::parse_retry_after;
use crate::config::OutboundConfig;
use crate::guard::AddressGuard;
use crate::model::{Endpoint, now_ms};
use crate::plugin::{OutboundRequest, PluginError, Plugins};
use crate::store::{AttemptRecord, Claimed};

/// Header carrying the notification id; stable across attempts and replays.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Header carrying the caller's `request_id`.
pub const REQUEST_ID: &str = "api-notify-request-id";

/// What the attempt means for the notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again later; the receiver may have asked for a delay.
    Failed {
        retry_after: Option<Duration>,
    },
    /// Never try again (410 Gone, or every endpoint refused by the guard).
    Final,
}

impl AttemptResult {
    /// True when the failure says the partner is unhealthy (feeds the circuit breaker): no
    /// answer at all, 5xx, 429 or 408. Other 4xx mean the partner is up and said no.
    pub fn partner_unhealthy(&self) -> bool {
        if !matches!(self.verdict, Verdict::Failed { .. }) {
            return false;
        }
        match self.record.status_code {
            Some(code) => code >= 500 || code == 429 || code == 408,
            None => true,
        }
    }
}

/// An attempt's verdict and its log row.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub verdict: Verdict,
    pub record: AttemptRecord,
}

/// Sends attempts. Holds the one HTTP client, built with the timeouts and without redirects.
#[derive(Debug, Clone)]
pub struct Delivery {
    client: reqwest::Client,
    guard: AddressGuard,
    excerpt_bytes: usize,
    /// Partner plugins run on each request right before it is sent.
    plugins: Option<Plugins>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl Delivery {
    pub fn new(config: &OutboundConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .pool_idle_timeout(Duration::from_millis(config.pool_idle_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .user_agent(concat!("api-notify/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let guard = AddressGuard::new(config.allow_cidrs.clone());
        Ok(Self {
            client,
            guard,
            excerpt_bytes: config.response_excerpt_bytes,
            plugins: None,
            metrics: None,
        })
    }

    /// Runs each partner's plugin on its requests, counting the calls in `metrics`.
    pub fn with_plugins(
        mut self,
        plugins: Plugins,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        self.plugins = Some(plugins);
        self.metrics = Some(metrics);
        self
    }

    /// Makes attempt number `claimed.attempts + 1`; `timeout` overrides the client's total
    /// deadline per POST.
    pub async fn attempt(&self, claimed: &Claimed, timeout: Option<Duration>) -> AttemptResult {
        let started_at_ms = now_ms();
        let clock = Instant::now();
        let mut failures: Vec<String> = Vec::new();
        let mut class = "blocked";
        let mut last_endpoint = None;
        for endpoint in &claimed.endpoints {
            last_endpoint = Some(endpoint.to_string());
            if let Err(refusal) = self.guard.check(endpoint.ip) {
                failures.push(format!(
                    "{endpoint}: refused by the address guard: {refusal}"
                ));
                continue;
            }
            let (request, plugin_version) = match self.prepare(claimed, endpoint).await {
                Ok(prepared) => prepared,
                Err((error, version)) => {
                    let record = AttemptRecord {
                        endpoint: Some(endpoint.to_string()),
                        plugin_version: version,
                        error_class: Some(PluginError::CLASS.to_string()),
                        error: Some(error.to_string()),
                        ..Default::default()
                    };
                    let failed = AttemptResult {
                        verdict: Verdict::Failed { retry_after: None },
                        record,
                    };
                    return finish(failed, started_at_ms, clock);
                }
            };
            match self.send(request, timeout).await {
                Ok(response) => {
                    let mut result = self.judge(response).await;
                    result.record.endpoint = Some(endpoint.to_string());
                    result.record.plugin_version = plugin_version;
                    if !failures.is_empty() {
                        let earlier = failures.join("; ");
                        let own = result.record.error.take();
                        result.record.error = Some(match own {
                            Some(own) => format!("{own} (after {earlier})"),
                            None => format!("delivered after failover: {earlier}"),
                        });
                    }
                    return finish(result, started_at_ms, clock);
                }
                Err(e) => {
                    class = transport_class(&e);
                    failures.push(format!("{endpoint}: {}", describe(&e)));
                }
            }
        }
        let verdict = if class == "blocked" {
            Verdict::Final
        } else {
            Verdict::Failed { retry_after: None }
        };
        let record = AttemptRecord {
            endpoint: last_endpoint,
            error_class: Some(class.to_string()),
            error: Some(failures.join("; ")),
            ..Default::default()
        };
        finish(AttemptResult { verdict, record }, started_at_ms, clock)
    }

    /// The request for one endpoint, after the partner's plugin (if any) ran on it, with the
    /// plugin version; or the plugin's failure.
    async fn prepare(
        &self,
        claimed: &Claimed,
        endpoint: &Endpoint,
    ) -> Result<(OutboundRequest, Option<String>), (PluginError, Option<String>)> {
        let mut headers = claimed.headers.clone();
        headers.push((WEBHOOK_ID.to_string(), claimed.id.clone()));
        headers.push((REQUEST_ID.to_string(), claimed.request_id.clone()));
        let request = OutboundRequest {
            method: "POST".to_string(),
            url: endpoint.url(),
            headers,
            body: claimed.body.clone(),
            partner_id: claimed.partner_id.clone(),
            request_id: claimed.request_id.clone(),
            notification_id: claimed.id.clone(),
            attempt: u32::try_from(claimed.attempts + 1).unwrap_or(u32::MAX),
        };
        let Some(plugins) = &self.plugins else {
            return Ok((request, None));
        };
        let clock = Instant::now();
        let result = plugins.transform(request.clone()).await;
        if let (Some(metrics), Some(result)) = (&self.metrics, &result) {
            let secs = clock.elapsed().as_secs_f64();
            metrics.plugin_call(&claimed.partner_id, result.is_ok(), secs);
        }
        match result {
            None => Ok((request, None)),
            Some(Ok(t)) => Ok((t.request, Some(t.version))),
            Some(Err(e)) => Err((e, plugins.version(&claimed.partner_id))),
        }
    }

    /// Sends exactly the prepared request: the bytes a plugin signed are the bytes on the wire.
    async fn send(
        &self,
        request: OutboundRequest,
        timeout: Option<Duration>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut headers = HeaderMap::with_capacity(request.headers.len());
        for (name, value) in &request.headers {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                headers.append(n, v);
            }
        }
        let method = Method::from_bytes(request.method.as_bytes()).unwrap_or(Method::POST);
        let mut builder = self.client.request(method, request.url).headers(headers);
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        builder.body(request.body).send().await
    }

    /// Classifies an HTTP answer and keeps a bounded excerpt of its body.
    async fn judge(&self, response: reqwest::Response) -> AttemptResult {
        let status = response.status();
        let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok());
        let retry_after = header(RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()));
        let location = header(LOCATION).map(str::to_string);
        let excerpt = read_excerpt(response, self.excerpt_bytes).await;
        let (verdict, class, error) = if status.is_success() {
            (Verdict::Delivered, None, None)
        } else if status == reqwest::StatusCode::GONE {
            (
                Verdict::Final,
                Some("gone"),
                Some("receiver answered 410 Gone".to_string()),
            )
        } else if status.is_redirection() {
            let to = location.as_deref().unwrap_or("no Location");
            let error = format!("receiver answered {status}, redirect to {to} not followed");
            (
                Verdict::Failed { retry_after: None },
                Some("redirect"),
                Some(error),
            )
        } else {
            let error = format!("receiver answered {status}");
            (
                Verdict::Failed { retry_after },
                Some("http_status"),
                Some(error),
            )
        };
        let record = AttemptRecord {
            status_code: Some(i64::from(status.as_u16())),
            error_class: class.map(str::to_string),
            error,
            response_excerpt: excerpt,
            ..Default::default()
        };
        AttemptResult { verdict, record }
    }
}

fn finish(mut result: AttemptResult, started_at_ms: i64, clock: Instant) -> AttemptResult {
    result.record.started_at_ms = started_at_ms;
    result.record.duration_ms = i64::try_from(clock.elapsed().as_millis()).unwrap_or(i64::MAX);
    result
}

/// Up to `limit` bytes of the response body, read for at most one second: the status line
/// decides the outcome, a slow body must not hold the attempt.
async fn read_excerpt(mut response: reqwest::Response, limit: usize) -> Option<String> {
    let mut bytes = Vec::new();
    let read = async {
        while bytes.len() < limit {
            match response.chunk().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
    if bytes.is_empty() {
        return None;
    }
    bytes.truncate(limit);
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn transport_class(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

/// The causes of a transport error on one line, without reqwest's "error sending request for
/// url" preamble (the endpoint is already named).
fn describe(e: &reqwest::Error) -> String {
    let mut text = String::new();
    let top: &dyn std::error::Error = e;
    let mut source = top.source().or(Some(top));
    while let Some(err) = source {
        let part = err.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}
