//! Logging set-up: human text by default, JSON lines on request; `RUST_LOG` filters.
//!
//! Logs always go to standard error. With a log directory they also go, in the same format, to
//! `api-notify.log.YYYY-MM-DD` files there, a new file each UTC day (old files are not deleted:
//! rotate them away with the platform's tools). File writes happen on a background thread; keep
//! the returned [`LogGuard`] alive until exit so the last lines are flushed.

use std::path::Path;

use clap::ValueEnum;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// File name prefix of the daily log files.
pub const LOG_FILE_PREFIX: &str = "api-notify.log";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flushes the log file when dropped.
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber; `default_level` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_level: &str, log_dir: Option<&Path>) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{default_level},sqlx=warn,hyper=warn,reqwest=warn"))
    });
    let mut layers: Vec<BoxedLayer> = vec![layer(format, std::io::stderr, true)];
    let mut guard = None;
    if let Some(dir) = log_dir {
        let appender = tracing_appender::rolling::daily(dir, LOG_FILE_PREFIX);
        let (writer, worker) = tracing_appender::non_blocking(appender);
        layers.push(layer(format, writer, false));
        guard = Some(worker);
    }
    let _ = tracing_subscriber::registry()
        .with(layers.with_filter(filter))
        .try_init();
    LogGuard { _worker: guard }
}

fn layer<W>(format: LogFormat, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let base = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => base.boxed(),
        LogFormat::Json => base.json().flatten_event(true).boxed(),
    }
}
