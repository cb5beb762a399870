//! The two shapes of run: throughput (ceiling, then the gateway) and backlog (pile up pending
//! rows with the receiver down, then drain them), each ending in the exactly-once check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use super::gateway::{Backend, Gateway};
use super::load::{self, LoadSpec, Target};
use super::report::{self, Measured, Memory, RowLabels};
use super::sink::{Behaviour, Sink};

/// Header of the table [`backlog`] writes a row of.
pub(super) const BACKLOG_HEADER: &str = "| scenario | mode | pending | RSS before MiB \
     | RSS with backlog MiB | RSS peak while draining MiB | drain time s | drain /s | load avg |\n\
     |---|---|---|---|---|---|---|---|---|";

/// Ceiling, then the same load through a gateway; returns the result row.
pub(super) async fn throughput(args: &BenchArgs) -> anyhow::Result<String> {
    let sink = Sink::start(args.endpoints, Behaviour::Fast, slow(args)).await?;
    let spec = spec(args, &sink);
    let ceiling = match args.no_ceiling || !delivers(args.receiver) {
        true => None,
        false => Some(ceiling(&sink, &spec).await?),
    };
    sink.set(args.receiver);
    report::reset_peak_memory();
    let gateway = Gateway::start(&args.backend(), &args.tuning(), &spec.run_id).await?;
    let measured = through_gateway(&sink, &spec, &gateway, args).await;
    let memory = report::memory();
    let stopped = gateway.stop().await;
    let measured = measured?;
    stopped?;
    eprintln!(
        "{}: accepted {}, ingest {:.0}/s, end to end {:.0}/s, ingest p50/p99 {} ms, end to end \
         p50/p99 {} ms, RSS {:.0} MiB (peak {:.0})",
        args.label,
        measured.accepted,
        measured.send_per_sec,
        measured.end_to_end_per_sec,
        measured.ingest,
        measured.end_to_end,
        memory.rss_mib,
        memory.peak_mib
    );
    Ok(report::row(
        &labels(args),
        ceiling.as_ref(),
        &measured,
        memory,
    ))
}

/// Pending rows with the receiver down, then the drain; returns the result row.
pub(super) async fn backlog(args: &BenchArgs) -> anyhow::Result<String> {
    let sink = Sink::start(args.endpoints, Behaviour::Down, slow(args)).await?;
    let spec = spec(args, &sink);
    let gateway = Gateway::start(&args.backend(), &args.tuning(), &spec.run_id).await?;
    let row = backlog_phases(&sink, &spec, &gateway, args).await;
    let stopped = gateway.stop().await;
    let row = row?;
    stopped?;
    Ok(row)
}

async fn backlog_phases(
    sink: &Sink,
    spec: &LoadSpec,
    gateway: &Gateway,
    args: &BenchArgs,
) -> anyhow::Result<String> {
    let before = report::memory();
    let sampler = PeakSampler::start();
    let mut sent = load::run(spec, Target::Gateway(gateway.addr())).await?;
    let accepted = sent.accepted.len();
    wait_stored(gateway, accepted).await?;
    let with_backlog = report::memory();
    eprintln!(
        "{}: {accepted} pending, RSS {:.0} MiB; receiver up",
        args.label, with_backlog.rss_mib
    );
    sampler.reset();
    let drain_started = Instant::now();
    sink.set(Behaviour::Fast);
    wait_delivered(sink, accepted).await;
    let drain = drain_started.elapsed();
    let peak_mib = sampler.stop();
    report::exactly_once(&mut sent, &sink.take())?;
    Ok(format!(
        "| {} | {} | {accepted} | {:.0} | {:.0} | {peak_mib:.0} | {:.1} | {:.0} | {} |",
        args.label,
        mode(args),
        before.rss_mib,
        with_backlog.rss_mib,
        drain.as_secs_f64(),
        accepted as f64 / drain.as_secs_f64(),
        report::load_average()
    ))
}

/// The load straight to the receiver; leaves the receiver's log empty.
async fn ceiling(sink: &Sink, spec: &LoadSpec) -> anyhow::Result<Measured> {
    let cpu_before = report::cpu_snapshot();
    let mut sent = load::run(spec, Target::Direct).await?;
    let measured = report::exactly_once(&mut sent, &sink.take())?;
    let measured = report::with_cpu(measured, cpu_before);
    eprintln!(
        "ceiling: {:.0}/s, latency p50/p99 {} ms",
        measured.end_to_end_per_sec, measured.ingest
    );
    Ok(measured)
}

