//! Settings of the plugin subsystem: the `[plugins]` table of the gateway config and the
//! `plugin.toml` a partner's plugin directory carries.
//!
//! Host limits are ceilings: a `plugin.toml` may lower them for its partner, never raise them,
//! so an operator can reason about the worst case from the gateway config alone. Key secrets
//! are deserialized straight into [`Secret`] so they cannot leak through `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

/// The `[plugins]` table of the gateway config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Directory holding one `<partner_id>/plugin.wasm` (+ `plugin.toml`) per partner.
    pub dir: PathBuf,
    /// Host-held keys by name; partners are granted them by name in their `plugin.toml`.
    pub keys: BTreeMap<String, KeyConfig>,
    /// CPU budget of one plugin call.
    pub timeout_ms: u64,
    /// Linear memory cap of one plugin call; also sizes the pooling allocator's slots.
    pub memory_bytes: u64,
    /// Largest body a plugin may return.
    pub max_body_bytes: u64,
    /// Most headers a plugin may return.
    pub max_headers: u32,
    /// Most bytes of header names and values together a plugin may return.
    pub max_header_bytes: u64,
    /// Most sign calls (HMAC or Ed25519) in one plugin call.
    pub max_sign_calls: u32,
    /// Most log lines kept from one plugin call.
    pub max_log_lines: u32,
    /// Most log bytes kept from one plugin call.
    pub max_log_bytes: u64,
    /// Plugin calls running at once; sizes the instance pool and the semaphore in front of it.
    pub max_concurrent_calls: u32,
    /// Idle instances kept warm across all plugins for their next call; 0 = a fresh instance
    /// for every call.
    pub warm_instances: u32,
    /// Calls after which a warm instance is replaced by a fresh one.
    pub max_calls_per_instance: u32,
    /// How often the plugin directory is scanned for changes.
    pub poll_interval_ms: u64,
    /// How long a changed file must stay unchanged before it is loaded.
    pub reload_debounce_ms: u64,
}

/// One host-held key. Exactly one of the fields must be set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// HMAC secret in Standard Webhooks form: `whsec_` followed by base64 of at least 24 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hmac_secret: Option<Secret>,
    /// Ed25519 private key: base64 of the 32-byte seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ed25519_seed: Option<Secret>,
}

/// A secret string whose `Debug`, `Display` and `Serialize` never show the value (serializing
/// writes `<redacted>`, so a serialized config cannot be loaded back with its keys).
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// The `plugin.toml` next to a partner's `plugin.wasm`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginManifest {
    /// Names of host keys this partner's plugin may use.
    pub keys: Vec<String>,
    /// Plain values the plugin reads with `config-get`.
    pub config: BTreeMap<String, String>,
    /// Limits lower than the host's for this plugin.
    pub limits: LimitOverrides,
}

/// Per-plugin limit overrides; each may only lower the host value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitOverrides {
    /// See [`PluginsConfig::timeout_ms`].
    pub timeout_ms: Option<u64>,
    /// See [`PluginsConfig::memory_bytes`].
    pub memory_bytes: Option<u64>,
    /// See [`PluginsConfig::max_body_bytes`].
    pub max_body_bytes: Option<u64>,
    /// See [`PluginsConfig::max_headers`].
    pub max_headers: Option<u32>,
}

/// The limits one plugin call runs under, after overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU budget of one call.
    pub timeout_ms: u64,
    /// Linear memory cap.
    pub memory_bytes: u64,
    /// Largest returned body.
    pub max_body_bytes: u64,
    /// Most returned headers.
    pub max_headers: u32,
    /// Most returned header bytes.
    pub max_header_bytes: u64,
    /// Most sign calls.
    pub max_sign_calls: u32,
    /// Most log lines.
    pub max_log_lines: u32,
    /// Most log bytes.
    pub max_log_bytes: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("plugins.d"),
            keys: BTreeMap::new(),
            timeout_ms: 50,
            memory_bytes: 32 << 20,
            max_body_bytes: 4 << 20,
            max_headers: 64,
            max_header_bytes: 64 << 10,
            max_sign_calls: 16,
            max_log_lines: 16,
            max_log_bytes: 8 << 10,
            max_concurrent_calls: 16,
            warm_instances: 32,
            max_calls_per_instance: 1000,
            poll_interval_ms: 100,
            reload_debounce_ms: 150,
        }
    }
}

