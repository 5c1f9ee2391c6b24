//! The gateway's one error enum. Each API surface turns it into its own envelope
//! (`api::openai::ApiError`, `api::anthropic::ApiError`); the status mapping lives here,
//! once, so both surfaces agree on it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The client's request is malformed (→ 400).
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending field, if known.
        param: Option<String>,
    },
    /// The body exceeds the configured limit (→ 413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Missing or wrong API key (→ 401).
    #[error("{0}")]
    Unauthorized(String),
    /// The model is not in the catalogue (→ 404).
    #[error("{0}")]
    ModelNotFound(String),
    /// The router refused the request with this status.
    #[error("{message}")]
    Rejected {
        /// HTTP status chosen by the router.
        status: u16,
        /// The router's message.
        message: String,
        /// When to retry, ms.
        retry_after_ms: Option<u32>,
    },
    /// Nothing can serve it now; retrying later may help (→ 503).
    #[error("{message}")]
    Unavailable {
        /// Why.
        message: String,
        /// When to retry, ms.
        retry_after_ms: u32,
    },
    /// A node answered with an error, or never answered (its status is kept for 4xx,
    /// 503 and 504; other 5xx become 502).
    #[error("{message}")]
    Upstream {
        /// The node's status.
        status: u16,
        /// The node's message.
        message: String,
        /// The node's machine-readable code.
        code: Option<String>,
        /// From the node's `Retry-After`, ms.
        retry_after_ms: Option<u32>,
    },
    /// A bug or an unexpected failure (→ 500; details are logged, not sent).
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    /// Convenience constructor for a 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::Rejected { status, .. } => StatusCode::from_u16(*status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            GatewayError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Upstream { status, .. } => match StatusCode::from_u16(*status) {
                Ok(s) if s.is_client_error() => s,
                Ok(StatusCode::SERVICE_UNAVAILABLE) => StatusCode::SERVICE_UNAVAILABLE,
                Ok(StatusCode::GATEWAY_TIMEOUT) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `Retry-After` in whole seconds, for 429 and 503 (at least 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        let ms = match self {
            GatewayError::Rejected { retry_after_ms, .. } => *retry_after_ms,
            GatewayError::Unavailable { retry_after_ms, .. } => Some(*retry_after_ms),
            GatewayError::Upstream { retry_after_ms, .. } => *retry_after_ms,
            _ => None,
        };
        let status = self.status();
        if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        Some(u64::from(ms.unwrap_or(1000)).div_ceil(1000).max(1))
    }

    /// The message the client sees (5xx internals are hidden).
    pub fn client_message(&self) -> String {
        match self {
            GatewayError::Internal(_) => "internal error in the gateway".to_owned(),
            other => other.to_string(),
        }
    }

    /// A short label for `helexa_errors_total{kind}`.
    pub fn kind_label(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "bad_request",
            GatewayError::PayloadTooLarge(_) => "payload_too_large",
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::Rejected { .. } => "rejected",
            GatewayError::Unavailable { .. } => "unavailable",
            GatewayError::Upstream { .. } => "upstream",
            GatewayError::Internal(_) => "internal",
        }
    }

    /// The offending parameter, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            GatewayError::BadRequest { param, .. } => param.as_deref(),
            GatewayError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// A machine-readable code, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            GatewayError::ModelNotFound(_) => Some("model_not_found"),
            GatewayError::Unauthorized(_) => Some("invalid_api_key"),
            GatewayError::Upstream { code, .. } => code.as_deref(),
            GatewayError::Unavailable { .. } => Some("unavailable"),
            _ => None,
        }
    }

    /// Build the response with `body` as JSON, the status and `Retry-After`; logs 5xx.
    pub(crate) fn respond(&self, body: serde_json::Value) -> Response {
        let status = self.status();
        if matches!(self, GatewayError::Unavailable { .. }) {
            // Expected under load (a full queue, a full translator pool): not a fault.
            tracing::warn!(status = status.as_u16(), error = %self, "request deferred");
        } else if status.is_server_error() {
            // Client input never reaches error level: 5xx are gateway or node failures.
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request refused");
        }
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
