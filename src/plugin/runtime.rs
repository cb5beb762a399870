//! The wasmtime engine every plugin runs in, and one call of one plugin.
//!
//! Compilation happens once per plugin version ([`Runtime::prepare`]): the component is checked
//! against the `plugin` world and its imports against an allow-list, then pre-instantiated.
//! Partners that ship the same file (a common signer with their own keys) share one compiled
//! component: the cache is keyed by the file's SHA-256 and keeps only versions in service.
//! Instances come from the pooling allocator; each call gets an epoch deadline, a memory cap and
//! fresh host budgets. A plugin's instance is kept warm for its next call (its own partner's
//! only) and dropped after `max_calls_per_instance` calls or any trap, so what a guest breaks
//! never outlives one failed call; `warm_instances = 0` gives every call a fresh instance.
//!
//! The pool has a fixed number of slots and running out is an error, not back-pressure. Slots
//! are sized as calls at once (held through [`Runtime::permits`]) + one for loading + the warm
//! instances, and the warm ones are capped globally, so a call always finds a slot.
//! Calls are synchronous and CPU-bound; run them on a blocking thread.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::error::Context as _;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::config::{Limits, PluginsConfig};
use super::host::bindings::{self, Plugin, PluginPre};
use super::host::{CallState, Capabilities};
use super::{OutboundRequest, PluginError};

/// Host time in milliseconds since the Unix epoch, as handed to plugins.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How often the epoch advances; deadlines are whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Instances whose memory grew past this are not kept warm, so idle instances stay small.
const MAX_WARM_MEMORY_BYTES: usize = 8 << 20;

/// Longest guest-supplied or trap text kept in an error.
const MAX_ERROR_TEXT: usize = 512;

/// Interfaces a plugin may import. A Rust `wasm32-wasip2` guest imports the WASI stdio, exit and
/// environment interfaces even when unused; they are linked to functions that trap, not granted.
const ALLOWED_IMPORTS: &[&str] = &[
    "api-notify:plugin/host@0.1.0",
    "wasi:io/error@",
    "wasi:io/streams@",
    "wasi:io/poll@",
    "wasi:cli/environment@",
    "wasi:cli/exit@",
    "wasi:cli/stdin@",
    "wasi:cli/stdout@",
    "wasi:cli/stderr@",
    "wasi:cli/terminal-input@",
    "wasi:cli/terminal-output@",
    "wasi:cli/terminal-stdin@",
    "wasi:cli/terminal-stdout@",
    "wasi:cli/terminal-stderr@",
];

/// The shared engine, its instance pool and the permits in front of it.
pub(crate) struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    permits: Arc<Semaphore>,
    clock: Clock,
    warm: Arc<WarmBudget>,
    max_calls_per_instance: u32,
    /// Compiled components by the SHA-256 of their file.
    compiled: Mutex<HashMap<Digest, Component>>,
}

/// SHA-256 of a plugin file.
pub(crate) type Digest = [u8; 32];

/// One compiled, type-checked plugin version, ready to instantiate, with its warm instances.
pub(crate) struct Prepared {
    pub(crate) digest: Digest,
    pre: PluginPre<CallState>,
    idle: Mutex<Vec<Instance>>,
    warm: Arc<WarmBudget>,
}

/// A live instance of a plugin in its own store.
struct Instance {
    store: Store<CallState>,
    plugin: Plugin,
    calls: u32,
}

/// How many idle warm instances may exist across all plugins.
struct WarmBudget {
    idle: AtomicU32,
    max_idle: u32,
}

