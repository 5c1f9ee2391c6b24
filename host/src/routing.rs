//! The routing path: turn a request into a [`RequestInfo`], ask the router, and carry out
//! its [`Decision`] until a node has answered with a response the client can get.
//!
//! - `Serve`: send to the node; when it could not take the request — connect failure,
//!   429, 5xx (a 503 `model_failed` means that replica is out) — try the plan's
//!   fallbacks in order. A request the node received and then failed (timeout, reset)
//!   is never re-sent: generation may have run, and a second node would repeat it.
//!   Only when every replica answered a plain 503 (busy, loading) does the router get
//!   asked again, within the queue budget.
//! - `Load`: free memory if asked (the evictor picks victims, each is unloaded), load
//!   the model — one load per (node, model) however many requests wait for it — then send.
//! - `RetryAfter(ms)`: wait and ask again, within the queue budget; then 503.
//! - `Reject`: that status and message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use helexa_node_api as api;

use crate::catalogue::ModelSpec;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::policy::{Decision, LoadPlan, RequestInfo, Surface};

/// A load other requests can wait on; the error is already in client terms.
pub(crate) type SharedLoad = Shared<BoxFuture<'static, Result<(), GatewayError>>>;

/// The fields of a client body the gateway itself reads; everything else passes through.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct RequestHead {
    /// `model`.
    pub model: Option<String>,
    /// `stream`.
    pub stream: Option<bool>,
    /// `max_tokens` (chat, completions, Anthropic).
    pub max_tokens: Option<u32>,
    /// `max_completion_tokens` (chat).
    pub max_completion_tokens: Option<u32>,
    /// `max_output_tokens` (Responses).
    pub max_output_tokens: Option<u32>,
}

/// Build the router's view of a request.
pub fn request_info(
    surface: Surface,
    head: &RequestHead,
    body_len: usize,
    caller: Option<String>,
    headers: &HeaderMap,
) -> RequestInfo {
    RequestInfo {
        model: head.model.clone().unwrap_or_default(),
        surface,
        prompt_tokens_estimate: u32::try_from(body_len / 4).unwrap_or(u32::MAX),
        max_output_tokens: head
            .max_tokens
            .or(head.max_completion_tokens)
            .or(head.max_output_tokens),
        stream: head.stream.unwrap_or(false),
        caller,
        headers: helexa_headers(headers),
    }
}

/// `x-helexa-*` headers, lower-cased (as `HeaderMap` stores names), in arrival order.
pub fn helexa_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-helexa-"))
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// A node's response that the client will get (2xx, or a node 4xx to relay).
#[derive(Debug)]
pub struct Routed {
    /// The node that answered.
    pub node: String,
    /// Its response, body not yet read.
    pub response: reqwest::Response,
    /// Catalogue id of the model, or the client's name when uncatalogued.
    pub model: String,
}

enum Attempt {
    Done(Box<Routed>),
    /// The node did not serve the request; `next` says what may be tried after it.
    Failed {
        error: GatewayError,
        next: Next,
    },
}

/// What a failed attempt allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// A plain 503 (busy, loading): other replicas, then the router again (it may be
    /// ready soon).
    Busy,
    /// The node refused or never got the request (connect failure, 429, 5xx,
    /// `model_failed`): other replicas, but no waiting on this one.
    Fallback,
    /// The node got the request and then failed (timeout, reset): never re-send.
    Stop,
}

