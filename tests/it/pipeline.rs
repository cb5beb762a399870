//! The delivery pipeline end to end, in both modes: volume, dedup, conflicts, retries, death.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use api_notify::receiver::{self, Receiver};
use api_notify::server::Roles;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Gateway, Mode, any_port, closed_addr, config, notification};

macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                super::$name(Mode::Embedded).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn kafka_mariadb() {
                super::$name(Mode::Kafka).await;
            }
        }
    };
}

both_modes!(thousand_notifications_over_three_partners_are_each_delivered_once);
both_modes!(repeated_request_id_is_delivered_once);
both_modes!(same_request_id_with_other_content_is_never_delivered);
both_modes!(receiver_failing_twice_gets_the_third_attempt_with_the_same_webhook_id);
both_modes!(all_endpoints_down_ends_dead_with_every_attempt_logged);

async fn thousand_notifications_over_three_partners_are_each_delivered_once(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(mode, "thousand", &dir).await, Roles::ALL).await;
    let partners = ["acme", "globex", "initech"];
    let mut receivers = Vec::new();
    for _ in 0..partners.len() * 2 {
        receivers.push(
            Receiver::start(any_port(), receiver::always_ok())
                .await
                .unwrap(),
        );
    }
    let down = closed_addr().await;
    // initech's first endpoint is down: its notifications fail over to the second.
    let endpoints = |p: usize| match p {
        2 => vec![down, receivers[5].addr()],
        _ => vec![receivers[2 * p].addr(), receivers[2 * p + 1].addr()],
    };
    let posts = futures::stream::iter(0..1000).map(|i| {
        let n = notification(
            &format!("bulk-{i}"),
            partners[i % 3],
            &endpoints(i % 3),
            json!({"seq": i}),
        );
        let client = gateway.client.clone();
        async move { client.post(&n).await }
    });
    let answers: Vec<_> = posts.buffer_unordered(32).collect().await;
    let accepted: HashSet<String> = answers
        .iter()
        .map(|(code, body)| {
            assert_eq!(
                *code,
                StatusCode::ACCEPTED,
                "every fresh notification should be accepted: {body}"
            );
            body["id"].as_str().expect("id in answer").to_string()
        })
        .collect();
    assert_eq!(
        accepted.len(),
        1000,
        "every notification should get its own id"
    );

    let total = |rs: &[Receiver]| rs.iter().map(|r| r.received().len()).sum::<usize>();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while total(&receivers) < 1000 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // let any duplicate surface
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &receivers {
        for (id, n) in r.counts() {
            *counts.entry(id).or_default() += n;
        }
    }
    let delivered: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        delivered, accepted,
        "the receivers should get exactly the accepted webhook-ids"
    );
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "no notification should be delivered twice: {repeated:?}"
    );
    assert!(
        receivers[4].received().is_empty(),
        "nothing should reach an endpoint listed after a live one"
    );
    assert_eq!(
        receivers[5].received().len(),
        333,
        "initech's 333 notifications should fail over"
    );
    gateway.stop().await;
}

async fn repeated_request_id_is_delivered_once(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(mode, "repeat", &dir).await, Roles::ALL).await;
    let r = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    let sequential = notification("rep-seq", "acme", &[r.addr()], json!({"k": 1}));
    let (code, first) = gateway.client.post(&sequential).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "the first submission is accepted: {first}"
    );
    gateway
        .client
        .wait_for_state("rep-seq", "delivered", Duration::from_secs(20))
        .await;
    for round in 1..3 {
        let (code, body) = gateway.client.post(&sequential).await;
        assert_eq!(
            code,
            StatusCode::OK,
            "round {round}: a stored repeat is answered 200: {body}"
        );
        assert_eq!(
            body["duplicate"], true,
            "a known repeat is flagged as a duplicate: {body}"
        );
        assert_eq!(body["id"], first["id"], "a repeat names the first id");
    }

    let concurrent = notification("rep-con", "acme", &[r.addr()], json!({"k": 2}));
    let posts = (0..3).map(|_| gateway.client.post(&concurrent));
    for (code, body) in futures::future::join_all(posts).await {
        assert!(
            code == StatusCode::ACCEPTED || code == StatusCode::OK,
            "concurrent repeat: {code} {body}"
        );
    }
    gateway
        .client
        .wait_for_state("rep-con", "delivered", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_request: HashMap<String, usize> =
        r.received().iter().fold(HashMap::new(), |mut m, x| {
            *m.entry(x.request_id.clone().unwrap_or_default())
                .or_default() += 1;
            m
        });
    assert_eq!(
        per_request.get("rep-seq"),
        Some(&1),
        "three sequential posts, one delivery"
    );
    assert_eq!(
        per_request.get("rep-con"),
        Some(&1),
        "three concurrent posts, one delivery"
    );
    gateway.stop().await;
}

