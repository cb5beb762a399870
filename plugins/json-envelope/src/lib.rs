//! Wraps the body in a JSON envelope carrying event metadata.
//!
//! Output: `{"type":<event_type>,"id":<notification id>,"timestamp":<unix seconds>,
//! "attempt":<n>,"<data_field>":<body>}`. A JSON body is embedded byte for byte (never parsed and
//! re-serialised, so numbers and escapes arrive as sent); any other UTF-8 body is embedded as a
//! JSON string. Sets `content-type: application/json`.
//!
//! Config: `event_type` (default `notification`), `data_field` (default `data`).

use serde_json::value::RawValue;

use bindings::api_notify::plugin::host;

#[allow(
    clippy::too_many_arguments,
    reason = "generated glue passes the request flattened"
)]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });
}

use bindings::{Guest, OutboundRequest, PluginError};

struct JsonEnvelope;

impl Guest for JsonEnvelope {
    fn transform(mut request: OutboundRequest) -> Result<OutboundRequest, PluginError> {
        let event_type = host::config_get("event_type").unwrap_or_else(|| "notification".into());
        let data_field = host::config_get("data_field").unwrap_or_else(|| "data".into());
        let data = embeddable(&request.body)?;

        let mut envelope = Vec::with_capacity(request.body.len() + 128);
        envelope.extend_from_slice(b"{\"type\":");
        envelope.extend_from_slice(quote(&event_type).as_bytes());
        envelope.extend_from_slice(b",\"id\":");
        envelope.extend_from_slice(quote(&request.notification_id).as_bytes());
        let metadata = format!(
            ",\"timestamp\":{},\"attempt\":{},",
            host::now_unix_ms() / 1000,
            request.attempt
        );
        envelope.extend_from_slice(metadata.as_bytes());
        envelope.extend_from_slice(quote(&data_field).as_bytes());
        envelope.push(b':');
        envelope.extend_from_slice(&data);
        envelope.push(b'}');

        request.body = envelope;
        request
            .headers
            .retain(|(name, _)| !name.eq_ignore_ascii_case("content-type"));
        request
            .headers
            .push(("content-type".into(), "application/json".into()));
        Ok(request)
    }
}

/// The body as a JSON value: itself when it is JSON, else a JSON string of its text.
fn embeddable(body: &[u8]) -> Result<Vec<u8>, PluginError> {
    if serde_json::from_slice::<&RawValue>(body).is_ok() {
        return Ok(body.to_vec());
    }
    let text = core::str::from_utf8(body)
        .map_err(|_| PluginError::BadRequest("body is neither JSON nor UTF-8 text".into()))?;
    Ok(quote(text).into_bytes())
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

bindings::export!(JsonEnvelope with_types_in bindings);
