//! Ingest validation: parse a request body into a [`NewNotification`] or name the wrong field.

use std::net::IpAddr;
use std::str::FromStr;

use axum::http::{HeaderName, HeaderValue};

use super::{Endpoint, EndpointIn, NewNotification, NotificationIn, content_hash, now_ms};
use crate::guard::AddressGuard;

/// Size and count limits on ingest.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_endpoints: usize,
    pub max_headers: usize,
    pub max_header_value_bytes: usize,
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_endpoints: 10,
            max_headers: 64,
            max_header_value_bytes: 8 * 1024,
            max_body_bytes: 512 * 1024,
        }
    }
}

/// What is wrong with a request, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `invalid_json`, `invalid_field`, `too_large`, `endpoint_refused`.
    pub code: &'static str,
    /// Path of the offending field, e.g. `endpoints[1].ip`.
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: "invalid_field",
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// Connection, framing and hop-by-hop headers: the HTTP client sets them, neither callers nor
/// plugins may.
pub const HOST_OWNED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Further headers callers may not set: the gateway's own (plugins may set the signature ones).
const GATEWAY_HEADERS: &[&str] = &[
    "expect",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "api-notify-request-id",
];

/// Parses and validates one ingest body.
pub fn parse_notification(
    bytes: &[u8],
    limits: &Limits,
    guard: &AddressGuard,
) -> Result<NewNotification, FieldError> {
    let input = decode(bytes)?;
    let request_id = check_id("request_id", &input.request_id, 128)?;
    let partner_id = check_id("partner_id", &input.partner_id, 64)?;
    if partner_id.starts_with('.') {
        return Err(FieldError::invalid("partner_id", "must not start with '.'"));
    }
    let endpoints = check_endpoints(&input.endpoints, limits, guard)?;
    let headers = check_headers(&input, limits)?;
    let body = body_text(&input)?;
    if body.len() > limits.max_body_bytes {
        return Err(FieldError {
            code: "too_large",
            field: Some("body".into()),
            message: format!(
                "body is {} bytes; the limit is {}",
                body.len(),
                limits.max_body_bytes
            ),
        });
    }
    let content_hash = content_hash(&partner_id, &endpoints, &headers, &body);
    Ok(NewNotification {
        id: NewNotification::new_id(),
        request_id,
        partner_id,
        content_hash,
        endpoints,
        headers,
        body,
        accepted_at_ms: now_ms(),
    })
}

fn decode(bytes: &[u8]) -> Result<NotificationIn, FieldError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let input: NotificationIn = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        FieldError {
            code: "invalid_json",
            field,
            message: e.into_inner().to_string(),
        }
    })?;
    de.end().map_err(|e| FieldError {
        code: "invalid_json",
        field: None,
        message: format!("trailing data after the JSON object: {e}"),
    })?;
    Ok(input)
}

/// Ids appear in URLs and logs: printable ASCII without separators that need escaping.
fn check_id(field: &str, value: &str, max_len: usize) -> Result<String, FieldError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._:~@+=-".contains(c);
    if value.is_empty() || value.len() > max_len {
        return Err(FieldError::invalid(
            field,
            format!("must be 1 to {max_len} characters"),
        ));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(FieldError::invalid(
            field,
            format!("character {bad:?} is not allowed; use letters, digits and . _ : ~ @ + = -"),
        ));
    }
    Ok(value.to_string())
}

fn check_endpoints(
    input: &[EndpointIn],
    limits: &Limits,
    guard: &AddressGuard,
) -> Result<Vec<Endpoint>, FieldError> {
    if input.is_empty() || input.len() > limits.max_endpoints {
        return Err(FieldError::invalid(
            "endpoints",
            format!("give 1 to {} endpoints", limits.max_endpoints),
        ));
    }
    input
        .iter()
        .enumerate()
        .map(|(i, e)| check_endpoint(i, e, guard))
        .collect()
}

fn check_endpoint(i: usize, e: &EndpointIn, guard: &AddressGuard) -> Result<Endpoint, FieldError> {
    let at = |name: &str| format!("endpoints[{i}].{name}");
    let ip = IpAddr::from_str(&e.ip).map_err(|_| {
        FieldError::invalid(
            at("ip"),
            format!("{:?} is not an IPv4 or IPv6 address literal", e.ip),
        )
    })?;
    let port = u16::try_from(e.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::invalid(at("port"), "must be between 1 and 65535"))?;
    let path = e.path.clone().unwrap_or_else(|| "/".to_string());
    let path_ok = path.starts_with('/')
        && path.len() <= 2048
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b'#');
    if !path_ok {
        return Err(FieldError::invalid(
            at("path"),
            "must start with '/' and hold at most 2048 printable ASCII characters without '#'",
        ));
    }
    guard.check(ip).map_err(|refusal| FieldError {
        code: "endpoint_refused",
        field: Some(at("ip")),
        message: format!("{ip} is refused: {refusal}"),
    })?;
    Ok(Endpoint {
        ip,
        port,
        path,
        tls: e.tls,
    })
}

