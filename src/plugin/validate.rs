//! Checks on what a plugin returns before the gateway sends it.
//!
//! A plugin must not be a way around the address guard or the host's ownership of framing:
//! the scheme, host, port and credentials of the URL stay as the dispatcher set them, the method
//! comes from an allow-list, and headers that describe the connection or the body's length are
//! the HTTP client's business. Ids and the attempt number are the host's and are restored.

use http::{HeaderName, HeaderValue};
use url::Url;

use super::config::Limits;
use super::{OutboundRequest, PluginError};

/// Methods a plugin may return.
const ALLOWED_METHODS: &[&str] = &["POST", "PUT", "PATCH"];

use crate::model::HOST_OWNED_HEADERS;

/// Returns `output` with the host's ids restored, or why it may not be sent.
pub(crate) fn check_output(
    input: &OutboundRequest,
    mut output: OutboundRequest,
    limits: &Limits,
) -> Result<OutboundRequest, PluginError> {
    check_method(&output.method)?;
    check_url(&input.url, &output.url)?;
    check_headers(&output.headers, limits)?;
    if output.body.len() as u64 > limits.max_body_bytes {
        return Err(invalid(format!(
            "body of {} bytes is over the limit of {} bytes",
            output.body.len(),
            limits.max_body_bytes
        )));
    }

    output.partner_id.clone_from(&input.partner_id);
    output.request_id.clone_from(&input.request_id);
    output.notification_id.clone_from(&input.notification_id);
    output.attempt = input.attempt;
    Ok(output)
}

fn check_method(method: &str) -> Result<(), PluginError> {
    if ALLOWED_METHODS.contains(&method) {
        return Ok(());
    }
    Err(invalid(format!(
        "method `{}` is not one of POST, PUT, PATCH",
        super::runtime::cut(method)
    )))
}

fn check_url(before: &str, after: &str) -> Result<(), PluginError> {
    let before =
        Url::parse(before).map_err(|e| invalid(format!("input url does not parse: {e}")))?;
    let after = Url::parse(after).map_err(|e| invalid(format!("url does not parse: {e}")))?;
    let same_target = before.scheme() == after.scheme()
        && before.host_str() == after.host_str()
        && before.port_or_known_default() == after.port_or_known_default()
        && before.username() == after.username()
        && before.password() == after.password();
    if same_target {
        return Ok(());
    }
    Err(invalid(
        "url scheme, host, port or credentials changed".to_owned(),
    ))
}

fn check_headers(headers: &[(String, String)], limits: &Limits) -> Result<(), PluginError> {
    if headers.len() as u64 > u64::from(limits.max_headers) {
        return Err(invalid(format!(
            "{} headers is over the limit of {}",
            headers.len(),
            limits.max_headers
        )));
    }
    let mut total_bytes = 0u64;
    for (name, value) in headers {
        check_header(name, value)?;
        total_bytes += (name.len() + value.len()) as u64;
    }
    if total_bytes > limits.max_header_bytes {
        return Err(invalid(format!(
            "headers of {total_bytes} bytes are over the limit"
        )));
    }
    Ok(())
}

fn check_header(name: &str, value: &str) -> Result<(), PluginError> {
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        invalid(format!(
            "header name `{}` is not valid",
            name.escape_debug()
        ))
    })?;
    if HOST_OWNED_HEADERS.contains(&parsed.as_str()) {
        return Err(invalid(format!(
            "header `{parsed}` is set by the gateway, not by plugins"
        )));
    }
    HeaderValue::from_str(value)
        .map_err(|_| invalid(format!("value of header `{parsed}` is not valid")))?;
    Ok(())
}

fn invalid(reason: String) -> PluginError {
    PluginError::InvalidOutput(super::runtime::cut(&reason))
}

#[cfg(test)]
mod tests {
    use super::super::config::PluginsConfig;
    use super::*;

    fn request() -> OutboundRequest {
        OutboundRequest {
            method: "POST".to_owned(),
            url: "https://partner.example:8443/hook".to_owned(),
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: b"{}".to_vec(),
            partner_id: "p".to_owned(),
            request_id: "r".to_owned(),
            notification_id: "n".to_owned(),
            attempt: 1,
        }
    }

    fn check(output: OutboundRequest) -> Result<OutboundRequest, PluginError> {
        check_output(&request(), output, &PluginsConfig::default().limits())
    }

    #[test]
    fn path_and_headers_may_change_and_ids_are_restored() {
        let mut output = request();
        output.url = "https://partner.example:8443/other?x=1".to_owned();
        output
            .headers
            .push(("Webhook-Id".to_owned(), "n".to_owned()));
        output.notification_id = "forged".to_owned();

        let checked = check(output).expect("a new path and a new header are allowed");
        assert_eq!(
            checked.notification_id, "n",
            "the host's notification id should be restored"
        );
    }

    #[test]
    fn target_changes_are_rejected() {
        for url in [
            "https://evil.example:8443/hook",
            "https://partner.example/hook",
            "http://partner.example:8443/hook",
            "https://user:pw@partner.example:8443/hook",
            "not a url",
        ] {
            let output = OutboundRequest {
                url: url.to_owned(),
                ..request()
            };
            assert!(
                check(output).is_err(),
                "changing the target to {url} should be rejected"
            );
        }
    }

    #[test]
    fn methods_outside_the_allow_list_are_rejected() {
        for method in ["GET", "DELETE", "post", "CONNECT"] {
            let output = OutboundRequest {
                method: method.to_owned(),
                ..request()
            };
            assert!(check(output).is_err(), "method {method} should be rejected");
        }
    }

    #[test]
    fn host_owned_and_malformed_headers_are_rejected() {
        let bad = [
            ("Content-Length", "3"),
            ("HOST", "evil"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
            ("bad name", "x"),
            ("x:y", "x"),
            ("x-ok", "a\r\nX-Injected: 1"),
        ];
        for (name, value) in bad {
            let mut output = request();
            output.headers.push((name.to_owned(), value.to_owned()));
            assert!(
                check(output).is_err(),
                "header {name:?}: {value:?} should be rejected"
            );
        }
    }

    #[test]
    fn too_many_headers_or_too_big_a_body_is_rejected() {
        let mut many = request();
        many.headers = (0..65)
            .map(|i| (format!("x-{i}"), "v".to_owned()))
            .collect();
        let big = OutboundRequest {
            body: vec![b'a'; (4 << 20) + 1],
            ..request()
        };

        assert!(
            check(many).is_err(),
            "65 headers should be over the default limit of 64"
        );
        assert!(
            check(big).is_err(),
            "a body over 4 MiB should be over the default limit"
        );
    }
}
