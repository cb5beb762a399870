//! `GET /metrics` after real runs on Kafka + MariaDB: the values operators alert on must be exact.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use api_notify::config::KafkaConfig;
use api_notify::receiver::{self, Receiver};
use api_notify::server::Roles;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Client, Gateway, Mode, any_port, closed_addr, config, notification};

/// A sample's name, exact label set and expected value.
type Expected = (&'static str, &'static [(&'static str, &'static str)], f64);

/// The value of the sample `name` whose labels are exactly `labels`, if exported.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            metric == name && parse_labels(rest.trim_end_matches('}')) == wanted
        })
        .map(|(_, value)| value.parse().expect("a numeric sample"))
}

fn parse_labels(text: &str) -> BTreeMap<&str, &str> {
    text.split("\",")
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| pair.split_once("=\""))
        .map(|(k, v)| (k, v.trim_end_matches('"')))
        .collect()
}

/// Every partition's reported consumer lag.
fn consumer_lags(text: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.starts_with("api_notify_kafka_consumer_lag_records{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect()
}

/// Scrapes until `done` holds on the text, for at most `limit`; returns the last scrape.
async fn scrape_until(client: &Client, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (code, text) = client.get_text("/metrics").await;
        assert_eq!(code, StatusCode::OK, "GET /metrics should answer 200");
        if done(&text) || Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_partner_shows_in_failures_latency_and_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Mode::Kafka, "metrics", &dir).await;
    c.metrics.refresh_interval_ms = 200;
    let gateway = Gateway::start(c, Roles::ALL).await;
    let ok = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    let down = closed_addr().await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push((format!("m-good-{i}"), "good", ok.addr(), "delivered"));
    }
    for i in 0..2 {
        sent.push((format!("m-broken-{i}"), "broken", down, "dead"));
    }
    for (request_id, partner, target, _) in &sent {
        let n = notification(request_id, partner, &[*target], json!({"i": request_id}));
        let (code, body) = gateway.client.post(&n).await;
        assert_eq!(
            code,
            StatusCode::ACCEPTED,
            "fresh notification accepted: {body}"
        );
    }
    for (request_id, _, _, state) in &sent {
        let limit = Duration::from_secs(30);
        gateway
            .client
            .wait_for_state(request_id, state, limit)
            .await;
    }

    let backlog = |text: &str, state: &str| {
        sample(
            text,
            "api_notify_backlog_notifications",
            &[("state", state)],
        )
    };
    let text = scrape_until(&gateway.client, Duration::from_secs(20), |t| {
        let caught_up = consumer_lags(t).iter().all(|lag| *lag == 0.0);
        backlog(t, "delivered") == Some(3.0) && backlog(t, "dead") == Some(2.0) && caught_up
    })
    .await;
    let expected: [Expected; 11] = [
        (
            "api_notify_backlog_notifications",
            &[("state", "delivered")],
            3.0,
        ),
        (
            "api_notify_backlog_notifications",
            &[("state", "dead")],
            2.0,
        ),
        (
            "api_notify_backlog_notifications",
            &[("state", "pending")],
            0.0,
        ),
        (
            "api_notify_backlog_notifications",
            &[("state", "in_flight")],
            0.0,
        ),
        // Two notifications, three attempts each (the schedule has two retries), all refused.
        (
            "api_notify_partner_delivery_failures_total",
            &[("partner_id", "broken"), ("class", "connect")],
            6.0,
        ),
        ("api_notify_delivery_latency_seconds_count", &[], 3.0),
        (
            "api_notify_delivery_attempts_total",
            &[("outcome", "delivered")],
            3.0,
        ),
        (
            "api_notify_delivery_attempts_total",
            &[("outcome", "retry")],
            4.0,
        ),
        (
            "api_notify_delivery_attempts_total",
            &[("outcome", "dead")],
            2.0,
        ),
        (
            "api_notify_ingest_requests_total",
            &[("outcome", "accepted")],
            5.0,
        ),
        ("api_notify_kafka_produce_failures_total", &[], 0.0),
    ];
    for (name, labels, value) in expected {
        assert_eq!(
            sample(&text, name, labels),
            Some(value),
            "{name}{labels:?} should be {value}; scrape:\n{text}"
        );
    }
    assert!(
        !text.contains("partner_id=\"good\""),
        "the healthy partner should have no failures: {text}"
    );
    let lags = consumer_lags(&text);
    assert!(
        !lags.is_empty() && lags.iter().all(|lag| *lag == 0.0),
        "the intake should report a lag of 0 on its partitions once all is consumed: {text}"
    );
    let latency_sum = sample(&text, "api_notify_delivery_latency_seconds_sum", &[]);
    assert!(
        latency_sum.is_some_and(|s| s > 0.0),
        "the latency histogram should sum the three deliveries' latencies: {latency_sum:?}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_broker_raises_the_produce_failure_counter() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Mode::Kafka, "prodfail", &dir).await;
    let dead = closed_addr().await;
    c.kafka = Some(KafkaConfig {
        brokers: dead.to_string(),
        ..c.kafka.clone().unwrap()
    });
    c.api.queue_timeout_ms = 1_000;
    let gateway = Gateway::start(c, "api".parse::<Roles>().unwrap()).await;
    let (_, before) = gateway.client.get_text("/metrics").await;
    assert_eq!(
        sample(&before, "api_notify_kafka_produce_failures_total", &[]),
        Some(0.0),
        "no produce failure before any ingest: {before}"
    );
    for i in 0..2 {
        let n = notification(&format!("pf-{i}"), "acme", &[dead], json!({}));
        let (code, body) = gateway.client.post(&n).await;
        assert_eq!(
            code,
            StatusCode::SERVICE_UNAVAILABLE,
            "no broker, no 202: {body}"
        );
    }
    let (_, after) = gateway.client.get_text("/metrics").await;
    let expected: [Expected; 3] = [
        ("api_notify_kafka_produce_failures_total", &[], 2.0),
        (
            "api_notify_ingest_requests_total",
            &[("outcome", "unavailable")],
            2.0,
        ),
        (
            "api_notify_ingest_requests_total",
            &[("outcome", "accepted")],
            0.0,
        ),
    ];
    for (name, labels, value) in expected {
        assert_eq!(
            sample(&after, name, labels),
            Some(value),
            "{name}{labels:?} should be {value}; scrape:\n{after}"
        );
    }
    gateway.stop().await;
}
