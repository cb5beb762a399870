//! The lease state machine: claim due rows, finish them, return expired leases.
//!
//! `pending → in_flight` happens in one statement or transaction that also sets `lease_until` and
//! a fresh `claim_token`; MySQL/MariaDB skip rows another dispatcher holds (`FOR UPDATE SKIP
//! LOCKED`), SQLite serialises writers. Finishing checks the token, so a worker whose lease was
//! reaped cannot overwrite the newer claim. No transaction is ever held across an HTTP call.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    AnyQuery, Dialect, Store, batch_query, bind_in, in_list, in_list_len, placeholders, state, text,
};
use crate::model::Endpoint;

/// A notification claimed for one delivery attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub request_id: String,
    pub partner_id: String,
    pub endpoints: Vec<Endpoint>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Attempts made before this one.
    pub attempts: i64,
    /// Attempts made before the last replay: the retry schedule counts from here.
    pub retry_base: i64,
    pub created_at_ms: i64,
    pub claim_token: String,
}

/// How an attempt ended for the notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Retry { next_attempt_at_ms: i64 },
    Dead,
}

/// One attempt as recorded in the attempt log.
#[derive(Debug, Clone, Default)]
pub struct AttemptRecord {
    pub endpoint: Option<String>,
    pub plugin_version: Option<String>,
    pub status_code: Option<i64>,
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub response_excerpt: Option<String>,
    pub started_at_ms: i64,
}

/// The result of one attempt, ready to be written.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: String,
    pub claim_token: String,
    /// Number of this attempt (1 for the first).
    pub number: i64,
    pub outcome: Outcome,
    pub attempt: AttemptRecord,
    pub finished_at_ms: i64,
}

const CLAIM_COLUMNS: &str =
    "id, request_id, partner_id, endpoints, headers, body, attempts, retry_base, created_at";

impl Store {
    /// Claims up to `limit` due notifications for `lease_ms`, leaving out the partners in
    /// `exclude` (at most the first 1,000 are honoured).
    pub async fn claim(
        &self,
        now_ms: i64,
        limit: usize,
        lease_ms: i64,
        exclude: &[String],
    ) -> anyhow::Result<Vec<Claimed>> {
        let token = uuid::Uuid::now_v7().simple().to_string();
        let exclude = &exclude[..exclude.len().min(1000)];
        let claim = ClaimSpec {
            now_ms,
            limit,
            lease_ms,
            token: &token,
            exclude,
        };
        match self.dialect {
            Dialect::Sqlite => self.claim_sqlite(&claim).await,
            Dialect::Mysql => self.claim_mysql(&claim).await,
        }
    }

    /// Claims the oldest unfinished notification of a FIFO partner, if it is pending and due.
    /// Nothing is claimed while the head is in flight or waiting for its retry.
    pub async fn claim_fifo_head(
        &self,
        partner_id: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> anyhow::Result<Option<Claimed>> {
        let token = uuid::Uuid::now_v7().simple().to_string();
        let mut tx = self.pool.begin().await?;
        let lock = if self.dialect == Dialect::Mysql {
            "FOR UPDATE"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {CLAIM_COLUMNS}, state, next_attempt_at FROM notification \
             WHERE partner_id = ? AND state IN (?, ?) ORDER BY id LIMIT 1 {lock}"
        );
        let head = sqlx::query(&sql)
            .bind(partner_id)
            .bind(state::PENDING)
            .bind(state::IN_FLIGHT)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(head) = head else { return Ok(None) };
        let due = head.try_get::<String, _>("state")? == state::PENDING
            && head.try_get::<i64, _>("next_attempt_at")? <= now_ms;
        if !due {
            return Ok(None);
        }
        let claimed = claimed_from_row(&head, &token)?;
        sqlx::query(
            "UPDATE notification SET state = ?, lease_until = ?, claim_token = ?, updated_at = ? \
             WHERE id = ? AND state = ?",
        )
        .bind(state::IN_FLIGHT)
        .bind(now_ms + lease_ms)
        .bind(token.as_str())
        .bind(now_ms)
        .bind(claimed.id.as_str())
        .bind(state::PENDING)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(claimed))
    }

    async fn claim_sqlite(&self, c: &ClaimSpec<'_>) -> anyhow::Result<Vec<Claimed>> {
        let sql = format!(
            "UPDATE notification SET state = ?, lease_until = ?, claim_token = ?, updated_at = ? \
             WHERE id IN (SELECT id FROM notification WHERE state = ? AND next_attempt_at <= ? \
             {} ORDER BY next_attempt_at LIMIT ?) RETURNING {CLAIM_COLUMNS}",
            c.exclusion()
        );
        let query = sqlx::query(&sql)
            .bind(state::IN_FLIGHT)
            .bind(c.now_ms + c.lease_ms)
            .bind(c.token)
            .bind(c.now_ms)
            .bind(state::PENDING)
            .bind(c.now_ms);
        let query = c.bind_exclusion(query);
        let rows = query.bind(c.limit as i64).fetch_all(&self.pool).await?;
        rows.iter().map(|r| claimed_from_row(r, c.token)).collect()
    }

