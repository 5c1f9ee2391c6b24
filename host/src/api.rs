//! The HTTP surfaces: [`app`] builds the router. Handlers only unpack the request and
//! delegate to [`crate::service`]; each surface has one `ApiError` that writes its
//! envelope (OpenAI `{"error":{…}}`, Anthropic `{"type":"error","error":{…}}`), and the
//! extractors here reject in the envelope of the route that used them.

pub mod anthropic;
pub mod llama;
pub mod openai;

use std::marker::PhantomData;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::Bytes;

use crate::error::GatewayError;
use crate::gateway::AppState;
use crate::policy::Surface;
use crate::routing::{RequestHead, request_info};
use crate::service::{ClientRequest, parse_head};

/// The API router (the metrics have their own, see [`crate::metrics::Metrics::router`]).
pub fn app(state: AppState) -> Router {
    let limit = state.proxy_config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(openai::responses))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/health", get(health))
        // llama-server-style discovery (Zed, Open WebUI's llama.cpp connection).
        .route("/props", get(llama::props))
        .route("/models", get(llama::models))
        .fallback(openai::unknown_route)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(gateway): State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(gateway.health())
}

/// The authenticated caller (the key's name; `None` with auth off), the request's
/// `x-helexa-*` headers and its arrival time. Rejects in `E`'s envelope.
#[derive(Debug)]
pub struct Auth<E> {
    /// Caller identity.
    pub caller: Option<String>,
    /// `x-helexa-*` headers.
    pub headers: Vec<(String, String)>,
    /// When the request arrived.
    pub started: Instant,
    _envelope: PhantomData<fn() -> E>,
}

impl<E> FromRequestParts<AppState> for Auth<E>
where
    E: From<GatewayError> + IntoResponse,
{
    type Rejection = E;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, E> {
        let started = Instant::now();
        let caller = state.authenticate(&parts.headers).map_err(E::from)?;
        Ok(Auth {
            caller,
            headers: crate::routing::helexa_headers(&parts.headers),
            started,
            _envelope: PhantomData,
        })
    }
}

/// A JSON object body with a `model`, kept as raw bytes (passthrough forwards them
/// untouched). Rejects in `E`'s envelope: 400 for bad JSON, 413 when too large.
#[derive(Debug)]
pub struct JsonBody<E> {
    /// The body.
    pub bytes: Bytes,
    /// The fields the gateway reads.
    pub head: RequestHead,
    _envelope: PhantomData<fn() -> E>,
}

impl<S, E> FromRequest<S> for JsonBody<E>
where
    S: Send + Sync,
    E: From<GatewayError> + IntoResponse,
{
    type Rejection = E;

    async fn from_request(request: Request, state: &S) -> Result<Self, E> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                E::from(if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    GatewayError::PayloadTooLarge(
                    "the request body is larger than this gateway accepts ([proxy] max_body_mb)"
                        .to_owned(),
                )
                } else {
                    GatewayError::bad_request(format!(
                        "could not read the body: {}",
                        rejection.body_text()
                    ))
                })
            })?;
        let head = parse_head(&bytes).map_err(E::from)?;
        Ok(JsonBody {
            bytes,
            head,
            _envelope: PhantomData,
        })
    }
}

impl<E> JsonBody<E> {
    /// Combine with the caller into the request the service layer works on.
    pub fn into_request(self, surface: Surface, auth: Auth<E>) -> ClientRequest {
        let mut info = request_info(
            surface,
            &self.head,
            self.bytes.len(),
            auth.caller,
            &Default::default(),
        );
        info.headers = auth.headers;
        ClientRequest {
            body: self.bytes,
            head: self.head,
            info,
            started: auth.started,
        }
    }
}
