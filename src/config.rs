//! Gateway configuration: one typed tree, loaded from defaults, then an optional TOML file, then
//! `API_NOTIFY__SECTION__KEY` environment variables (later sources win).
//!
//! Unknown keys are errors that name the key. Secrets (the database password) live in
//! [`Secret`] so that `Debug` and `Display` never print them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod validate;

/// Prefix of every environment variable the gateway reads.
pub const ENV_PREFIX: &str = "API_NOTIFY__";

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub api: ApiConfig,
    pub database: DatabaseConfig,
    /// Absent: embedded in-process intake. Present: produce to and consume from Kafka.
    pub kafka: Option<KafkaConfig>,
    pub outbound: OutboundConfig,
    pub retry: RetryConfig,
    pub dispatch: DispatchConfig,
    pub metrics: MetricsConfig,
    /// Settings every partner gets unless `[partners.<id>]` overrides them.
    pub partner_defaults: PartnerSettings,
    /// Per-partner overrides; keys are partner ids.
    pub partners: BTreeMap<String, PartnerOverride>,
    pub retention: RetentionConfig,
    /// Per-partner WebAssembly plugins and the keys the host holds for them.
    pub plugins: crate::plugin::PluginsConfig,
}

/// Delivery policy for one partner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PartnerSettings {
    /// Deliveries in flight at once for this partner, per dispatcher process.
    pub max_in_flight: usize,
    /// Requests per second; 0 means no limit.
    pub rate_limit_per_sec: u32,
    /// Total deadline of one POST; 0 means `outbound.request_timeout_ms`.
    pub request_timeout_ms: u64,
    /// Retry schedule; empty means `retry.schedule_secs`.
    pub retry_schedule_secs: Vec<u64>,
    /// One delivery at a time, in order of acceptance; a failing head blocks the partner.
    pub fifo: bool,
    /// Consecutive failed attempts (transport errors, 5xx, 429, 408) that open the breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker waits before one probe attempt.
    pub breaker_cooldown_ms: u64,
}

/// `[partners.<id>]`: any subset of [`PartnerSettings`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartnerOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_sec: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_schedule_secs: Option<Vec<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fifo: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker_failure_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker_cooldown_ms: Option<u64>,
}

/// How long finished notifications and their attempts are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delivered and dead notifications older than this are purged; 0 keeps them forever.
    pub max_age_secs: u64,
    /// Rows deleted per statement, so a purge never holds long locks.
    pub purge_batch: usize,
    pub purge_interval_secs: u64,
}

/// The ingest HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body (the whole JSON document).
    pub max_request_bytes: usize,
    /// How long ingest waits for the queue to acknowledge before answering 503.
    pub queue_timeout_ms: u64,
    /// Bearer tokens; none means the API is open, which is allowed only on loopback.
    pub tokens: Vec<TokenConfig>,
}

/// One API token, as `[[api.tokens]]`. Only the token's hash is configured
/// (`api-notify token new` prints both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it, for logs.
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Partner ids the token may use; `["*"]` for all.
    #[serde(default)]
    pub partners: Vec<String>,
    /// May call operator routes (replay, partner state).
    #[serde(default)]
    pub admin: bool,
}

/// The store.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://FILE` (embedded) or `mysql://user:pass@host:port/db`.
    pub url: Secret,
    pub max_connections: u32,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
}

/// Kafka producer and intake consumer group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    /// Producer linger: a few milliseconds batches concurrent ingests into one produce request.
    pub linger_ms: u64,
    /// Most records the intake inserts in one database transaction.
    pub intake_batch_max: usize,
}

/// Outbound HTTP to partners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Loopback, private, CGNAT and unique-local targets are refused unless listed here.
    pub allow_cidrs: Vec<IpNet>,
    pub connect_timeout_ms: u64,
    /// Total deadline of one POST: connect, write, and response headers.
    pub request_timeout_ms: u64,
    /// Idle pooled connections are dropped after this long (shorter than common receiver
    /// keep-alive timeouts, so a reused connection is rarely closed under us).
    pub pool_idle_timeout_ms: u64,
    /// Bytes of the response body kept in the attempt log.
    pub response_excerpt_bytes: usize,
}

