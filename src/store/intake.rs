//! Writes from the intake (dedup on `request_id`) and reads for the status API.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Dialect, Store, batch_query, bind_in, in_list, opt_text, state};
use crate::model::NewNotification;

/// What became of one notification offered to [`Store::insert_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored under its own id; it will be delivered.
    Inserted,
    /// The same `request_id` with the same content exists under `id`; nothing new stored.
    Duplicate { id: String },
    /// The same `request_id` exists under `id` with other content; recorded, never delivered.
    Conflict { id: String },
}

/// A notification as the status API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NotificationStatus {
    pub id: String,
    pub request_id: String,
    pub partner_id: String,
    /// `pending`, `in_flight`, `delivered` or `dead`.
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub delivered_at_ms: Option<i64>,
    /// Later submissions of this `request_id` with different content.
    pub conflicts: i64,
    pub attempt_log: Vec<AttemptOut>,
}

/// One recorded attempt.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptOut {
    pub number: i64,
    pub endpoint: Option<String>,
    pub plugin_version: Option<String>,
    pub status_code: Option<i64>,
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub response_excerpt: Option<String>,
    pub started_at_ms: i64,
}

const INSERT_COLUMNS: &str = "(id, request_id, partner_id, content_hash, endpoints, headers, \
     body, state, attempts, next_attempt_at, created_at, updated_at)";

impl Store {
    /// Inserts a batch in one transaction; a `request_id` already stored (or repeated within
    /// the batch) is not inserted again. Safe to call again with the same batch.
    pub async fn insert_batch(
        &self,
        batch: &[NewNotification],
    ) -> anyhow::Result<Vec<InsertOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let row_marks = vec!["(?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)"; batch.len()].join(", ");
        let on_conflict = match self.dialect {
            Dialect::Mysql => "ON DUPLICATE KEY UPDATE request_id = request_id",
            Dialect::Sqlite => "ON CONFLICT (request_id) DO NOTHING",
        };
        let sql =
            format!("INSERT INTO notification {INSERT_COLUMNS} VALUES {row_marks} {on_conflict}");
        let mut query = batch_query(&sql);
        for n in batch {
            query = query
                .bind(n.id.as_str())
                .bind(n.request_id.as_str())
                .bind(n.partner_id.as_str())
                .bind(n.content_hash.as_str())
                .bind(serde_json::to_string(&n.endpoints)?)
                .bind(serde_json::to_string(&n.headers)?)
                .bind(n.body.as_bytes())
                .bind(state::PENDING)
                .bind(n.accepted_at_ms)
                .bind(n.accepted_at_ms)
                .bind(n.accepted_at_ms);
        }
        query.execute(&mut *tx).await?;

        let sql = format!(
            "SELECT id, request_id, content_hash FROM notification WHERE request_id IN ({})",
            in_list(batch.len())
        );
        let ids: Vec<&str> = batch.iter().map(|n| n.request_id.as_str()).collect();
        let query = bind_in(sqlx::query(&sql), &ids);
        // request_id → (id, content_hash) of the stored row.
        let stored: HashMap<String, (String, String)> = query
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| Ok((r.try_get(1)?, (r.try_get(0)?, r.try_get(2)?))))
            .collect::<Result<_, sqlx::Error>>()?;

        let mut outcomes = Vec::with_capacity(batch.len());
        for n in batch {
            let (id, hash) = stored
                .get(&n.request_id)
                .ok_or_else(|| anyhow::anyhow!("row for {} vanished after insert", n.request_id))?;
            let outcome = if *id == n.id {
                InsertOutcome::Inserted
            } else if *hash == n.content_hash {
                InsertOutcome::Duplicate { id: id.clone() }
            } else {
                InsertOutcome::Conflict { id: id.clone() }
            };
            if matches!(outcome, InsertOutcome::Conflict { .. }) {
                self.record_conflict(&mut tx, n).await?;
            }
            outcomes.push(outcome);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn record_conflict(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        n: &NewNotification,
    ) -> anyhow::Result<()> {
        let verb = match self.dialect {
            Dialect::Mysql => "INSERT IGNORE INTO",
            Dialect::Sqlite => "INSERT OR IGNORE INTO",
        };
        let sql = format!(
            "{verb} conflict (rejected_id, request_id, partner_id, content_hash, received_at) \
             VALUES (?, ?, ?, ?, ?)"
        );
        sqlx::query(&sql)
            .bind(n.id.as_str())
            .bind(n.request_id.as_str())
            .bind(n.partner_id.as_str())
            .bind(n.content_hash.as_str())
            .bind(n.accepted_at_ms)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// State, schedule and attempt log of one notification.
    pub async fn status(&self, request_id: &str) -> anyhow::Result<Option<NotificationStatus>> {
        let row = sqlx::query(
            "SELECT id, request_id, partner_id, state, attempts, next_attempt_at, last_error, \
             created_at, delivered_at FROM notification WHERE request_id = ?",
        )
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut status = status_from_row(&row)?;
        let conflicts = sqlx::query("SELECT COUNT(*) FROM conflict WHERE request_id = ?")
            .bind(request_id)
            .fetch_one(&self.pool)
            .await?;
        status.conflicts = conflicts.try_get(0)?;
        let attempts = sqlx::query(
            "SELECT number, endpoint, plugin_version, status_code, error_class, error, \
             duration_ms, response_excerpt, started_at FROM attempt \
             WHERE notification_id = ? ORDER BY number",
        )
        .bind(status.id.as_str())
        .fetch_all(&self.pool)
        .await?;
        status.attempt_log = attempts
            .iter()
            .map(attempt_from_row)
            .collect::<Result<_, _>>()?;
        Ok(Some(status))
    }
}

fn status_from_row(row: &AnyRow) -> Result<NotificationStatus, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let next: i64 = row.try_get("next_attempt_at")?;
    Ok(NotificationStatus {
        id: row.try_get("id")?,
        request_id: row.try_get("request_id")?,
        partner_id: row.try_get("partner_id")?,
        next_attempt_at_ms: (state == state::PENDING).then_some(next),
        state,
        attempts: row.try_get("attempts")?,
        last_error: opt_text(row, "last_error")?,
        created_at_ms: row.try_get("created_at")?,
        delivered_at_ms: row.try_get("delivered_at")?,
        conflicts: 0,
        attempt_log: Vec::new(),
    })
}

fn attempt_from_row(row: &AnyRow) -> Result<AttemptOut, sqlx::Error> {
    Ok(AttemptOut {
        number: row.try_get("number")?,
        endpoint: opt_text(row, "endpoint")?,
        plugin_version: row.try_get("plugin_version")?,
        status_code: row.try_get("status_code")?,
        error_class: row.try_get("error_class")?,
        error: opt_text(row, "error")?,
        duration_ms: row.try_get("duration_ms")?,
        response_excerpt: opt_text(row, "response_excerpt")?,
        started_at_ms: row.try_get("started_at")?,
    })
}
