//! `api-notify plugin check`: load a plugin the way the gateway would and show what it does.
//!
//! The check uses the same engine, limits, key grants and output validation as delivery, so a
//! plugin that passes here loads in the gateway with the same `[plugins]` config. It runs the
//! plugin on a sample request, or on one read from a JSON file shaped like [`SampleRequest`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use base64::Engine as _;
use serde::Deserialize;

use super::config::{PluginManifest, PluginsConfig};
use super::registry::{Registry, probe_request};
use super::{OutboundRequest, Transformed};

/// A request given to `plugin check --request FILE`; every field has a default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SampleRequest {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    /// Body as UTF-8 text.
    body: String,
    /// Body as base64, for binary bodies; wins over `body`.
    body_base64: Option<String>,
    request_id: String,
    notification_id: String,
    attempt: u32,
}

/// Loads the plugin at `path` (a `plugin.wasm`, or a partner directory holding one), runs it once
/// on `request` (or a sample) and returns the transformed request as text.
pub async fn plugin_check(
    path: &Path,
    partner: Option<&str>,
    request: Option<&Path>,
    config: &PluginsConfig,
) -> anyhow::Result<String> {
    let (wasm_path, manifest_path) = plugin_files(path);
    let partner_id = partner.map_or_else(|| default_partner(path), str::to_owned);
    let input = match request {
        Some(file) => read_request(file, &partner_id)?,
        None => probe_request(&partner_id),
    };

    let registry = Arc::new(Registry::new(config, Arc::new(super::system_time_ms))?);
    let wasm =
        std::fs::read(&wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
    let manifest = read_manifest(manifest_path.as_deref())?;
    let loaded = registry
        .load_bytes(&partner_id, &wasm, &manifest)
        .with_context(|| format!("{}", wasm_path.display()))?;

    let transformed = tokio::task::spawn_blocking(move || registry.call(&loaded, input))
        .await
        .context("plugin check worker failed")?
        .with_context(|| format!("{}", wasm_path.display()))?;
    Ok(render(&wasm_path, &transformed))
}

fn plugin_files(path: &Path) -> (PathBuf, Option<PathBuf>) {
    if path.is_dir() {
        return (path.join("plugin.wasm"), Some(path.join("plugin.toml")));
    }
    let manifest = path.parent().map(|dir| dir.join("plugin.toml"));
    (path.to_path_buf(), manifest)
}

fn default_partner(path: &Path) -> String {
    let dir = if path.is_dir() {
        Some(path)
    } else {
        path.parent()
    };
    let name = dir.and_then(Path::file_name).and_then(|name| name.to_str());
    name.unwrap_or("check").to_owned()
}

fn read_manifest(path: Option<&Path>) -> anyhow::Result<PluginManifest> {
    let Some(path) = path.filter(|path| path.is_file()) else {
        return Ok(PluginManifest::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    PluginManifest::parse(&text).with_context(|| format!("{}", path.display()))
}

fn read_request(file: &Path, partner_id: &str) -> anyhow::Result<OutboundRequest> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let sample: SampleRequest = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a request", file.display()))?;
    let body = match &sample.body_base64 {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .with_context(|| format!("{}: body_base64 is not base64", file.display()))?,
        None => sample.body.into_bytes(),
    };
    Ok(OutboundRequest {
        method: sample.method,
        url: sample.url,
        headers: sample.headers,
        body,
        partner_id: partner_id.to_owned(),
        request_id: sample.request_id,
        notification_id: sample.notification_id,
        attempt: sample.attempt,
    })
}

fn render(wasm_path: &Path, transformed: &Transformed) -> String {
    let request = &transformed.request;
    let mut text = String::new();
    let _ = writeln!(text, "plugin:  {}", wasm_path.display());
    let _ = writeln!(text, "version: {}", transformed.version);
    let _ = writeln!(text, "partner: {}\n", request.partner_id);
    let _ = writeln!(text, "{} {}", request.method, request.url);
    for (name, value) in &request.headers {
        let _ = writeln!(text, "{name}: {value}");
    }
    match std::str::from_utf8(&request.body) {
        Ok(body) => {
            let _ = writeln!(text, "\n{body}");
        }
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(&request.body);
            let _ = writeln!(text, "\n<{} bytes, base64> {encoded}", request.body.len());
        }
    }
    text
}

impl Default for SampleRequest {
    fn default() -> Self {
        let probe = probe_request("");
        Self {
            method: probe.method,
            url: probe.url,
            headers: probe.headers,
            body: String::from_utf8_lossy(&probe.body).into_owned(),
            body_base64: None,
            request_id: "check".to_owned(),
            notification_id: "msg_check".to_owned(),
            attempt: 1,
        }
    }
}
