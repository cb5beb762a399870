//! Signs each request per Standard Webhooks: adds `webhook-id`, `webhook-timestamp` and
//! `webhook-signature`.
//!
//! Config (`[config]` in `plugin.toml`):
//! - `keys`: space-separated names of HMAC keys; one `v1,<base64 HMAC-SHA256>` each. During a
//!   secret rotation list the old and the new key: receivers accept either signature.
//! - `ed25519_keys`: space-separated names of Ed25519 keys; one `v1a,<base64 signature>` each.
//!
//! The signed content is `<webhook-id>.<webhook-timestamp>.<body>` over the exact body bytes; the
//! id is the notification id, so it is the same on every attempt and replay.

use base64::Engine as _;

use bindings::api_notify::plugin::host;

#[allow(
    clippy::too_many_arguments,
    reason = "generated glue passes the request flattened"
)]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });
}

use bindings::{Guest, OutboundRequest, PluginError};

struct StandardWebhooks;

impl Guest for StandardWebhooks {
    fn transform(mut request: OutboundRequest) -> Result<OutboundRequest, PluginError> {
        let hmac_keys = key_names("keys");
        let ed25519_keys = key_names("ed25519_keys");
        if hmac_keys.is_empty() && ed25519_keys.is_empty() {
            return Err(PluginError::BadConfig(
                "set `keys` and/or `ed25519_keys` in [config]".into(),
            ));
        }

        let timestamp = (host::now_unix_ms() / 1000).to_string();
        let content = signed_content(&request.notification_id, &timestamp, &request.body);
        let mut signatures = Vec::new();
        for name in &hmac_keys {
            let mac = host::hmac_sha256(name, &content).map_err(PluginError::HostCall)?;
            signatures.push(format!("v1,{}", encode(&mac)));
        }
        for name in &ed25519_keys {
            let signature = host::ed25519_sign(name, &content).map_err(PluginError::HostCall)?;
            signatures.push(format!("v1a,{}", encode(&signature)));
        }

        request
            .headers
            .retain(|(name, _)| !is_signature_header(name));
        request
            .headers
            .push(("webhook-id".into(), request.notification_id.clone()));
        request
            .headers
            .push(("webhook-timestamp".into(), timestamp));
        request
            .headers
            .push(("webhook-signature".into(), signatures.join(" ")));
        Ok(request)
    }
}

fn key_names(config_name: &str) -> Vec<String> {
    let value = host::config_get(config_name).unwrap_or_default();
    value.split_whitespace().map(str::to_owned).collect()
}

fn signed_content(id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
    content.extend_from_slice(id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Headers this plugin owns; copies already on the request are dropped, whatever their case.
fn is_signature_header(name: &str) -> bool {
    ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .any(|owned| name.eq_ignore_ascii_case(owned))
}

bindings::export!(StandardWebhooks with_types_in bindings);
