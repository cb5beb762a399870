//! Route handlers.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::json;
use tracing::{error, warn};

use super::auth::Caller;
use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::metrics::{self, IngestOutcome};
use crate::model::{NotificationIn, parse_notification};
use crate::queue::{QueueError, Submitted};
use crate::store::NotificationStatus;

/// Bound on each readiness check, so a dead dependency answers 503 promptly.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long ingest waits for the duplicate lookup before submitting anyway (the intake
/// deduplicates in any case).
const LOOKUP_BUDGET: std::time::Duration = std::time::Duration::from_millis(250);

/// Answer to an ingest.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AcceptedOut {
    /// The notification id: sent to the partner as `webhook-id`.
    pub id: String,
    pub request_id: String,
    /// Always `accepted`.
    pub status: &'static str,
    /// Present and true when the same `request_id` with the same content was already accepted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

type IngestAnswer = Result<(StatusCode, Json<AcceptedOut>), ApiError>;

/// Accept a notification for delivery.
#[utoipa::path(
    post,
    path = "/v1/notifications",
    request_body = NotificationIn,
    responses(
        (status = 202, description = "Accepted: the queue acknowledged it", body = AcceptedOut),
        (status = 200, description = "Already accepted with the same content", body = AcceptedOut),
        (status = 400, description = "Malformed or invalid", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Token not allowed for this partner", body = ErrorBody),
        (status = 409, description = "request_id reused with other content", body = ErrorBody),
        (status = 413, description = "Body or a field too large", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Endpoint refused by the address guard", body = ErrorBody),
        (status = 503, description = "The queue did not acknowledge; retry with the same \
            request_id after Retry-After", body = ErrorBody),
    ),
    tag = "notifications",
    security(("bearer" = []))
)]
pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> IngestAnswer {
    let answer = ingest(&state, &caller, &headers, body).await;
    let outcome = match &answer {
        Ok((StatusCode::OK, _)) => IngestOutcome::Duplicate,
        Ok(_) => IngestOutcome::Accepted,
        Err(e) if e.status == StatusCode::CONFLICT => IngestOutcome::Conflict,
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => IngestOutcome::Unavailable,
        Err(_) => IngestOutcome::Rejected,
    };
    state.metrics.ingest(outcome);
    answer
}

async fn ingest(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> IngestAnswer {
    require_json(headers)?;
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            "too_large",
            format!("request body rejected: {}", e.body_text()),
        )
    })?;
    let notification = parse_notification(&body, &state.limits, &state.guard)?;
    caller.check_partner(&notification.partner_id)?;
    let request_id = notification.request_id.clone();
    tracing::Span::current().record("request_id", request_id.as_str());
    let answer = |status, id: String, duplicate| {
        Ok((
            status,
            Json(AcceptedOut {
                id,
                request_id: request_id.clone(),
                status: "accepted",
                duplicate,
            }),
        ))
    };

    // The queue, not the store, decides acceptance: a slow or absent store must not hold ingest.
    let lookup = tokio::time::timeout(LOOKUP_BUDGET, state.store.lookup(&request_id))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the store did not answer in time")));
    match lookup {
        Ok(Some((id, hash))) if hash == notification.content_hash => {
            return answer(StatusCode::OK, id, true);
        }
        Ok(Some(_)) => return Err(ApiError::conflict(&request_id)),
        Ok(None) => {}
        Err(e) => {
            state.metrics.database_error("lookup");
            warn!(error = %e, "duplicate lookup failed; submitting anyway");
        }
    }

    let id = notification.id.clone();
    match state.queue.submit(notification).await {
        Ok(Submitted::Accepted) => answer(StatusCode::ACCEPTED, id, false),
        Ok(Submitted::Duplicate { id }) => answer(StatusCode::OK, id, true),
        Ok(Submitted::Conflict { .. }) => Err(ApiError::conflict(&request_id)),
        Err(e @ (QueueError::Timeout | QueueError::Unavailable(_))) => {
            warn!(error = %e, request_id = %request_id, "queue did not accept; answering 503");
            Err(ApiError::unavailable(
                "the queue did not accept the notification; retry with the same request_id",
            ))
        }
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    match content_type {
        Some(ct)
            if ct
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json") =>
        {
            Ok(())
        }
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the notification as JSON with Content-Type: application/json",
        )),
    }
}

/// State, schedule and attempt log of one notification.
#[utoipa::path(
    get,
    path = "/v1/notifications/{request_id}",
    params(("request_id" = String, Path, description = "The caller's request_id")),
    responses(
        (status = 200, description = "Found", body = NotificationStatus),
        (status = 404, description = "No notification with this request_id", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Token not allowed here", body = ErrorBody),
        (status = 503, description = "The store is not reachable", body = ErrorBody),
    ),
    tag = "notifications",
    security(("bearer" = []))
)]
pub(super) async fn status(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(request_id): Path<String>,
) -> Result<Json<NotificationStatus>, ApiError> {
    tracing::Span::current().record("request_id", request_id.as_str());
    match state.store.status(&request_id).await {
        Ok(Some(status)) => {
            caller.check_partner(&status.partner_id)?;
            Ok(Json(status))
        }
        Ok(None) => Err(ApiError::not_found(format!(
            "no notification with request_id {request_id}"
        ))),
        Err(e) => {
            state.metrics.database_error("status");
            error!(error = %e, "status lookup failed");
            Err(ApiError::unavailable("the store is not reachable"))
        }
    }
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Object)))]
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// The store answers (and the broker, in Kafka mode), each within two seconds.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready to accept and deliver", body = Object),
    (status = 503, description = "The store or the broker is not reachable", body = ErrorBody),
))]
pub(super) async fn readyz(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let reason = match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {READY_TIMEOUT:?}")),
    };
    if let Some(reason) = reason {
        state.metrics.database_error("ping");
        warn!(error = %reason, "readiness: the store is not reachable");
        return Err(ApiError::unavailable("the store is not reachable"));
    }
    if let crate::queue::Queue::Kafka(kafka) = &state.queue {
        let kafka = kafka.clone();
        let checked = tokio::task::spawn_blocking(move || kafka.check()).await;
        if !matches!(checked, Ok(Ok(()))) {
            return Err(ApiError::unavailable("the Kafka broker is not reachable"));
        }
    }
    Ok(Json(json!({"status": "ready"})))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
pub(super) async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
}
