//! Every Prometheus metric the gateway exports, defined in this one place.
//!
//! [`server::run`](crate::server::run) creates one [`Metrics`] per gateway and hands an
//! `Arc<Metrics>` to each role; roles record through the methods below, never by name, so the
//! names, help texts, labels and buckets live here only. Each gateway has its own registry (no
//! process-wide globals), so tests that run several gateways in one process read exact values.
//!
//! Label values are bounded: outcomes, states and error classes are fixed sets, `partner_id` is
//! the partner (tens to hundreds), `partition` the topic's partitions. Never label by request or
//! notification id. `docs/metrics.md` describes every metric; keep it in step with this file.
//!

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::store::{Backlog, Store};

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Delivery latency buckets in seconds: from a prompt first attempt to the end of the default
/// retry schedule (about 30 hours).
const LATENCY_BUCKETS_SECS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0,
    86400.0, 172800.0,
];

/// One POST's duration buckets in seconds, up to the default request timeout.
const ATTEMPT_BUCKETS_SECS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Plugin call buckets: tens of microseconds (a warm signer) to the 50 ms CPU budget and beyond.
const PLUGIN_BUCKETS_SECS: &[f64] = &[
    0.000_02, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.05, 0.1, 0.5,
];

/// How an ingest request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// `202`: the queue acknowledged a new notification.
    Accepted,
    /// `200`: the same `request_id` with the same content was known.
    Duplicate,
    /// `409`: the same `request_id` with other content.
    Conflict,
    /// `4xx`: malformed, too large, or refused by validation.
    Rejected,
    /// `503`: the queue did not acknowledge.
    Unavailable,
}

/// All metrics of one gateway and the registry that exports them.
pub struct Metrics {
    registry: Registry,
    ingest_requests: IntCounterVec,
    kafka_produce_failures: IntCounter,
    database_errors: IntCounterVec,
    delivery_attempts: IntCounterVec,
    partner_delivery_failures: IntCounterVec,
    delivery_latency: Histogram,
    attempt_duration: Histogram,
    backlog: IntGaugeVec,
    conflicts: IntGauge,
    consumer_lag: IntGaugeVec,
    breaker: IntGaugeVec,
    plugin_calls: IntCounterVec,
    plugin_call_duration: Histogram,
    plugin_loads: IntGaugeVec,
}

