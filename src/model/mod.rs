//! The domain's shapes: what callers send (`…In`), what travels through the queue
//! ([`NewNotification`]) and what the dispatcher works on ([`Endpoint`]).
//!
//! Validation lives in [`validate`]: everything a caller can get wrong is checked once, at
//! ingest, and answered with the field that is wrong. What passes is trusted downstream.

mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub use validate::{FieldError, HOST_OWNED_HEADERS, Limits, parse_notification};

/// `POST /v1/notifications` body as sent by callers.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotificationIn {
    pub request_id: String,
    pub partner_id: String,
    pub endpoints: Vec<EndpointIn>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Kept as the caller's exact text: a JSON string is sent decoded, anything else verbatim.
    #[schema(value_type = serde_json::Value)]
    pub body: Box<RawValue>,
}

/// One target as sent by callers.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointIn {
    /// An IP literal; host names are not accepted (there is no resolution to guard).
    pub ip: String,
    pub port: u32,
    pub path: Option<String>,
    #[serde(default)]
    pub tls: bool,
}

/// A validated target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub path: String,
    pub tls: bool,
}

impl Endpoint {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// The URL the request goes to (IPv6 in brackets).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.socket_addr(), self.path)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// A validated notification, as it travels from ingest through the queue into the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewNotification {
    /// Time-ordered id; also the `webhook-id` partners see.
    pub id: String,
    pub request_id: String,
    pub partner_id: String,
    /// SHA-256 (hex) of everything that defines the delivery; tells a repeat from a conflict.
    pub content_hash: String,
    pub endpoints: Vec<Endpoint>,
    /// Header names in lower case, sorted.
    pub headers: Vec<(String, String)>,
    /// The exact bytes to POST (always UTF-8, since they came from JSON).
    pub body: String,
    pub accepted_at_ms: i64,
}

impl NewNotification {
    /// A fresh time-ordered notification id.
    pub fn new_id() -> String {
        format!("msg_{}", uuid::Uuid::now_v7().simple())
    }
}

/// Hash of the delivery-defining content, independent of the id and the time of acceptance.
pub(crate) fn content_hash(
    partner_id: &str,
    endpoints: &[Endpoint],
    headers: &[(String, String)],
    body: &str,
) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(partner_id.as_bytes());
    for e in endpoints {
        field(e.url().as_bytes());
    }
    field(b"|");
    for (name, value) in headers {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    field(body.as_bytes());
    hex::encode(h.finalize())
}

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
