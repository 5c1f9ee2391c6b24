//! OpenAI-compatible routes and their error envelope
//! `{"error":{"message","type","code","param"}}`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Auth, JsonBody};
use crate::error::GatewayError;
use crate::gateway::AppState;
use crate::policy::Surface;

/// An error in the OpenAI envelope.
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
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        e.respond(json!({"error": {
            "message": e.client_message(),
            "type": kind,
            "code": e.code(),
            "param": e.param(),
        }}))
    }
}

/// `POST /v1/chat/completions` (passthrough).
pub async fn chat_completions(
    State(gateway): State<AppState>,
    auth: Auth<ApiError>,
    body: JsonBody<ApiError>,
) -> Result<Response, ApiError> {
    let request = body.into_request(Surface::OpenaiChat, auth);
    let model = request.info.model.clone();
    let result = gateway.passthrough("/v1/chat/completions", request).await;
    gateway.count(Surface::OpenaiChat, &model, &result);
    result.map_err(ApiError)
}

/// `POST /v1/completions` (passthrough).
pub async fn completions(
    State(gateway): State<AppState>,
    auth: Auth<ApiError>,
    body: JsonBody<ApiError>,
) -> Result<Response, ApiError> {
    let request = body.into_request(Surface::OpenaiCompletions, auth);
    let model = request.info.model.clone();
    let result = gateway.passthrough("/v1/completions", request).await;
    gateway.count(Surface::OpenaiCompletions, &model, &result);
    result.map_err(ApiError)
}

/// `POST /v1/responses` (translated to chat and back).
pub async fn responses(
    State(gateway): State<AppState>,
    auth: Auth<ApiError>,
    body: JsonBody<ApiError>,
) -> Result<Response, ApiError> {
    let request = body.into_request(Surface::OpenaiResponses, auth);
    let model = request.info.model.clone();
    let result = gateway.translated(request).await;
    gateway.count(Surface::OpenaiResponses, &model, &result);
    result.map_err(ApiError)
}

/// `GET /v1/models`.
pub async fn models(
    State(gateway): State<AppState>,
    _auth: Auth<ApiError>,
) -> Json<serde_json::Value> {
    Json(gateway.list_models())
}

/// Any other path.
pub async fn unknown_route() -> ApiError {
    ApiError(crate::service::unknown_route())
}