impl Metrics {
    /// A fresh registry with every metric registered at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            ingest_requests: counter_vec(
                "api_notify_ingest_requests_total",
                "Ingest requests (POST /v1/notifications) by outcome.",
                &["outcome"],
            ),
            kafka_produce_failures: IntCounter::new(
                "api_notify_kafka_produce_failures_total",
                "Notifications the Kafka producer did not get acknowledged (answered 503).",
            )
            .expect("valid metric"),
            database_errors: counter_vec(
                "api_notify_database_errors_total",
                "Failed database operations, by operation.",
                &["operation"],
            ),
            delivery_attempts: counter_vec(
                "api_notify_delivery_attempts_total",
                "Delivery attempts by what they meant for the notification.",
                &["outcome"],
            ),
            partner_delivery_failures: counter_vec(
                "api_notify_partner_delivery_failures_total",
                "Failed delivery attempts by partner and error class.",
                &["partner_id", "class"],
            ),
            delivery_latency: histogram(
                "api_notify_delivery_latency_seconds",
                "Time from acceptance to successful delivery.",
                LATENCY_BUCKETS_SECS,
            ),
            attempt_duration: histogram(
                "api_notify_attempt_duration_seconds",
                "Duration of one delivery attempt, failover included.",
                ATTEMPT_BUCKETS_SECS,
            ),
            backlog: IntGaugeVec::new(
                Opts::new(
                    "api_notify_backlog_notifications",
                    "Stored notifications by state, refreshed periodically from the database.",
                ),
                &["state"],
            )
            .expect("valid metric"),
            conflicts: IntGauge::new(
                "api_notify_conflicting_submissions",
                "Stored submissions that reused a request_id with other content.",
            )
            .expect("valid metric"),
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    "api_notify_kafka_consumer_lag_records",
                    "Records between the intake's position and the partition's high watermark.",
                ),
                &["partition"],
            )
            .expect("valid metric"),
            breaker: IntGaugeVec::new(
                Opts::new(
                    "api_notify_partner_breaker_state",
                    "Circuit breaker per partner: 0 closed, 1 half-open (probing), 2 open.",
                ),
                &["partner_id"],
            )
            .expect("valid metric"),
            plugin_calls: counter_vec(
                "api_notify_plugin_calls_total",
                "Plugin calls by partner and outcome (ok, error).",
                &["partner_id", "outcome"],
            ),
            plugin_call_duration: histogram(
                "api_notify_plugin_call_duration_seconds",
                "Duration of one plugin call, waiting for a free instance included.",
                PLUGIN_BUCKETS_SECS,
            ),
            plugin_loads: IntGaugeVec::new(
                Opts::new(
                    "api_notify_plugin_loads",
                    "Plugin versions loaded or rejected since start (result: loaded, rejected).",
                ),
                &["result"],
            )
            .expect("valid metric"),
            registry,
        };
        metrics.register_all();
        metrics.preset_labels();
        metrics
    }

    fn register_all(&self) {
        for collector in self.collectors() {
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
    }

    /// The name of every metric, whether or not it has a sample yet.
    pub fn names(&self) -> Vec<String> {
        let collectors = self.collectors();
        let descs = collectors.iter().flat_map(|c| c.desc());
        descs.map(|d| d.fq_name.clone()).collect()
    }

    fn collectors(&self) -> [Box<dyn Collector>; 14] {
        [
            Box::new(self.ingest_requests.clone()),
            Box::new(self.kafka_produce_failures.clone()),
            Box::new(self.database_errors.clone()),
            Box::new(self.delivery_attempts.clone()),
            Box::new(self.partner_delivery_failures.clone()),
            Box::new(self.delivery_latency.clone()),
            Box::new(self.attempt_duration.clone()),
            Box::new(self.backlog.clone()),
            Box::new(self.conflicts.clone()),
            Box::new(self.consumer_lag.clone()),
            Box::new(self.breaker.clone()),
            Box::new(self.plugin_calls.clone()),
            Box::new(self.plugin_call_duration.clone()),
            Box::new(self.plugin_loads.clone()),
        ]
    }

    /// Fixed label sets appear at zero from the start, so rates work from the first scrape.
    fn preset_labels(&self) {
        for outcome in [
            "accepted",
            "duplicate",
            "conflict",
            "rejected",
            "unavailable",
        ] {
            self.ingest_requests.with_label_values(&[outcome]);
        }
        for outcome in ["delivered", "retry", "dead"] {
            self.delivery_attempts.with_label_values(&[outcome]);
        }
        for state in ["pending", "in_flight", "delivered", "dead"] {
            self.backlog.with_label_values(&[state]);
        }
    }

    /// The text exposition format, for `GET /metrics`.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }

    /// One plugin call finished.
    pub fn plugin_call(&self, partner_id: &str, ok: bool, duration_secs: f64) {
        let outcome = if ok { "ok" } else { "error" };
        self.plugin_calls
            .with_label_values(&[partner_id, outcome])
            .inc();
        self.plugin_call_duration.observe(duration_secs);
    }

    /// Plugin versions loaded and rejected since start.
    pub fn set_plugin_loads(&self, loaded: u64, rejected: u64) {
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.plugin_loads
            .with_label_values(&["loaded"])
            .set(as_i64(loaded));
        self.plugin_loads
            .with_label_values(&["rejected"])
            .set(as_i64(rejected));
    }

    pub fn ingest(&self, outcome: IngestOutcome) {
        let label = match outcome {
            IngestOutcome::Accepted => "accepted",
            IngestOutcome::Duplicate => "duplicate",
            IngestOutcome::Conflict => "conflict",
            IngestOutcome::Rejected => "rejected",
            IngestOutcome::Unavailable => "unavailable",
        };
        self.ingest_requests.with_label_values(&[label]).inc();
    }

    pub fn kafka_produce_failed(&self) {
        self.kafka_produce_failures.inc();
    }

    /// A store call failed; `operation` is a fixed name such as `claim` or `insert`.
    pub fn database_error(&self, operation: &'static str) {
        self.database_errors.with_label_values(&[operation]).inc();
    }

    /// An attempt ended; `outcome` is `delivered`, `retry` or `dead`.
    pub fn attempt_finished(&self, outcome: &'static str, duration_secs: f64) {
        self.delivery_attempts.with_label_values(&[outcome]).inc();
        self.attempt_duration.observe(duration_secs);
    }

    /// An attempt to `partner_id` failed with error class `class` (`connect`, `http_status`, …).
    pub fn partner_failure(&self, partner_id: &str, class: &str) {
        self.partner_delivery_failures
            .with_label_values(&[partner_id, class])
            .inc();
    }

    /// A notification was delivered `latency_secs` after it was accepted.
    pub fn delivered(&self, latency_secs: f64) {
        self.delivery_latency.observe(latency_secs.max(0.0));
    }

    /// Replaces the backlog gauges with a fresh count.
    pub fn set_backlog(&self, backlog: &Backlog) {
        let states = [
            ("pending", backlog.pending),
            ("in_flight", backlog.in_flight),
            ("delivered", backlog.delivered),
            ("dead", backlog.dead),
        ];
        for (state, count) in states {
            self.backlog.with_label_values(&[state]).set(count);
        }
        self.conflicts.set(backlog.conflicts);
    }

    /// The intake's lag on one partition, as librdkafka last reported it.
    pub fn set_consumer_lag(&self, partition: i32, lag_records: i64) {
        self.consumer_lag
            .with_label_values(&[&partition.to_string()])
            .set(lag_records);
    }

    /// The breaker of `partner_id` changed to `state` (`closed`, `half_open` or `open`).
    pub fn breaker_changed(&self, partner_id: &str, state: &str) {
        let value = match state {
            "open" => 2,
            "half_open" => 1,
            _ => 0,
        };
        self.breaker.with_label_values(&[partner_id]).set(value);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Recounts the backlog every `period` until `shutdown`. A failed count keeps the previous
/// values and counts a database error.
pub async fn run_backlog_refresh(
    metrics: Arc<Metrics>,
    store: Store,
    period: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match store.backlog().await {
            Ok(backlog) => metrics.set_backlog(&backlog),
            Err(e) => {
                metrics.database_error("backlog");
                debug!(error = %e, "counting the backlog failed");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_from_the_start() {
        let text = Metrics::new().render();
        for name in [
            "api_notify_ingest_requests_total{outcome=\"accepted\"} 0",
            "api_notify_kafka_produce_failures_total 0",
            "api_notify_delivery_attempts_total{outcome=\"dead\"} 0",
            "api_notify_delivery_latency_seconds_count 0",
            "api_notify_backlog_notifications{state=\"pending\"} 0",
            "api_notify_conflicting_submissions 0",
        ] {
            assert!(text.contains(name), "{name} should be exported: {text}");
        }
    }

    #[test]
    fn recorded_values_show_with_their_labels() {
        let metrics = Metrics::new();
        metrics.partner_failure("acme", "connect");
        metrics.partner_failure("acme", "connect");
        metrics.database_error("claim");
        metrics.delivered(0.3);
        let text = metrics.render();
        let expected = [
            "api_notify_partner_delivery_failures_total{class=\"connect\",partner_id=\"acme\"} 2",
            "api_notify_database_errors_total{operation=\"claim\"} 1",
            "api_notify_delivery_latency_seconds_bucket{le=\"0.5\"} 1",
            "api_notify_delivery_latency_seconds_bucket{le=\"0.25\"} 0",
        ];
        for line in expected {
            assert!(text.contains(line), "{line} should be exported: {text}");
        }
    }
}
