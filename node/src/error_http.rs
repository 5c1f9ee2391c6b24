//! The one HTTP error type of the node ([`ApiError`]) and the JSON extractor whose rejections
//! come out in the same OpenAI envelope.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use helexa_node_api::{ErrorEnvelope, error_code};

use crate::backend::BackendError;
use crate::source::SourceError;

/// An error answer: status, OpenAI envelope, optional `Retry-After` seconds.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub envelope: ErrorEnvelope,
    /// `Retry-After` header, seconds.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            envelope: ErrorEnvelope::new(kind, message),
            retry_after: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending field.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.envelope = e.envelope.with_param(param);
        e
    }

    /// 404 for a model id that is not loaded here.
    pub fn model_not_found(id: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("model {id:?} is not loaded on this node; load it with POST /models/load"),
        );
        e.envelope = e
            .envelope
            .with_code(error_code::MODEL_NOT_FOUND)
            .with_param("model");
        e
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(code: &str, message: impl Into<String>, retry_after: u32) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        e.envelope = e.envelope.with_code(code);
        e.retry_after = Some(retry_after);
        e
    }

    /// 429 `overloaded` with `Retry-After`.
    pub fn queue_full(message: impl Into<String>, retry_after: u32) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.envelope = e.envelope.with_code(error_code::OVERLOADED);
        e.retry_after = Some(retry_after);
        e
    }

    /// A 4xx with a machine-readable code.
    pub fn coded(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        let kind = if status == StatusCode::NOT_FOUND {
            "not_found_error"
        } else {
            "invalid_request_error"
        };
        let mut e = Self::new(status, kind, message);
        e.envelope = e.envelope.with_code(code);
        e
    }

    /// 500: the detail is logged, the client gets a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error in helexa-node; see its log",
        )
    }
}

impl From<crate::Error> for ApiError {
    fn from(error: crate::Error) -> Self {
        match error {
            crate::Error::TemplateRejected(message) => ApiError::bad_param(
                "messages",
                format!("the chat template rejected the conversation: {message}"),
            ),
            crate::Error::Template(message) => {
                ApiError::bad_request(format!("cannot render the chat template: {message}"))
            }
            crate::Error::Tokenizer(message) => ApiError::bad_request(message),
            other => ApiError::internal(other),
        }
    }
}

impl From<SourceError> for ApiError {
    fn from(error: SourceError) -> Self {
        let message = error.to_string();
        match error {
            SourceError::MissingFiles { .. } => {
                ApiError::coded(StatusCode::BAD_REQUEST, error_code::MISSING_FILES, message)
            }
            SourceError::QuantNotFound { .. } => ApiError::coded(
                StatusCode::BAD_REQUEST,
                error_code::QUANT_NOT_FOUND,
                message,
            ),
            SourceError::UnknownArchitecture(_) => ApiError::coded(
                StatusCode::BAD_REQUEST,
                error_code::UNKNOWN_ARCHITECTURE,
                message,
            ),
            SourceError::InvalidSource(_) => ApiError::bad_param("source", message),
            SourceError::Unavailable(_) => {
                let mut e = ApiError::bad_param("source", message);
                e.status = StatusCode::BAD_GATEWAY;
                e.envelope.error.kind = "server_error".into();
                e
            }
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(error: BackendError) -> Self {
        use helexa_engine_abi::ErrorKind;
        match error.kind {
            ErrorKind::BadInput => ApiError::bad_request(format!("engine: {}", error.message)),
            ErrorKind::NotFound => ApiError::coded(
                StatusCode::NOT_FOUND,
                error_code::MODEL_NOT_FOUND,
                format!("engine: {}", error.message),
            ),
            ErrorKind::OutOfMemory => ApiError::coded(
                StatusCode::INSUFFICIENT_STORAGE,
                error_code::INSUFFICIENT_MEMORY,
                format!("engine: out of memory: {}", error.message),
            ),
            ErrorKind::Unsupported => ApiError::coded(
                StatusCode::BAD_REQUEST,
                error_code::UNKNOWN_ARCHITECTURE,
                format!("engine: {}", error.message),
            ),
            ErrorKind::DeviceFault => ApiError::unavailable(
                error_code::MODEL_FAILED,
                format!("engine device fault: {}", error.message),
                30,
            ),
            ErrorKind::Cancelled | ErrorKind::Internal => ApiError::internal(error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.envelope.error.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.envelope.error.message, "request refused");
        }
        let mut response = (self.status, axum::Json(self.envelope)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s with actionable messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => {
                let message = match &rejection {
                    JsonRejection::MissingJsonContentType(_) => {
                        "send the body as JSON with `Content-Type: application/json`".to_owned()
                    }
                    JsonRejection::JsonSyntaxError(_) => {
                        format!("the body is not valid JSON: {}", rejection.body_text())
                    }
                    JsonRejection::JsonDataError(_) => {
                        format!(
                            "the body does not match the expected shape: {}",
                            rejection.body_text()
                        )
                    }
                    _ => rejection.body_text(),
                };
                let mut error = ApiError::bad_request(message);
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    error.status = StatusCode::PAYLOAD_TOO_LARGE;
                }
                Err(error)
            }
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