    async fn claim_mysql(&self, c: &ClaimSpec<'_>) -> anyhow::Result<Vec<Claimed>> {
        let (now_ms, lease_ms, token) = (c.now_ms, c.lease_ms, c.token);
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT {CLAIM_COLUMNS} FROM notification WHERE state = ? AND next_attempt_at <= ? \
             {} ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED",
            c.exclusion()
        );
        let query = c.bind_exclusion(sqlx::query(&sql).bind(state::PENDING).bind(now_ms));
        let rows = query.bind(c.limit as i64).fetch_all(&mut *tx).await?;
        // Decode before committing: a row that cannot be read must not be left in flight.
        let claimed: Vec<Claimed> = rows
            .iter()
            .map(|r| claimed_from_row(r, token))
            .collect::<anyhow::Result<_>>()?;
        if claimed.is_empty() {
            tx.rollback().await?;
            return Ok(claimed);
        }
        let sql = format!(
            "UPDATE notification SET state = ?, lease_until = ?, claim_token = ?, updated_at = ? \
             WHERE id IN ({})",
            in_list(claimed.len())
        );
        let update = sqlx::query(&sql)
            .bind(state::IN_FLIGHT)
            .bind(now_ms + lease_ms)
            .bind(token)
            .bind(now_ms);
        let ids: Vec<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
        bind_in(update, &ids).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    /// Writes attempt outcomes and their log rows in one transaction. Returns how many
    /// notifications were updated; a finish whose claim was lost (lease reaped) updates nothing
    /// but its attempt is still logged.
    ///
    /// Plain deliveries (the common case) take one `UPDATE … WHERE claim_token = ? AND id IN
    /// (…)` per claim instead of one statement per row; retries, dead rows and deliveries that
    /// carry an error text are written one by one.
    pub async fn finish(&self, batch: &[Finish]) -> anyhow::Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        // Rows are updated in id order so that concurrent finishers lock in the same order.
        let mut ordered: Vec<&Finish> = batch.iter().collect();
        ordered.sort_by(|a, b| a.id.cmp(&b.id));
        let (plain, single): (Vec<&Finish>, Vec<&Finish>) = ordered
            .into_iter()
            .partition(|f| f.outcome == Outcome::Delivered && f.attempt.error.is_none());
        let mut tx = self.pool.begin().await?;
        let mut updated = 0;
        for group in by_claim(&plain) {
            updated += finish_delivered(&mut tx, &group).await?;
        }
        for f in single {
            updated += finish_one(&mut tx, f).await?;
        }
        insert_attempts(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(updated)
    }

