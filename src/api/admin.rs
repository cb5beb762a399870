//! Operator routes: replay one or a range of finished notifications, partner state.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use super::auth::Caller;
use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::config::PartnerSettings;
use crate::model::now_ms;
use crate::store::{PartnerCounts, ReplayOutcome, ReplayRange};

/// Most notifications one range replay may schedule.
pub const MAX_RANGE_REPLAY: usize = 10_000;

/// Answer to a replay of one notification.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplayOut {
    pub id: String,
    pub request_id: String,
    pub status: String,
}

/// `POST /v1/replays` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRangeIn {
    pub partner_id: String,
    /// Accepted at or after, milliseconds since the epoch.
    pub since_ms: i64,
    /// Accepted at or before, milliseconds since the epoch.
    pub until_ms: i64,
    /// `dead` (default) or `delivered`.
    #[serde(default = "dead")]
    pub state: String,
    /// At most this many (default and maximum 10,000).
    pub limit: Option<usize>,
}

fn dead() -> String {
    "dead".into()
}

/// `POST /v1/replays` answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplayRangeOut {
    pub scheduled: u64,
}

/// `GET /v1/partners/{partner_id}` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartnerOut {
    pub partner_id: String,
    pub notifications: PartnerCounts,
    /// Last breaker state a dispatcher recorded (`closed` if none ever opened).
    pub breaker: String,
    pub breaker_changed_at_ms: Option<i64>,
    pub settings: PartnerSettings,
}

fn store_down(state: &AppState, e: &anyhow::Error) -> ApiError {
    state.metrics.database_error("admin");
    error!(error = %e, "store error in an operator route");
    ApiError::unavailable("the store is not reachable")
}

/// Deliver a delivered or dead notification again, now, with a fresh retry budget.
#[utoipa::path(
    post,
    path = "/v1/notifications/{request_id}/replay",
    params(("request_id" = String, Path, description = "The caller's request_id")),
    responses(
        (status = 202, description = "Replay scheduled", body = ReplayOut),
        (status = 404, description = "No notification with this request_id", body = ErrorBody),
        (status = 409, description = "Still pending or in flight", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Token not allowed here", body = ErrorBody),
        (status = 503, description = "The store is not reachable", body = ErrorBody),
    ),
    tag = "operations",
    security(("bearer" = []))
)]
pub(super) async fn replay_one(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(request_id): Path<String>,
) -> Result<(StatusCode, Json<ReplayOut>), ApiError> {
    caller.check_admin()?;
    match state
        .store
        .replay(&request_id, now_ms())
        .await
        .map_err(|e| store_down(&state, &e))?
    {
        ReplayOutcome::Scheduled { id } => {
            info!(request_id, notification_id = %id, "replay scheduled");
            let out = ReplayOut {
                id,
                request_id,
                status: "scheduled".into(),
            };
            Ok((StatusCode::ACCEPTED, Json(out)))
        }
        ReplayOutcome::NotFinished { state } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_finished",
            format!("{request_id} is {state}; only delivered or dead notifications are replayed"),
        )),
        ReplayOutcome::NotFound => Err(ApiError::not_found(format!(
            "no notification with request_id {request_id}"
        ))),
    }
}

/// Replay a partner's delivered or dead notifications accepted in a time range.
#[utoipa::path(
    post,
    path = "/v1/replays",
    request_body = ReplayRangeIn,
    responses(
        (status = 202, description = "Replays scheduled", body = ReplayRangeOut),
        (status = 400, description = "Invalid range", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Token not allowed here", body = ErrorBody),
        (status = 503, description = "The store is not reachable", body = ErrorBody),
    ),
    tag = "operations",
    security(("bearer" = []))
)]
pub(super) async fn replay_range(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ReplayRangeOut>), ApiError> {
    caller.check_admin()?;
    let input: ReplayRangeIn = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
    if input.state != "dead" && input.state != "delivered" {
        return Err(invalid("state", "must be dead or delivered"));
    }
    if input.since_ms > input.until_ms {
        return Err(invalid("since_ms", "must not be after until_ms"));
    }
    let limit = input.limit.unwrap_or(MAX_RANGE_REPLAY);
    if limit == 0 || limit > MAX_RANGE_REPLAY {
        return Err(invalid(
            "limit",
            &format!("must be between 1 and {MAX_RANGE_REPLAY}"),
        ));
    }
    let range = ReplayRange {
        partner_id: input.partner_id,
        since_ms: input.since_ms,
        until_ms: input.until_ms,
        state: input.state,
        limit,
    };
    let scheduled = state
        .store
        .replay_range(&range, now_ms())
        .await
        .map_err(|e| store_down(&state, &e))?;
    info!(partner_id = %range.partner_id, scheduled, "range replay scheduled");
    Ok((StatusCode::ACCEPTED, Json(ReplayRangeOut { scheduled })))
}

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError {
        field: Some(field.into()),
        ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message)
    }
}

/// A partner's backlog, breaker and effective delivery settings.
#[utoipa::path(
    get,
    path = "/v1/partners/{partner_id}",
    params(("partner_id" = String, Path, description = "The partner id")),
    responses(
        (status = 200, description = "The partner's view", body = PartnerOut),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Token not allowed here", body = ErrorBody),
        (status = 503, description = "The store is not reachable", body = ErrorBody),
    ),
    tag = "operations",
    security(("bearer" = []))
)]
pub(super) async fn partner(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(partner_id): Path<String>,
) -> Result<Json<PartnerOut>, ApiError> {
    caller.check_admin()?;
    let notifications = state
        .store
        .partner_counts(&partner_id)
        .await
        .map_err(|e| store_down(&state, &e))?;
    let breaker = state
        .store
        .breaker(&partner_id)
        .await
        .map_err(|e| store_down(&state, &e))?;
    let (breaker, breaker_changed_at_ms) = match breaker {
        Some((b, at)) => (b, Some(at)),
        None => ("closed".to_string(), None),
    };
    let settings = state.config.partner(&partner_id);
    Ok(Json(PartnerOut {
        partner_id,
        notifications,
        breaker,
        breaker_changed_at_ms,
        settings,
    }))
}