fn check_headers(
    input: &NotificationIn,
    limits: &Limits,
) -> Result<Vec<(String, String)>, FieldError> {
    if input.headers.len() > limits.max_headers {
        return Err(FieldError::invalid(
            "headers",
            format!("at most {} headers are allowed", limits.max_headers),
        ));
    }
    let mut out: Vec<(String, String)> = Vec::with_capacity(input.headers.len());
    for (name, value) in &input.headers {
        let field = format!("headers.{name}");
        let lower = name.to_ascii_lowercase();
        if HeaderName::from_bytes(lower.as_bytes()).is_err() {
            return Err(FieldError::invalid(
                field,
                "is not a valid HTTP header name",
            ));
        }
        let reserved = HOST_OWNED_HEADERS
            .iter()
            .chain(GATEWAY_HEADERS)
            .any(|h| *h == lower);
        if reserved || lower.starts_with("proxy-") {
            return Err(FieldError::invalid(
                field,
                "is set by the gateway and may not be given",
            ));
        }
        if value.len() > limits.max_header_value_bytes || HeaderValue::from_str(value).is_err() {
            return Err(FieldError::invalid(
                field,
                format!(
                    "value must be visible ASCII or spaces, at most {} bytes",
                    limits.max_header_value_bytes
                ),
            ));
        }
        if out.iter().any(|(n, _)| *n == lower) {
            return Err(FieldError::invalid(
                field,
                "is given twice (names are case-insensitive)",
            ));
        }
        out.push((lower, value.clone()));
    }
    out.sort();
    Ok(out)
}

/// Deepest JSON nesting accepted in a body: receivers' parsers often recurse.
const MAX_BODY_DEPTH: usize = 64;

fn body_text(input: &NotificationIn) -> Result<String, FieldError> {
    let raw = input.body.get();
    if raw.starts_with('"') {
        return serde_json::from_str::<String>(raw)
            .map_err(|e| FieldError::invalid("body", format!("invalid string: {e}")));
    }
    if json_depth(raw) > MAX_BODY_DEPTH {
        return Err(FieldError::invalid(
            "body",
            format!("nests deeper than {MAX_BODY_DEPTH} levels"),
        ));
    }
    Ok(raw.to_string())
}

