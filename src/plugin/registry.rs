//! The plugin directory: which partner has which plugin version, and hot reload.
//!
//! The directory is polled (every `poll_interval_ms`) rather than watched through inotify so the
//! behaviour is the same on every filesystem, including bind mounts and network volumes. A
//! change is loaded only after the files stayed unchanged for `reload_debounce_ms`; loading
//! compiles, type-checks and probes the plugin off the hot path, and only a plugin that passed
//! all three replaces the one serving. A rejected version is logged once (per file state) and
//! the old version keeps serving; removing a partner's directory (or its `plugin.wasm`) returns
//! that partner to plain delivery.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::config::{Limits, PluginManifest, PluginsConfig};
use super::host::Capabilities;
use super::keys::KeyRing;
use super::runtime::{Clock, Digest, Prepared, Runtime};
use super::{OutboundRequest, PluginError, Transformed, validate};

/// Counters of plugin loading since start, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginStats {
    /// Plugin versions loaded and put into service.
    pub loaded_total: u64,
    /// Plugin versions rejected (did not compile, wrong world, probe failed, bad plugin.toml).
    pub rejected_total: u64,
    /// Distinct compiled plugin files held now (partners serving the same file share one).
    pub compiled_components: u64,
}

/// One plugin version in service.
///
/// TODO: quarantine a version that keeps trapping (DESIGN §5) so that partner's deliveries wait
/// for a new version instead of burning retries; needs the dispatcher's view of attempts.
pub(crate) struct Loaded {
    pub(crate) version: String,
    prepared: Prepared,
    capabilities: Arc<Capabilities>,
    limits: Limits,
}

/// What the files of one partner looked like when last seen: size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    wasm: (u64, Option<SystemTime>),
    manifest: Option<(u64, Option<SystemTime>)>,
}

pub(crate) struct Registry {
    runtime: Runtime,
    keys: KeyRing,
    config: PluginsConfig,
    serving: RwLock<HashMap<String, Arc<Loaded>>>,
    /// File state of each partner's last load attempt, good or bad.
    attempted: Mutex<HashMap<String, Fingerprint>>,
    loaded_total: AtomicU64,
    rejected_total: AtomicU64,
}

impl Registry {
    pub(crate) fn new(config: &PluginsConfig, clock: Clock) -> anyhow::Result<Self> {
        Ok(Self {
            runtime: Runtime::new(config, clock)?,
            keys: KeyRing::from_config(&config.keys)?,
            config: config.clone(),
            serving: RwLock::default(),
            attempted: Mutex::default(),
            loaded_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
        })
    }

    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub(crate) fn get(&self, partner_id: &str) -> Option<Arc<Loaded>> {
        let serving = self.serving.read().unwrap_or_else(PoisonError::into_inner);
        serving.get(partner_id).cloned()
    }

    pub(crate) fn stats(&self) -> PluginStats {
        PluginStats {
            loaded_total: self.loaded_total.load(Ordering::Relaxed),
            rejected_total: self.rejected_total.load(Ordering::Relaxed),
            compiled_components: self.runtime.compiled_count(),
        }
    }

    /// Runs `loaded` on `request` and checks the output. Blocks the thread.
    pub(crate) fn call(
        &self,
        loaded: &Loaded,
        request: OutboundRequest,
    ) -> Result<Transformed, PluginError> {
        let output = self.runtime.call(
            &loaded.prepared,
            Arc::clone(&loaded.capabilities),
            &loaded.limits,
            &request,
        )?;
        let checked = validate::check_output(&request, output, &loaded.limits)?;
        Ok(Transformed {
            request: checked,
            version: loaded.version.clone(),
        })
    }

    /// Loads every partner directory present now.
    pub(crate) fn load_all(&self) {
        for (partner_id, fingerprint) in scan(&self.config.dir) {
            self.reload(&partner_id, fingerprint);
        }
        self.forget_unused_code();
    }

