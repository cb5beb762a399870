//! Kafka mode: the API produces, an intake consumer group inserts into the store.
//!
//! Records are keyed by partner id. The producer is idempotent with `acks=all`, and ingest
//! awaits each delivery report. The intake stores offsets only after the batch that holds them
//! is committed to the database, so a crash replays records (deduplicated by the unique
//! `request_id`) and never skips one. Delivery to partners never runs inside this loop: a slow
//! partner cannot stall a partition or cause a rebalance.
//!
//! Each batch the intake stores runs in an `intake_batch` span naming the topic and, per
//! partition, the first and last offset, so a log line about a failed insert says which records
//! it concerns. Consumer lag comes from librdkafka's statistics callback (`LagContext`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use super::{QueueError, Submitted};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::model::NewNotification;
use crate::store::Store;

/// The producing side, shared by all API handlers.
#[derive(Clone)]
pub struct KafkaQueue {
    producer: Arc<Replaceable>,
    topic: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// The producer, rebuilt when the broker keeps refusing it: an idempotent producer whose state
/// the broker lost (a restart of a broker without durable producer state) or that librdkafka
/// marked fatal cannot recover by itself; a new one gets a fresh producer id.
struct Replaceable {
    current: std::sync::RwLock<FutureProducer>,
    settings: ClientConfig,
    rebuilt_at: std::sync::Mutex<std::time::Instant>,
}

impl Replaceable {
    fn get(&self) -> FutureProducer {
        self.current.read().expect("producer lock").clone()
    }

    /// Replaces the producer, at most once a second.
    fn rebuild(&self, why: &KafkaError) {
        let mut at = self.rebuilt_at.lock().expect("producer rebuild lock");
        if at.elapsed() < Duration::from_secs(1) {
            return;
        }
        *at = std::time::Instant::now();
        match self.settings.create::<FutureProducer>() {
            Ok(fresh) => {
                warn!(error = %why, "Kafka producer refused by the broker; replaced it");
                *self.current.write().expect("producer lock") = fresh;
            }
            Err(e) => warn!(error = %e, "could not replace the Kafka producer"),
        }
    }
}

/// What the intake consumer needs.
pub struct KafkaIntake {
    pub config: KafkaConfig,
    pub store: Store,
    /// Nudges the dispatcher when rows arrive.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// How often librdkafka reports statistics (consumer lag).
    pub statistics_interval: Duration,
}

impl KafkaQueue {
    /// A producer that gives up on a record after `timeout` (the ingest answers 503 then).
    pub fn new(
        config: &KafkaConfig,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let mut settings = ClientConfig::new();
        settings
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set("reconnect.backoff.max.ms", "1000")
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string());
        let producer: FutureProducer = settings.create().context("creating the Kafka producer")?;
        let producer = Arc::new(Replaceable {
            current: std::sync::RwLock::new(producer),
            settings,
            rebuilt_at: std::sync::Mutex::new(std::time::Instant::now()),
        });
        Ok(Self {
            producer,
            topic: config.topic.clone(),
            timeout,
            metrics,
        })
    }

    pub(super) async fn submit(&self, n: NewNotification) -> Result<Submitted, QueueError> {
        let result = self.produce(&n).await;
        if result.is_err() {
            self.metrics.kafka_produce_failed();
        }
        result
    }

    async fn produce(&self, n: &NewNotification) -> Result<Submitted, QueueError> {
        let payload = serde_json::to_vec(&n).map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let record = FutureRecord::to(&self.topic)
            .key(&n.partner_id)
            .payload(&payload);
        let producer = self.producer.get();
        let send = producer.send(record, Timeout::After(Duration::from_millis(100)));
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), send).await {
            Ok(Ok(_)) => Ok(Submitted::Accepted),
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                Err(QueueError::Timeout)
            }
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))) => {
                Err(QueueError::Unavailable("the producer queue is full".into()))
            }
            Ok(Err((e, _))) => {
                self.producer.rebuild(&e);
                Err(QueueError::Unavailable(e.to_string()))
            }
            Err(_) => Err(QueueError::Timeout),
        }
    }

    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.get().flush(Timeout::After(timeout)) {
            warn!(error = %e, "Kafka producer flush did not complete");
        }
    }

    /// Asks the broker for the topic's metadata: readiness of the queue.
    pub fn check(&self) -> anyhow::Result<()> {
        self.producer
            .get()
            .client()
            .fetch_metadata(Some(&self.topic), Timeout::After(Duration::from_secs(2)))
            .context("the Kafka broker did not answer")?;
        Ok(())
    }
}