impl Gateway {
    /// Route `info` and send `body` to `path` on the chosen node, carrying out the
    /// router's decision (see the module docs).
    pub async fn dispatch(
        self: &Arc<Self>,
        info: &RequestInfo,
        path: &str,
        body: Bytes,
    ) -> Result<Routed, GatewayError> {
        let started = Instant::now();
        let budget = self.proxy_config.queue_budget;
        let catalogue = self.catalogue.current();
        let spec = catalogue.find(&info.model).cloned();
        let model = spec
            .as_ref()
            .map_or_else(|| info.model.clone(), |s| s.id.clone());
        // The node serves a model under its catalogue id only; rewrite aliases.
        let body = match &spec {
            Some(spec) if spec.id != info.model => rewrite_model(&body, &spec.id)?,
            _ => body,
        };
        loop {
            let fleet = self.fleet.view();
            let decision = self.policies.route(info, &catalogue.policy, &fleet);
            tracing::debug!(model = %info.model, ?decision, "route");
            let attempt = match decision {
                Decision::Serve(plan) => {
                    let mut last = None;
                    let mut all_busy = true;
                    for node in std::iter::once(&plan.node).chain(&plan.fallbacks) {
                        match self
                            .send(node, path, body.clone(), &model, info.stream)
                            .await
                        {
                            Attempt::Done(routed) => return Ok(*routed),
                            Attempt::Failed {
                                error,
                                next: Next::Stop,
                            } => return Err(error),
                            Attempt::Failed { error, next } => {
                                tracing::warn!(%node, model = %model, %error, "node failed before the first byte");
                                all_busy &= next == Next::Busy;
                                last = Some(error);
                            }
                        }
                    }
                    Attempt::Failed {
                        error: last
                            .unwrap_or_else(|| GatewayError::Internal("empty serve plan".into())),
                        next: if all_busy { Next::Busy } else { Next::Fallback },
                    }
                }
                Decision::Load(plan) => {
                    let Some(spec) = &spec else {
                        return Err(not_in_catalogue(&info.model));
                    };
                    self.ensure_loaded(&plan, spec).await?;
                    self.send(&plan.node, path, body.clone(), &model, info.stream)
                        .await
                }
                Decision::RetryAfter(ms) => {
                    let wait = Duration::from_millis(u64::from(ms.max(10)));
                    if started.elapsed() + wait > budget {
                        return Err(GatewayError::Unavailable {
                            message: format!(
                                "model \"{}\" is not ready on any node yet; retry later",
                                info.model
                            ),
                            retry_after_ms: ms.max(1000),
                        });
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Decision::Reject(rejection) => {
                    return Err(if rejection.status == 404 {
                        GatewayError::ModelNotFound(rejection.message)
                    } else {
                        GatewayError::Rejected {
                            status: rejection.status,
                            message: rejection.message,
                            retry_after_ms: rejection.retry_after_ms,
                        }
                    });
                }
            };
            match attempt {
                Attempt::Done(routed) => return Ok(*routed),
                // A busy or loading node may be ready soon: ask the router again.
                Attempt::Failed {
                    next: Next::Busy, ..
                } if started.elapsed() + Duration::from_millis(500) < budget => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Attempt::Failed { error, .. } => return Err(error),
            }
        }
    }

    /// Send once to `node`. A 4xx other than 429 is a final answer (relayed); 429, 5xx
    /// and connect failures let the caller try another replica; a failure after the
    /// node got the request does not.
    async fn send(
        &self,
        node: &str,
        path: &str,
        body: Bytes,
        model: &str,
        stream: bool,
    ) -> Attempt {
        let Some(handle) = self.fleet.node(node) else {
            return Attempt::Failed {
                error: GatewayError::Internal(format!("router chose unknown node \"{node}\"")),
                next: Next::Fallback,
            };
        };
        match self
            .proxy
            .forward(&handle.config.endpoint, path, body, stream)
            .await
        {
            Ok(response)
                if response.status().is_server_error()
                    || response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS =>
            {
                let error = upstream_error(node, response).await;
                let next = match &error {
                    GatewayError::Upstream {
                        status: 503, code, ..
                    } if code.as_deref() == Some(api::error_code::MODEL_FAILED) => {
                        // The model is poisoned on that node (a device fault): waiting
                        // will not help. Refresh the fleet view so the router sees it.
                        self.refresh_soon(node);
                        Next::Fallback
                    }
                    GatewayError::Upstream { status: 503, .. } => Next::Busy,
                    _ => Next::Fallback,
                };
                Attempt::Failed {
                    error: replica_out(node, error),
                    next,
                }
            }
            Ok(response) => Attempt::Done(Box::new(Routed {
                node: node.to_owned(),
                response,
                model: model.to_owned(),
            })),
            // The request never reached the node: safe to send elsewhere.
            Err(e) if e.is_connect() => Attempt::Failed {
                error: GatewayError::Upstream {
                    status: 502,
                    message: format!("node \"{node}\" is unreachable: {e}"),
                    code: Some("node_unreachable".to_owned()),
                    retry_after_ms: None,
                },
                next: Next::Fallback,
            },
            // The node may be generating (or have generated) already: re-sending would
            // run the request twice, so the client gets the failure.
            Err(e) => Attempt::Failed {
                error: GatewayError::Upstream {
                    status: if e.is_timeout() { 504 } else { 502 },
                    message: format!("node \"{node}\" failed after receiving the request: {e}"),
                    code: Some(
                        if e.is_timeout() {
                            "node_timeout"
                        } else {
                            "node_failed"
                        }
                        .to_owned(),
                    ),
                    retry_after_ms: None,
                },
                next: Next::Stop,
            },
        }
    }

    /// Send once to `node`, outside any routing plan (no fallbacks): the node's answer
    /// if it took the request (any status below 500 except 429), else the error.
    pub(crate) async fn send_once(
        &self,
        node: &str,
        path: &str,
        body: Bytes,
        model: &str,
    ) -> Result<Routed, GatewayError> {
        match self.send(node, path, body, model, false).await {
            Attempt::Done(routed) => Ok(*routed),
            Attempt::Failed { error, .. } => Err(error),
        }
    }

    /// Re-poll `node` in the background.
    fn refresh_soon(&self, node: &str) {
        let fleet = Arc::clone(&self.fleet);
        let node = node.to_owned();
        tokio::spawn(async move { fleet.refresh(&node).await });
    }

    /// Load `spec` on `plan.node` (evicting first if the plan says so), sharing one load
    /// among all requests that want the same (node, model).
    pub(crate) async fn ensure_loaded(
        self: &Arc<Self>,
        plan: &LoadPlan,
        spec: &ModelSpec,
    ) -> Result<(), GatewayError> {
        let key = (plan.node.clone(), spec.id.clone());
        let shared = {
            let mut loads = self
                .loads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match loads.get(&key) {
                Some(existing) => existing.clone(),
                None => {
                    let gateway = Arc::clone(self);
                    let (plan, spec, key2) = (plan.clone(), spec.clone(), key.clone());
                    let future = async move {
                        let result = gateway.evict_and_load(&plan, &spec).await;
                        gateway
                            .loads
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&key2);
                        result
                    }
                    .boxed()
                    .shared();
                    loads.insert(key, future.clone());
                    future
                }
            }
        };
        shared.await
    }

    async fn evict_and_load(&self, plan: &LoadPlan, spec: &ModelSpec) -> Result<(), GatewayError> {
        let handle = self.fleet.node(&plan.node).ok_or_else(|| {
            GatewayError::Internal(format!("router chose unknown node \"{}\"", plan.node))
        })?;
        let endpoint = &handle.config.endpoint;
        if plan.free_mb_needed > 0 {
            let fleet = self.fleet.view();
            let victims = match fleet.nodes.iter().find(|n| n.name == plan.node) {
                Some(node) => {
                    self.policies
                        .choose_victims(node, plan.free_mb_needed, &spec.entry())
                }
                None => Vec::new(),
            };
            tracing::info!(node = %plan.node, model = %spec.id, need_mb = plan.free_mb_needed, ?victims, "evicting");
            for victim in victims {
                let request = api::UnloadRequest { id: victim.clone() };
                match self
                    .proxy
                    .control(endpoint, "/models/unload", &request)
                    .await
                {
                    Ok(r) if r.status().is_success() => self.metrics.evictions.inc(),
                    Ok(r) => {
                        let error = upstream_error(&plan.node, r).await;
                        tracing::warn!(node = %plan.node, %victim, %error, "unload failed");
                    }
                    Err(e) => {
                        tracing::warn!(node = %plan.node, %victim, error = %e, "unload failed")
                    }
                }
            }
        }
        let request = api::LoadRequest {
            id: spec.id.clone(),
            source: spec.source.clone(),
            quant: spec.quant.clone(),
            dtype: spec.dtype.clone(),
            devices: (!plan.devices.is_empty()).then(|| plan.devices.clone()),
            context_length: (spec.context_length > 0).then_some(spec.context_length),
        };
        tracing::info!(node = %plan.node, model = %spec.id, devices = ?plan.devices, "loading");
        let started = Instant::now();
        let response = self
            .proxy
            .control(endpoint, "/models/load", &request)
            .await
            .map_err(|e| GatewayError::Upstream {
                status: 502,
                message: format!(
                    "loading \"{}\" on node \"{}\" failed: {e}",
                    spec.id, plan.node
                ),
                code: Some("load_failed".to_owned()),
                retry_after_ms: None,
            })?;
        let result = if response.status().is_success() {
            self.metrics.cold_starts.inc();
            tracing::info!(node = %plan.node, model = %spec.id, ms = started.elapsed().as_millis() as u64, "loaded");
            Ok(())
        } else {
            let error = upstream_error(&plan.node, response).await;
            Err(match error {
                // The client did nothing wrong: a node that cannot load a catalogue model
                // is an operator problem or a transient shortage.
                GatewayError::Upstream {
                    status,
                    message,
                    code,
                    retry_after_ms,
                } => {
                    let transient = code.as_deref() == Some(api::error_code::INSUFFICIENT_MEMORY)
                        || status == 503;
                    GatewayError::Upstream {
                        status: if transient { 503 } else { 502 },
                        message: format!(
                            "loading \"{}\" on node \"{}\" failed: {message}",
                            spec.id, plan.node
                        ),
                        code,
                        retry_after_ms: retry_after_ms.or(transient.then_some(5000)),
                    }
                }
                other => other,
            })
        };
        self.fleet.refresh(&plan.node).await;
        result
    }
}

/// A node's `model_failed` becomes a 503 naming the node and its reason, with a
/// `Retry-After` (an operator must reload the model there, or another replica serves);
/// other errors are unchanged.
fn replica_out(node: &str, error: GatewayError) -> GatewayError {
    match error {
        GatewayError::Upstream {
            status: 503,
            message,
            code,
            retry_after_ms,
        } if code.as_deref() == Some(api::error_code::MODEL_FAILED) => GatewayError::Upstream {
            status: 503,
            message: format!("node \"{node}\" cannot serve this model: {message}"),
            code,
            retry_after_ms: Some(retry_after_ms.unwrap_or(5000)),
        },
        other => other,
    }
}

/// A 404 for a model the catalogue lacks.
pub(crate) fn not_in_catalogue(model: &str) -> GatewayError {
    GatewayError::ModelNotFound(format!(
        "model \"{model}\" is not in this gateway's catalogue; GET /v1/models lists the models it serves"
    ))
}

/// Read a node's error response into a [`GatewayError::Upstream`].
pub(crate) async fn upstream_error(node: &str, response: reqwest::Response) -> GatewayError {
    let status = response.status().as_u16();
    let retry_after_ms = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map(|secs| secs.saturating_mul(1000));
    let body = response.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<api::ErrorEnvelope>(&body) {
        Ok(envelope) => GatewayError::Upstream {
            status,
            message: envelope.error.message,
            code: envelope.error.code,
            retry_after_ms,
        },
        Err(_) => GatewayError::Upstream {
            status,
            message: format!(
                "node \"{node}\" answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            ),
            code: None,
            retry_after_ms,
        },
    }
}

/// Replace the top-level `model` of a JSON object body.
pub(crate) fn rewrite_model(body: &[u8], model: &str) -> Result<Bytes, GatewayError> {
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| GatewayError::bad_request(format!("invalid JSON body: {e}")))?;
    object.insert(
        "model".to_owned(),
        serde_json::Value::String(model.to_owned()),
    );
    serde_json::to_vec(&object)
        .map(Bytes::from)
        .map_err(|e| GatewayError::Internal(format!("re-encoding the body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_info_reads_limits_and_helexa_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-helexa-tier", "gold".parse().unwrap());
        headers.insert("x-other", "no".parse().unwrap());
        let head = RequestHead {
            model: Some("m".into()),
            stream: Some(true),
            max_completion_tokens: Some(7),
            ..Default::default()
        };
        let info = request_info(
            Surface::OpenaiChat,
            &head,
            400,
            Some("alice".into()),
            &headers,
        );
        assert_eq!(info.prompt_tokens_estimate, 100);
        assert_eq!(info.max_output_tokens, Some(7));
        assert!(info.stream);
        assert_eq!(
            info.headers,
            vec![("x-helexa-tier".to_owned(), "gold".to_owned())]
        );
    }

    #[test]
    fn rewrite_model_keeps_other_fields() {
        let out = rewrite_model(br#"{"model":"alias","messages":[1]}"#, "real").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "real");
        assert_eq!(v["messages"][0], 1);
    }
}