impl Runtime {
    /// Builds the engine with pooling, epoch interruption and a ticker thread.
    pub(crate) fn new(config: &PluginsConfig, clock: Clock) -> anyhow::Result<Self> {
        // Calls at once, one slot so loading never waits behind traffic, and the warm instances.
        let slots = config.max_concurrent_calls.max(1) + 1 + config.warm_instances;
        let engine =
            Engine::new(&engine_config(config, slots)).context("creating the plugin engine")?;
        start_ticker(&engine);

        let mut linker = Linker::new(&engine);
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state: &mut CallState| state)
            .context("linking host functions")?;
        let permits = Arc::new(Semaphore::new(config.max_concurrent_calls.max(1) as usize));
        let warm = Arc::new(WarmBudget {
            idle: AtomicU32::new(0),
            max_idle: config.warm_instances,
        });
        Ok(Self {
            engine,
            linker,
            permits,
            clock,
            warm,
            max_calls_per_instance: config.max_calls_per_instance,
            compiled: Mutex::default(),
        })
    }

    /// The semaphore every call must hold a permit of.
    pub(crate) fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    /// Compiles `wasm`, checks it against the world and pre-instantiates it.
    pub(crate) fn prepare(&self, wasm: &[u8]) -> anyhow::Result<Prepared> {
        let digest: Digest = Sha256::digest(wasm).into();
        let component = self.compile(digest, wasm)?;

        let mut linker = self.linker.clone();
        linker.define_unknown_imports_as_traps(&component)?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .context("imports do not match")?;
        let pre = PluginPre::new(instance_pre).context("does not export the `plugin` world")?;
        Ok(Prepared {
            digest,
            pre,
            idle: Mutex::default(),
            warm: Arc::clone(&self.warm),
        })
    }

    /// The compiled component of `wasm`, from the cache or compiled and import-checked now.
    fn compile(&self, digest: Digest, wasm: &[u8]) -> anyhow::Result<Component> {
        let cached = self
            .compiled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&digest)
            .cloned();
        if let Some(component) = cached {
            return Ok(component);
        }
        let component =
            Component::from_binary(&self.engine, wasm).context("not a valid component")?;
        check_imports(&self.engine, &component)?;
        self.compiled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest, component.clone());
        Ok(component)
    }

    /// Forgets compiled components other than `in_service`, so replaced versions free their code.
    pub(crate) fn keep_compiled(&self, in_service: &HashSet<Digest>) {
        self.compiled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|digest, _| in_service.contains(digest));
    }

    /// Distinct compiled components held.
    pub(crate) fn compiled_count(&self) -> u64 {
        let compiled = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        compiled.len() as u64
    }

    /// Runs `transform` once under `limits`, on a warm instance of the plugin or a new one.
    /// Blocks the thread.
    pub(crate) fn call(
        &self,
        prepared: &Prepared,
        capabilities: Arc<Capabilities>,
        limits: &Limits,
        request: &OutboundRequest,
    ) -> Result<OutboundRequest, PluginError> {
        let mut instance = match prepared.take_idle() {
            Some(instance) => instance,
            None => self.instantiate(prepared, capabilities, limits)?,
        };
        instance.store.data_mut().start_call(limits);
        instance
            .store
            .set_epoch_deadline(deadline_ticks(limits.timeout_ms));

        let outcome = instance.plugin.call_transform(&mut instance.store, request);
        instance.calls += 1;
        match outcome {
            Ok(Ok(output)) => {
                self.recycle(prepared, instance);
                Ok(output)
            }
            Ok(Err(error)) => {
                self.recycle(prepared, instance);
                Err(PluginError::Guest(cut(&guest_error_text(&error))))
            }
            Err(error) => Err(classify(
                &error,
                instance.store.data().memory_limit_hit(),
                limits,
            )),
        }
    }

    fn instantiate(
        &self,
        prepared: &Prepared,
        capabilities: Arc<Capabilities>,
        limits: &Limits,
    ) -> Result<Instance, PluginError> {
        let state = CallState::new(capabilities, Arc::clone(&self.clock), limits);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| state.limiter());
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(limits.timeout_ms));

        match prepared.pre.instantiate(&mut store) {
            Ok(plugin) => Ok(Instance {
                store,
                plugin,
                calls: 0,
            }),
            Err(error) => Err(classify(&error, store.data().memory_limit_hit(), limits)),
        }
    }

    /// Keeps `instance` warm for the plugin's next call, if it is young and the budget allows.
    fn recycle(&self, prepared: &Prepared, instance: Instance) {
        let worn = instance.calls >= self.max_calls_per_instance
            || instance.store.data().memory_peak_bytes() > MAX_WARM_MEMORY_BYTES;
        if worn || !self.warm.try_reserve() {
            return;
        }
        prepared
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(instance);
    }
}