    /// Drops compiled code that no partner's version in service uses any more.
    fn forget_unused_code(&self) {
        let in_service = self
            .serving
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|loaded| loaded.prepared.digest)
            .collect();
        self.runtime.keep_compiled(&in_service);
    }

    /// Polls the directory until `shutdown`, loading changes once they settle.
    pub(crate) async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_interval_ms.max(1));
        let mut settling: HashMap<String, (Fingerprint, Instant)> = HashMap::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
            let registry = Arc::clone(&self);
            let pending = std::mem::take(&mut settling);
            let joined = tokio::task::spawn_blocking(move || registry.poll_once(pending)).await;
            match joined {
                Ok(still_settling) => settling = still_settling,
                Err(error) => tracing::error!(%error, "plugin directory poll failed"),
            }
        }
    }

    /// One poll: drops removed partners, loads settled changes, returns changes still settling.
    fn poll_once(
        &self,
        mut settling: HashMap<String, (Fingerprint, Instant)>,
    ) -> HashMap<String, (Fingerprint, Instant)> {
        let present = scan(&self.config.dir);
        self.drop_removed(&present);
        settling.retain(|partner_id, _| present.contains_key(partner_id));

        let debounce = Duration::from_millis(self.config.reload_debounce_ms);
        for (partner_id, fingerprint) in present {
            if self.last_attempt(&partner_id) == Some(fingerprint) {
                settling.remove(&partner_id);
                continue;
            }
            match settling.get(&partner_id) {
                Some((seen, since)) if *seen == fingerprint && since.elapsed() >= debounce => {
                    settling.remove(&partner_id);
                    self.reload(&partner_id, fingerprint);
                }
                Some((seen, _)) if *seen == fingerprint => {}
                _ => {
                    settling.insert(partner_id, (fingerprint, Instant::now()));
                }
            }
        }
        self.forget_unused_code();
        settling
    }

    fn last_attempt(&self, partner_id: &str) -> Option<Fingerprint> {
        let attempted = self
            .attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        attempted.get(partner_id).copied()
    }

    fn drop_removed(&self, present: &BTreeMap<String, Fingerprint>) {
        self.attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|partner_id, _| present.contains_key(partner_id));
        let mut serving = self.serving.write().unwrap_or_else(PoisonError::into_inner);
        serving.retain(|partner_id, loaded| {
            let keep = present.contains_key(partner_id);
            if !keep {
                tracing::info!(partner = %partner_id, version = %loaded.version, "plugin removed; partner back to plain delivery");
            }
            keep
        });
    }

    /// Loads the partner's files and, if they pass, puts them into service.
    fn reload(&self, partner_id: &str, fingerprint: Fingerprint) {
        self.attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(partner_id.to_owned(), fingerprint);
        let dir = self.config.dir.join(partner_id);
        match self.load_dir(partner_id, &dir) {
            Ok(loaded) => self.put_in_service(partner_id, loaded),
            Err(error) => {
                self.rejected_total.fetch_add(1, Ordering::Relaxed);
                let serving = self.get(partner_id).map(|old| old.version.clone());
                tracing::warn!(partner = %partner_id, dir = %dir.display(), still_serving = ?serving,
                    "plugin rejected: {error:#}");
            }
        }
    }

    fn put_in_service(&self, partner_id: &str, loaded: Loaded) {
        self.loaded_total.fetch_add(1, Ordering::Relaxed);
        let version = loaded.version.clone();
        let previous = self
            .serving
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(partner_id.to_owned(), Arc::new(loaded));
        let previous = previous.map(|old| old.version.clone());
        tracing::info!(partner = %partner_id, %version, ?previous, "plugin loaded");
    }

    /// Reads, compiles and probes the plugin in `dir`.
    pub(crate) fn load_dir(&self, partner_id: &str, dir: &Path) -> anyhow::Result<Loaded> {
        let wasm_path = dir.join("plugin.wasm");
        let wasm = std::fs::read(&wasm_path)
            .with_context(|| format!("reading {}", wasm_path.display()))?;
        let manifest = read_manifest(&dir.join("plugin.toml"))?;
        self.load_bytes(partner_id, &wasm, &manifest)
            .with_context(|| format!("{}", wasm_path.display()))
    }

    /// Compiles and probes `wasm` for `partner_id` with `manifest`.
    pub(crate) fn load_bytes(
        &self,
        partner_id: &str,
        wasm: &[u8],
        manifest: &PluginManifest,
    ) -> anyhow::Result<Loaded> {
        let limits = self
            .config
            .limits()
            .lowered_by(&manifest.limits)
            .context("plugin.toml")?;
        let grant = self.keys.grant(&manifest.keys).context("plugin.toml")?;
        let capabilities = Arc::new(Capabilities {
            grant,
            config: manifest.config.clone(),
        });
        let prepared = self.runtime.prepare(wasm)?;
        let loaded = Loaded {
            version: version_of(&prepared.digest),
            prepared,
            capabilities,
            limits,
        };

        self.call(&loaded, probe_request(partner_id))
            .context("probe call failed")?;
        Ok(loaded)
    }
}

/// Partner directories holding a `plugin.wasm`, with the state of their files.
fn scan(dir: &Path) -> BTreeMap<String, Fingerprint> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let partner_id = entry.file_name().into_string().ok()?;
            if partner_id.starts_with('.') {
                return None;
            }
            let fingerprint = fingerprint(&entry.path())?;
            Some((partner_id, fingerprint))
        })
        .collect()
}

fn fingerprint(partner_dir: &Path) -> Option<Fingerprint> {
    let stat = |path: PathBuf| {
        let meta = std::fs::metadata(path).ok().filter(|meta| meta.is_file())?;
        Some((meta.len(), meta.modified().ok()))
    };
    Some(Fingerprint {
        wasm: stat(partner_dir.join("plugin.wasm"))?,
        manifest: stat(partner_dir.join("plugin.toml")),
    })
}

fn read_manifest(path: &Path) -> anyhow::Result<PluginManifest> {
    match std::fs::read_to_string(path) {
        Ok(text) => PluginManifest::parse(&text).with_context(|| format!("{}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(PluginManifest::default()),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// The first 16 hex digits of the plugin file's SHA-256 (computed once, when it is prepared).
fn version_of(digest: &Digest) -> String {
    hex::encode(&digest[..8])
}

/// The request a new plugin version must transform successfully before it serves.
pub(crate) fn probe_request(partner_id: &str) -> OutboundRequest {
    OutboundRequest {
        method: "POST".to_owned(),
        url: "https://probe.invalid/hook".to_owned(),
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: br#"{"probe":true}"#.to_vec(),
        partner_id: partner_id.to_owned(),
        request_id: "probe".to_owned(),
        notification_id: "probe".to_owned(),
        attempt: 1,
    }
}
