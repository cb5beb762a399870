//! Gateway processes on Kafka + MariaDB: several dispatchers, crashes, signals, a dead broker.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_notify::config::KafkaConfig;
use api_notify::receiver::{self, Receiver};
use api_notify::server::Roles;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{
    Client, Gateway, Mode, any_port, closed_addr, config, notification, write_config,
};

/// A gateway process, killed when dropped (also when a test fails half-way).
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `api-notify serve` as a child process.
fn spawn_gateway(config: &Path, roles: &str, listen: Option<std::net::SocketAddr>) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_api-notify"));
    cmd.args(["serve", "--config"])
        .arg(config)
        .args(["--roles", roles]);
    if let Some(addr) = listen {
        cmd.args(["--listen", &addr.to_string()]);
    }
    cmd.env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Proc(cmd.spawn().expect("start the api-notify binary"))
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status();
    assert!(
        status.expect("run kill").success(),
        "kill -{name} should succeed"
    );
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "gateway process should exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every id in `ledger` reached the receiver, for at most `limit`.
async fn wait_delivered(
    r: &Receiver,
    ledger: &HashSet<String>,
    limit: Duration,
) -> HashMap<String, usize> {
    let all = r.wait_until(limit, |log| {
        let seen: HashSet<_> = log.iter().filter_map(|x| x.webhook_id.as_ref()).collect();
        ledger.iter().all(|id| seen.contains(id))
    });
    assert!(
        all.await,
        "every accepted notification should be delivered within {limit:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.counts()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_dispatcher_processes_never_post_the_same_notification_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Mode::Kafka, "twodisp", &dir).await;
    c.dispatch.claim_batch = 20;
    let path = write_config(&c, &dir, "dispatch.toml");
    let r = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    let ingest = Gateway::start(c.clone(), "api,intake".parse::<Roles>().unwrap()).await;
    let mut a = spawn_gateway(&path, "dispatch", None);
    let mut b = spawn_gateway(&path, "dispatch", None);

    let posts = futures::stream::iter(0..600).map(|i| {
        let n = notification(
            &format!("two-{i}"),
            &format!("p{}", i % 4),
            &[r.addr()],
            json!({"i": i}),
        );
        let client = ingest.client.clone();
        async move { client.post(&n).await }
    });
    let ledger: HashSet<String> = posts
        .buffer_unordered(16)
        .map(|(code, body)| {
            assert_eq!(code, StatusCode::ACCEPTED, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect()
        .await;
    let counts = wait_delivered(&r, &ledger, Duration::from_secs(60)).await;
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "two dispatchers must never post one notification twice: {twice:?}"
    );
    assert_eq!(
        counts.len(),
        600,
        "exactly the accepted notifications arrive"
    );
    for child in [&mut a, &mut b] {
        signal(child, "TERM");
        assert!(
            wait_exit(child, Duration::from_secs(20)).success(),
            "dispatcher exits cleanly on SIGTERM"
        );
    }
    ingest.stop().await;
}

/// Posts `count` notifications to the gateway at `addr`, returning the ids answered 202. Posts
/// that fail because the process died are simply not in the ledger.
async fn post_until_error(
    addr: std::net::SocketAddr,
    prefix: String,
    count: usize,
    target: std::net::SocketAddr,
) -> HashSet<String> {
    let client = Client::new(addr);
    let posts = futures::stream::iter(0..count).map(|i| {
        let n = notification(
            &format!("{prefix}-{i}"),
            &format!("p{}", i % 3),
            &[target],
            json!({"i": i}),
        );
        let client = client.clone();
        async move { client.post_raw(n.to_string(), "application/json").await }
    });
    posts
        .buffer_unordered(8)
        .filter_map(|answer| async move {
            match answer {
                Ok((StatusCode::ACCEPTED, body)) => Some(body["id"].as_str().unwrap().to_string()),
                _ => None,
            }
        })
        .collect()
        .await
}

async fn crash_and_restart(
    kill_signal: &str,
    label: &str,
) -> (
    HashSet<String>,
    HashMap<String, usize>,
    std::process::ExitStatus,
) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(Mode::Kafka, label, &dir).await;
    let path = write_config(&c, &dir, "gateway.toml");
    // A slow receiver keeps attempts in flight when the signal lands.
    let slow = std::sync::Arc::new(|_: &receiver::Received| {
        receiver::Reply::Delayed(200, Duration::from_millis(20))
    });
    let r = Receiver::start(any_port(), slow).await.unwrap();
    let listen = closed_addr().await;
    let mut gateway = spawn_gateway(&path, "api,intake,dispatch", Some(listen));
    Client::new(listen).wait_ready().await;

    let load = tokio::spawn(post_until_error(
        listen,
        format!("{label}-a"),
        400,
        r.addr(),
    ));
    r.wait_until(Duration::from_secs(30), |log| log.len() >= 100)
        .await;
    signal(&gateway, kill_signal);
    let exit = wait_exit(&mut gateway, Duration::from_secs(30));
    let mut ledger = load.await.unwrap();

    let mut restarted = spawn_gateway(&path, "api,intake,dispatch", Some(listen));
    Client::new(listen).wait_ready().await;
    ledger.extend(post_until_error(listen, format!("{label}-b"), 100, r.addr()).await);
    let counts = wait_delivered(&r, &ledger, Duration::from_secs(90)).await;
    signal(&restarted, "TERM");
    assert!(
        wait_exit(&mut restarted, Duration::from_secs(20)).success(),
        "restarted gateway exits cleanly"
    );
    (ledger, counts, exit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_killed_mid_run_loses_nothing_accepted() {
    let (ledger, counts, _) = crash_and_restart("KILL", "kill9").await;
    assert!(
        ledger.len() >= 200,
        "the run should have accepted a real load: {}",
        ledger.len()
    );
    let lost: Vec<_> = ledger
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "nothing accepted may be lost: {lost:?}");
    let repeats = counts.values().filter(|n| **n > 1).count();
    // One crash can repeat at most what was in flight (max_in_flight) at that moment.
    assert!(
        repeats <= 256,
        "at most the in-flight notifications repeat after one crash: {repeats}"
    );
    assert!(
        counts.values().all(|n| *n <= 2),
        "a single crash repeats a notification at most once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_drains_and_restart_delivers_the_rest_once() {
    let (ledger, counts, exit) = crash_and_restart("TERM", "sigterm").await;
    assert!(
        exit.success(),
        "SIGTERM should end the gateway with exit code 0, got {exit:?}"
    );
    let lost: Vec<_> = ledger
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "nothing accepted may be lost: {lost:?}");
    let repeats: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeats.is_empty(),
        "a graceful stop repeats nothing: {repeats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_broker_answers_503_and_never_202() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Mode::Kafka, "nobroker", &dir).await;
    let dead = closed_addr().await;
    c.kafka = Some(KafkaConfig {
        brokers: dead.to_string(),
        ..c.kafka.clone().unwrap()
    });
    c.api.queue_timeout_ms = 1_500;
    let gateway = Gateway::start(c, "api".parse::<Roles>().unwrap()).await;
    for i in 0..3 {
        let n = notification(
            &format!("nb-{i}"),
            "acme",
            &[closed_addr().await],
            json!({}),
        );
        let (code, body) = gateway.client.post(&n).await;
        assert_eq!(
            code,
            StatusCode::SERVICE_UNAVAILABLE,
            "no broker, no 202: {body}"
        );
        assert_eq!(
            body["error"]["code"], "unavailable",
            "the error says the queue is unavailable: {body}"
        );
    }
    let (code, _) = gateway.client.status("nb-0").await;
    assert_eq!(
        code,
        StatusCode::NOT_FOUND,
        "a refused notification is not stored"
    );
    gateway.stop().await;
}
