//! Control-plane errors: every one answers `{"code": <status>, "message": "..."}`,
//! the shape the E2B SDKs parse.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id:?} not found: it does not exist, was killed, or belongs to another API key"),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key: send one of the server's keys (DORMOUSE_API_KEYS) in X-API-KEY",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

/// Maps a dormouse error to the status E2B would answer with. Errors of the
/// caller's making are 4xx; the sandbox or host failing is 5xx.
impl From<dormouse::Error> for ApiError {
    fn from(e: dormouse::Error) -> Self {
        use dormouse::Error as E;
        let status = match &e {
            E::NotFound { .. } => StatusCode::NOT_FOUND,
            E::TemplateNotFound { .. } => StatusCode::NOT_FOUND,
            E::SnapshotNotFound { .. } => StatusCode::NOT_FOUND,
            E::InvalidConfig(_) => StatusCode::BAD_REQUEST,
            E::AlreadyPaused { .. } | E::NotPaused { .. } | E::Busy { .. } => StatusCode::CONFLICT,
            E::SandboxPaused { .. } => StatusCode::CONFLICT,
            E::SnapshotExists { .. } => StatusCode::CONFLICT,
            E::Incompatible { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            log::warn!("request failed: {e}");
        }
        Self::new(status, e.to_string())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, format!("invalid request body: {}", e.body_text()))
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        Self::bad_request(format!("invalid query: {}", e.body_text()))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
