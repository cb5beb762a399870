//! A gateway under test, started in this process through [`crate::server::run`].
//!
//! Embedded mode gets a SQLite file in a temporary directory. Kafka + MariaDB mode gets its own
//! topic (three partitions, created with the admin client), consumer group and database, all
//! named after the run, and [`Gateway::stop`] deletes them again.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DatabaseConfig, KafkaConfig, Secret};
use crate::server::{self, Roles};
use crate::store::{Backlog, Store};

/// Where the gateway keeps its queue and its rows.
#[derive(Debug, Clone)]
pub enum Backend {
    Embedded,
    /// Broker list and a MariaDB server URL without a database name.
    Kafka {
        brokers: String,
        mysql: String,
    },
}

/// Knobs the scenarios turn; everything else is the shipped default.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub max_in_flight: usize,
    pub partner_max_in_flight: usize,
    pub claim_batch: usize,
    pub linger_ms: u64,
    pub db_connections: u32,
    /// Partners `p0`, `p1`, … whose deliveries the Standard Webhooks plugin signs (0: none).
    pub signed_partners: usize,
}

/// The key the load tool's signer uses: the Standard Webhooks specification's public test secret.
const BENCH_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BENCH_KEY: &str = "bench_signing";

/// A running gateway.
pub(super) struct Gateway {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    database: DatabaseConfig,
    leftovers: Leftovers,
    _dir: tempfile::TempDir,
}

/// What to delete when the gateway stops.
struct Leftovers {
    backend: Backend,
    database: String,
    topic: String,
}

impl Gateway {
    /// Creates the topic and database, and starts every role.
    pub(super) async fn start(
        backend: &Backend,
        tuning: &Tuning,
        run_id: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let name = format!("api_notify_bench_{run_id}");
        let mut config = settings(tuning);
        if tuning.signed_partners > 0 {
            install_signer(&mut config, dir.path(), tuning.signed_partners)?;
        }
        match backend {
            Backend::Embedded => {
                let file = dir.path().join("gateway.db");
                config.database.url = Secret::new(format!("sqlite://{}", file.display()));
            }
            Backend::Kafka { brokers, mysql } => {
                create_database(mysql, &name).await?;
                config.database.url = Secret::new(format!("{mysql}/{name}"));
                create_topic(brokers, &name).await?;
                config.kafka = Some(KafkaConfig {
                    brokers: brokers.clone(),
                    topic: name.clone(),
                    group: name.clone(),
                    linger_ms: tuning.linger_ms,
                    ..KafkaConfig::default()
                });
            }
        }
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let database = config.database.clone();
        let task = tokio::spawn(server::run(
            config,
            Roles::ALL,
            Some(listener),
            stop.clone(),
        ));
        wait_ready(addr).await?;
        Ok(Self {
            addr,
            stop,
            task,
            database,
            leftovers: Leftovers {
                backend: backend.clone(),
                database: name.clone(),
                topic: name,
            },
            _dir: dir,
        })
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Rows per state, read over a separate small pool.
    pub(super) async fn backlog(&self) -> anyhow::Result<Backlog> {
        let mut database = self.database.clone();
        database.max_connections = 1;
        database.migrate_on_start = false;
        let store = Store::connect(&database).await?;
        let backlog = store.backlog().await;
        store.close().await;
        backlog
    }

    /// Stops every role, then drops the database and deletes the topic.
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let ran = self.task.await.context("the gateway task panicked")?;
        if let Backend::Kafka { brokers, mysql } = &self.leftovers.backend {
            drop_database(mysql, &self.leftovers.database).await?;
            delete_topic(brokers, &self.leftovers.topic).await;
        }
        ran
    }
}

/// Defaults, plus loopback allowed and a short retry schedule so scenarios stay bounded.
fn settings(tuning: &Tuning) -> Config {
    let mut c = Config::default();
    c.outbound.allow_cidrs = vec!["127.0.0.0/8".parse().expect("a valid CIDR")];
    c.outbound.request_timeout_ms = 5_000;
    c.retry.schedule_secs = vec![1; 30];
    c.retry.jitter_percent = 0;
    c.dispatch.max_in_flight = tuning.max_in_flight;
    c.dispatch.claim_batch = tuning.claim_batch;
    c.dispatch.poll_interval_ms = 20;
    c.database.max_connections = tuning.db_connections;
    c.partner_defaults.max_in_flight = tuning.partner_max_in_flight;
    c.partner_defaults.breaker_cooldown_ms = 1_000;
    c
}

/// One plugin directory per signed partner, all holding the same signer and key grant.
fn install_signer(
    config: &mut Config,
    dir: &std::path::Path,
    partners: usize,
) -> anyhow::Result<()> {
    let plugins = dir.join("plugins.d");
    let manifest = format!("keys = [\"{BENCH_KEY}\"]\n\n[config]\nkeys = \"{BENCH_KEY}\"\n");
    for partner in 0..partners {
        let partner_dir = plugins.join(format!("p{partner}"));
        std::fs::create_dir_all(&partner_dir)
            .with_context(|| format!("creating {}", partner_dir.display()))?;
        std::fs::write(partner_dir.join("plugin.wasm"), crate::demo::SIGNER_WASM)?;
        std::fs::write(partner_dir.join("plugin.toml"), &manifest)?;
    }
    config.plugins.dir = plugins;
    let key = crate::plugin::KeyConfig {
        hmac_secret: Some(crate::plugin::Secret::new(BENCH_SECRET)),
        ..Default::default()
    };
    config.plugins.keys.insert(BENCH_KEY.into(), key);
    Ok(())
}

async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    let url = format!("http://{addr}/readyz");
    let client = reqwest::Client::builder().no_proxy().build()?;
    for _ in 0..200 {
        if let Ok(r) = client.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the gateway did not become ready within 10 s")
}

async fn admin_sql(mysql: &str, sql: &str) -> anyhow::Result<()> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("{mysql}/mysql"))
        .await
        .context("connecting to MariaDB")?;
    let done = sqlx::query(sql).execute(&pool).await;
    pool.close().await;
    done.with_context(|| format!("running {sql}"))?;
    Ok(())
}

async fn create_database(mysql: &str, name: &str) -> anyhow::Result<()> {
    admin_sql(mysql, &format!("CREATE DATABASE `{name}`")).await
}

async fn drop_database(mysql: &str, name: &str) -> anyhow::Result<()> {
    admin_sql(mysql, &format!("DROP DATABASE IF EXISTS `{name}`")).await
}

fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")
}

async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let new = NewTopic::new(topic, 3, TopicReplication::Fixed(1));
    let results = admin(brokers)?
        .create_topics([&new], &AdminOptions::new())
        .await
        .context("creating the topic")?;
    for result in results {
        result.map_err(|(t, e)| anyhow::anyhow!("topic {t} could not be created: {e}"))?;
    }
    Ok(())
}

/// Best effort: the broker belongs to the run, so a topic left behind goes with it.
async fn delete_topic(brokers: &str, topic: &str) {
    if let Ok(admin) = admin(brokers) {
        let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
    }
}
