//! Route handlers.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use serde_json::json;
use tracing::{error, warn};

use super::auth::Caller;
use super::{ApiError, AppState};
use crate::model::parse_notification;
use crate::queue::{QueueError, Submitted};
use crate::store::NotificationStatus;

/// Answer to an ingest.
#[derive(Debug, Serialize)]
pub struct AcceptedOut {
    pub id: String,
    pub request_id: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// `POST /v1/notifications`
pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AcceptedOut>), ApiError> {
    require_json(&headers)?;
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

    match state.store.lookup(&request_id).await {
        Ok(Some((id, hash))) if hash == notification.content_hash => {
            return answer(StatusCode::OK, id, true);
        }
        Ok(Some(_)) => return Err(ApiError::conflict(&request_id)),
        Ok(None) => {}
        // The queue, not the store, decides acceptance: a store outage must not stop ingest.
        Err(e) => warn!(error = %e, "duplicate lookup failed; submitting anyway"),
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

/// `GET /v1/notifications/{request_id}`
pub(super) async fn status(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(request_id): Path<String>,
) -> Result<Json<NotificationStatus>, ApiError> {
    match state.store.status(&request_id).await {
        Ok(Some(status)) => {
            caller.check_partner(&status.partner_id)?;
            Ok(Json(status))
        }
        Ok(None) => Err(ApiError::not_found(format!(
            "no notification with request_id {request_id}"
        ))),
        Err(e) => {
            error!(error = %e, "status lookup failed");
            Err(ApiError::unavailable("the store is not reachable"))
        }
    }
}

/// `GET /healthz`: the process is alive.
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the store answers (and the broker, in Kafka mode).
pub(super) async fn readyz(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Err(e) = state.store.ping().await {
        warn!(error = %e, "readiness: store not reachable");
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
