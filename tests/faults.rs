//! Process-level fault tests with a ledger: every `request_id` answered 202 must reach the
//! receiver; repeats are allowed only for notifications a crash touched, at most one per crash,
//! with the same `webhook-id`. Gateways run as separate `api-notify` processes against MariaDB
//! (`API_NOTIFY_TEST_MYSQL`) and a private broker each test starts on its own port.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_notify::config::{Config, KafkaConfig, Secret};
use api_notify::receiver::{self, Receiver};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::json;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A tansu broker in its own directory; restartable on the same port and data.
struct Broker {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    fn start() -> Self {
        let mut b = Broker {
            addr: free_addr(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        b.resume();
        b
    }

    fn resume(&mut self) {
        let url = format!("tcp://{}", self.addr);
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("broker.log")).unwrap())
            .spawn()
            .expect("tansu on PATH (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "broker should listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the broker as an operator would (SIGTERM), killing it after 10 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn kafka_config(label: &str, broker: &Broker) -> Config {
    let base =
        std::env::var("API_NOTIFY_TEST_MYSQL").expect("API_NOTIFY_TEST_MYSQL: run scripts/test");
    let prefix = std::env::var("API_NOTIFY_TEST_DB_PREFIX").unwrap_or_default();
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let name = format!("{prefix}f_{label}_{}", &unique[unique.len() - 10..]);
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("{base}/mysql"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE `{name}`"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.addr.to_string())
        .create()
        .unwrap();
    let topic = NewTopic::new(&name, 3, TopicReplication::Fixed(1));
    admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap();

    let mut c = Config::default();
    c.database.url = Secret::new(format!("{base}/{name}"));
    c.kafka = Some(KafkaConfig {
        brokers: broker.addr.to_string(),
        topic: name.clone(),
        group: name,
        ..Default::default()
    });
    c.outbound.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    c.outbound.connect_timeout_ms = 1_000;
    c.outbound.request_timeout_ms = 2_000;
    c.retry.schedule_secs = vec![1; 5];
    c.retry.jitter_percent = 0;
    c.api.queue_timeout_ms = 2_000;
    c.dispatch.lease_secs = 4;
    c.dispatch.poll_interval_ms = 20;
    c.dispatch.reap_interval_ms = 500;
    c
}

fn write(config: &Config, dir: &Path) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    path
}

/// A gateway process, killed when dropped (also when a test fails half-way).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path, roles: &str, listen: SocketAddr) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_api-notify"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--roles", roles, "--listen", &listen.to_string()])
        .env(
            "RUST_LOG",
            std::env::var("API_NOTIFY_FAULTS_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("start api-notify");
    Proc(child)
}

/// Polls `/healthz` of a gateway process for up to 30 s.
async fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if reqwest::get(format!("http://{addr}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway at {addr} should become healthy within 30 s");
}

fn kill9(process: &mut Proc) {
    let _ = process.0.kill();
    let _ = process.0.wait();
}

/// Posts notifications one after another until `stop`, recording every id answered 202.
fn start_load(
    api: SocketAddr,
    target: SocketAddr,
    ledger: Arc<Mutex<HashSet<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut sent = 0;
        for i in 0..100_000 {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let n = json!({"request_id": format!("f-{i}"), "partner_id": format!("p{}", i % 3),
                "endpoints": [{"ip": "127.0.0.1", "port": target.port()}], "body": {"i": i}});
            sent += 1;
            match client
                .post(format!("http://{api}/v1/notifications"))
                .json(&n)
                .send()
                .await
            {
                Ok(r) if r.status() == 202 => {
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    ledger
                        .lock()
                        .unwrap()
                        .insert(body["id"].as_str().unwrap_or_default().to_string());
                }
                Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        sent
    })
}

/// Waits for every ledger id at the receiver and checks the repeat bound.
async fn settle(r: &Receiver, ledger: &HashSet<String>, crashes: usize) -> HashMap<String, usize> {
    let all = r.wait_until(Duration::from_secs(120), |log| {
        let seen: HashSet<_> = log.iter().filter_map(|x| x.webhook_id.as_ref()).collect();
        ledger.iter().all(|id| seen.contains(id))
    });
    assert!(
        all.await,
        "every notification answered 202 must be delivered"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = r.counts();
    let most = counts.values().copied().max().unwrap_or(0);
    assert!(
        most <= 1 + crashes,
        "no notification repeats more than once per crash: {most}"
    );
    eprintln!(
        "ledger {} accepted, {} delivered, {} repeated, {crashes} crashes",
        ledger.len(),
        counts.len(),
        counts.values().filter(|n| **n > 1).count()
    );
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_role_killed_under_load_loses_nothing() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write(&kafka_config("roles", &broker).await, dir.path());
    let r = Receiver::start(free_addr(), receiver::always_ok())
        .await
        .unwrap();
    let api_addr = free_addr();
    let mut api = spawn(&path, "api", api_addr);
    let mut intake = spawn(&path, "intake", free_addr());
    let mut dispatch = spawn(&path, "dispatch", free_addr());
    let ledger = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    wait_healthy(api_addr).await;
    let load = start_load(api_addr, r.addr(), ledger.clone(), stop.clone());

    for role in ["intake", "dispatch", "api"] {
        let pause = Duration::from_millis(1_000 + rand::random::<u64>() % 1_000);
        tokio::time::sleep(pause).await;
        let child = match role {
            "intake" => &mut intake,
            "dispatch" => &mut dispatch,
            _ => &mut api,
        };
        kill9(child);
        tokio::time::sleep(Duration::from_millis(300)).await;
        *child = spawn(
            &path,
            role,
            if role == "api" { api_addr } else { free_addr() },
        );
        if role == "api" {
            wait_healthy(api_addr).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = load.await.unwrap();
    let ledger = ledger.lock().unwrap().clone();
    assert!(
        ledger.len() >= 20,
        "the run should accept a real load: {} of {sent}",
        ledger.len()
    );
    settle(&r, &ledger, 3).await;
    for child in [&mut api, &mut intake, &mut dispatch] {
        kill9(child);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_stopped_and_started_again_loses_nothing() {
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write(&kafka_config("broker", &broker).await, dir.path());
    let r = Receiver::start(free_addr(), receiver::always_ok())
        .await
        .unwrap();
    let api_addr = free_addr();
    let mut gateway = spawn(&path, "api,intake,dispatch", api_addr);
    let ledger = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    wait_healthy(api_addr).await;
    let load = start_load(api_addr, r.addr(), ledger.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ledger.lock().unwrap().len();
    broker.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = ledger.lock().unwrap().len();
    broker.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger.lock().unwrap().len() < during + 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.await.unwrap();
    let ledger = ledger.lock().unwrap().clone();
    assert!(before > 0, "load was accepted before the outage");
    let log = std::fs::read_to_string(broker.dir.path().join("broker.log")).unwrap_or_default();
    let tail: String = log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains("ERROR"))
        .take(6)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        ledger.len() > during,
        "ingest recovers after the broker returns; broker log:\n{tail}"
    );
    settle(&r, &ledger, 0).await;
    kill9(&mut gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_broker_is_gone_still_stops_on_one_sigterm() {
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = kafka_config("orphan", &broker).await;
    config.dispatch.drain_timeout_ms = 1_000;
    let path = write(&config, dir.path());
    let r = Receiver::start(free_addr(), receiver::always_ok())
        .await
        .unwrap();
    let api_addr = free_addr();
    let mut gateway = spawn(&path, "api,intake,dispatch", api_addr);
    wait_healthy(api_addr).await;
    let ledger = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_load(api_addr, r.addr(), ledger.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.await.unwrap();
    assert!(
        !ledger.lock().unwrap().is_empty(),
        "the intake consumed records, so it has offsets to commit"
    );

    broker.stop();
    let _ = Command::new("kill")
        .args(["-TERM", &gateway.0.id().to_string()])
        .status();
    // Drain (1 s) + the intake's final commit budget (5 s) + start-up slack; without the bound
    // the final commit waits on librdkafka's retries and the process never exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Ok(Some(status)) = gateway.0.try_wait() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        exited.is_some(),
        "one SIGTERM should stop a gateway whose broker is gone within 30 s"
    );
    kill9(&mut gateway);
}
