//! The queue between ingest and the store.
//!
//! Ingest answers `202` only after [`Queue::submit`] returned `Ok`: in Kafka mode that means the
//! broker acknowledged the record (`acks=all`, idempotent producer); in embedded mode it means
//! the row is committed to SQLite. Either way the notification survives a crash from then on.

mod embedded;
mod kafka;

pub use embedded::{EmbeddedQueue, run_embedded_intake};
pub use kafka::{KafkaIntake, KafkaQueue, run_kafka_intake};

use crate::model::NewNotification;

/// What the queue did with a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Durably accepted; it will be stored and delivered once.
    Accepted,
    /// Known already with the same content under `id` (embedded mode knows at once).
    Duplicate { id: String },
    /// Known already under `id` with other content: recorded, never delivered.
    Conflict { id: String },
}

/// Why a submission was not accepted; the caller may retry with the same `request_id`.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue did not acknowledge in time")]
    Timeout,
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
}

/// Embedded or Kafka queue.
#[derive(Clone)]
pub enum Queue {
    Embedded(EmbeddedQueue),
    Kafka(KafkaQueue),
}

impl Queue {
    pub async fn submit(&self, notification: NewNotification) -> Result<Submitted, QueueError> {
        match self {
            Queue::Embedded(q) => q.submit(notification).await,
            Queue::Kafka(q) => q.submit(notification).await,
        }
    }
}