/// Greatest nesting of arrays and objects in valid JSON text (brackets inside strings ignored).
fn json_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<NewNotification, FieldError> {
        let guard = AddressGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        parse_notification(json.as_bytes(), &Limits::default(), &guard)
    }

    fn with_body(body: &str) -> String {
        format!(
            r#"{{"request_id":"r-1","partner_id":"p","endpoints":[{{"ip":"127.0.0.1","port":9}}],
               "headers":{{"Content-Type":"application/json"}},"body":{body}}}"#
        )
    }

    #[test]
    fn json_body_is_kept_byte_for_byte_with_big_integers() {
        let body = r#"{"zeta":1, "big":12345678901234567890123,"n":1e2,"u":"https:\/\/x"}"#;
        let n = parse(&with_body(body)).expect("valid notification");
        assert_eq!(n.body, body, "the JSON body must be sent exactly as given");
    }

    #[test]
    fn string_body_is_sent_decoded() {
        let n = parse(&with_body(r#""{\"a\":  1}\n""#)).expect("valid notification");
        assert_eq!(
            n.body, "{\"a\":  1}\n",
            "a string body must be sent as its decoded text"
        );
    }

    #[test]
    fn wrong_fields_are_named() {
        let cases = [
            (
                r#"{"request_id":"r","partner_id":"p","endpoints":[{"ip":"127.1","port":9}],"body":1}"#,
                "endpoints[0].ip",
            ),
            (
                r#"{"request_id":"r","partner_id":"p","endpoints":[{"ip":"::1:18022","port":9}],"body":1}"#,
                "endpoints[0].ip",
            ),
            (
                r#"{"request_id":"r","partner_id":"p","endpoints":[{"ip":"127.0.0.1","port":70000}],"body":1}"#,
                "endpoints[0].port",
            ),
            (
                r#"{"request_id":"r r","partner_id":"p","endpoints":[{"ip":"127.0.0.1","port":9}],"body":1}"#,
                "request_id",
            ),
            (
                r#"{"request_id":"r","partner_id":"p","endpoints":[],"body":1}"#,
                "endpoints",
            ),
            (
                r#"{"request_id":"r","partner_id":"p","endpoints":[{"ip":"127.0.0.1","port":9}],"headers":{"Host":"x"},"body":1}"#,
                "headers.Host",
            ),
            (
                r#"{"request_id":"r","partner_id":"p","endpoints":[{"ip":"127.0.0.1","port":"9"}],"body":1}"#,
                "endpoints[0].port",
            ),
            (
                r#"{"request_id":"r","partner_id":"p","endpoints":[{"ip":"127.0.0.1","port":9}]}"#,
                ".",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).expect_err("invalid input must be rejected");
            let named = err.field.clone().unwrap_or_else(|| ".".into());
            assert!(
                named.starts_with(field),
                "{json}: expected field {field}, got {err:?}"
            );
        }
    }

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert_eq!(
            json_depth(r#"{"a":[1,{"b":"[[[{"}]}"#),
            3,
            "brackets in strings do not count"
        );
        assert_eq!(
            json_depth(r#""\\\"[""#),
            0,
            "escaped quotes keep the string open"
        );
        assert_eq!(json_depth("1"), 0);
    }

    #[test]
    fn refused_endpoint_names_the_address() {
        let json = r#"{"request_id":"r","partner_id":"p","endpoints":[{"ip":"169.254.169.254","port":80}],"body":1}"#;
        let err = parse(json).expect_err("metadata address must be refused");
        assert_eq!(
            err.code, "endpoint_refused",
            "refusal code expected: {err:?}"
        );
        assert!(
            err.message.contains("169.254.169.254"),
            "message should name the address"
        );
    }

    #[test]
    fn same_content_gives_same_hash_and_other_content_another() {
        let a = parse(&with_body("1")).unwrap();
        let b = parse(&with_body("1")).unwrap();
        let c = parse(&with_body("2")).unwrap();
        assert_eq!(
            a.content_hash, b.content_hash,
            "identical requests must hash alike"
        );
        assert_ne!(
            a.content_hash, c.content_hash,
            "different bodies must hash differently"
        );
        assert_ne!(a.id, b.id, "each acceptance gets its own id");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let guard = AddressGuard::default();
                let _ = parse_notification(&bytes, &Limits::default(), &guard);
            }

            #[test]
            fn valid_requests_parse_and_string_bodies_arrive_unchanged(
                request_id in "[A-Za-z0-9._:~@+=-]{1,128}",
                partner_id in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}",
                port in 1u32..=65535,
                body in "\\PC{0,200}",
            ) {
                let json = serde_json::json!({
                    "request_id": request_id, "partner_id": partner_id,
                    "endpoints": [{"ip": "203.0.113.7", "port": port}], "body": body,
                });
                let n = parse_notification(json.to_string().as_bytes(), &Limits::default(), &AddressGuard::default())
                    .expect("a valid request should parse");
                prop_assert_eq!(n.body, body);
                prop_assert_eq!(n.endpoints[0].port as u32, port);
            }

            #[test]
            fn out_of_range_ports_are_refused_by_name(port in prop_oneof![Just(0u64), 65_536u64..u64::from(u32::MAX)]) {
                let json = format!(r#"{{"request_id":"r","partner_id":"p","endpoints":[{{"ip":"203.0.113.7","port":{port}}}],"body":1}}"#);
                let err = parse_notification(json.as_bytes(), &Limits::default(), &AddressGuard::default())
                    .expect_err("an out-of-range port is refused");
                prop_assert_eq!(err.field.as_deref(), Some("endpoints[0].port"));
            }

            #[test]
            fn deep_nesting_is_refused_not_crashed(depth in 65usize..5_000) {
                let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                let json = format!(r#"{{"request_id":"r","partner_id":"p","endpoints":[{{"ip":"203.0.113.7","port":1}}],"body":{body}}}"#);
                let parsed = parse_notification(json.as_bytes(), &Limits::default(), &AddressGuard::default());
                let err = parsed.expect_err("deep nesting is refused");
                prop_assert_eq!(err.field.as_deref(), Some("body"));
            }
        }
    }
}
