//! `/readyz` follows its dependencies: unready while MariaDB or the broker is stopped, ready
//! again once they are back. Uses private services (tests/it/private.rs), never the shared ones.

use std::time::{Duration, Instant};

use api_notify::config::{KafkaConfig, Secret};
use api_notify::server::Roles;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use reqwest::StatusCode;

use crate::private::{PrivateBroker, PrivateMariadb};
use crate::support::{Client, Gateway, Mode, config, unique};

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("Kafka admin client");
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("topic {t} should be created: {e}"));
    }
}

/// Polls `/readyz` until it answers `want`, for at most `limit`; returns the last body.
async fn wait_readiness(client: &Client, want: StatusCode, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (code, body) = client.get_text("/readyz").await;
        if code == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz should answer {want} within {limit:?}; last answer {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_the_database_and_the_broker() {
    let (mut db, mut broker) =
        tokio::task::spawn_blocking(|| (PrivateMariadb::start(), PrivateBroker::start()))
            .await
            .expect("start private services");
    let topic = unique("ready");
    create_topic(&broker.address(), &topic).await;

    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Mode::Embedded, "ready", &dir).await;
    c.database.url = Secret::new(db.url());
    c.kafka = Some(KafkaConfig {
        brokers: broker.address(),
        topic,
        group: unique("ready"),
        ..KafkaConfig::default()
    });
    let gateway = Gateway::start(c, "api".parse::<Roles>().unwrap()).await;
    let client = &gateway.client;
    let limit = Duration::from_secs(60);
    wait_readiness(client, StatusCode::OK, limit).await;

    db = tokio::task::spawn_blocking(move || {
        db.pause();
        db
    })
    .await
    .unwrap();
    let body = wait_readiness(client, StatusCode::SERVICE_UNAVAILABLE, limit).await;
    assert!(
        body.contains("store"),
        "the answer should blame the store: {body}"
    );
    db = tokio::task::spawn_blocking(move || {
        db.resume();
        db
    })
    .await
    .unwrap();
    wait_readiness(client, StatusCode::OK, limit).await;

    broker.pause();
    let body = wait_readiness(client, StatusCode::SERVICE_UNAVAILABLE, limit).await;
    assert!(
        body.contains("Kafka"),
        "the answer should blame the broker: {body}"
    );
    broker.resume();
    wait_readiness(client, StatusCode::OK, limit).await;

    gateway.stop().await;
    drop((db, broker));
}
