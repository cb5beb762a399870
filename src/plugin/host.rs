//! The host side of `wit/plugin.wit`: generated bindings and the functions a guest may call.
//!
//! One [`CallState`] lives in the store of one plugin instance; budgets and the memory-limit flag
//! are refilled before every call ([`CallState::start_call`]), so they are per call even when a
//! warm instance is reused. Host functions never trap: misuse (a key not granted, a spent budget)
//! comes back to the guest as an `Err(String)` it can report.

use std::sync::Arc;

use wasmtime::ResourceLimiter;

use super::config::Limits;
use super::keys::{Grant, HmacAlgorithm};
use super::runtime::Clock;

/// Bindings generated from `wit/plugin.wit`.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "plugin",
        additional_derives: [PartialEq, Eq],
    });
}

use bindings::api_notify::plugin::host::{Host, Level};

/// Longest single log line kept; the rest is cut.
const MAX_LOG_LINE_BYTES: usize = 1024;

/// Everything a partner's plugin may reach besides its own memory.
#[derive(Debug)]
pub(crate) struct Capabilities {
    pub(crate) grant: Grant,
    pub(crate) config: std::collections::BTreeMap<String, String>,
}

/// The store data of one plugin call.
pub(crate) struct CallState {
    capabilities: Arc<Capabilities>,
    clock: Clock,
    memory: MemoryCap,
    sign_calls_left: u32,
    log_lines_left: u32,
    log_bytes_left: u64,
}

/// A [`ResourceLimiter`] that remembers whether the guest hit the memory cap, and the most
/// memory it was ever granted (linear memory never shrinks).
pub(crate) struct MemoryCap {
    max_bytes: usize,
    hit: bool,
    peak_bytes: usize,
}

/// Most table elements a guest may grow to.
const MAX_TABLE_ELEMENTS: usize = 10_000;

impl CallState {
    pub(crate) fn new(capabilities: Arc<Capabilities>, clock: Clock, limits: &Limits) -> Self {
        let mut state = Self {
            capabilities,
            clock,
            memory: MemoryCap {
                max_bytes: 0,
                hit: false,
                peak_bytes: 0,
            },
            sign_calls_left: 0,
            log_lines_left: 0,
            log_bytes_left: 0,
        };
        state.start_call(limits);
        state
    }

    /// Refills the budgets and clears the memory flag before a call on a reused instance.
    pub(crate) fn start_call(&mut self, limits: &Limits) {
        self.memory.max_bytes = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        self.memory.hit = false;
        self.sign_calls_left = limits.max_sign_calls;
        self.log_lines_left = limits.max_log_lines;
        self.log_bytes_left = limits.max_log_bytes;
    }

    pub(crate) fn limiter(&mut self) -> &mut MemoryCap {
        &mut self.memory
    }

    /// The largest linear memory the guest grew to over the life of its instance.
    pub(crate) fn memory_peak_bytes(&self) -> usize {
        self.memory.peak_bytes
    }

    /// Whether the guest asked for more memory than its cap during this call.
    pub(crate) fn memory_limit_hit(&self) -> bool {
        self.memory.hit
    }

    fn spend_sign_call(&mut self) -> Result<(), String> {
        if self.sign_calls_left == 0 {
            return Err("sign call budget of this plugin call is spent".to_owned());
        }
        self.sign_calls_left -= 1;
        Ok(())
    }

    fn hmac(
        &mut self,
        algorithm: HmacAlgorithm,
        key_name: &str,
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.spend_sign_call()?;
        self.capabilities.grant.hmac(algorithm, key_name, data)
    }
}

impl Host for CallState {
    fn hmac_sha256(&mut self, key_name: String, data: Vec<u8>) -> Result<Vec<u8>, String> {
        self.hmac(HmacAlgorithm::Sha256, &key_name, &data)
    }

    fn hmac_sha512(&mut self, key_name: String, data: Vec<u8>) -> Result<Vec<u8>, String> {
        self.hmac(HmacAlgorithm::Sha512, &key_name, &data)
    }

