//! Duplicate lookups for ingest, batched: concurrent `POST`s share one `SELECT … IN (…)`.
//!
//! Every ingest asks whether its `request_id` is stored already, so that a repeat is answered
//! `200`/`409` where the store knows. One query per request costs a pooled connection and a
//! database round trip each, at the ingest rate. Instead, callers queue their ids to one task
//! that runs a query per batch of whatever is waiting: an idle gateway still answers after one
//! round trip, a busy one answers many callers with it. The task starts with the first lookup
//! and ends when the last clone of the [`Store`] is dropped.

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::Context;
use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::{Store, bind_in, in_list};

/// Most ids in one query.
const BATCH_MAX: usize = 256;

/// Stored id and content hash, or why the store could not say.
type Answer = Result<Option<(String, String)>, String>;
type Ask = (String, oneshot::Sender<Answer>);

/// The queue to the lookup task, started on first use.
#[derive(Default)]
pub(super) struct Lookups {
    queue: OnceLock<mpsc::Sender<Ask>>,
}

impl Store {
    /// The stored id and content hash for `request_id`, if any.
    pub async fn lookup(&self, request_id: &str) -> anyhow::Result<Option<(String, String)>> {
        let queue = self.lookups.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(4 * BATCH_MAX);
            tokio::spawn(run(self.pool.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        queue
            .send((request_id.to_string(), reply))
            .await
            .map_err(|_| anyhow::anyhow!("the lookup task has stopped"))?;
        answer
            .await
            .context("the lookup task dropped the question")?
            .map_err(anyhow::Error::msg)
    }
}

async fn run(pool: AnyPool, mut queue: mpsc::Receiver<Ask>) {
    let mut asks = Vec::with_capacity(BATCH_MAX);
    while queue.recv_many(&mut asks, BATCH_MAX).await > 0 {
        let found = find(&pool, &asks).await.map_err(|e| format!("{e:#}"));
        for (request_id, reply) in asks.drain(..) {
            let answer = match &found {
                Ok(rows) => Ok(rows.get(&request_id).cloned()),
                Err(e) => Err(e.clone()),
            };
            let _ = reply.send(answer);
        }
    }
}

async fn find(pool: &AnyPool, asks: &[Ask]) -> anyhow::Result<HashMap<String, (String, String)>> {
    let sql = format!(
        "SELECT request_id, id, content_hash FROM notification WHERE request_id IN ({})",
        in_list(asks.len())
    );
    let ids: Vec<&str> = asks
        .iter()
        .map(|(request_id, _)| request_id.as_str())
        .collect();
    let query = bind_in(sqlx::query(&sql), &ids);
    let mut found = HashMap::with_capacity(asks.len());
    for row in query.fetch_all(pool).await? {
        found.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
    }
    Ok(found)
}
