//! Per-partner WebAssembly plugins: a partner's component reshapes or signs each outbound
//! request just before it is sent.
//!
//! The dispatcher calls [`Plugins::transform`] right before each POST (per attempt and endpoint,
//! since the URL is part of the request) and sends exactly what comes back; `None` means the
//! partner has no plugin and the request goes out as it is. A plugin failure of any kind is a
//! [`PluginError`] — an attempt failure of class `plugin`, retried like any other — and never
//! takes the gateway down. The interface is `wit/plugin.wit`; the operator guide is
//! `docs/plugins.md`. Where things live: limits and `plugin.toml` in `config`, keys in `keys`,
//! the engine and one call in `runtime`, host functions in `host`, output checks in
//! `validate`, the directory and hot reload in `registry`, the CLI check in `check`.

mod check;
mod config;
mod host;
mod keys;
mod registry;
mod runtime;
mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use check::plugin_check;
pub use config::{KeyConfig, LimitOverrides, Limits, PluginManifest, PluginsConfig, Secret};
pub use keys::{KeyRing, MIN_HMAC_KEY_BYTES};
pub use registry::PluginStats;
pub use runtime::Clock;

use registry::{Loaded, Registry};

/// What the dispatcher hands to a plugin and gets back: `outbound-request` of
/// `wit/plugin.wit`, used as is so a call copies the request only into and out of the guest.
pub use host::bindings::OutboundRequest;

/// A request after its partner's plugin ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transformed {
    /// The request to send.
    pub request: OutboundRequest,
    /// The plugin version that made it: the first 16 hex digits of the SHA-256 of `plugin.wasm`.
    pub version: String,
}

/// Why a plugin call failed. Every variant is an attempt failure of class `plugin`; the
/// `Display` text is safe to store in the attempt log (it never holds key bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The guest trapped (a panic, `unreachable`, an out-of-bounds access, ...).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The guest ran past its CPU budget and was interrupted.
    #[error("plugin ran past its time limit of {limit_ms} ms")]
    Timeout {
        /// The limit that applied.
        limit_ms: u64,
    },
    /// The guest asked for more memory than its cap.
    #[error("plugin ran past its memory limit of {limit_bytes} bytes")]
    MemoryLimit {
        /// The limit that applied.
        limit_bytes: u64,
    },
    /// The guest returned an error of its own.
    #[error("plugin returned an error: {0}")]
    Guest(String),
    /// The guest returned a request the gateway will not send.
    #[error("plugin output rejected: {0}")]
    InvalidOutput(String),
    /// The plugin could not be run at all (the gateway is shutting down, a worker failed).
    #[error("plugin could not run: {0}")]
    Unavailable(String),
}

impl PluginError {
    /// The attempt failure class every plugin error belongs to.
    pub const CLASS: &'static str = "plugin";
}

/// The loaded plugins of every partner. Cheap to clone; clones share one registry.
#[derive(Clone)]
pub struct Plugins {
    registry: Arc<Registry>,
    /// Calls running in place on async worker threads now (see [`Plugins::run`]).
    inline_busy: Arc<AtomicUsize>,
}

impl Plugins {
    /// Loads every `<dir>/<partner_id>/plugin.wasm` present. A bad plugin is logged and skipped;
    /// a bad `[plugins]` config (such as an invalid key) is an error. Compiles on the calling
    /// thread (about 0.1 s per plugin): from async code, call it in `spawn_blocking`.
    pub fn load(config: &PluginsConfig) -> anyhow::Result<Self> {
        Self::load_with_clock(config, Arc::new(system_time_ms))
    }

    /// [`Plugins::load`] with the clock plugins see through `now-unix-ms` (tests fix it).
    pub fn load_with_clock(config: &PluginsConfig, clock: Clock) -> anyhow::Result<Self> {
        let registry = Arc::new(Registry::new(config, clock)?);
        registry.load_all();
        Ok(Self {
            registry,
            inline_busy: Arc::default(),
        })
    }

    /// Watches the plugin directory and swaps in changed plugins until `shutdown`.
    pub fn watch(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(Arc::clone(&self.registry).watch(shutdown))
    }

    /// Runs the partner's plugin on `request`; `None` when the partner has no plugin.
    pub async fn transform(
        &self,
        request: OutboundRequest,
    ) -> Option<Result<Transformed, PluginError>> {
        let plugin = self.registry.get(&request.partner_id)?;
        let span =
            tracing::info_span!("plugin", partner = %request.partner_id, version = %plugin.version);
        Some(self.run(plugin, request).instrument(span).await)
    }

    /// The version serving `partner_id` now, if any.
    pub fn version(&self, partner_id: &str) -> Option<String> {
        self.registry
            .get(partner_id)
            .map(|plugin| plugin.version.clone())
    }

    /// Counters of loads and rejections since start.
    pub fn stats(&self) -> PluginStats {
        self.registry.stats()
    }

    /// Runs the call. A call takes ~10 µs, so on a multi-threaded runtime it runs in place on
    /// the worker while an inline slot is free ([`Plugins::inline_slot`]); otherwise it goes to
    /// the blocking pool. Measured with the load tool (docs/benchmarks.md): `block_in_place`, used
    /// before, cost ~150 µs of CPU per delivery under load and grew the process to ~850 MiB,
    /// since every call handed the worker's queue to another thread.
    async fn run(
        &self,
        plugin: Arc<Loaded>,
        request: OutboundRequest,
    ) -> Result<Transformed, PluginError> {
        let permits = Arc::clone(self.registry.runtime().permits());
        let permit = permits
            .acquire_owned()
            .await
            .map_err(|_| PluginError::Unavailable("plugin runtime is closed".to_owned()))?;
        if let Some(_slot) = self.inline_slot() {
            let _permit = permit;
            return self.registry.call(&plugin, request);
        }

        let registry = Arc::clone(&self.registry);
        let span = tracing::Span::current();
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            span.in_scope(|| registry.call(&plugin, request))
        })
        .await;
        joined.unwrap_or_else(|error| {
            Err(PluginError::Unavailable(format!(
                "plugin worker failed: {error}"
            )))
        })
    }

    /// An inline slot, if the runtime is multi-threaded and fewer than all but one of its
    /// workers are inside a plugin call: a slow plugin (up to its deadline) then leaves a worker
    /// for the API and the intake. A task parked on the calling worker waits for the call
    /// (at most the plugin's deadline) before another worker picks it up.
    fn inline_slot(&self) -> Option<InlineSlot> {
        let handle = Handle::current();
        if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
            return None;
        }
        let limit = handle.metrics().num_workers().saturating_sub(1);
        self.inline_busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |busy| {
                (busy < limit).then_some(busy + 1)
            })
            .ok()?;
        Some(InlineSlot(Arc::clone(&self.inline_busy)))
    }
}

/// An inline slot in use; given back when dropped.
struct InlineSlot(Arc<AtomicUsize>);

impl Drop for InlineSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn system_time_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since_epoch.map_or(0, |elapsed| {
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
    })
}
