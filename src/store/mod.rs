//! The store: the single source of truth for "has this been delivered".
//!
//! One implementation serves SQLite (embedded mode) and MySQL/MariaDB (production) through sqlx's
//! `Any` driver; the few statements whose syntax differs branch on [`Dialect`]. Every write that
//! runs per notification is batched, because each commit costs an fsync (about 3,000 commits/s on
//! MariaDB's defaults, against 45,000 rows/s in multi-row statements).
//!
//! Times are milliseconds since the Unix epoch, always passed in by the caller, so that the
//! gateway's clock (not each database's) decides what is due.

mod intake;
mod lease;
mod lookup;
mod ops;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};

pub use intake::{AttemptOut, InsertOutcome, NotificationStatus};
pub use lease::{AttemptRecord, Claimed, Finish, Outcome};
pub use ops::{PartnerCounts, ReplayOutcome, ReplayRange};

use crate::config::DatabaseConfig;

/// SQL flavour of the connected database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Mysql,
}

/// Delivery states.
pub mod state {
    pub const PENDING: &str = "pending";
    pub const IN_FLIGHT: &str = "in_flight";
    pub const DELIVERED: &str = "delivered";
    pub const DEAD: &str = "dead";
}

/// Connection pool plus dialect. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    lookups: std::sync::Arc<lookup::Lookups>,
}

/// Rows per state, for readiness, metrics and tests.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Backlog {
    pub pending: i64,
    pub in_flight: i64,
    pub delivered: i64,
    pub dead: i64,
    pub conflicts: i64,
}

impl Store {
    /// Connects with the configured pool size; SQLite files are created when missing.
    pub async fn connect(config: &DatabaseConfig) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let url = config.url.expose();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Mysql
        };
        let url = match dialect {
            Dialect::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url)
            .context("database.url is not a valid connection URL")?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
        let pool = AnyPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    match dialect {
                        Dialect::Sqlite => {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                        }
                        // A queue table under REPEATABLE READ takes gap and next-key locks on
                        // every row a statement scans; READ COMMITTED locks only the rows it
                        // changes, which keeps claims, finishes and the reaper from deadlocking.
                        Dialect::Mysql => {
                            conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                                .await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to {}",
                    crate::config::redact_url(config.url.expose())
                )
            })?;
        Ok(Self {
            pool,
            dialect,
            lookups: Default::default(),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Applies the migrations in `migrations/<dialect>/` that have not run yet.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = match self.dialect {
            Dialect::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Dialect::Mysql => sqlx::migrate!("./migrations/mysql"),
        };
        migrator
            .run(&self.pool)
            .await
            .context("applying database migrations")?;
        Ok(())
    }

    /// A round trip to the database.
    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Counts rows per state.
    pub async fn backlog(&self) -> anyhow::Result<Backlog> {
        use sqlx::Row;
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM notification GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let [pending, in_flight, delivered, dead] = tally_states(&rows)?;
        let mut backlog = Backlog {
            pending,
            in_flight,
            delivered,
            dead,
            ..Backlog::default()
        };
        let row = sqlx::query("SELECT COUNT(*) AS n FROM conflict")
            .fetch_one(&self.pool)
            .await?;
        backlog.conflicts = row.try_get("n")?;
        Ok(backlog)
    }

    /// Closes the pool, waiting for connections to return.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// True for errors worth an immediate retry: a MySQL deadlock victim (SQLSTATE 40001) or a busy
/// SQLite database.
pub fn is_transient(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|db| db.code())
            .is_some_and(|code| matches!(code.as_ref(), "40001" | "5" | "517"))
    })
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// A multi-row statement whose text varies with its batch (one row of `?` per notification):
/// prepared for this execution only. Kept in the connection's statement cache, hundreds of
/// such statements, each with metadata for up to thousands of parameters, grew the process by
/// hundreds of MiB under sustained load (docs/benchmarks.md).
fn batch_query(sql: &str) -> AnyQuery<'_> {
    sqlx::query(sql).persistent(false)
}

/// How many places an `IN (…)` list of `n` values is written with: the next power of two, so
/// a handful of statement texts serve every batch size and stay prepared in the statement
/// cache. The extra places repeat the last value, which changes nothing in an `IN` list.
fn in_list_len(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// `?, ?, …` for an `IN` list of `n` values (see [`in_list_len`]); bind it with [`bind_in`].
fn in_list(n: usize) -> String {
    placeholders(in_list_len(n))
}

/// Binds the values of an `IN` list written with [`in_list`], then the last one again for each
/// extra place.
fn bind_in<'q>(mut query: AnyQuery<'q>, values: &[&'q str]) -> AnyQuery<'q> {
    for value in values {
        query = query.bind(*value);
    }
    if let Some(last) = values.last() {
        for _ in values.len()..in_list_len(values.len()) {
            query = query.bind(*last);
        }
    }
    query
}

/// `?, ?, …` with `n` placeholders.
fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 3);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s
}

/// Pending, in-flight, delivered and dead counts from `SELECT state, COUNT(*) AS n … GROUP BY
/// state` rows.
fn tally_states(rows: &[sqlx::any::AnyRow]) -> Result<[i64; 4], sqlx::Error> {
    use sqlx::Row;
    let mut counts = [0; 4];
    for row in rows {
        let n: i64 = row.try_get("n")?;
        match row.try_get::<String, _>("state")?.as_str() {
            state::PENDING => counts[0] = n,
            state::IN_FLIGHT => counts[1] = n,
            state::DELIVERED => counts[2] = n,
            state::DEAD => counts[3] = n,
            _ => {}
        }
    }
    Ok(counts)
}

/// A text column. MySQL reports `TEXT` as a blob type through the `Any` driver, so bytes are
/// accepted too (they are UTF-8: the gateway wrote them).
fn text(row: &sqlx::any::AnyRow, column: &str) -> Result<String, sqlx::Error> {
    Ok(opt_text(row, column)?.unwrap_or_default())
}

fn opt_text(row: &sqlx::any::AnyRow, column: &str) -> Result<Option<String>, sqlx::Error> {
    use sqlx::Row;
    match row.try_get::<Option<String>, _>(column) {
        Ok(v) => Ok(v),
        Err(_) => {
            let bytes: Option<Vec<u8>> = row.try_get(column)?;
            bytes
                .map(|b| String::from_utf8(b).map_err(|e| sqlx::Error::Decode(Box::new(e))))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{in_list, in_list_len};

    #[test]
    fn in_lists_are_written_in_a_few_lengths() {
        let lengths: Vec<usize> = [0, 1, 2, 3, 5, 200, 500, 1000].map(in_list_len).to_vec();
        assert_eq!(lengths, [1, 1, 2, 4, 8, 256, 512, 1024]);
        assert_eq!(in_list(3), "?, ?, ?, ?", "three values take four places");
    }
}