/// Consumes the topic into the store until `shutdown`; commits offsets before returning.
pub async fn run_kafka_intake(
    intake: KafkaIntake,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let KafkaIntake {
        config,
        store,
        wake,
        metrics,
        statistics_interval,
    } = intake;
    let context = LagContext {
        metrics: metrics.clone(),
        topic: config.topic.clone(),
    };
    let consumer: StreamConsumer<LagContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Prefetch at most 16 MiB (librdkafka's default is 64 MiB): the intake stores a batch
        // at a time, so a deeper queue only adds memory while the database is the slower side.
        .set("queued.max.messages.kbytes", "16384")
        // A broker that holds a fetch until its maximum wait even when records are there (tansu
        // does) would otherwise add up to librdkafka's default 500 ms to every delivery.
        .set("fetch.wait.max.ms", "50")
        .set("reconnect.backoff.max.ms", "1000")
        .set(
            "statistics.interval.ms",
            statistics_interval.as_millis().to_string(),
        )
        .create_with_context(context)
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
        let span = info_span!(
            "intake_batch",
            topic = %config.topic,
            records = batch.rows.len(),
            offsets = %batch.ranges(),
        );
        let stored = store_with_retry(&store, &batch.rows, &metrics, &shutdown)
            .instrument(span)
            .await;
        if !stored {
            break;
        }
        if let Err(e) = consumer.store_offsets(&batch.offsets()) {
            warn!(error = %e, "storing offsets failed (partition revoked?); records will replay");
        }
        wake.notify_one();
    }
    finish_consumer(consumer).await;
    info!("Kafka intake stopped");
    Ok(())
}

/// Longest a stopping intake waits for its final offset commit and the consumer's close.
const FINAL_COMMIT_BUDGET: Duration = Duration::from_secs(5);

/// Commits the stored offsets and closes the consumer, waiting at most [`FINAL_COMMIT_BUDGET`]:
/// with the broker gone both can block for as long as librdkafka retries, and a stop must not
/// depend on the broker. Offsets not committed are replayed on the next start (the intake
/// deduplicates), so giving up loses nothing. The work runs on a plain thread that is left
/// behind if it does not finish, rather than on the runtime, whose shutdown would wait for it.
async fn finish_consumer(consumer: StreamConsumer<LagContext>) {
    let (done, finished) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("kafka-intake-close".into())
        .spawn(move || {
            let committed = consumer.commit_consumer_state(CommitMode::Sync);
            drop(consumer);
            let _ = done.send(committed);
        });
    if let Err(e) = spawned {
        warn!(error = %e, "could not start the final offset commit; records will replay");
        return;
    }
    match tokio::time::timeout(FINAL_COMMIT_BUDGET, finished).await {
        Ok(Ok(Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "final offset commit failed; records will replay"),
        Ok(Err(_)) => warn!("the final offset commit ended without an answer; records will replay"),
        Err(_) => warn!(
            budget = ?FINAL_COMMIT_BUDGET,
            "the broker did not take the final offset commit in time; records will replay"
        ),
    }
}

/// Reports the intake's consumer lag from librdkafka's periodic statistics.
struct LagContext {
    metrics: Arc<Metrics>,
    topic: String,
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        for (partition, stats) in &topic.partitions {
            // Partition -1 is librdkafka's internal "unassigned"; a lag of -1 means unknown.
            if *partition >= 0 && stats.consumer_lag >= 0 {
                self.metrics
                    .set_consumer_lag(*partition, stats.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for LagContext {}

/// Decoded records and, per partition, the first offset and the next offset to commit.
#[derive(Default)]
struct Batch {
    rows: Vec<NewNotification>,
    offsets: Vec<(String, i32, i64, i64)>,
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
            .find(|(t, p, _, _)| t == topic && *p == partition)
        {
            Some(entry) => {
                entry.2 = entry.2.min(offset);
                entry.3 = entry.3.max(offset + 1);
            }
            None => self
                .offsets
                .push((topic.to_string(), partition, offset, offset + 1)),
        }
    }

    /// `partition:first-last` for each partition in the batch, for the batch's span.
    fn ranges(&self) -> String {
        let parts: Vec<String> = self
            .offsets
            .iter()
            .map(|(_, partition, first, next)| format!("{partition}:{first}-{}", next - 1))
            .collect();
        parts.join(" ")
    }

    fn offsets(&self) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (topic, partition, _, next) in &self.offsets {
            let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        list
    }
}

/// Inserts until it succeeds; false if shutdown came first (offsets are then not stored).
async fn store_with_retry(
    store: &Store,
    rows: &[NewNotification],
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match store.insert_batch(rows).await {
            Ok(_) => return true,
            Err(e) => {
                metrics.database_error("insert");
                error!(error = %e, rows = rows.len(), "intake insert failed; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
