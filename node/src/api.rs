//! The HTTP API (DESIGN.md §4): routes, thin handlers that unpack and delegate, and the
//! request-metrics middleware. Build it with [`crate::app`].

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use helexa_node_api::{
    ApplyTemplateResponse, DetokenizeRequest, DetokenizeResponse, Discovery, Health, LoadRequest,
    LoadResponse, ModelList, NodeStatus, TokenizeRequest, TokenizeResponse, UnloadRequest,
};
use serde_json::json;

pub use crate::error_http::{ApiError, Json};
use crate::openai::{self, ChatRequest, CompletionRequest};
use crate::state::AppState;

/// The router with every route; state included.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/discovery", get(discovery))
        .route("/models", get(models))
        .route("/models/load", post(load))
        .route("/models/unload", post(unload))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/apply-template", post(apply_template))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = state.metrics();
    metrics
        .requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    metrics
        .request_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::coded(
        axum::http::StatusCode::NOT_FOUND,
        "route_not_found",
        format!(
            "no route {} {}; see GET /discovery and the node API docs",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Blocking engine call on the blocking pool.
async fn engine_call<T: Send + 'static>(
    state: &AppState,
    call: impl FnOnce(&dyn crate::backend::Backend) -> Result<T, crate::backend::BackendError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    let backend = state.0.backend.clone();
    tokio::task::spawn_blocking(move || call(backend.as_ref()))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

fn device_info(d: &helexa_engine_abi::json::DeviceInfo) -> helexa_node_api::DeviceInfo {
    // The ABI spells compute capability "9.0"; the node API as major*10+minor.
    let compute_capability = d
        .compute_capability
        .as_deref()
        .and_then(|cc| {
            let (major, minor) = cc.split_once('.').unwrap_or((cc, "0"));
            Some(major.parse::<u32>().ok()? * 10 + minor.parse::<u32>().ok()?)
        })
        .unwrap_or(0);
    helexa_node_api::DeviceInfo {
        index: d.index,
        name: d.name.clone(),
        vram_total_mb: d.vram_total_mb,
        vram_free_mb: d.vram_free_mb,
        compute_capability,
        utilization_pct: None,
        temperature_c: None,
        fault: None,
    }
}

async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let memory = engine_call(&state, |b| b.memory()).await?;
    let models = state.model_infos();
    let status = if state.is_draining() {
        NodeStatus::Draining
    } else if models
        .iter()
        .any(|m| m.state == helexa_node_api::ModelState::Failed)
    {
        NodeStatus::Degraded
    } else {
        NodeStatus::Ok
    };
    Ok(Json(Health {
        status,
        models,
        devices: memory.devices.iter().map(device_info).collect(),
    }))
}

async fn discovery(State(state): State<AppState>) -> Result<Json<Discovery>, ApiError> {
    let info = engine_call(&state, |b| b.info()).await?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    Ok(Json(Discovery {
        host,
        node_version: env!("CARGO_PKG_VERSION").into(),
        engine: helexa_node_api::EngineInfo {
            backend: info.backend,
            name: info.name,
            version: info.version,
            abi_version: format!(
                "{}.{}",
                helexa_engine_abi::ABI_MAJOR,
                helexa_engine_abi::ABI_MINOR
            ),
        },
        devices: info.devices.iter().map(device_info).collect(),
    }))
}

async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state.model_infos(),
    })
}

async fn load(
    State(state): State<AppState>,
    Json(request): Json<LoadRequest>,
) -> Result<Json<LoadResponse>, ApiError> {
    let started = Instant::now();
    let model = state.load(request).await?;
    Ok(Json(LoadResponse {
        model,
        load_ms: started.elapsed().as_millis() as u64,
    }))
}

async fn unload(
    State(state): State<AppState>,
    Json(request): Json<UnloadRequest>,
) -> Result<Response, ApiError> {
    state.unload(&request.id).await?;
    Ok(axum::Json(json!({"id": request.id, "unloaded": true})).into_response())
}

async fn chat(
    State(state): State<AppState>,
    Json(request): Json<ChatRequest>,
) -> Result<Response, ApiError> {
    openai::chat(state, request).await
}

async fn completions(
    State(state): State<AppState>,
    Json(request): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    openai::completion(state, request).await
}

/// Text for `/tokenize` and `/apply-template`: the raw prompt, or rendered messages.
fn request_text(
    state: &AppState,
    request: &TokenizeRequest,
) -> Result<(std::sync::Arc<crate::state::Model>, String), ApiError> {
    let model = state.model(&request.model)?;
    let text = match (&request.prompt, &request.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either `prompt` or `messages`, not both",
            ));
        }
        (Some(prompt), None) => prompt.clone(),
        (None, Some(messages)) => openai::render_chat(
            &model,
            messages,
            request.tools.as_deref().filter(|t| !t.is_empty()),
            request.chat_template_kwargs.as_ref(),
            request.add_generation_prompt.unwrap_or(true),
        )?,
        (None, None) => {
            return Err(ApiError::bad_request("give `prompt` (text) or `messages`"));
        }
    };
    Ok((model, text))
}

async fn tokenize(
    State(state): State<AppState>,
    Json(request): Json<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    // Rendering and tokenization are CPU-bound: keep them off the async workers.
    let tokens = tokio::task::spawn_blocking(move || {
        let (model, text) = request_text(&state, &request)?;
        Ok::<_, ApiError>(model.tokenizer.encode(&text)?)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
    }))
}

async fn detokenize(
    State(state): State<AppState>,
    Json(request): Json<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let model = state.model(&request.model)?;
    let vocab = model.tokenizer.vocab_size();
    if let Some(bad) = request.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    Ok(Json(DetokenizeResponse {
        text: model.tokenizer.decode(&request.tokens)?,
    }))
}

async fn apply_template(
    State(state): State<AppState>,
    Json(request): Json<TokenizeRequest>,
) -> Result<Json<ApplyTemplateResponse>, ApiError> {
    if request.messages.is_none() {
        return Err(ApiError::bad_param("messages", "`messages` is required"));
    }
    let (_, prompt) = tokio::task::spawn_blocking(move || request_text(&state, &request))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(ApplyTemplateResponse { prompt }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
        .into_response()
}
