//! Admin routes that load and unload catalogue models on the fleet (what `helexa load`
//! and `helexa unload` call), guarded by the `[admin] key` like the plugin routes:
//!
//! - `POST /admin/models/load` `{"model": NAME, "node": NODE?}`: without `node`, the router
//!   policy places the model (exactly as for a request that finds it cold, evictions by
//!   the evictor policy included); with `node`, it is loaded there. Answers when the node
//!   has it ready: `{"model", "node", "load_ms", "already_loaded"}`.
//! - `POST /admin/models/unload` `{"model": NAME, "node": NODE?}`: unload it from `node`,
//!   or from every node that holds it: `{"model", "unloaded_from": [...]}`.
//!
//! Errors use the OpenAI envelope; a name not in the catalogue is a 404. Authorization is
//! `crate::admin::authorize`, shared with the plugin routes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use helexa_node_api as api;
use serde::Deserialize;
use serde_json::json;

use crate::api::openai::ApiError;
use crate::error::GatewayError;
use crate::gateway::AppState;
use crate::policy::{Decision, Health, LoadPlan, RequestInfo, Surface};
use crate::routing::upstream_error;

#[derive(Clone)]
struct FleetAdmin {
    gateway: AppState,
    key: Option<Arc<str>>,
}

/// The body of both routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTarget {
    /// Catalogue id or alias.
    pub model: String,
    /// A node name from the config; `None` = let the router choose (load) or all (unload).
    #[serde(default)]
    pub node: Option<String>,
}

/// The routes, guarded by `key` (`None`: every call answers 403).
pub fn router(gateway: AppState, key: Option<String>) -> Router {
    Router::new()
        .route("/admin/models/load", post(load))
        .route("/admin/models/unload", post(unload))
        .with_state(FleetAdmin {
            gateway,
            key: key.map(Arc::from),
        })
}

async fn load(
    State(state): State<FleetAdmin>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    answer(&state, &headers, do_load(&state.gateway, &body)).await
}

/// The admin key check, then `action`'s JSON answer or its error in the gateway's envelope.
async fn answer(
    state: &FleetAdmin,
    headers: &HeaderMap,
    action: impl std::future::Future<Output = Result<serde_json::Value, GatewayError>>,
) -> Response {
    if let Err(response) = crate::admin::authorize(state.key.as_deref(), headers) {
        return *response;
    }
    match action.await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

fn parse_target(body: &[u8]) -> Result<ModelTarget, GatewayError> {
    serde_json::from_slice(body).map_err(|e| {
        GatewayError::bad_request(format!(
            "expected {{\"model\": NAME, \"node\": NODE (optional)}}: {e}"
        ))
    })
}

fn check_node(gateway: &AppState, node: &str) -> Result<(), GatewayError> {
    if gateway.fleet().node(node).is_some() {
        return Ok(());
    }
    let names: Vec<String> = gateway
        .fleet()
        .view()
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    Err(GatewayError::bad_request(format!(
        "no node \"{node}\"; the fleet has: {}",
        names.join(", ")
    )))
}

async fn do_load(gateway: &AppState, body: &[u8]) -> Result<serde_json::Value, GatewayError> {
    let target = parse_target(body)?;
    let catalogue = gateway.catalogue().current();
    let spec = catalogue
        .find(&target.model)
        .cloned()
        .ok_or_else(|| crate::routing::not_in_catalogue(&target.model))?;
    let started = Instant::now();
    let ready_on = |node: &str| {
        gateway
            .fleet()
            .view()
            .nodes
            .iter()
            .any(|n| n.name == node && n.has_ready(&spec.id))
    };
    let plan = match &target.node {
        Some(node) => {
            check_node(gateway, node)?;
            if ready_on(node) {
                return Ok(
                    json!({"model": spec.id, "node": node, "load_ms": 0, "already_loaded": true}),
                );
            }
            LoadPlan {
                node: node.clone(),
                devices: Vec::new(),
                free_mb_needed: 0,
            }
        }
        None => {
            // Ask the router as a request for this model would, so placement and
            // eviction follow the operator's policies.
            let info = RequestInfo {
                model: spec.id.clone(),
                surface: Surface::OpenaiChat,
                prompt_tokens_estimate: 0,
                max_output_tokens: None,
                stream: false,
                caller: Some("admin".to_owned()),
                headers: Vec::new(),
            };
            let deadline = Instant::now() + gateway.proxy_config.queue_budget;
            loop {
                let fleet = gateway.fleet().view();
                match gateway.policies.route(&info, &catalogue.policy, &fleet) {
                    Decision::Serve(plan) => {
                        return Ok(
                            json!({"model": spec.id, "node": plan.node, "load_ms": 0, "already_loaded": true}),
                        );
                    }
                    Decision::Load(plan) => break plan,
                    Decision::RetryAfter(ms) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(u64::from(ms.max(100)))).await;
                    }
                    Decision::RetryAfter(ms) => {
                        return Err(GatewayError::Unavailable {
                            message: format!(
                                "\"{}\" is still loading somewhere; retry later",
                                spec.id
                            ),
                            retry_after_ms: ms.max(1000),
                        });
                    }
                    Decision::Reject(rejection) => {
                        return Err(GatewayError::Rejected {
                            status: rejection.status,
                            message: rejection.message,
                            retry_after_ms: rejection.retry_after_ms,
                        });
                    }
                }
            }
        }
    };
    gateway.ensure_loaded(&plan, &spec).await?;
    Ok(json!({
        "model": spec.id,
        "node": plan.node,
        "load_ms": started.elapsed().as_millis() as u64,
        "already_loaded": false,
    }))
}

async fn unload(
    State(state): State<FleetAdmin>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    answer(&state, &headers, do_unload(&state.gateway, &body)).await
}

async fn do_unload(gateway: &AppState, body: &[u8]) -> Result<serde_json::Value, GatewayError> {
    let target = parse_target(body)?;
    let catalogue = gateway.catalogue().current();
    let id = catalogue
        .find(&target.model)
        .map_or_else(|| target.model.clone(), |m| m.id.clone());
    if let Some(node) = &target.node {
        check_node(gateway, node)?;
    }
    let holders: Vec<String> = gateway
        .fleet()
        .view()
        .nodes
        .iter()
        .filter(|n| target.node.as_ref().is_none_or(|want| *want == n.name))
        .filter(|n| n.health != Health::Unreachable && n.models.iter().any(|m| m.id == id))
        .map(|n| n.name.clone())
        .collect();
    if holders.is_empty() {
        return Err(GatewayError::ModelNotFound(format!(
            "\"{id}\" is not loaded on {}; `helexa status` shows what is loaded where",
            target.node.as_deref().unwrap_or("any node")
        )));
    }
    let mut unloaded = Vec::new();
    for node in holders {
        let Some(handle) = gateway.fleet().node(&node) else {
            continue;
        };
        let endpoint = handle.config.endpoint.clone();
        let request = api::UnloadRequest { id: id.clone() };
        let response = gateway
            .proxy
            .control(&endpoint, "/models/unload", &request)
            .await
            .map_err(|e| GatewayError::Upstream {
                status: 502,
                message: format!("unloading \"{id}\" on node \"{node}\" failed: {e}"),
                code: None,
                retry_after_ms: None,
            })?;
        if !response.status().is_success() {
            return Err(upstream_error(&node, response).await);
        }
        gateway.fleet().refresh(&node).await;
        unloaded.push(node);
    }
    Ok(json!({"model": id, "unloaded_from": unloaded}))
}