async fn same_request_id_with_other_content_is_never_delivered(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(mode, "conflict", &dir).await, Roles::ALL).await;
    let r = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    let first = notification("conf-1", "acme", &[r.addr()], json!({"amount": 10}));
    let other = notification("conf-1", "acme", &[r.addr()], json!({"amount": 99}));
    let (code, _) = gateway.client.post(&first).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "the first submission should be accepted"
    );
    gateway
        .client
        .wait_for_state("conf-1", "delivered", Duration::from_secs(20))
        .await;
    let (code, body) = gateway.client.post(&other).await;
    assert_eq!(
        code,
        StatusCode::CONFLICT,
        "other content under a known request_id is a conflict: {body}"
    );
    assert_eq!(
        body["error"]["field"], "request_id",
        "the conflict should name request_id: {body}"
    );

    // A race the API cannot see: both submitted before either is stored.
    let a = notification("conf-2", "acme", &[r.addr()], json!({"amount": 1}));
    let b = notification("conf-2", "acme", &[r.addr()], json!({"amount": 2}));
    let (ra, rb) = tokio::join!(gateway.client.post(&a), gateway.client.post(&b));
    let codes = [ra.0, rb.0];
    assert!(
        codes.contains(&StatusCode::ACCEPTED),
        "one of the racing submissions is accepted: {codes:?}"
    );
    let status = gateway
        .client
        .wait_for_state("conf-2", "delivered", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<_> = r
        .received()
        .into_iter()
        .filter(|x| x.request_id.as_deref() == Some("conf-2"))
        .collect();
    assert_eq!(got.len(), 1, "racing conflicting submissions deliver once");
    let both_accepted = codes.iter().all(|c| *c == StatusCode::ACCEPTED);
    if both_accepted {
        assert_eq!(
            status["conflicts"], 1,
            "the intake should record the loser as a conflict: {status}"
        );
    }
    assert_eq!(
        r.received()
            .iter()
            .filter(|x| x.request_id.as_deref() == Some("conf-1"))
            .count(),
        1,
        "the conflicting conf-1 must never be delivered"
    );
    gateway.stop().await;
}

async fn receiver_failing_twice_gets_the_third_attempt_with_the_same_webhook_id(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(mode, "retry", &dir).await, Roles::ALL).await;
    let r = Receiver::start(any_port(), receiver::fail_first(2, 500))
        .await
        .unwrap();
    let n = notification("retry-1", "acme", &[r.addr()], json!({"x": 1}));
    let (code, answer) = gateway.client.post(&n).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let status = gateway
        .client
        .wait_for_state("retry-1", "delivered", Duration::from_secs(20))
        .await;
    let seen = r.received();
    assert_eq!(seen.len(), 3, "two failures then a success");
    for x in &seen {
        assert_eq!(
            x.webhook_id.as_deref(),
            answer["id"].as_str(),
            "every attempt carries the same webhook-id"
        );
    }
    assert_eq!(status["attempts"], 3, "three attempts recorded: {status}");
    let codes: Vec<_> = status["attempt_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].clone())
        .collect();
    assert_eq!(
        codes,
        vec![json!(500), json!(500), json!(200)],
        "attempt log: {status}"
    );
    gateway.stop().await;
}

async fn all_endpoints_down_ends_dead_with_every_attempt_logged(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(mode, "dead", &dir).await, Roles::ALL).await;
    let n = notification(
        "dead-1",
        "acme",
        &[closed_addr().await, closed_addr().await],
        json!({}),
    );
    let (code, _) = gateway.client.post(&n).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let status = gateway
        .client
        .wait_for_state("dead-1", "dead", Duration::from_secs(20))
        .await;
    let log = status["attempt_log"].as_array().expect("attempt log");
    assert_eq!(
        log.len(),
        3,
        "one attempt plus the two scheduled retries: {status}"
    );
    for a in log {
        assert_eq!(
            a["error_class"], "connect",
            "each attempt failed to connect: {a}"
        );
        let error = a["error"].as_str().unwrap_or_default();
        assert_eq!(
            error.matches("127.0.0.1").count(),
            2,
            "both endpoints tried in each attempt: {error}"
        );
    }
    gateway.stop().await;
}
