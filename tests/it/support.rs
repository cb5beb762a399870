//! Test harness: configurations per mode, a gateway started through `server::run`, a typed
//! client, and notification builders.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api_notify::config::{Config, KafkaConfig, Secret};
use api_notify::server::{self, Roles};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the queue and the store live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SQLite file and in-process intake.
    Embedded,
    /// Kafka-protocol broker and MariaDB.
    Kafka,
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the integration tests through scripts/test, which starts MariaDB and the broker")
    })
}

/// A unique, short name for databases, topics and groups.
pub fn unique(label: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("t_{label}_{}", &id[id.len() - 10..])
}

/// Creates a fresh MariaDB database and returns its URL.
pub async fn fresh_mysql_database(label: &str) -> String {
    let base = required_env("API_NOTIFY_TEST_MYSQL");
    let name = format!(
        "{}{}",
        std::env::var("API_NOTIFY_TEST_DB_PREFIX").unwrap_or_default(),
        unique(label)
    );
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("{base}/mysql"))
        .await
        .expect("connect to MariaDB");
    sqlx::query(&format!("CREATE DATABASE `{name}`"))
        .execute(&pool)
        .await
        .expect("create database");
    pool.close().await;
    format!("{base}/{name}")
}

/// Creates a topic with three partitions on the test broker.
pub async fn fresh_topic(label: &str) -> (String, String) {
    let brokers = required_env("API_NOTIFY_TEST_KAFKA");
    let topic = unique(label);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("Kafka admin client");
    let new = NewTopic::new(&topic, 3, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("topic {t} could not be created: {e}"));
    }
    (brokers, topic)
}

/// Settings for fast tests: short retry schedule, short lease, loopback allowed.
pub async fn config(mode: Mode, label: &str, dir: &tempfile::TempDir) -> Config {
    let mut c = Config::default();
    c.outbound.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    c.outbound.connect_timeout_ms = 1_000;
    c.outbound.request_timeout_ms = 2_000;
    c.retry.schedule_secs = vec![1, 1];
    c.retry.jitter_percent = 0;
    c.dispatch.lease_secs = 5;
    c.dispatch.poll_interval_ms = 20;
    c.dispatch.reap_interval_ms = 500;
    c.dispatch.drain_timeout_ms = 5_000;
    match mode {
        Mode::Embedded => {
            let db = dir.path().join("gateway.db");
            c.database.url = Secret::new(format!("sqlite://{}", db.display()));
        }
        Mode::Kafka => {
            c.database.url = Secret::new(fresh_mysql_database(label).await);
            let (brokers, topic) = fresh_topic(label).await;
            c.kafka = Some(KafkaConfig {
                brokers,
                topic,
                group: unique(label),
                linger_ms: 2,
                ..KafkaConfig::default()
            });
        }
    }
    c
}

/// Writes `config` as a TOML file for a gateway process.
pub fn write_config(config: &Config, dir: &tempfile::TempDir, name: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, toml::to_string(config).expect("config to TOML")).expect("write config");
    path
}

/// A gateway running in this process.
pub struct Gateway {
    pub client: Client,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    pub async fn start(config: Config, roles: Roles) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway port");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(config, roles, Some(listener), shutdown.clone()));
        let client = Client::new(addr);
        client.wait_ready().await;
        Self {
            client,
            shutdown,
            task,
        }
    }

    /// Graceful stop; the gateway must exit cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("gateway should stop within 20 s");
        result
            .expect("gateway task panicked")
            .expect("gateway should stop without error");
    }
}

/// A typed client for the gateway's API.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// `http://host:port` of the gateway.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Polls `/healthz` for up to 10 s.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let answer = self.http.get(format!("{}/healthz", self.base)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "gateway at {} did not become healthy within 10 s",
            self.base
        );
    }

    pub async fn post(&self, notification: &Value) -> (StatusCode, Value) {
        self.post_raw(notification.to_string(), "application/json")
            .await
            .expect("gateway reachable")
    }

    pub async fn post_raw(
        &self,
        body: String,
        content_type: &str,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let r = self
            .http
            .post(format!("{}/v1/notifications", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        let status = r.status();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn status(&self, request_id: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}/v1/notifications/{request_id}", self.base))
            .send()
            .await
            .expect("gateway reachable");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `GET path`: status and body text.
    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("gateway reachable");
        let status = r.status();
        (status, r.text().await.unwrap_or_default())
    }

    /// Polls the status API until `state` is reached, for at most `limit`.
    pub async fn wait_for_state(&self, request_id: &str, state: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (code, body) = self.status(request_id).await;
            if code == StatusCode::OK && body["state"] == state {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{request_id} should reach {state} within {limit:?}; last seen {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A notification to `endpoints` with a JSON body.
pub fn notification(
    request_id: &str,
    partner_id: &str,
    endpoints: &[SocketAddr],
    body: Value,
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|a| json!({"ip": a.ip().to_string(), "port": a.port(), "path": format!("/hooks/{partner_id}")}))
        .collect();
    json!({
        "request_id": request_id,
        "partner_id": partner_id,
        "endpoints": endpoints,
        "headers": {"Content-Type": "application/json"},
        "body": body,
    })
}

/// A loopback address where nothing listens.
pub async fn closed_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Loopback with a free port.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