    fn ed25519_sign(&mut self, key_name: String, data: Vec<u8>) -> Result<Vec<u8>, String> {
        self.spend_sign_call()?;
        self.capabilities.grant.ed25519_sign(&key_name, &data)
    }

    fn now_unix_ms(&mut self) -> u64 {
        (self.clock)()
    }

    fn log(&mut self, level: Level, message: String) {
        let line = clean_log_line(&message);
        let bytes = line.len() as u64;
        if self.log_lines_left == 0 || bytes > self.log_bytes_left {
            return;
        }
        self.log_lines_left -= 1;
        self.log_bytes_left -= bytes;
        emit(level, &line);
    }

    fn config_get(&mut self, name: String) -> Option<String> {
        self.capabilities.config.get(&name).cloned()
    }
}

/// Cuts a guest log line and replaces control characters so it cannot forge log lines.
fn clean_log_line(message: &str) -> String {
    let mut end = message.len().min(MAX_LOG_LINE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn emit(level: Level, line: &str) {
    match level {
        Level::Trace => tracing::trace!(target: "api_notify::plugin::guest", "{line}"),
        Level::Debug => tracing::debug!(target: "api_notify::plugin::guest", "{line}"),
        Level::Info => tracing::info!(target: "api_notify::plugin::guest", "{line}"),
        Level::Warn => tracing::warn!(target: "api_notify::plugin::guest", "{line}"),
        Level::Error => tracing::error!(target: "api_notify::plugin::guest", "{line}"),
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        self.peak_bytes = self.peak_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_cut_and_cannot_forge_new_lines() {
        let long = format!("a\nb\r{}", "é".repeat(MAX_LOG_LINE_BYTES));
        let line = clean_log_line(&long);

        assert!(
            line.len() <= MAX_LOG_LINE_BYTES,
            "a line should be cut to the maximum length"
        );
        assert!(
            !line.contains('\n') && !line.contains('\r'),
            "control characters should be replaced"
        );
    }

    fn state_with_one_sign_call_and_one_log_line() -> CallState {
        let limits = Limits {
            max_sign_calls: 1,
            max_log_lines: 1,
            ..crate::plugin::PluginsConfig::default().limits()
        };
        let capabilities = Capabilities {
            grant: Grant::default(),
            config: Default::default(),
        };
        CallState::new(Arc::new(capabilities), Arc::new(|| 0), &limits)
    }

    #[test]
    fn sign_calls_past_the_budget_are_refused() {
        let mut state = state_with_one_sign_call_and_one_log_line();

        let first = state.hmac_sha256("absent".to_owned(), Vec::new());
        let second = state.hmac_sha256("absent".to_owned(), Vec::new());
        assert!(
            first.is_err_and(|e| e.contains("not granted")),
            "the first call should reach the grant"
        );
        assert!(
            second.is_err_and(|e| e.contains("budget")),
            "the second call should be over budget"
        );
    }

    #[test]
    fn log_lines_past_the_budget_are_dropped() {
        let mut state = state_with_one_sign_call_and_one_log_line();

        state.log(Level::Info, "kept".to_owned());
        state.log(Level::Info, "dropped".to_owned());
        let spent = crate::plugin::PluginsConfig::default().max_log_bytes - state.log_bytes_left;
        assert_eq!(
            spent, 4,
            "only the first line (`kept`, 4 bytes) should have been logged"
        );
    }

    #[test]
    fn memory_cap_refuses_growth_past_the_limit_and_remembers_it() {
        let mut cap = MemoryCap {
            max_bytes: 1 << 20,
            hit: false,
            peak_bytes: 0,
        };

        assert!(
            cap.memory_growing(0, 1 << 20, None).unwrap_or(false),
            "growth up to the cap is allowed"
        );
        assert!(
            !cap.memory_growing(0, 2 << 20, None).unwrap_or(true),
            "growth past the cap is refused"
        );
        assert!(
            cap.hit,
            "the refusal should be recorded as a memory limit hit"
        );
    }
}
