//! A starting point for your own plugin: copy this directory, rename the crate, edit
//! `transform`. See docs/plugins.md for building, checking and deploying.
//!
//! This one adds `x-greeting: <config greeting>` and logs once. What a plugin can use is in
//! `wit/plugin.wit`: config values, HMAC/Ed25519 signing with keys the operator granted, the
//! host's time and logging. There are no files, network, environment or clock besides these, and
//! each call has a time and memory budget; keep to `BTreeMap` (a `HashMap` needs random numbers,
//! which plugins do not get).

use bindings::api_notify::plugin::host;

#[allow(
    clippy::too_many_arguments,
    reason = "generated glue passes the request flattened"
)]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });
}

use bindings::{Guest, OutboundRequest, PluginError};

struct Template;

impl Guest for Template {
    fn transform(mut request: OutboundRequest) -> Result<OutboundRequest, PluginError> {
        let greeting = host::config_get("greeting").unwrap_or_else(|| "hello".into());
        host::log(
            host::Level::Debug,
            &format!("greeting attempt {}", request.attempt),
        );

        request.headers.push(("x-greeting".into(), greeting));
        Ok(request)
    }
}

bindings::export!(Template with_types_in bindings);
