//! Shared helpers: a temporary plugin directory, a test config and bounded waiting.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use api_notify::plugin::{KeyConfig, OutboundRequest, PluginsConfig, Secret};
use tempfile::TempDir;

/// The Standard Webhooks spec's example secret.
pub(crate) const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The second secret of the BR-04 rotation case.
pub(crate) const ROTATED_SECRET: &str = "whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA==";
/// Seed of the test Ed25519 key (base64 of 32 bytes of 0x2a).
pub(crate) const ED25519_SEED: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

/// A plugin directory that lives as long as the test.
pub(crate) struct PluginDir {
    pub(crate) root: TempDir,
}

impl PluginDir {
    pub(crate) fn new() -> Self {
        Self {
            root: tempfile::tempdir().expect("a temporary directory can be created"),
        }
    }

    /// The gateway config for this directory: test keys, fast polling.
    pub(crate) fn config(&self) -> PluginsConfig {
        let keys = BTreeMap::from([
            ("spec".to_owned(), hmac_key(SPEC_SECRET)),
            ("rotated".to_owned(), hmac_key(ROTATED_SECRET)),
            ("other-key".to_owned(), hmac_key(ROTATED_SECRET)),
            (
                "ed".to_owned(),
                KeyConfig {
                    hmac_secret: None,
                    ed25519_seed: Some(Secret::new(ED25519_SEED)),
                },
            ),
        ]);
        PluginsConfig {
            dir: self.root.path().to_path_buf(),
            keys,
            poll_interval_ms: 20,
            reload_debounce_ms: 40,
            ..PluginsConfig::default()
        }
    }

    pub(crate) fn partner_dir(&self, partner_id: &str) -> std::path::PathBuf {
        self.root.path().join(partner_id)
    }

    /// Installs `wasm` and `manifest` for `partner_id`, replacing the wasm atomically.
    pub(crate) fn install(&self, partner_id: &str, wasm: &[u8], manifest: &str) {
        let dir = self.partner_dir(partner_id);
        std::fs::create_dir_all(&dir).expect("partner directory can be created");
        std::fs::write(dir.join("plugin.toml"), manifest).expect("plugin.toml can be written");
        write_atomically(&dir.join("plugin.wasm"), wasm);
    }
}

fn hmac_key(secret: &str) -> KeyConfig {
    KeyConfig {
        hmac_secret: Some(Secret::new(secret)),
        ed25519_seed: None,
    }
}

/// Writes `bytes` to a temporary name and renames it over `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, bytes).expect("temporary plugin file can be written");
    std::fs::rename(&temporary, path).expect("plugin file can be renamed into place");
}

/// Compiles component text to binary.
pub(crate) fn wasm(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap_or_else(|error| panic!("test component text should parse: {error}"))
}

/// A request to partner `partner_id` on attempt `attempt`.
pub(crate) fn request(partner_id: &str, attempt: u32) -> OutboundRequest {
    OutboundRequest {
        method: "POST".to_owned(),
        url: "https://partner.example/hook".to_owned(),
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: br#"{"order":"A-1001"}"#.to_vec(),
        partner_id: partner_id.to_owned(),
        request_id: "req-1".to_owned(),
        notification_id: "msg_1".to_owned(),
        attempt,
    }
}

/// Polls `condition` every 10 ms until it holds or `bound` passes; returns whether it held.
pub(crate) async fn eventually(bound: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition().await {
            return true;
        }
        if start.elapsed() > bound {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