/// Retry schedule: delay before attempt 2, 3, …; after the last entry the notification is dead.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub schedule_secs: Vec<u64>,
    pub jitter_percent: u8,
    /// Upper bound for a receiver's `Retry-After`.
    pub max_retry_after_secs: u64,
}

/// The dispatcher's claim loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Deliveries in flight at once in this process.
    pub max_in_flight: usize,
    /// Most rows claimed per database round trip.
    pub claim_batch: usize,
    /// How long a claim is held; must exceed the request timeout times the endpoint count.
    pub lease_secs: u64,
    /// Idle poll interval when nothing is due.
    pub poll_interval_ms: u64,
    /// How often expired leases are returned to `pending`.
    pub reap_interval_ms: u64,
    /// On shutdown, how long in-flight deliveries may take before their claims are released.
    pub drain_timeout_ms: u64,
}

/// Prometheus metrics served at `GET /metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// How often the backlog gauges are recounted from the database and librdkafka reports
    /// consumer lag.
    pub refresh_interval_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_request_bytes: 1024 * 1024,
            queue_timeout_ms: 5_000,
            tokens: Vec::new(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("sqlite://api-notify.db"),
            max_connections: 16,
            migrate_on_start: true,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(self.url.expose()))
            .field("max_connections", &self.max_connections)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "api-notify.notifications".into(),
            group: "api-notify".into(),
            linger_ms: 5,
            intake_batch_max: 500,
        }
    }
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            allow_cidrs: Vec::new(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
            pool_idle_timeout_ms: 4_000,
            response_excerpt_bytes: 1_024,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            schedule_secs: vec![5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200],
            jitter_percent: 20,
            max_retry_after_secs: 6 * 3600,
        }
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            claim_batch: 200,
            lease_secs: 120,
            poll_interval_ms: 200,
            reap_interval_ms: 5_000,
            drain_timeout_ms: 10_000,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            refresh_interval_ms: 15_000,
        }
    }
}

impl Default for PartnerSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            rate_limit_per_sec: 0,
            request_timeout_ms: 0,
            retry_schedule_secs: Vec::new(),
            fifo: false,
            breaker_failure_threshold: 10,
            breaker_cooldown_ms: 30_000,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_age_secs: 7 * 24 * 3600,
            purge_batch: 500,
            purge_interval_secs: 60,
        }
    }
}

/// Upper bound of [`Config::claim_wait_limit_ms`].
const CLAIM_WAIT_LIMIT_MAX_MS: u64 = 1_000;

impl Config {
    /// How long a row claimed beyond its partner's room may wait in the dispatcher for a slot:
    /// half the lease left after the slowest POST to one endpoint (connect timeout plus the
    /// longest request timeout of any partner), at most one second. A row that starts within
    /// this still has a lease longer than a POST to its first endpoint. (An attempt that fails
    /// over through several slow endpoints can outlast the lease with or without this wait: the
    /// `dispatch.lease_secs` rule covers one endpoint.)
    pub fn claim_wait_limit_ms(&self) -> i64 {
        let slowest_request = std::iter::once(self.outbound.request_timeout_ms)
            .chain(std::iter::once(self.partner_defaults.request_timeout_ms))
            .chain(
                self.partners
                    .keys()
                    .map(|id| self.partner(id).request_timeout_ms),
            )
            .max()
            .unwrap_or(0);
        let attempt_ms = self.outbound.connect_timeout_ms + slowest_request;
        let spare_ms = self
            .dispatch
            .lease_secs
            .saturating_mul(1000)
            .saturating_sub(attempt_ms);
        i64::try_from((spare_ms / 2).min(CLAIM_WAIT_LIMIT_MAX_MS)).unwrap_or(0)
    }

