//! The API's one error type and its JSON shape: `{"error": {"code", "message", "field"}}`.
//!
//! Messages are written for the caller; internal error text is logged, never returned.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::model::FieldError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds for `Retry-After` (503 answers).
    pub retry_after_secs: Option<u32>,
}

/// The JSON shape of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ErrorBody<'a> {
    error: ErrorOut<'a>,
}

/// What went wrong, for the caller.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ErrorOut<'a> {
    /// Stable machine-readable code, e.g. `invalid`, `conflict`, `unavailable`.
    code: &'a str,
    /// Human-readable explanation.
    message: &'a str,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_secs: None,
        }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// The queue or store could not take the request now; the caller should retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the gateway log",
        )
    }

    pub fn conflict(request_id: &str) -> Self {
        Self {
            field: Some("request_id".into()),
            ..Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("request_id {request_id} was already accepted with different content"),
            )
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        let status = match e.code {
            "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            "endpoint_refused" => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        Self {
            field: e.field,
            ..Self::new(status, e.code, e.message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorOut {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
