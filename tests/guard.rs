//! The outbound address guard, end to end. These tests name forbidden addresses on purpose, so
//! they run only inside a network namespace that has nothing but loopback: if the guard were
//! broken, the forbidden addresses would still reach nothing. Run outside one, each test
//! re-executes itself under `unshare -n` (root or CAP_SYS_ADMIN needed).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use api_notify::config::{Config, Secret};
use api_notify::receiver::{self, Receiver, Reply};
use api_notify::server::{self, Roles};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const MARK: &str = "API_NOTIFY_GUARD_NETNS";

/// True when this process may run the test here; otherwise the test ran in a child.
fn in_loopback_namespace(test: &str) -> bool {
    // /proc/net/dev lists the interfaces of this process's own network namespace.
    let only_lo = std::fs::read_to_string("/proc/net/dev")
        .map(|t| t.lines().skip(2).all(|l| l.trim_start().starts_with("lo:")))
        .unwrap_or(false);
    if only_lo {
        return true;
    }
    assert!(
        std::env::var(MARK).is_err(),
        "inside unshare -n but other interfaces are visible"
    );
    let exe = std::env::current_exe().expect("test binary path");
    let status = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(exe)
        .args(["--exact", test, "--test-threads", "1"])
        .env(MARK, "1")
        .status()
        .expect("run unshare -n (needs root or CAP_SYS_ADMIN)");
    assert!(
        status.success(),
        "{test} failed inside its network namespace"
    );
    false
}

