//! Kafka mode: the API produces, an intake consumer group inserts into the store.
//!
//! Records are keyed by partner id. The producer is idempotent with `acks=all`, and ingest
//! awaits each delivery report. The intake stores offsets only after the batch that holds them
//! is committed to the database, so a crash replays records (deduplicated by the unique
//! `request_id`) and never skips one. Delivery to partners never runs inside this loop: a slow
//! partner cannot stall a partition or cause a rebalance.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{QueueError, Submitted};
use crate::config::KafkaConfig;
use crate::model::NewNotification;
use crate::store::Store;

/// The producing side, shared by all API handlers.
#[derive(Clone)]
pub struct KafkaQueue {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl KafkaQueue {
    /// A producer that gives up on a record after `timeout` (the ingest answers 503 then).
    pub fn new(config: &KafkaConfig, timeout: Duration) -> anyhow::Result<Self> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
            .create()
            .context("creating the Kafka producer")?;
        Ok(Self {
            producer,
            topic: config.topic.clone(),
            timeout,
        })
    }

    pub(super) async fn submit(&self, n: NewNotification) -> Result<Submitted, QueueError> {
        let payload = serde_json::to_vec(&n).map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let record = FutureRecord::to(&self.topic)
            .key(&n.partner_id)
            .payload(&payload);
        let send = self
            .producer
            .send(record, Timeout::After(Duration::from_millis(100)));
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), send).await {
            Ok(Ok(_)) => Ok(Submitted::Accepted),
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                Err(QueueError::Timeout)
            }
            Ok(Err((e, _))) => Err(QueueError::Unavailable(e.to_string())),
            Err(_) => Err(QueueError::Timeout),
        }
    }

    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            warn!(error = %e, "Kafka producer flush did not complete");
        }
    }

    /// Asks the broker for the topic's metadata: readiness of the queue.
    pub fn check(&self) -> anyhow::Result<()> {
        self.producer
            .client()
            .fetch_metadata(Some(&self.topic), Timeout::After(Duration::from_secs(2)))
            .context("the Kafka broker did not answer")?;
        Ok(())
    }
}

/// Consumes the topic into the store until `shutdown`; commits offsets before returning.
pub async fn run_kafka_intake(
    config: KafkaConfig,
    store: Store,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&config.topic])
        .context("subscribing to the topic")?;
    info!(topic = %config.topic, group = %config.group, "Kafka intake started");

    loop {
        let first = tokio::select! {
            m = consumer.recv() => m,
            () = shutdown.cancelled() => break,
        };
        let mut batch = Batch::default();
        match first {
            Ok(m) => batch.add(&m),
            Err(e) => {
                warn!(error = %e, "Kafka consume error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        while batch.offsets.len() < config.intake_batch_max {
            match tokio::time::timeout(Duration::from_millis(2), consumer.recv()).await {
                Ok(Ok(m)) => batch.add(&m),
                _ => break,
            }
        }
        if !store_with_retry(&store, &batch.rows, &shutdown).await {
            break;
        }
        if let Err(e) = consumer.store_offsets(&batch.offsets()) {
            warn!(error = %e, "storing offsets failed (partition revoked?); records will replay");
        }
        wake.notify_one();
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(error = %e, "final offset commit failed; records will replay"),
    }
    info!("Kafka intake stopped");
    Ok(())
}

/// Decoded records and the next offset to commit per partition.
#[derive(Default)]
struct Batch {
    rows: Vec<NewNotification>,
    offsets: Vec<(String, i32, i64)>,
}

impl Batch {
    fn add(&mut self, m: &impl Message) {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        match m.payload().map(serde_json::from_slice::<NewNotification>) {
            Some(Ok(n)) => self.rows.push(n),
            Some(Err(e)) => {
                error!(topic, partition, offset, error = %e, "skipping an undecodable record")
            }
            None => error!(
                topic,
                partition, offset, "skipping a record without payload"
            ),
        }
        match self
            .offsets
            .iter_mut()
            .find(|(t, p, _)| t == topic && *p == partition)
        {
            Some(entry) => entry.2 = entry.2.max(offset + 1),
            None => self
                .offsets
                .push((topic.to_string(), partition, offset + 1)),
        }
    }

    fn offsets(&self) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (topic, partition, next) in &self.offsets {
            let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        list
    }
}

/// Inserts until it succeeds; false if shutdown came first (offsets are then not stored).
async fn store_with_retry(
    store: &Store,
    rows: &[NewNotification],
    shutdown: &CancellationToken,
) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match store.insert_batch(rows).await {
            Ok(_) => return true,
            Err(e) => error!(error = %e, rows = rows.len(), "intake insert failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
