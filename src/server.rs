//! Starts the configured roles in one process and stops them together.
//!
//! `main` and the tests both call [`run`] with an already-bound listener and a cancellation
//! token: the tests bind port 0 and cancel when done, `main` binds the configured address and
//! cancels on SIGINT/SIGTERM.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{AppState, router};
use crate::config::Config;
use crate::dispatch::{Delivery, Dispatcher, Partners};
use crate::guard::AddressGuard;
use crate::metrics::{self, Metrics};
use crate::model::Limits;
use crate::plugin::Plugins;
use crate::queue::{
    EmbeddedQueue, KafkaIntake, KafkaQueue, Queue, run_embedded_intake, run_kafka_intake,
};
use crate::store::Store;

/// Which parts of the gateway this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub intake: bool,
    pub dispatch: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        intake: true,
        dispatch: true,
    };
}

impl FromStr for Roles {
    type Err = String;

    /// `api,intake,dispatch` in any order and subset.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut roles = Roles {
            api: false,
            intake: false,
            dispatch: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "api" => roles.api = true,
                "intake" => roles.intake = true,
                "dispatch" => roles.dispatch = true,
                other => return Err(format!("unknown role {other:?}; use api, intake, dispatch")),
            }
        }
        if roles
            == (Roles {
                api: false,
                intake: false,
                dispatch: false,
            })
        {
            return Err("give at least one role: api, intake, dispatch".into());
        }
        Ok(roles)
    }
}

/// Runs `roles` until `shutdown` is cancelled or a role fails. `listener` is used by the API
/// role (bound to `api.listen` when `None`).
pub async fn run(
    config: Config,
    roles: Roles,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = Store::connect(&config.database).await?;
    if config.database.migrate_on_start {
        migrate_with_retry(&store).await?;
    }
    let wake = Arc::new(Notify::new());
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    let queue_timeout = Duration::from_millis(config.api.queue_timeout_ms);
    let metrics = Arc::new(Metrics::new());
    let refresh = Duration::from_millis(config.metrics.refresh_interval_ms);

    let queue = match &config.kafka {
        Some(kafka) => {
            if roles.intake {
                let intake = KafkaIntake {
                    config: kafka.clone(),
                    store: store.clone(),
                    wake: wake.clone(),
                    metrics: metrics.clone(),
                    statistics_interval: refresh,
                };
                let run = run_kafka_intake(intake, shutdown.clone());
                tasks.spawn(async move { ("intake", run.await) });
            }
            Queue::Kafka(KafkaQueue::new(kafka, queue_timeout, metrics.clone())?)
        }
        None => {
            let (queue, intake) = EmbeddedQueue::new(4096);
            if roles.api {
                let run =
                    run_embedded_intake(intake, store.clone(), wake.clone(), 500, metrics.clone());
                tasks.spawn(async move {
                    run.await;
                    ("intake", Ok(()))
                });
            }
            Queue::Embedded(queue)
        }
    };

    if roles.dispatch {
        let plugins = load_plugins(&config).await?;
        plugins.watch(shutdown.clone());
        tokio::spawn(report_plugin_loads(
            plugins.clone(),
            metrics.clone(),
            refresh,
            shutdown.clone(),
        ));
        let dispatcher = Dispatcher {
            store: store.clone(),
            delivery: Delivery::new(&config.outbound)?.with_plugins(plugins, metrics.clone()),
            config: config.dispatch.clone(),
            retry: config.retry.clone(),
            retention: config.retention.clone(),
            partners: Arc::new(Partners::new(config.clone())),
            wake: wake.clone(),
            metrics: metrics.clone(),
            max_wait_ms: config.claim_wait_limit_ms(),
        };
        let run = dispatcher.run(shutdown.clone());
        tasks.spawn(async move { ("dispatch", run.await) });
    }

    if !roles.api {
        drop(listener); // never leave a socket accepting connections nobody serves
    } else {
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.api.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.api.listen))?,
        };
        let state = Arc::new(AppState {
            queue: queue.clone(),
            store: store.clone(),
            limits: Limits::default(),
            guard: AddressGuard::new(config.outbound.allow_cidrs.clone()),
            max_request_bytes: config.api.max_request_bytes,
            metrics: metrics.clone(),
            config: config.clone(),
            tokens: crate::api::auth::Tokens::new(&config.api.tokens),
        });
        let refresher =
            metrics::run_backlog_refresh(metrics.clone(), store.clone(), refresh, shutdown.clone());
        tasks.spawn(async move {
            refresher.await;
            ("metrics", Ok(()))
        });
        if state.tokens.is_open() {
            warn!("authentication is off (no api.tokens): the API accepts anyone on loopback");
        }
        info!(address = %listener.local_addr()?, mode = mode(&config), "API listening");
        let app = router(state);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            ("api", served.map_err(anyhow::Error::from))
        });
    }
    // Only the API holds the embedded queue's sender: when the API stops, the intake drains
    // what was submitted and stops too.
    let producer = match queue {
        Queue::Kafka(kafka) => Some(kafka),
        embedded @ Queue::Embedded(_) => {
            drop(embedded);
            None
        }
    };

    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let (role, outcome) = joined.context("a gateway task panicked")?;
        if let Err(e) = outcome {
            error!(role, error = %e, "role failed; shutting down");
            shutdown.cancel();
            result = Err(e.context(format!("{role} failed")));
        }
        if let (Some(kafka), "api") = (&producer, role) {
            kafka.flush(queue_timeout);
        }
    }
    store.close().await;
    result
}

fn mode(config: &Config) -> &'static str {
    if config.kafka.is_some() {
        "kafka"
    } else {
        "embedded"
    }
}

/// Compiles the plugins found in `plugins.dir` off the async executor.
async fn load_plugins(config: &Config) -> anyhow::Result<Plugins> {
    let plugins_config = config.plugins.clone();
    let plugins = tokio::task::spawn_blocking(move || Plugins::load(&plugins_config))
        .await
        .context("plugin loading panicked")??;
    let stats = plugins.stats();
    info!(dir = %config.plugins.dir.display(), loaded = stats.loaded_total,
        compiled = stats.compiled_components, "plugins loaded");
    Ok(plugins)
}

/// Applies migrations; several processes starting at once may race on the migration table, so
/// a failure is retried a few times (the loser then finds the work done).
async fn migrate_with_retry(store: &Store) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                warn!(error = %format!("{e:#}"), attempt, "migration failed; retrying");
                tokio::time::sleep(Duration::from_millis(300 * attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Copies the plugin registry's load and rejection counts into the metrics.
async fn report_plugin_loads(
    plugins: Plugins,
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let stats = plugins.stats();
        metrics.set_plugin_loads(stats.loaded_total, stats.rejected_total);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => {}
        }
    }
}
