//! Embedded mode: the intake runs in the API process and writes straight into the store.
//!
//! Concurrent submissions are gathered into one transaction (one fsync for many rows), and each
//! caller learns its own outcome, so embedded mode answers repeats and conflicts exactly.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, info};

use super::{QueueError, Submitted};
use crate::metrics::Metrics;
use crate::model::NewNotification;
use crate::store::{InsertOutcome, Store};

type Reply = oneshot::Sender<Result<InsertOutcome, String>>;

/// Sending half: cheap to clone, one per API handler.
#[derive(Clone)]
pub struct EmbeddedQueue {
    tx: mpsc::Sender<(NewNotification, Reply)>,
}

/// Receiving half, consumed by [`run_embedded_intake`].
pub struct EmbeddedIntake {
    rx: mpsc::Receiver<(NewNotification, Reply)>,
}

impl EmbeddedQueue {
    /// A queue and the intake that drains it.
    pub fn new(capacity: usize) -> (Self, EmbeddedIntake) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, EmbeddedIntake { rx })
    }

    pub(super) async fn submit(&self, n: NewNotification) -> Result<Submitted, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((n, reply))
            .await
            .map_err(|_| QueueError::Unavailable("the intake has stopped".into()))?;
        match answer.await {
            Ok(Ok(InsertOutcome::Inserted)) => Ok(Submitted::Accepted),
            Ok(Ok(InsertOutcome::Duplicate { id })) => Ok(Submitted::Duplicate { id }),
            Ok(Ok(InsertOutcome::Conflict { id })) => Ok(Submitted::Conflict { id }),
            Ok(Err(e)) => Err(QueueError::Unavailable(e)),
            Err(_) => Err(QueueError::Unavailable("the intake has stopped".into())),
        }
    }
}

/// Inserts submissions in batches of up to `batch_max` until every sender is gone.
pub async fn run_embedded_intake(
    mut intake: EmbeddedIntake,
    store: Store,
    wake: Arc<Notify>,
    batch_max: usize,
    metrics: Arc<Metrics>,
) {
    info!("embedded intake started");
    let mut items = Vec::with_capacity(batch_max);
    while intake.rx.recv_many(&mut items, batch_max).await > 0 {
        let (batch, replies): (Vec<NewNotification>, Vec<Reply>) = items.drain(..).unzip();
        match store.insert_batch(&batch).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
                wake.notify_one();
            }
            Err(e) => {
                metrics.database_error("insert");
                error!(error = %e, rows = batch.len(), "embedded intake could not store a batch");
                for reply in replies {
                    let _ = reply.send(Err("the store did not accept the notification".into()));
                }
            }
        }
    }
    info!("embedded intake stopped");
}