impl PluginsConfig {
    /// The host limits, before any `plugin.toml` override.
    pub fn limits(&self) -> Limits {
        Limits {
            timeout_ms: self.timeout_ms,
            memory_bytes: self.memory_bytes,
            max_body_bytes: self.max_body_bytes,
            max_headers: self.max_headers,
            max_header_bytes: self.max_header_bytes,
            max_sign_calls: self.max_sign_calls,
            max_log_lines: self.max_log_lines,
            max_log_bytes: self.max_log_bytes,
        }
    }
}

impl Limits {
    /// These limits lowered by `overrides`; a value above the host's is an error.
    pub fn lowered_by(self, overrides: &LimitOverrides) -> anyhow::Result<Self> {
        Ok(Self {
            timeout_ms: lower("timeout_ms", self.timeout_ms, overrides.timeout_ms)?,
            memory_bytes: lower("memory_bytes", self.memory_bytes, overrides.memory_bytes)?,
            max_body_bytes: lower(
                "max_body_bytes",
                self.max_body_bytes,
                overrides.max_body_bytes,
            )?,
            max_headers: lower("max_headers", self.max_headers, overrides.max_headers)?,
            ..self
        })
    }
}

fn lower<N: Copy + PartialOrd + fmt::Display>(
    name: &str,
    host: N,
    wanted: Option<N>,
) -> anyhow::Result<N> {
    match wanted {
        None => Ok(host),
        Some(value) if value <= host => Ok(value),
        Some(value) => anyhow::bail!("limits.{name} = {value} is above the gateway's {host}"),
    }
}

impl PluginManifest {
    /// Parses the text of a `plugin.toml`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret text; call only where the key is parsed.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_config_reads_keys_and_keeps_defaults() {
        let text = r#"
            dir = "/srv/plugins"
            [keys.acme-signing]
            hmac_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        "#;
        let config: PluginsConfig = toml::from_str(text).expect("a valid [plugins] table parses");

        assert_eq!(config.timeout_ms, 50, "timeout_ms should default to 50");
        assert_eq!(
            config.memory_bytes,
            32 << 20,
            "memory_bytes should default to 32 MiB"
        );
        assert!(
            config.keys.contains_key("acme-signing"),
            "the key should be read by name"
        );
    }

    #[test]
    fn serialized_config_redacts_secrets() {
        let key = KeyConfig {
            hmac_secret: Some(Secret::new("whsec_topsecret")),
            ..Default::default()
        };
        let config = PluginsConfig {
            keys: BTreeMap::from([("k".to_owned(), key)]),
            ..Default::default()
        };
        let text = toml::to_string(&config).expect("the config serializes");
        assert!(
            !text.contains("topsecret"),
            "secret text must not be serialized: {text}"
        );
    }

    #[test]
    fn host_config_rejects_unknown_fields() {
        let parsed = toml::from_str::<PluginsConfig>("timeout = 5");
        assert!(
            parsed.is_err(),
            "a misspelt setting should be an error, not ignored"
        );
    }

    #[test]
    fn secret_debug_and_display_are_redacted() {
        let key = KeyConfig {
            hmac_secret: Some(Secret::new("whsec_topsecret")),
            ..Default::default()
        };
        let shown = format!(
            "{key:?} {}",
            key.hmac_secret
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(
            !shown.contains("topsecret"),
            "secret text must not be shown: {shown}"
        );
    }

    #[test]
    fn manifest_may_lower_but_not_raise_limits() {
        let host = PluginsConfig::default().limits();
        let lower = PluginManifest::parse("[limits]\ntimeout_ms = 20").expect("manifest parses");
        let higher = PluginManifest::parse("[limits]\ntimeout_ms = 2000").expect("manifest parses");

        let lowered = host
            .lowered_by(&lower.limits)
            .expect("lowering a limit is allowed");
        assert_eq!(
            lowered.timeout_ms, 20,
            "the plugin's lower timeout should apply"
        );
        assert!(
            host.lowered_by(&higher.limits).is_err(),
            "raising a limit should be refused"
        );
    }

    #[test]
    fn manifest_reads_keys_and_config() {
        let text = "keys = [\"a\", \"b\"]\n[config]\nkeys = \"a b\"\n";
        let manifest = PluginManifest::parse(text).expect("manifest parses");
        assert_eq!(
            manifest.keys,
            ["a", "b"],
            "granted key names should be read in order"
        );
        assert_eq!(
            manifest.config.get("keys").map(String::as_str),
            Some("a b"),
            "config value read"
        );
    }
}
