//! Delivery policy on Kafka + MariaDB: receiver signals, breaker, failover, replay, FIFO,
//! partner isolation and retention.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use api_notify::config::{Config, PartnerOverride};
use api_notify::receiver::{self, Receiver, Reply};
use api_notify::server::Roles;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Gateway, Mode, any_port, closed_addr, config, notification};

async fn gateway(label: &str, dir: &tempfile::TempDir, tune: impl FnOnce(&mut Config)) -> Gateway {
    let mut c = config(Mode::Kafka, label, dir).await;
    tune(&mut c);
    Gateway::start(c, Roles::ALL).await
}

async fn admin(g: &Gateway, path: &str, body: Value) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", g.client.base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn partner(g: &Gateway, id: &str) -> Value {
    let r = reqwest::get(format!("{}/v1/partners/{id}", g.client.base()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "partner view should answer");
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_on_429_delays_the_next_attempt_and_410_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("signals", &dir, |_| {}).await;
    let busy = Receiver::start(
        any_port(),
        Arc::new(|_: &receiver::Received| Reply::RetryAfter(429, "120".into())),
    )
    .await
    .unwrap();
    let gone = Receiver::start(
        any_port(),
        Arc::new(|_: &receiver::Received| Reply::Status(410)),
    )
    .await
    .unwrap();
    g.client
        .post(&notification("ra-1", "busy", &[busy.addr()], json!({})))
        .await;
    g.client
        .post(&notification("gone-1", "gone", &[gone.addr()], json!({})))
        .await;

    let dead = g
        .client
        .wait_for_state("gone-1", "dead", Duration::from_secs(20))
        .await;
    assert_eq!(
        dead["attempts"], 1,
        "410 Gone ends the notification after one attempt: {dead}"
    );
    assert_eq!(dead["attempt_log"][0]["error_class"], "gone");

    busy.wait_until(Duration::from_secs(20), |log| !log.is_empty())
        .await;
    let status = g
        .client
        .wait_for_state("ra-1", "pending", Duration::from_secs(20))
        .await;
    let started = status["attempt_log"][0]["started_at_ms"]
        .as_i64()
        .expect("attempt logged");
    let next = status["next_attempt_at_ms"]
        .as_i64()
        .expect("next attempt scheduled");
    assert!(
        next - started >= 120_000,
        "Retry-After: 120 should push the next attempt ≥ 120 s: {status}"
    );
    assert_eq!(gone.received().len(), 1, "nothing is sent after 410");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn breaker_opens_after_the_threshold_and_closes_when_the_probe_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("breaker", &dir, |c| {
        let o = PartnerOverride {
            breaker_failure_threshold: Some(3),
            breaker_cooldown_ms: Some(3_000),
            max_in_flight: Some(1),
            ..Default::default()
        };
        c.partners.insert("flaky".into(), o);
        c.retry.schedule_secs = vec![1; 8];
    })
    .await;
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let r = Receiver::start(
        any_port(),
        Arc::new(move |_: &receiver::Received| {
            Reply::Status(if flag.load(Ordering::SeqCst) {
                200
            } else {
                500
            })
        }),
    )
    .await
    .unwrap();
    for i in 0..3 {
        g.client
            .post(&notification(
                &format!("br-{i}"),
                "flaky",
                &[r.addr()],
                json!({"i": i}),
            ))
            .await;
    }
    let mut opened = false;
    for _ in 0..200 {
        if partner(&g, "flaky").await["breaker"] == "open" {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(opened, "three consecutive failures should open the breaker");
    let at_open = r.received().len();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        r.received().len(),
        at_open,
        "an open breaker sends nothing during the cool-down"
    );
    healthy.store(true, Ordering::SeqCst);
    for i in 0..3 {
        g.client
            .wait_for_state(&format!("br-{i}"), "delivered", Duration::from_secs(30))
            .await;
    }
    assert_eq!(
        partner(&g, "flaky").await["breaker"],
        "closed",
        "a successful probe closes the breaker"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_endpoint_refusing_is_failed_over_within_one_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("failover", &dir, |_| {}).await;
    let r = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    g.client
        .post(&notification(
            "fo-1",
            "acme",
            &[closed_addr().await, r.addr()],
            json!({}),
        ))
        .await;
    let status = g
        .client
        .wait_for_state("fo-1", "delivered", Duration::from_secs(20))
        .await;
    assert_eq!(
        status["attempts"], 1,
        "failover happens inside the first attempt: {status}"
    );
    let endpoint = status["attempt_log"][0]["endpoint"].as_str().unwrap();
    assert!(
        endpoint.contains(&r.addr().port().to_string()),
        "the attempt names the endpoint that answered: {endpoint}"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_delivers_a_dead_notification_with_the_same_webhook_id_and_ranges_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("replay", &dir, |_| {}).await;
    // Gone on the first request of each notification, fine afterwards.
    let r = Receiver::start(
        any_port(),
        Arc::new(|x: &receiver::Received| {
            Reply::Status(if x.seen_before == 0 { 410 } else { 200 })
        }),
    )
    .await
    .unwrap();
    let since = api_notify::model::now_ms();
    for i in 0..5 {
        g.client
            .post(&notification(
                &format!("rp-{i}"),
                "replayed",
                &[r.addr()],
                json!({"i": i}),
            ))
            .await;
    }
    for i in 0..5 {
        g.client
            .wait_for_state(&format!("rp-{i}"), "dead", Duration::from_secs(20))
            .await;
    }
    let (code, one) = admin(&g, "/v1/notifications/rp-0/replay", json!({})).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "replay of a dead notification is accepted: {one}"
    );
    let status = g
        .client
        .wait_for_state("rp-0", "delivered", Duration::from_secs(20))
        .await;
    let ids: Vec<_> = r
        .received()
        .iter()
        .filter(|x| x.request_id.as_deref() == Some("rp-0"))
        .map(|x| x.webhook_id.clone())
        .collect();
    assert_eq!(ids.len(), 2, "the original attempt and the replay");
    assert_eq!(ids[0], ids[1], "a replay keeps the webhook-id");
    assert_eq!(status["attempts"], 2);

    let until = api_notify::model::now_ms();
    let range = json!({"partner_id": "replayed", "since_ms": since, "until_ms": until, "state": "dead", "limit": 3});
    let (code, answer) = admin(&g, "/v1/replays", range).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        answer["scheduled"], 3,
        "the range replay honours its limit: {answer}"
    );
    let done = r
        .wait_until(Duration::from_secs(20), |log| log.len() >= 5 + 1 + 3)
        .await;
    assert!(done, "the three replayed notifications are delivered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        r.received().len(),
        9,
        "exactly three more deliveries, no more"
    );
    let (code, _) = admin(&g, "/v1/notifications/rp-0/replay", json!({})).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "a delivered notification can be replayed too"
    );
    let (code, _) = admin(&g, "/v1/notifications/nope/replay", json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_partner_keeps_acceptance_order_across_retries() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("fifo", &dir, |c| {
        c.partners.insert(
            "ordered".into(),
            PartnerOverride {
                fifo: Some(true),
                ..Default::default()
            },
        );
    })
    .await;
    let r = Receiver::start(
        any_port(),
        Arc::new(|x: &receiver::Received| {
            let fail = x.request_id.as_deref() == Some("fifo-1") && x.seen_before == 0;
            Reply::Status(if fail { 500 } else { 200 })
        }),
    )
    .await
    .unwrap();
    for i in 0..5 {
        let (code, _) = g
            .client
            .post(&notification(
                &format!("fifo-{i}"),
                "ordered",
                &[r.addr()],
                json!({"i": i}),
            ))
            .await;
        assert_eq!(code, StatusCode::ACCEPTED);
    }
    g.client
        .wait_for_state("fifo-4", "delivered", Duration::from_secs(30))
        .await;
    let order: Vec<String> = r
        .received()
        .iter()
        .map(|x| x.request_id.clone().unwrap())
        .collect();
    let expected: Vec<String> = ["fifo-0", "fifo-1", "fifo-1", "fifo-2", "fifo-3", "fifo-4"]
        .map(String::from)
        .to_vec();
    assert_eq!(
        order, expected,
        "a failing head blocks its successors until it is delivered"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn black_holed_partner_does_not_hold_back_a_healthy_one() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("isolation", &dir, |c| {
        c.outbound.request_timeout_ms = 3_000;
    })
    .await;
    let hole = Receiver::start(any_port(), Arc::new(|_: &receiver::Received| Reply::Hang))
        .await
        .unwrap();
    let good = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    for i in 0..300 {
        g.client
            .post(&notification(
                &format!("bh-{i}"),
                "blackhole",
                &[hole.addr()],
                json!({"i": i}),
            ))
            .await;
    }
    for i in 0..300 {
        g.client
            .post(&notification(
                &format!("ok-{i}"),
                "healthy",
                &[good.addr()],
                json!({"i": i}),
            ))
            .await;
    }
    let all = good
        .wait_until(Duration::from_secs(20), |log| log.len() >= 300)
        .await;
    assert!(
        all,
        "every healthy delivery arrives while the other partner hangs"
    );
    assert!(
        hole.received().len() <= 64 + 64,
        "the black hole never gets more than its cap at once"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purge_removes_only_finished_rows_older_than_the_limit() {
    use api_notify::model::{Endpoint, NewNotification};
    use api_notify::store::{AttemptRecord, Finish, Outcome, Store};

    let url = crate::support::fresh_mysql_database("retention").await;
    let db = api_notify::config::DatabaseConfig {
        url: api_notify::config::Secret::new(url),
        ..Default::default()
    };
    let store = Store::connect(&db).await.unwrap();
    store.migrate().await.unwrap();
    let day_ms = 86_400_000;
    let now = api_notify::model::now_ms();
    let endpoint = Endpoint {
        ip: "127.0.0.1".parse().unwrap(),
        port: 9,
        path: "/".into(),
        tls: false,
    };
    let make = |request_id: &str| NewNotification {
        id: NewNotification::new_id(),
        request_id: request_id.into(),
        partner_id: "acme".into(),
        content_hash: request_id.repeat(4),
        endpoints: vec![endpoint.clone()],
        headers: vec![],
        body: "{}".into(),
        accepted_at_ms: now - 30 * day_ms,
    };
    let rows = [make("old-done"), make("new-done"), make("old-pending")];
    store.insert_batch(&rows).await.unwrap();
    let claimed = store
        .claim(now - 30 * day_ms + 1, 2, 60_000, &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2, "two rows claimed to finish");
    let finishes: Vec<Finish> = claimed
        .iter()
        .map(|c| Finish {
            id: c.id.clone(),
            claim_token: c.claim_token.clone(),
            number: 1,
            outcome: Outcome::Delivered,
            attempt: AttemptRecord {
                started_at_ms: now,
                ..Default::default()
            },
            finished_at_ms: if c.request_id == "old-done" {
                now - 10 * day_ms
            } else {
                now
            },
        })
        .collect();
    store.finish(&finishes).await.unwrap();
    let purged = store.purge(now - 7 * day_ms, 500).await.unwrap();
    assert_eq!(
        purged, 1,
        "only the delivered row older than seven days is purged"
    );
    assert!(
        store.status("old-done").await.unwrap().is_none(),
        "the old delivered row is gone"
    );
    assert!(
        store.status("new-done").await.unwrap().is_some(),
        "a recent delivered row stays"
    );
    let pending = store
        .status("old-pending")
        .await
        .unwrap()
        .expect("pending row stays");
    assert_eq!(
        pending.state, "pending",
        "an unfinished row is never purged, however old"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receiver_hanging_past_the_timeout_gets_everything_once_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("hang", &dir, |c| {
        c.outbound.request_timeout_ms = 1_000;
        c.retry.schedule_secs = vec![1; 10];
    })
    .await;
    let answering = Arc::new(AtomicBool::new(false));
    let flag = answering.clone();
    let r = Receiver::start(
        any_port(),
        Arc::new(move |_: &receiver::Received| {
            if flag.load(Ordering::SeqCst) {
                Reply::Status(200)
            } else {
                Reply::Hang
            }
        }),
    )
    .await
    .unwrap();
    let mut ledger = std::collections::HashSet::new();
    for i in 0..20 {
        let (code, body) = g
            .client
            .post(&notification(
                &format!("hang-{i}"),
                "slowpoke",
                &[r.addr()],
                json!({"i": i}),
            ))
            .await;
        assert_eq!(code, StatusCode::ACCEPTED);
        ledger.insert(body["id"].as_str().unwrap().to_string());
    }
    r.wait_until(Duration::from_secs(10), |log| log.len() >= 20)
        .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // every first attempt has timed out
    answering.store(true, Ordering::SeqCst);
    for i in 0..20 {
        let status = g
            .client
            .wait_for_state(&format!("hang-{i}"), "delivered", Duration::from_secs(30))
            .await;
        assert_eq!(
            status["attempt_log"][0]["error_class"], "timeout",
            "the hung attempt is a timeout: {status}"
        );
    }
    let counts = r.counts();
    let seen: std::collections::HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        seen, ledger,
        "every accepted notification reached the receiver under its own webhook-id"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_at_its_cap_gets_every_notification_once_and_never_more_than_its_cap() {
    const CAP: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let g = gateway("capped", &dir, |c| {
        c.partners.insert(
            "narrow".into(),
            PartnerOverride {
                max_in_flight: Some(CAP as usize),
                ..Default::default()
            },
        );
    })
    .await;
    let slow = Receiver::start(
        any_port(),
        Arc::new(|_: &receiver::Received| Reply::Delayed(200, Duration::from_millis(40))),
    )
    .await
    .unwrap();
    for i in 0..40 {
        g.client
            .post(&notification(
                &format!("cap-{i}"),
                "narrow",
                &[slow.addr()],
                json!({"i": i}),
            ))
            .await;
    }
    // The claim takes up to a whole batch of this partner's rows at once; all but three wait in
    // the dispatcher for a slot. Each answer takes 40 ms, so with at most three in flight no
    // four requests can arrive within 40 ms of each other.
    let all = slow
        .wait_until(Duration::from_secs(30), |log| log.len() >= 40)
        .await;
    assert!(all, "every notification arrives");
    let counts = slow.counts();
    assert!(
        counts.len() == 40 && counts.values().all(|n| *n == 1),
        "each arrives exactly once: {counts:?}"
    );
    let mut arrivals: Vec<std::time::Instant> = slow.received().iter().map(|r| r.at).collect();
    arrivals.sort();
    let tightest = arrivals
        .windows(CAP as usize + 1)
        .map(|w| w[CAP as usize] - w[0])
        .min()
        .unwrap();
    assert!(
        tightest >= Duration::from_millis(39),
        "{} requests arrived within {tightest:?}: more than the cap of {CAP} in flight",
        CAP + 1
    );
    g.stop().await;
}
