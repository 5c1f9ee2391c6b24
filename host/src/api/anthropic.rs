//! Anthropic-compatible routes and their error envelope
//! `{"type":"error","error":{"type","message"}}`. Unknown `anthropic-beta` values and
//! unknown body fields are left to the translator, which tolerates them.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Auth, JsonBody};
use crate::error::GatewayError;
use crate::gateway::AppState;
use crate::policy::Surface;

/// An error in the Anthropic envelope.
#[derive(Debug)]
pub struct ApiError(pub GatewayError);

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = &self.0;
        let kind = match e.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        };
        e.respond(json!({
            "type": "error",
            "error": { "type": kind, "message": e.client_message() },
        }))
    }
}

/// `POST /v1/messages`.
pub async fn messages(
    State(gateway): State<AppState>,
    auth: Auth<ApiError>,
    body: JsonBody<ApiError>,
) -> Result<Response, ApiError> {
    let request = body.into_request(Surface::AnthropicMessages, auth);
    let model = request.info.model.clone();
    let result = gateway.translated(request).await;
    gateway.count(Surface::AnthropicMessages, &model, &result);
    result.map_err(ApiError)
}

/// `POST /v1/messages/count_tokens` → `{"input_tokens": n}`.
pub async fn count_tokens(
    State(gateway): State<AppState>,
    auth: Auth<ApiError>,
    body: JsonBody<ApiError>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut request = body.into_request(Surface::AnthropicMessages, auth);
    request.info.stream = false;
    gateway
        .count_tokens(request)
        .await
        .map(Json)
        .map_err(ApiError)
}
