//! Turning raw timings into the figures `docs/benchmarks.md` shows, and checking that every
//! accepted notification arrived exactly once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::load::{LoadResult, Sent};
use super::sink::Arrival;

/// Median and 99th percentile, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Spread {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One measured run: either the ceiling or the gateway.
#[derive(Debug, Clone, Default)]
pub(super) struct Measured {
    pub(super) accepted: usize,
    /// Accepted per second while sending.
    pub(super) send_per_sec: f64,
    /// Delivered per second, from the first request sent to the last delivery received.
    pub(super) end_to_end_per_sec: f64,
    pub(super) ingest: Spread,
    pub(super) end_to_end: Spread,
    /// CPU time of the whole process (client, receiver, gateway) per accepted notification.
    pub(super) cpu_us_per_notification: f64,
    /// CPU time of MariaDB and of the broker per accepted notification.
    pub(super) database_cpu_us: f64,
    pub(super) broker_cpu_us: f64,
}

/// Process memory from `/proc/self/status`, in MiB.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Memory {
    pub(super) rss_mib: f64,
    pub(super) peak_mib: f64,
}

impl Spread {
    /// Percentiles of `samples_us` (sorted in place); zeros when empty.
    pub(super) fn of(samples_us: &mut [u32]) -> Self {
        if samples_us.is_empty() {
            return Self::default();
        }
        samples_us.sort_unstable();
        let at = |q: f64| {
            let rank = ((samples_us.len() as f64 * q).ceil() as usize).clamp(1, samples_us.len());
            f64::from(samples_us[rank - 1]) / 1000.0
        };
        Self {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} / {:.2}", self.p50_ms, self.p99_ms)
    }
}

/// Matches deliveries to acceptances. Fails, naming counts and an example, when a notification
/// is missing, arrived twice, or an unknown id arrived.
pub(super) fn exactly_once(
    load: &mut LoadResult,
    arrivals: &[Arrival],
) -> anyhow::Result<Measured> {
    let mut sent: HashMap<u128, (Instant, bool)> = load
        .accepted
        .iter()
        .map(|s: &Sent| (s.id, (s.at, false)))
        .collect();
    let (mut twice, mut unknown) = (Vec::new(), Vec::new());
    let mut latency_us = Vec::with_capacity(arrivals.len());
    for a in arrivals {
        match sent.get_mut(&a.id) {
            Some((_, true)) => twice.push(a.id),
            Some((at, seen)) => {
                *seen = true;
                let micros = a.at.saturating_duration_since(*at).as_micros();
                latency_us.push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
            None => unknown.push(a.id),
        }
    }
    let missing: Vec<u128> = sent.iter().filter(|(_, v)| !v.1).map(|(k, _)| *k).collect();
    anyhow::ensure!(
        twice.is_empty() && unknown.is_empty() && missing.is_empty(),
        "delivery was not exactly once: {} accepted, {} missing (e.g. {:x?}), {} delivered twice \
         (e.g. {:x?}), {} unknown ids (e.g. {:x?})",
        load.accepted.len(),
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first(),
        unknown.len(),
        unknown.first()
    );
    Ok(measure(load, arrivals, latency_us))
}

/// Figures for a receiver that never answers 2xx: ingest only.
pub(super) fn ingest_only(load: &mut LoadResult) -> Measured {
    measure(load, &[], Vec::new())
}

fn measure(load: &mut LoadResult, arrivals: &[Arrival], mut e2e_us: Vec<u32>) -> Measured {
    let per_sec = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let last = arrivals.iter().map(|a| a.at).max();
    let span = match (load.started, last) {
        (Some(start), Some(last)) => last.saturating_duration_since(start),
        _ => load.elapsed,
    };
    Measured {
        accepted: load.accepted.len(),
        send_per_sec: per_sec(load.accepted.len(), load.elapsed),
        end_to_end_per_sec: per_sec(arrivals.len(), span),
        ingest: Spread::of(&mut load.latency_us),
        end_to_end: Spread::of(&mut e2e_us),
        cpu_us_per_notification: 0.0,
        database_cpu_us: 0.0,
        broker_cpu_us: 0.0,
    }
}

/// Starts a new peak for [`memory`]: the kernel's `VmHWM` is reset by writing 5 to
/// `/proc/self/clear_refs`, so the gateway phase's peak does not include the ceiling phase's
/// bookkeeping (a 60 s ceiling run records 2.4 million requests). Best effort.
pub(super) fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Current and peak resident memory of this process.
pub(super) fn memory() -> Memory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    Memory {
        rss_mib: field("VmRSS:"),
        peak_mib: field("VmHWM:"),
    }
}