async fn through_gateway(
    sink: &Sink,
    spec: &LoadSpec,
    gateway: &Gateway,
    args: &BenchArgs,
) -> anyhow::Result<Measured> {
    let cpu_before = report::cpu_snapshot();
    let mut sent = load::run(spec, Target::Gateway(gateway.addr())).await?;
    if sent.refused > 0 {
        eprintln!(
            "warning: {} requests not accepted; first: {}",
            sent.refused,
            sent.first_refusal.as_deref().unwrap_or("?")
        );
    }
    if !delivers(args.receiver) {
        return Ok(report::with_cpu(report::ingest_only(&mut sent), cpu_before));
    }
    wait_delivered(sink, sent.accepted.len()).await;
    let arrivals = sink.take();
    if args.signer {
        let unsigned = arrivals.iter().filter(|a| !a.signed).count();
        anyhow::ensure!(
            unsigned == 0,
            "{unsigned} of {} deliveries arrived without a webhook-signature",
            arrivals.len()
        );
    }
    let measured = report::exactly_once(&mut sent, &arrivals)?;
    Ok(report::with_cpu(measured, cpu_before))
}

/// Waits until `n` deliveries arrived (bounded by 30 s plus 2 ms per notification), then a
/// little longer so that a repeat would be seen too.
async fn wait_delivered(sink: &Sink, n: usize) {
    let limit = Duration::from_secs(30) + Duration::from_millis(2 * n as u64);
    let deadline = Instant::now() + limit;
    while sink.delivered_count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Waits until the store holds `n` rows (the intake has caught up).
async fn wait_stored(gateway: &Gateway, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let b = gateway.backlog().await?;
        let stored = b.pending + b.in_flight + b.delivered + b.dead;
        if stored >= n as i64 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {stored} of {n} accepted notifications were stored after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spec(args: &BenchArgs, sink: &Sink) -> LoadSpec {
    LoadSpec {
        count: match args.duration_secs {
            Some(_) => u64::MAX,
            None => args.count,
        },
        duration: args.duration(),
        rate_per_sec: args.rate,
        concurrency: args.concurrency,
        partners: args.partners,
        ports: sink.ports().to_vec(),
        body_bytes: args.body_bytes,
        run_id: format!("{}_{}", std::process::id(), crate::model::now_ms()),
    }
}

fn labels(args: &BenchArgs) -> RowLabels<'_> {
    RowLabels {
        scenario: &args.label,
        mode: mode(args),
        partners: args.partners,
        body_bytes: args.body_bytes,
    }
}

fn mode(args: &BenchArgs) -> &'static str {
    match args.backend() {
        Backend::Embedded => "embedded",
        Backend::Kafka { .. } => "kafka+mariadb",
    }
}

fn slow(args: &BenchArgs) -> Duration {
    Duration::from_millis(args.slow_ms)
}

/// Whether the receiver eventually answers 2xx (so the exactly-once check applies).
fn delivers(behaviour: Behaviour) -> bool {
    matches!(
        behaviour,
        Behaviour::Fast | Behaviour::Slow | Behaviour::Failing
    )
}

/// Samples this process's RSS every 100 ms and keeps the largest value since the last reset.
struct PeakSampler {
    peak_kib: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl PeakSampler {
    fn start() -> Self {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (peak, until) = (peak_kib.clone(), stop.clone());
        tokio::spawn(async move {
            while !until.is_cancelled() {
                let Memory { rss_mib, .. } = report::memory();
                peak.fetch_max((rss_mib * 1024.0) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { peak_kib, stop }
    }

    fn reset(&self) {
        self.peak_kib.store(0, Ordering::Relaxed);
    }

    /// Stops sampling; the peak in MiB.
    fn stop(self) -> f64 {
        self.stop.cancel();
        let now = (report::memory().rss_mib * 1024.0) as u64;
        self.peak_kib.load(Ordering::Relaxed).max(now) as f64 / 1024.0
    }
}
