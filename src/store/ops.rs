//! Operator actions on the store: replay, retention purge, partner summaries.

use serde::Serialize;
use sqlx::Row;

use super::{Dialect, Store, bind_in, in_list, state};

/// What a single replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Scheduled for delivery now, with its original `webhook-id`.
    Scheduled {
        id: String,
    },
    /// Still pending or in flight: nothing to replay.
    NotFinished {
        state: String,
    },
    NotFound,
}

/// Which finished notifications a range replay selects.
#[derive(Debug, Clone)]
pub struct ReplayRange {
    pub partner_id: String,
    /// Acceptance time window, milliseconds since the epoch, inclusive.
    pub since_ms: i64,
    pub until_ms: i64,
    /// `dead` or `delivered`.
    pub state: String,
    pub limit: usize,
}

/// Rows per state for one partner.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct PartnerCounts {
    pub pending: i64,
    pub in_flight: i64,
    pub delivered: i64,
    pub dead: i64,
}

impl Store {
    /// Schedules a delivered or dead notification again, now, with a fresh retry budget.
    pub async fn replay(&self, request_id: &str, now_ms: i64) -> anyhow::Result<ReplayOutcome> {
        let row = sqlx::query("SELECT id, state FROM notification WHERE request_id = ?")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(ReplayOutcome::NotFound);
        };
        let id: String = row.try_get("id")?;
        let current: String = row.try_get("state")?;
        if current != state::DEAD && current != state::DELIVERED {
            return Ok(ReplayOutcome::NotFinished { state: current });
        }
        let done = self.reschedule(std::slice::from_ref(&id), now_ms).await?;
        Ok(if done == 1 {
            ReplayOutcome::Scheduled { id }
        } else {
            ReplayOutcome::NotFinished {
                state: state::PENDING.into(),
            }
        })
    }

    /// Selects up to `range.limit` finished notifications (oldest first) and reschedules them
    /// in chunks of 100 with a pause between chunks, so a replay does not flood a partner or
    /// hold long locks. Returns how many were scheduled.
    pub async fn replay_range(&self, range: &ReplayRange, now_ms: i64) -> anyhow::Result<u64> {
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM notification WHERE partner_id = ? AND state = ? \
             AND created_at >= ? AND created_at <= ? ORDER BY id LIMIT ?",
        )
        .bind(range.partner_id.as_str())
        .bind(range.state.as_str())
        .bind(range.since_ms)
        .bind(range.until_ms)
        .bind(range.limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
        let mut scheduled = 0;
        for (i, chunk) in ids.chunks(100).enumerate() {
            if i > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            scheduled += self.reschedule(chunk, now_ms + 50 * i as i64).await?;
        }
        Ok(scheduled)
    }

    async fn reschedule(&self, ids: &[String], due_ms: i64) -> anyhow::Result<u64> {
        let sql = format!(
            "UPDATE notification SET state = ?, next_attempt_at = ?, retry_base = attempts, \
             last_error = NULL, delivered_at = NULL, updated_at = ? \
             WHERE state IN (?, ?) AND id IN ({})",
            in_list(ids.len())
        );
        let query = sqlx::query(&sql)
            .bind(state::PENDING)
            .bind(due_ms)
            .bind(due_ms)
            .bind(state::DEAD)
            .bind(state::DELIVERED);
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        Ok(bind_in(query, &ids)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Deletes up to `batch` delivered or dead notifications last changed before `cutoff_ms`,
    /// with their attempts. Returns how many notifications were deleted.
    pub async fn purge(&self, cutoff_ms: i64, batch: usize) -> anyhow::Result<u64> {
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM notification WHERE state IN (?, ?) AND updated_at < ? LIMIT ?",
        )
        .bind(state::DELIVERED)
        .bind(state::DEAD)
        .bind(cutoff_ms)
        .bind(batch as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(0);
        }
        let marks = in_list(ids.len());
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut tx = self.pool.begin().await?;
        let attempts_sql = format!("DELETE FROM attempt WHERE notification_id IN ({marks})");
        bind_in(sqlx::query(&attempts_sql), &ids)
            .execute(&mut *tx)
            .await?;
        let rows_sql = format!(
            "DELETE FROM notification WHERE state IN (?, ?) AND updated_at < ? AND id IN ({marks})"
        );
        let query = sqlx::query(&rows_sql)
            .bind(state::DELIVERED)
            .bind(state::DEAD)
            .bind(cutoff_ms);
        let deleted = bind_in(query, &ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM conflict WHERE received_at < ?")
            .bind(cutoff_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// Rows per state for one partner.
    pub async fn partner_counts(&self, partner_id: &str) -> anyhow::Result<PartnerCounts> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM notification WHERE partner_id = ? GROUP BY state",
        )
        .bind(partner_id)
        .fetch_all(&self.pool)
        .await?;
        let [pending, in_flight, delivered, dead] = super::tally_states(&rows)?;
        Ok(PartnerCounts {
            pending,
            in_flight,
            delivered,
            dead,
        })
    }

    /// Records a partner's breaker state as last seen by a dispatcher.
    pub async fn record_breaker(
        &self,
        partner_id: &str,
        breaker: &str,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        let upsert = match self.dialect {
            Dialect::Mysql => {
                "ON DUPLICATE KEY UPDATE breaker = VALUES(breaker), changed_at = VALUES(changed_at)"
            }
            Dialect::Sqlite => {
                "ON CONFLICT (partner_id) DO UPDATE SET breaker = excluded.breaker, changed_at = excluded.changed_at"
            }
        };
        let sql = format!(
            "INSERT INTO partner (partner_id, breaker, changed_at) VALUES (?, ?, ?) {upsert}"
        );
        sqlx::query(&sql)
            .bind(partner_id)
            .bind(breaker)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The last recorded breaker state of a partner and when it changed.
    pub async fn breaker(&self, partner_id: &str) -> anyhow::Result<Option<(String, i64)>> {
        let row = sqlx::query("SELECT breaker, changed_at FROM partner WHERE partner_id = ?")
            .bind(partner_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
            None => None,
        })
    }
}