/// CPU time (user + system) used so far by this process and by the database and broker
/// processes on the machine (every process named `mariadbd`, resp. `tansu`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CpuSnapshot {
    own: Duration,
    database: Duration,
    broker: Duration,
}

pub(super) fn cpu_snapshot() -> CpuSnapshot {
    let mut snapshot = CpuSnapshot {
        own: cpu_time_of("self"),
        ..CpuSnapshot::default()
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return snapshot;
    };
    for entry in entries.filter_map(Result::ok) {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        match comm.trim() {
            "mariadbd" | "mysqld" => snapshot.database += cpu_time_of(&pid),
            "tansu" => snapshot.broker += cpu_time_of(&pid),
            _ => {}
        }
    }
    snapshot
}

/// CPU time of `/proc/<pid>`. `/proc/<pid>/stat` counts in clock ticks, 100 per second on
/// Linux x86-64.
fn cpu_time_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Fills in the CPU cost per notification from the CPU time used since `before`.
pub(super) fn with_cpu(mut measured: Measured, before: CpuSnapshot) -> Measured {
    let now = cpu_snapshot();
    let per = |now: Duration, before: Duration| {
        now.saturating_sub(before).as_secs_f64() * 1e6 / (measured.accepted.max(1) as f64)
    };
    measured.cpu_us_per_notification = per(now.own, before.own);
    measured.database_cpu_us = per(now.database, before.database);
    measured.broker_cpu_us = per(now.broker, before.broker);
    measured
}

/// The one-minute load average: how busy the machine was while a figure was taken.
pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Header of the table [`row`] writes.
pub(super) const TABLE_HEADER: &str = "| scenario | mode | partners | body | accepted | ceiling /s \
     | ingest /s | end-to-end /s | ratio to ceiling | ingest p50 / p99 ms | end-to-end p50 / p99 ms \
     | RSS now / peak MiB | CPU µs per notification (ceiling / gateway / MariaDB / broker) \
     | load avg |\n\
     |---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

/// What a table row says besides the measurements.
pub(super) struct RowLabels<'a> {
    pub(super) scenario: &'a str,
    pub(super) mode: &'a str,
    pub(super) partners: usize,
    pub(super) body_bytes: usize,
}

/// One markdown table row.
pub(super) fn row(
    labels: &RowLabels<'_>,
    ceiling: Option<&Measured>,
    gateway: &Measured,
    memory: Memory,
) -> String {
    let mut out = String::new();
    let ceiling_rate = ceiling.map(|c| c.end_to_end_per_sec);
    let _ = write!(
        out,
        "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {:.0} / {:.0} | {} / {:.0} / {:.0} / \
         {:.0} | {} |",
        labels.scenario,
        labels.mode,
        labels.partners,
        bytes(labels.body_bytes),
        gateway.accepted,
        ceiling_rate.map_or("–".into(), |r| format!("{r:.0}")),
        gateway.send_per_sec,
        gateway.end_to_end_per_sec,
        ceiling_rate.map_or("–".into(), |r| format!(
            "{:.2}",
            gateway.end_to_end_per_sec / r
        )),
        gateway.ingest,
        gateway.end_to_end,
        memory.rss_mib,
        memory.peak_mib,
        ceiling.map_or("–".into(), |c| format!(
            "{:.0}",
            c.cpu_us_per_notification
        )),
        gateway.cpu_us_per_notification,
        gateway.database_cpu_us,
        gateway.broker_cpu_us,
        load_average(),
    );
    out
}

fn bytes(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        let spread = Spread::of(&mut samples);
        assert_eq!(spread.p50_ms, 50.0, "median of 1..=100 ms is 50 ms");
        assert_eq!(spread.p99_ms, 99.0, "p99 of 1..=100 ms is 99 ms");
    }

    #[test]
    fn a_duplicate_delivery_fails_the_check() {
        let at = Instant::now();
        let mut load = LoadResult {
            accepted: vec![Sent { id: 7, at }],
            ..LoadResult::default()
        };
        let once = Arrival {
            id: 7,
            at,
            signed: false,
        };
        let twice = [once, once];
        assert!(
            exactly_once(&mut load, &twice).is_err(),
            "a repeat must fail"
        );
        assert!(
            exactly_once(&mut load, &twice[..1]).is_ok(),
            "one arrival passes"
        );
    }
}
