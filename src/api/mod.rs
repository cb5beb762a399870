//! The HTTP API: ingest, status, health, metrics and the OpenAPI document.
//!
//! Handlers validate, then hand the notification to the [`Queue`]; they answer `202` only after
//! the queue acknowledged it. Routes are built by [`router`] so tests can drive them without a
//! socket.

mod admin;
pub mod auth;
mod error;
mod handlers;
mod openapi;

pub use admin::{MAX_RANGE_REPLAY, PartnerOut, ReplayOut, ReplayRangeIn, ReplayRangeOut};
pub use handlers::AcceptedOut;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware;
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use openapi::{ApiDoc, openapi_json};

use crate::guard::AddressGuard;
use crate::metrics::Metrics;
use crate::model::Limits;
use crate::queue::Queue;
use crate::store::Store;

/// What handlers share.
pub struct AppState {
    pub queue: Queue,
    pub store: Store,
    pub limits: Limits,
    pub guard: AddressGuard,
    pub max_request_bytes: usize,
    pub metrics: Arc<Metrics>,
    /// For partner settings in operator answers.
    pub config: crate::config::Config,
    pub tokens: auth::Tokens,
}

/// All routes.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.max_request_bytes;
    let v1 = Router::new()
        .route("/v1/notifications", post(handlers::create))
        .route("/v1/notifications/{request_id}", get(handlers::status))
        .route(
            "/v1/notifications/{request_id}/replay",
            post(admin::replay_one),
        )
        .route("/v1/replays", post(admin::replay_range))
        .route("/v1/partners/{partner_id}", get(admin::partner))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require));
    Router::new()
        .merge(v1)
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let route = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("unmatched", MatchedPath::as_str);
                tracing::info_span!(
                    "http",
                    method = %request.method(),
                    route,
                    request_id = tracing::field::Empty,
                )
            }),
        )
        .with_state(state)
}
