//! Renames, removes and adds headers, driven by config. Names match case-insensitively.
//!
//! Config, applied in this order:
//! - `remove`: space-separated header names to drop.
//! - `rename`: one `old: new` per line; the value is kept.
//! - `add`: one `name: value` per line; replaces any header of that name.

use bindings::api_notify::plugin::host;

#[allow(
    clippy::too_many_arguments,
    reason = "generated glue passes the request flattened"
)]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });
}

use bindings::{Guest, OutboundRequest, PluginError};

struct HeaderMapper;

impl Guest for HeaderMapper {
    fn transform(mut request: OutboundRequest) -> Result<OutboundRequest, PluginError> {
        let remove = host::config_get("remove").unwrap_or_default();
        let rename = pairs("rename")?;
        let add = pairs("add")?;

        for name in remove.split_whitespace() {
            request
                .headers
                .retain(|(header, _)| !header.eq_ignore_ascii_case(name));
        }
        for (old, new) in &rename {
            for (header, _) in request
                .headers
                .iter_mut()
                .filter(|(h, _)| h.eq_ignore_ascii_case(old))
            {
                header.clone_from(new);
            }
        }
        for (name, value) in add {
            request
                .headers
                .retain(|(header, _)| !header.eq_ignore_ascii_case(&name));
            request.headers.push((name, value));
        }
        Ok(request)
    }
}

/// The `name: value` lines of config value `config_name`.
fn pairs(config_name: &str) -> Result<Vec<(String, String)>, PluginError> {
    let text = host::config_get(config_name).unwrap_or_default();
    let lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
    lines
        .map(|line| {
            let (name, value) = line.split_once(':').ok_or_else(|| {
                PluginError::BadConfig(format!(
                    "`{config_name}` line `{line}` is not `name: value`"
                ))
            })?;
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

bindings::export!(HeaderMapper with_types_in bindings);
