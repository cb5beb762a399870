//! `api-notify bench`: a load tool that measures a gateway it starts in this process.
//!
//! One run starts a receiver on loopback ([`sink`]), first POSTs straight to it (the ceiling: what
//! this machine's loopback and this client allow), then starts a gateway ([`gateway`]) and sends
//! the same load through it. It fails unless the receiver got every accepted notification
//! exactly once. Client, gateway and receiver share the process and its cores, so a figure is
//! always read next to its ceiling. `scripts/bench` runs the scenarios and writes
//! `docs/benchmarks.md`.

mod gateway;
mod load;
mod report;
mod scenario;
mod sink;

use std::time::Duration;

pub use gateway::{Backend, Tuning};
pub use sink::Behaviour;

/// Arguments of `api-notify bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Kafka brokers: run the Kafka + MariaDB mode (needs --mysql). Default: embedded mode.
    #[arg(long, requires = "mysql")]
    pub kafka: Option<String>,
    /// MariaDB server URL without a database (mysql://user:pass@127.0.0.1:3306); the run
    /// creates its own database and drops it at the end.
    #[arg(long, requires = "kafka")]
    pub mysql: Option<String>,
    /// Notifications to send.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Send for this long instead of a count.
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// Target rate in notifications per second; 0 sends as fast as answers come back.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Distinct partner ids, round robin.
    #[arg(long, default_value_t = 1)]
    pub partners: usize,
    /// Distinct receiver endpoints (ports), round robin.
    #[arg(long, default_value_t = 1)]
    pub endpoints: usize,
    /// Size of each delivered body.
    #[arg(long, default_value_t = 1024)]
    pub body_bytes: usize,
    /// How the receiver answers.
    #[arg(long, value_enum, default_value = "fast")]
    pub receiver: Behaviour,
    /// Delay of the slow receiver.
    #[arg(long, default_value_t = 50)]
    pub slow_ms: u64,
    /// Backlog scenario: send --count with the receiver down (breaker opens, rows stay
    /// pending), then bring it up and time the drain, sampling memory throughout.
    #[arg(long)]
    pub backlog: bool,
    /// Skip the direct-to-receiver ceiling run.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Name of the scenario in the result row.
    #[arg(long, default_value = "custom")]
    pub label: String,
    /// Sign every delivery with the Standard Webhooks plugin (`plugins/standard-webhooks`,
    /// one plugin directory per partner, HMAC-SHA256 with a host-held key); the receiver then
    /// checks that every delivery carries a signature.
    #[arg(long)]
    pub signer: bool,
    /// Print the result tables' headers and exit.
    #[arg(long)]
    pub headers: bool,
    /// dispatch.max_in_flight
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// partner_defaults.max_in_flight
    #[arg(long, default_value_t = 64)]
    pub partner_max_in_flight: usize,
    /// dispatch.claim_batch
    #[arg(long, default_value_t = 200)]
    pub claim_batch: usize,
    /// kafka.linger_ms
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// database.max_connections
    #[arg(long, default_value_t = 16)]
    pub db_connections: u32,
}

impl BenchArgs {
    fn backend(&self) -> Backend {
        match (&self.kafka, &self.mysql) {
            (Some(brokers), Some(mysql)) => Backend::Kafka {
                brokers: brokers.clone(),
                mysql: mysql.trim_end_matches('/').to_string(),
            },
            _ => Backend::Embedded,
        }
    }

    fn tuning(&self) -> Tuning {
        Tuning {
            max_in_flight: self.max_in_flight,
            partner_max_in_flight: self.partner_max_in_flight,
            claim_batch: self.claim_batch,
            linger_ms: self.linger_ms,
            db_connections: self.db_connections,
            signed_partners: if self.signer { self.partners.max(1) } else { 0 },
        }
    }

    fn duration(&self) -> Duration {
        self.duration_secs
            .map_or(Duration::from_secs(3600), Duration::from_secs)
    }
}

/// Runs one scenario; prints a summary on stderr and one markdown table row on stdout.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.headers {
        println!("{}\n\n{}", report::TABLE_HEADER, scenario::BACKLOG_HEADER);
        return Ok(());
    }
    let row = if args.backlog {
        scenario::backlog(&args).await?
    } else {
        scenario::throughput(&args).await?
    };
    println!("{row}");
    Ok(())
}