async fn start(config: Config, roles: Roles) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(server::run(config, roles, Some(listener), stop.clone()));
    for _ in 0..100 {
        if !roles.api {
            break;
        }
        if reqwest::get(format!("{base}/healthz")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (base, stop)
}

fn config(dir: &tempfile::TempDir, allow: &[&str]) -> Config {
    let mut c = Config::default();
    c.database.url = Secret::new(format!("sqlite://{}", dir.path().join("g.db").display()));
    c.outbound.allow_cidrs = allow.iter().map(|a| a.parse().unwrap()).collect();
    c.retry.schedule_secs = vec![1];
    c.dispatch.poll_interval_ms = 20;
    c
}

async fn post(base: &str, ip: &str, port: u16, request_id: &str) -> (StatusCode, Value) {
    let n = json!({"request_id": request_id, "partner_id": "p", "headers": {},
        "endpoints": [{"ip": ip, "port": port, "path": "/hook"}], "body": {"x": 1}});
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/notifications"))
        .json(&n)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn state_of(base: &str, request_id: &str, want: &str) -> Value {
    for _ in 0..200 {
        let body: Value = reqwest::get(format!("{base}/v1/notifications/{request_id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        if body["state"] == want {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{request_id} should reach {want}");
}

#[tokio::test]
async fn ip_field_takes_only_canonical_literals_and_the_guard_covers_whole_ranges() {
    if !in_loopback_namespace(
        "ip_field_takes_only_canonical_literals_and_the_guard_covers_whole_ranges",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, stop) = start(config(&dir, &[]), Roles::ALL).await;
    let not_literals = [
        "2130706433",
        "017700000001",
        "0x7f000001",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "127.1",
        "127.0.0.01",
        "2852039166",
        "0xA9FEA9FE",
        "0251.0376.0251.0376",
        "169.254.43518",
        "0",
        " 127.0.0.1",
        "127.0.0.1\n",
        "localhost",
        "localtest.me",
        "169.254.169.254.nip.io",
        "metadata.google.internal",
        "",
        "[::1]",
        "::1%lo",
        "fe80::1%eth0",
        "::1:18022",
    ];
    for (i, ip) in not_literals.iter().enumerate() {
        let (code, body) = post(&base, ip, 80, &format!("lit-{i}")).await;
        assert_eq!(
            code,
            StatusCode::BAD_REQUEST,
            "{ip:?} is not an IP literal: {body}"
        );
        assert_eq!(
            body["error"]["field"], "endpoints[0].ip",
            "the field is named for {ip:?}"
        );
    }
    let refused = [
        "0.0.0.0",
        "0.0.0.1",
        "0.1.2.3",
        "100.100.100.200",
        "100.64.0.1",
        "169.254.169.254",
        "169.254.170.2",
        "192.0.0.1",
        "198.18.0.1",
        "255.255.255.255",
        "224.0.0.1",
        "127.0.0.1",
        "10.0.0.1",
        "::1",
        "0:0:0:0:0:0:0:1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "fe80::1",
        "fd00::1",
        "::1:8022",
    ];
    for (i, ip) in refused.iter().enumerate() {
        let (code, body) = post(&base, ip, 80, &format!("ref-{i}")).await;
        assert_eq!(
            code,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{ip} must be refused by default: {body}"
        );
    }
    stop.cancel();
}

#[tokio::test]
async fn dispatcher_rechecks_the_guard_before_connecting() {
    if !in_loopback_namespace("dispatcher_rechecks_the_guard_before_connecting") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), receiver::always_ok())
        .await
        .unwrap();
    // The API allows loopback; the dispatcher (another process in production) does not.
    let (base, stop_api) = start(config(&dir, &["127.0.0.0/8"]), "api".parse().unwrap()).await;
    let (code, _) = post(&base, "127.0.0.1", r.addr().port(), "recheck-1").await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let (_, stop_dispatch) = start(config(&dir, &[]), "dispatch".parse().unwrap()).await;
    let status = state_of(&base, "recheck-1", "dead").await;
    assert_eq!(
        status["attempt_log"][0]["error_class"], "blocked",
        "refused at connect: {status}"
    );
    assert!(r.received().is_empty(), "the receiver is never contacted");
    stop_api.cancel();
    stop_dispatch.cancel();
}

#[tokio::test]
async fn redirects_are_never_followed_and_ipv6_loopback_is_delivered_when_allowed() {
    if !in_loopback_namespace(
        "redirects_are_never_followed_and_ipv6_loopback_is_delivered_when_allowed",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trap = Receiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), receiver::always_ok())
        .await
        .unwrap();
    let to = format!("http://127.0.0.1:{}/collect", trap.addr().port());
    let redirecting = Receiver::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::new(move |_: &receiver::Received| Reply::Redirect(307, to.clone())),
    )
    .await
    .unwrap();
    let metadata = Receiver::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::new(|_: &receiver::Received| {
            Reply::Redirect(302, "http://169.254.169.254/latest/meta-data/".into())
        }),
    )
    .await
    .unwrap();
    let v6 = Receiver::start("[::1]:0".parse().unwrap(), receiver::always_ok())
        .await
        .unwrap();
    let (base, stop) = start(config(&dir, &["127.0.0.0/8", "::1/128"]), Roles::ALL).await;

    post(&base, "127.0.0.1", redirecting.addr().port(), "redir-1").await;
    post(&base, "127.0.0.1", metadata.addr().port(), "redir-2").await;
    let (code, _) = post(&base, "::1", v6.addr().port(), "v6-1").await;
    assert_eq!(code, StatusCode::ACCEPTED, "::1 is allowed when listed");
    let status = state_of(&base, "redir-1", "dead").await;
    let error = status["attempt_log"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("/collect"),
        "the Location is shown to operators: {error}"
    );
    state_of(&base, "redir-2", "dead").await;
    assert!(
        trap.received().is_empty(),
        "a redirect target is never contacted"
    );
    state_of(&base, "v6-1", "delivered").await;
    let host = v6.received()[0]
        .headers
        .iter()
        .find(|(n, _)| n == "host")
        .map(|(_, v)| v.clone());
    assert_eq!(
        host,
        Some(format!("[::1]:{}", v6.addr().port())),
        "IPv6 Host header is bracketed"
    );
    stop.cancel();
}