    /// Returns leases that expired before `now_ms` to `pending`, due at once. Finds them with
    /// a plain read, then updates by primary key with the expiry re-checked, so it never locks
    /// rows whose leases are alive.
    pub async fn reap(&self, now_ms: i64) -> anyhow::Result<u64> {
        let expired: Vec<String> = sqlx::query(
            "SELECT id FROM notification WHERE state = ? AND lease_until < ? LIMIT 1000",
        )
        .bind(state::IN_FLIGHT)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
        if expired.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE notification SET state = ?, lease_until = NULL, claim_token = NULL, \
             next_attempt_at = ?, updated_at = ? WHERE state = ? AND lease_until < ? \
             AND id IN ({})",
            in_list(expired.len())
        );
        let update = sqlx::query(&sql)
            .bind(state::PENDING)
            .bind(now_ms)
            .bind(now_ms)
            .bind(state::IN_FLIGHT)
            .bind(now_ms);
        let ids: Vec<&str> = expired.iter().map(String::as_str).collect();
        Ok(bind_in(update, &ids)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Gives claims back unfinished (over a partner's cap, or at shutdown): the rows are due
    /// again at once. One statement per claim token.
    pub async fn release(&self, claims: &[(String, String)], now_ms: i64) -> anyhow::Result<u64> {
        let mut tokens: Vec<&str> = claims.iter().map(|(_, token)| token.as_str()).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let mut released = 0;
        let mut tx = self.pool.begin().await?;
        for token in tokens {
            let mut ids: Vec<&str> = claims
                .iter()
                .filter(|(_, t)| t == token)
                .map(|(id, _)| id.as_str())
                .collect();
            ids.sort_unstable();
            let sql = format!(
                "UPDATE notification SET state = ?, lease_until = NULL, claim_token = NULL, \
                 updated_at = ? WHERE claim_token = ? AND id IN ({})",
                in_list(ids.len())
            );
            let query = sqlx::query(&sql)
                .bind(state::PENDING)
                .bind(now_ms)
                .bind(token);
            released += bind_in(query, &ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(released)
    }
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// `batch` (sorted by id) split by claim token, each part still in id order.
fn by_claim<'a>(batch: &[&'a Finish]) -> Vec<Vec<&'a Finish>> {
    let mut groups: Vec<Vec<&Finish>> = Vec::new();
    for f in batch {
        match groups
            .iter_mut()
            .find(|g| g[0].claim_token == f.claim_token)
        {
            Some(group) => group.push(f),
            None => groups.push(vec![f]),
        }
    }
    groups
}

/// Marks one claim's delivered rows in one statement; per-row values go through `CASE id`. The
/// `CASE` and `IN` lists are padded to [`in_list_len`] by repeating the last row, so a few
/// statement texts serve every batch size.
async fn finish_delivered(tx: &mut Tx<'_>, group: &[&Finish]) -> anyhow::Result<u64> {
    let Some(last) = group.last() else {
        return Ok(0);
    };
    let padded: Vec<&Finish> = group
        .iter()
        .copied()
        .chain(std::iter::repeat_n(
            *last,
            in_list_len(group.len()) - group.len(),
        ))
        .collect();
    let cases = "WHEN ? THEN ? ".repeat(padded.len());
    let sql = format!(
        "UPDATE notification SET state = ?, attempts = CASE id {cases}END, \
         delivered_at = CASE id {cases}END, updated_at = CASE id {cases}END, \
         last_error = NULL, lease_until = NULL, claim_token = NULL \
         WHERE claim_token = ? AND id IN ({})",
        placeholders(padded.len())
    );
    let mut query = sqlx::query(&sql).bind(state::DELIVERED);
    for f in &padded {
        query = query.bind(f.id.as_str()).bind(f.number);
    }
    // delivered_at, then updated_at: both the attempt's own finishing time.
    for _ in 0..2 {
        for f in &padded {
            query = query.bind(f.id.as_str()).bind(f.finished_at_ms);
        }
    }
    query = query.bind(group[0].claim_token.as_str());
    for f in &padded {
        query = query.bind(f.id.as_str());
    }
    Ok(query.execute(&mut **tx).await?.rows_affected())
}

/// Writes one outcome.
async fn finish_one(tx: &mut Tx<'_>, f: &Finish) -> anyhow::Result<u64> {
    let (next_state, next_at, delivered_at) = match f.outcome {
        Outcome::Delivered => (state::DELIVERED, None, Some(f.finished_at_ms)),
        Outcome::Retry { next_attempt_at_ms } => (state::PENDING, Some(next_attempt_at_ms), None),
        Outcome::Dead => (state::DEAD, None, None),
    };
    let result = sqlx::query(
        "UPDATE notification SET state = ?, attempts = ?, \
         next_attempt_at = COALESCE(?, next_attempt_at), delivered_at = ?, \
         last_error = ?, lease_until = NULL, claim_token = NULL, updated_at = ? \
         WHERE id = ? AND claim_token = ?",
    )
    .bind(next_state)
    .bind(f.number)
    .bind(next_at)
    .bind(delivered_at)
    .bind(f.attempt.error.as_deref())
    .bind(f.finished_at_ms)
    .bind(f.id.as_str())
    .bind(f.claim_token.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected())
}

/// Appends the attempt log rows of `batch` in one multi-row insert.
async fn insert_attempts(tx: &mut Tx<'_>, batch: &[Finish]) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO attempt (notification_id, number, endpoint, plugin_version, status_code, \
         error_class, error, duration_ms, response_excerpt, started_at) VALUES {}",
        vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; batch.len()].join(", ")
    );
    let mut insert = batch_query(&sql);
    for f in batch {
        let a = &f.attempt;
        insert = insert
            .bind(f.id.as_str())
            .bind(f.number)
            .bind(a.endpoint.as_deref())
            .bind(a.plugin_version.as_deref())
            .bind(a.status_code)
            .bind(a.error_class.as_deref())
            .bind(a.error.as_deref())
            .bind(a.duration_ms)
            .bind(a.response_excerpt.as_deref())
            .bind(a.started_at_ms);
    }
    insert.execute(&mut **tx).await?;
    Ok(())
}

/// Parameters of one claim.
struct ClaimSpec<'a> {
    now_ms: i64,
    limit: usize,
    lease_ms: i64,
    token: &'a str,
    exclude: &'a [String],
}

impl ClaimSpec<'_> {
    /// `AND partner_id NOT IN (?, …)` when partners are excluded (an [`in_list`]).
    fn exclusion(&self) -> String {
        if self.exclude.is_empty() {
            String::new()
        } else {
            format!("AND partner_id NOT IN ({})", in_list(self.exclude.len()))
        }
    }

    /// Binds the partners of [`ClaimSpec::exclusion`].
    fn bind_exclusion<'q>(&'q self, query: AnyQuery<'q>) -> AnyQuery<'q> {
        let partners: Vec<&str> = self.exclude.iter().map(String::as_str).collect();
        bind_in(query, &partners)
    }
}

fn claimed_from_row(row: &AnyRow, token: &str) -> anyhow::Result<Claimed> {
    let endpoints = text(row, "endpoints")?;
    let headers = text(row, "headers")?;
    Ok(Claimed {
        id: row.try_get("id")?,
        request_id: row.try_get("request_id")?,
        partner_id: row.try_get("partner_id")?,
        endpoints: serde_json::from_str(&endpoints)?,
        headers: serde_json::from_str(&headers)?,
        body: row.try_get("body")?,
        attempts: row.try_get("attempts")?,
        retry_base: row.try_get("retry_base")?,
        created_at_ms: row.try_get("created_at")?,
        claim_token: token.to_string(),
    })
}