impl Prepared {
    fn take_idle(&self) -> Option<Instance> {
        let instance = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()?;
        self.warm.release(1);
        Some(instance)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let idle = self.idle.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.warm
            .release(u32::try_from(idle.len()).unwrap_or(u32::MAX));
    }
}

impl WarmBudget {
    fn try_reserve(&self) -> bool {
        let reserve = |idle: u32| (idle < self.max_idle).then_some(idle + 1);
        self.idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, reserve)
            .is_ok()
    }

    fn release(&self, count: u32) {
        self.idle.fetch_sub(count, Ordering::AcqRel);
    }
}

fn engine_config(config: &PluginsConfig, slots: u32) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        .total_core_instances(slots * 8)
        .total_memories(slots * 2)
        .total_tables(slots * 4)
        .max_core_instances_per_component(8)
        .max_memories_per_component(2)
        .max_tables_per_component(4)
        .max_memory_size(usize::try_from(config.memory_bytes).unwrap_or(usize::MAX));

    let mut engine = Config::new();
    engine
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    engine
}

/// Advances the engine's epoch every tick until the engine is dropped.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = thread::Builder::new()
        .name("plugin-epoch".to_owned())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "could not start the plugin epoch ticker; plugin calls have no deadline");
    }
}

/// Whole ticks covering `timeout_ms`, plus one because the current tick is already partly gone.
fn deadline_ticks(timeout_ms: u64) -> u64 {
    let tick_ms = EPOCH_TICK.as_millis() as u64;
    timeout_ms.div_ceil(tick_ms).max(1) + 1
}

fn check_imports(engine: &Engine, component: &Component) -> anyhow::Result<()> {
    let component_type = component.component_type();
    for (name, _) in component_type.imports(engine) {
        if !ALLOWED_IMPORTS
            .iter()
            .any(|allowed| name.starts_with(allowed))
        {
            anyhow::bail!(
                "imports `{name}`, which plugins do not get (no files, network, clocks or \
                 environment; use the `host` interface)"
            );
        }
    }
    Ok(())
}

fn classify(error: &wasmtime::Error, memory_limit_hit: bool, limits: &Limits) -> PluginError {
    if memory_limit_hit {
        return PluginError::MemoryLimit {
            limit_bytes: limits.memory_bytes,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Timeout {
            limit_ms: limits.timeout_ms,
        },
        Some(trap) => PluginError::Trap(cut(&trap.to_string())),
        None => PluginError::Trap(cut(&format!("{error:#}"))),
    }
}

fn guest_error_text(error: &bindings::PluginError) -> String {
    match error {
        bindings::PluginError::BadConfig(text) => format!("bad-config: {text}"),
        bindings::PluginError::HostCall(text) => format!("host-call: {text}"),
        bindings::PluginError::BadRequest(text) => format!("bad-request: {text}"),
        bindings::PluginError::Other(text) => format!("other: {text}"),
    }
}

/// `text` cut to [`MAX_ERROR_TEXT`] bytes on a character boundary.
pub(crate) fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_covers_the_whole_timeout() {
        let tick_ms = EPOCH_TICK.as_millis() as u64;
        for timeout_ms in [1, 5, 49, 50, 51, 1000] {
            let covered = (deadline_ticks(timeout_ms) - 1) * tick_ms;
            assert!(
                covered >= timeout_ms,
                "{timeout_ms} ms should be covered by whole ticks"
            );
        }
    }

    #[test]
    fn error_text_is_cut_on_a_character_boundary() {
        let text = "ü".repeat(MAX_ERROR_TEXT);
        let kept = cut(&text);
        assert!(
            kept.len() <= MAX_ERROR_TEXT,
            "text should be cut to the maximum"
        );
        assert!(
            kept.chars().all(|c| c == 'ü'),
            "no character should be split"
        );
    }
}
