//! llama-server-style discovery, so clients written for llama.cpp's server (Zed's and
//! Open WebUI's llama.cpp connections, scripts that read `/props`) find helexa's models:
//!
//! - `GET /props` (also `?model=ID`): llama-server's global properties for one model —
//!   `default_generation_settings.n_ctx`, `total_slots`, `model_path`, `chat_template`,
//!   `modalities`, `build_info`. Without `?model` it describes the first loaded model
//!   (else the first in the catalogue), as a single-model llama-server would.
//! - `GET /models`: the OpenAI model list (`data`, with llama-server's `meta` and router
//!   `status`) plus the Ollama-style `models` array llama-server also returns.
//!
//! Shapes follow the llama.cpp server README. Like llama-server, these routes answer
//! without an API key: they reveal model names only, which `/health` reveals as well.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::gateway::AppState;

use super::openai::ApiError;

/// `?model=` of `GET /props`.
#[derive(Debug, Deserialize)]
pub struct PropsQuery {
    /// A catalogue id or alias.
    pub model: Option<String>,
}

/// One catalogue model as the llama routes describe it.
struct Described {
    id: String,
    loaded: bool,
    context_length: u32,
    slots: u32,
}

fn describe_all(gateway: &AppState) -> Vec<Described> {
    let catalogue = gateway.catalogue().current();
    let fleet = gateway.fleet().view();
    catalogue
        .specs
        .iter()
        .map(|spec| {
            let ready_on = fleet.nodes.iter().filter(|n| n.has_ready(&spec.id)).count();
            Described {
                id: spec.id.clone(),
                loaded: ready_on > 0,
                context_length: spec.context_length,
                // One slot per replica is a floor; the nodes batch beyond it.
                slots: u32::try_from(ready_on.max(1)).unwrap_or(u32::MAX),
            }
        })
        .collect()
}

/// `GET /props`.
pub async fn props(
    State(gateway): State<AppState>,
    Query(query): Query<PropsQuery>,
) -> Result<Response, ApiError> {
    let all = describe_all(&gateway);
    let chosen = match &query.model {
        Some(name) => {
            let catalogue = gateway.catalogue().current();
            let id = catalogue.find(name).map(|m| m.id.clone()).ok_or_else(|| {
                ApiError::from(GatewayError::ModelNotFound(format!(
                    "model \"{name}\" is not in the catalogue; GET /models lists the models"
                )))
            })?;
            all.into_iter().find(|d| d.id == id)
        }
        None => {
            let first_loaded = all.iter().position(|d| d.loaded).unwrap_or(0);
            all.into_iter().nth(first_loaded)
        }
    };
    let Some(model) = chosen else {
        return Err(GatewayError::ModelNotFound(
            "the catalogue is empty; add models to models.toml".to_owned(),
        )
        .into());
    };
    Ok(axum::Json(json!({
        "default_generation_settings": {
            "n_ctx": model.context_length,
            "params": {},
        },
        "total_slots": model.slots,
        "model_path": model.id,
        "model_alias": model.id,
        // The template is applied on the node; clients send messages, not prompts.
        "chat_template": "",
        "modalities": {"vision": false, "audio": false},
        "build_info": format!("helexa-{}", env!("CARGO_PKG_VERSION")),
        "is_sleeping": false,
    }))
    .into_response())
}

/// `GET /models`.
pub async fn models(State(gateway): State<AppState>) -> Response {
    let all = describe_all(&gateway);
    let data: Vec<Value> = all
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": "helexa",
                "meta": {"n_ctx_train": m.context_length},
                "status": {"value": if m.loaded { "loaded" } else { "unloaded" }},
            })
        })
        .collect();
    let ollama: Vec<Value> = all
        .iter()
        .map(|m| {
            json!({
                "name": m.id,
                "model": m.id,
                "modified_at": "",
                "size": "",
                "digest": "",
                "type": "model",
                "description": "",
                "tags": [""],
                "capabilities": ["completion"],
                "parameters": "",
                "details": {"format": "", "family": "", "families": [""], "parameter_size": "", "quantization_level": ""},
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data, "models": ollama})).into_response()
}
