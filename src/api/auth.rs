//! Ingest authentication: bearer tokens from configuration, stored as SHA-256 hashes, each
//! scoped to a set of partner ids and optionally to operator (admin) routes.
//!
//! With no tokens configured the API runs open, which `server::run` allows only on a loopback
//! address. A missing or unknown token is `401`; a token used outside its scope is `403`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::config::TokenConfig;

/// Who is calling, as far as the API cares.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Token name from the configuration; `None` in open mode.
    pub name: Option<String>,
    /// `None`: every partner.
    partners: Option<Vec<String>>,
    admin: bool,
}

impl Caller {
    /// The caller of an API without tokens.
    pub fn open() -> Self {
        Self {
            name: None,
            partners: None,
            admin: true,
        }
    }

    /// May this caller submit or read notifications of `partner_id`?
    pub fn may_use(&self, partner_id: &str) -> bool {
        self.partners
            .as_ref()
            .is_none_or(|p| p.iter().any(|x| x == partner_id))
    }

    /// `403` unless the caller may use `partner_id`.
    pub fn check_partner(&self, partner_id: &str) -> Result<(), ApiError> {
        if self.may_use(partner_id) {
            return Ok(());
        }
        Err(ApiError {
            field: Some("partner_id".into()),
            ..ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this token is not allowed to use partner {partner_id}"),
            )
        })
    }

    /// `403` unless the caller holds an admin token.
    pub fn check_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route needs an admin token",
        ))
    }
}

/// The configured tokens by hash; empty means open.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Caller>,
}

impl Tokens {
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let by_hash = tokens
            .iter()
            .map(|t| {
                let all = t.partners.iter().any(|p| p == "*");
                let caller = Caller {
                    name: Some(t.name.clone()),
                    partners: (!all).then(|| t.partners.clone()),
                    admin: t.admin,
                };
                (t.sha256.to_ascii_lowercase(), caller)
            })
            .collect();
        Self { by_hash }
    }

    pub fn is_open(&self) -> bool {
        self.by_hash.is_empty()
    }

    fn caller(&self, token: &str) -> Option<Caller> {
        self.by_hash.get(&hash_token(token)).cloned()
    }
}

/// Hex SHA-256 of a token, as written in `api.tokens[].sha256`.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Middleware on `/v1` routes: resolves the caller or answers `401`.
pub(super) async fn require(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = if state.tokens.is_open() {
        Some(Caller::open())
    } else {
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|token| state.tokens.caller(token.trim()))
    };
    let Some(caller) = caller else {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send a valid token as Authorization: Bearer <token>",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, secret: &str, partners: &[&str], admin: bool) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            sha256: hash_token(secret),
            partners: partners.iter().map(|p| p.to_string()).collect(),
            admin,
        }
    }

    #[test]
    fn tokens_resolve_by_hash_with_their_scope() {
        let tokens = Tokens::new(&[
            token("billing", "s1", &["acme"], false),
            token("ops", "s2", &["*"], true),
        ]);
        let billing = tokens.caller("s1").expect("known token");
        assert!(
            billing.may_use("acme") && !billing.may_use("globex"),
            "scoped to acme only"
        );
        assert!(billing.check_admin().is_err(), "not an admin token");
        let ops = tokens.caller("s2").expect("known token");
        assert!(
            ops.may_use("anyone") && ops.check_admin().is_ok(),
            "wildcard admin token"
        );
        assert!(
            tokens.caller("s3").is_none(),
            "unknown tokens resolve to nobody"
        );
    }
}