    /// The effective settings of `partner_id`: defaults with its overrides applied.
    pub fn partner(&self, partner_id: &str) -> PartnerSettings {
        let mut s = self.partner_defaults.clone();
        let Some(o) = self.partners.get(partner_id) else {
            return s;
        };
        s.max_in_flight = o.max_in_flight.unwrap_or(s.max_in_flight);
        s.rate_limit_per_sec = o.rate_limit_per_sec.unwrap_or(s.rate_limit_per_sec);
        s.request_timeout_ms = o.request_timeout_ms.unwrap_or(s.request_timeout_ms);
        s.retry_schedule_secs = o
            .retry_schedule_secs
            .clone()
            .unwrap_or(s.retry_schedule_secs);
        s.fifo = o.fifo.unwrap_or(s.fifo);
        s.breaker_failure_threshold = o
            .breaker_failure_threshold
            .unwrap_or(s.breaker_failure_threshold);
        s.breaker_cooldown_ms = o.breaker_cooldown_ms.unwrap_or(s.breaker_cooldown_ms);
        s
    }

    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                anyhow::bail!("configuration file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        let config: Config = figment
            .extract()
            .map_err(|e| anyhow::anyhow!(describe(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Rules serde cannot express; every problem is reported, each naming its key and rule.
    pub fn validate(&self) -> anyhow::Result<()> {
        let problems = validate::problems(self);
        if problems.is_empty() {
            return Ok(());
        }
        anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "))
    }

    /// A copy safe to print: the database password replaced by `***`.
    pub fn redacted(&self) -> Config {
        let mut copy = self.clone();
        copy.database.url = Secret::new(redact_url(self.database.url.expose()));
        copy
    }

    /// True when the store is MySQL/MariaDB.
    pub fn is_mysql(&self) -> bool {
        !self.database.url.expose().starts_with("sqlite:")
    }
}

/// Turns figment's error into one line per problem that names the key and the source.
fn describe(error: figment::Error) -> String {
    let lines: Vec<String> = error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e
                .metadata
                .as_ref()
                .map(|m| m.name.to_string())
                .unwrap_or_default();
            let kind = e.kind.to_string();
            if key.is_empty() {
                format!("configuration: {kind} ({source})")
            } else {
                format!("configuration key `{key}`: {kind} ({source})")
            }
        })
        .collect();
    lines.join("\n")
}

/// A string that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A connection URL with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_wait_leaves_the_slowest_attempt_inside_the_lease() {
        let mut config = Config::default();
        assert_eq!(
            config.claim_wait_limit_ms(),
            1_000,
            "a 120 s lease against a 35 s attempt leaves plenty: the one-second cap applies"
        );
        config.dispatch.lease_secs = 4;
        config.outbound.connect_timeout_ms = 1_000;
        config.outbound.request_timeout_ms = 2_000;
        assert_eq!(
            config.claim_wait_limit_ms(),
            500,
            "half of the 1 s a 4 s lease has beyond a 3 s attempt"
        );
        config.partners.insert(
            "slow".into(),
            PartnerOverride {
                request_timeout_ms: Some(2_900),
                ..Default::default()
            },
        );
        assert_eq!(
            config.claim_wait_limit_ms(),
            50,
            "the slowest partner's timeout counts"
        );
    }

    #[test]
    fn redacted_url_hides_only_the_password() {
        assert_eq!(
            redact_url("mysql://u:hunter2@127.0.0.1:3306/db"),
            "mysql://u:***@127.0.0.1:3306/db"
        );
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }

    #[test]
    fn debug_of_config_never_shows_the_database_password() {
        let mut config = Config::default();
        config.database.url = Secret::new("mysql://u:hunter2@127.0.0.1/db");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2"),
            "password leaked in Debug: {shown}"
        );
    }

    #[test]
    fn defaults_are_valid() {
        Config::default()
            .validate()
            .expect("the default configuration should validate");
    }
}
