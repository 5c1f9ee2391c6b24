//! What each API surface does, behind the thin handlers of [`crate::api`]:
//! passthrough (OpenAI chat and completions), translated (Responses, Anthropic
//! Messages), token counting, the model list and the health report.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use helexa_node_api as api;
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::policy::{Health, RequestInfo, Surface, TranslateError};
use crate::proxy::{self, Observer};
use crate::routing::{RequestHead, Routed, upstream_error};

/// A parsed client request: raw body plus the fields the gateway reads.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    /// The body exactly as received.
    pub body: Bytes,
    /// Its top-level fields of interest.
    pub head: RequestHead,
    /// The router's view.
    pub info: RequestInfo,
    /// When the request arrived.
    pub started: Instant,
}

/// Label of a surface in metrics.
pub fn surface_label(surface: Surface) -> &'static str {
    match surface {
        Surface::OpenaiChat => "openai_chat",
        Surface::OpenaiCompletions => "openai_completions",
        Surface::OpenaiResponses => "openai_responses",
        Surface::AnthropicMessages => "anthropic_messages",
    }
}

impl Gateway {
    /// Count a finished request (status known when the head is sent).
    pub(crate) fn count(
        &self,
        surface: Surface,
        model: &str,
        result: &Result<Response, GatewayError>,
    ) {
        let status = match result {
            Ok(r) => r.status(),
            Err(e) => {
                self.metrics
                    .errors
                    .with_label_values(&[surface_label(surface), e.kind_label()])
                    .inc();
                e.status()
            }
        };
        // Unknown names are folded so clients cannot create unbounded label values.
        let catalogue = self.catalogue.current();
        let model = catalogue.find(model).map_or("unknown", |m| m.id.as_str());
        self.metrics
            .requests
            .with_label_values(&[surface_label(surface), model, status.as_str()])
            .inc();
    }

    fn observer(&self, routed: &Routed, surface: Surface, started: Instant) -> Observer {
        Observer::new(
            self.metrics.clone(),
            Arc::clone(&self.fleet),
            routed.node.clone(),
            surface_label(surface),
            started,
        )
    }

    /// A model name matched only by a glob alias (`claude-*`) becomes the model's id, in
    /// the request info and the body: router policies match ids and exact aliases only.
    fn resolve_glob_alias(
        &self,
        mut request: ClientRequest,
    ) -> Result<ClientRequest, GatewayError> {
        let catalogue = self.catalogue.current();
        let exact = catalogue
            .specs
            .iter()
            .any(|m| m.id == request.info.model || m.aliases.contains(&request.info.model));
        if !exact && let Some(spec) = catalogue.find_by_pattern(&request.info.model) {
            request.body = crate::routing::rewrite_model(&request.body, &spec.id)?;
            request.info.model = spec.id.clone();
        }
        Ok(request)
    }

    /// OpenAI chat / completions: route, then relay the node's response unchanged.
    pub async fn passthrough(
        self: &Arc<Self>,
        path: &str,
        request: ClientRequest,
    ) -> Result<Response, GatewayError> {
        let request = self.resolve_glob_alias(request)?;
        let surface = request.info.surface;
        let routed = self.dispatch(&request.info, path, request.body).await?;
        let status = routed.response.status();
        let content_type = routed
            .response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .cloned();
        let retry_after = routed
            .response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .cloned();
        let sse = content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let observer = self.observer(&routed, surface, request.started);
        let mut response = Response::new(proxy::relay(routed.response, observer, sse));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            content_type.unwrap_or(HeaderValue::from_static("application/json")),
        );
        // A relayed 4xx may say when to come back.
        if let Some(retry_after) = retry_after {
            headers.insert(header::RETRY_AFTER, retry_after);
        }
        if sse {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        Ok(response)
    }

    /// Responses / Anthropic Messages: translate to chat, route, translate back.
    pub async fn translated(
        self: &Arc<Self>,
        request: ClientRequest,
    ) -> Result<Response, GatewayError> {
        let request = self.resolve_glob_alias(request)?;
        let surface = request.info.surface;
        let client_body = std::str::from_utf8(&request.body)
            .map_err(|_| GatewayError::bad_request("the body is not UTF-8"))?;
        let chat = self
            .policies
            .request_to_chat(surface, client_body)
            .map_err(translate_error)?;
        let chat = Bytes::from(chat);
        if request.info.stream {
            return self
                .translated_stream(request.info.clone(), request.started, client_body, chat)
                .await;
        }
        let routed = self
            .dispatch(&request.info, "/v1/chat/completions", chat)
            .await?;
        if !routed.response.status().is_success() {
            return Err(upstream_error(&routed.node, routed.response).await);
        }
        let mut observer = self.observer(&routed, surface, request.started);
        let node_body = routed
            .response
            .bytes()
            .await
            .map_err(|e| GatewayError::Upstream {
                status: 502,
                message: format!(
                    "reading the response of node \"{}\" failed: {e}",
                    routed.node
                ),
                code: None,
                retry_after_ms: None,
            })?;
        observer.chunk(&node_body);
        drop(observer);
        let node_body = String::from_utf8_lossy(&node_body);
        let translated = self
            .policies
            .response_from_chat(surface, client_body, &node_body)
            .map_err(translate_error)?;
        Ok(([(header::CONTENT_TYPE, "application/json")], translated).into_response())
    }

    /// A streamed translated response. Routing gets one keep-alive interval to find a
    /// node: errors until then are plain HTTP errors (404, 503, ...); a route that takes
    /// longer (a cold load) starts the event stream at once so the client gets
    /// keep-alive events (Anthropic `ping`) while it waits, and a later failure ends
    /// that stream with the translator's error events.
    async fn translated_stream(
        self: &Arc<Self>,
        info: RequestInfo,
        started: Instant,
        client_body: &str,
        chat: Bytes,
    ) -> Result<Response, GatewayError> {
        let surface = info.surface;
        let prefix = match surface {
            Surface::AnthropicMessages => "msg_",
            _ => "resp_",
        };
        let id = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
        // The translator stream first: when none can be had (the instance pool is full
        // under many concurrent streams) the node must not be asked to generate for a
        // response nobody could translate.
        let translator = self
            .policies
            .response_stream(surface, client_body, &id)
            .map_err(|e| match e {
                TranslateError::InvalidInput(message) => GatewayError::bad_request(message),
                TranslateError::Unavailable(message) => GatewayError::Unavailable {
                    message,
                    retry_after_ms: 1000,
                },
                TranslateError::Failed(message) => GatewayError::Unavailable {
                    message: format!(
                        "the gateway cannot start another translated stream now ({message}); retry shortly"
                    ),
                    retry_after_ms: 1000,
                },
            })?;
        let gateway = Arc::clone(self);
        let mut route = Box::pin(async move {
            let routed = gateway
                .dispatch(&info, "/v1/chat/completions", chat)
                .await?;
            if !routed.response.status().is_success() {
                return Err(upstream_error(&routed.node, routed.response).await);
            }
            let observer = gateway.observer(&routed, surface, started);
            Ok((routed.response, observer))
        });
        let wait = self.proxy_config.keepalive_interval;
        let upstream = match tokio::time::timeout(wait, &mut route).await {
            Ok(result) => proxy::Upstream::Ready(Box::new(result?)),
            Err(_) => proxy::Upstream::Pending(Box::pin(async move {
                route.await.map_err(|e: GatewayError| e.client_message())
            })),
        };
        let body = proxy::translate(
            upstream,
            translator,
            wait,
            self.metrics.clone(),
            surface_label(surface),
        );
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        Ok(response)
    }

    /// `POST /v1/messages/count_tokens`: translate, then ask a node to tokenize the
    /// rendered chat (messages + tools, through the model's template). Only a node
    /// where the model is already ready is asked: counting tokens is not worth a cold
    /// load (and the evictions it may cause), so the router is not consulted.
    pub async fn count_tokens(
        self: &Arc<Self>,
        request: ClientRequest,
    ) -> Result<Value, GatewayError> {
        // count_tokens bodies carry no max_tokens, which a Messages translator may require.
        let mut body: serde_json::Map<String, Value> = serde_json::from_slice(&request.body)
            .map_err(|e| GatewayError::bad_request(format!("invalid JSON body: {e}")))?;
        body.entry("max_tokens").or_insert(json!(1));
        body.remove("stream");
        let body = Value::Object(body).to_string();
        let chat = self
            .policies
            .request_to_chat(Surface::AnthropicMessages, &body)
            .map_err(translate_error)?;
        let chat: Value = serde_json::from_str(&chat).map_err(|e| {
            GatewayError::Internal(format!("the translator produced invalid JSON: {e}"))
        })?;
        let catalogue = self.catalogue.current();
        let model = catalogue
            .find(&request.info.model)
            .map_or_else(|| request.info.model.clone(), |m| m.id.clone());
        let tokenize = api::TokenizeRequest {
            model: model.clone(),
            prompt: None,
            messages: chat.get("messages").and_then(Value::as_array).cloned(),
            tools: chat.get("tools").and_then(Value::as_array).cloned(),
            chat_template_kwargs: chat
                .get("chat_template_kwargs")
                .and_then(Value::as_object)
                .cloned(),
            add_generation_prompt: Some(true),
        };
        let payload = serde_json::to_vec(&tokenize)
            .map_err(|e| GatewayError::Internal(format!("encoding /tokenize: {e}")))?;
        let routed = self
            .tokenize_where_ready(&model, Bytes::from(payload))
            .await?;
        if !routed.response.status().is_success() {
            return Err(upstream_error(&routed.node, routed.response).await);
        }
        let answer: api::TokenizeResponse =
            routed
                .response
                .json()
                .await
                .map_err(|e| GatewayError::Upstream {
                    status: 502,
                    message: format!("node \"{}\" sent a bad /tokenize answer: {e}", routed.node),
                    code: None,
                    retry_after_ms: None,
                })?;
        Ok(json!({ "input_tokens": answer.count }))
    }

    /// Send a `/tokenize` body to the reachable nodes where `model` is ready, in turn,
    /// until one answers (tokenizing twice is harmless).
    async fn tokenize_where_ready(
        &self,
        model: &str,
        payload: Bytes,
    ) -> Result<Routed, GatewayError> {
        let fleet = self.fleet.view();
        let ready = fleet
            .nodes
            .iter()
            .filter(|n| n.health != Health::Unreachable && n.has_ready(model));
        let mut last = None;
        for node in ready {
            match self
                .send_once(&node.name, "/tokenize", payload.clone(), model)
                .await
            {
                Ok(routed) => return Ok(routed),
                Err(error) => {
                    tracing::warn!(node = %node.name, %model, %error, "tokenize failed");
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| GatewayError::Unavailable {
            message: format!(
                "model \"{model}\" is not loaded on any node, so its tokens cannot be counted now; send a request that uses it, then retry"
            ),
            retry_after_ms: 5000,
        }))
    }

    /// `GET /v1/models`: the catalogue joined with where each model is loaded and which
    /// nodes could host it.
    pub fn list_models(&self) -> Value {
        let catalogue = self.catalogue.current();
        let fleet = self.fleet.view();
        let data: Vec<Value> = catalogue
            .specs
            .iter()
            .map(|spec| {
                let locations: Vec<&str> = fleet
                    .nodes
                    .iter()
                    .filter(|n| n.has_ready(&spec.id))
                    .map(|n| n.name.as_str())
                    .collect();
                let feasible_on: Vec<&str> = fleet
                    .nodes
                    .iter()
                    .filter(|n| spec.pinned_on.is_empty() || spec.pinned_on.contains(&n.name))
                    .filter(|n| feasible(spec, n))
                    .map(|n| n.name.as_str())
                    .collect();
                json!({
                    "id": spec.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "helexa",
                    "loaded": !locations.is_empty(),
                    "locations": locations,
                    "feasible_on": feasible_on,
                    "aliases": spec.aliases,
                    "capabilities": spec.capabilities,
                    "context_length": spec.context_length,
                })
            })
            .collect();
        json!({ "object": "list", "data": data })
    }

    /// `GET /health`.
    pub fn health(&self) -> Value {
        let fleet = self.fleet.view();
        let reachable = fleet
            .nodes
            .iter()
            .filter(|n| n.health != crate::policy::Health::Unreachable)
            .count();
        json!({
            "status": if reachable > 0 { "ok" } else { "degraded" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.uptime().as_secs(),
            "auth": self.auth_enabled(),
            "fleet_version": fleet.version,
            "catalogue_version": self.catalogue.current().policy.version,
            "nodes": self.fleet.health_json(),
            "policies": self.policies.describe(),
            "plugins": self.policies.plugins_health(),
        })
    }
}

/// Whether `node` could ever host `spec` — the router's rule, so `/v1/models` never
/// advertises a node the router would not load on (keep in step with `feasibility` in
/// `policies/router/src/placement.rs`): the model must fit in the total memory of its
/// `min_devices.max(1)` largest devices of at least `min_device_vram_mb` each (it is
/// split over exactly that many devices, not over every device of the node).
fn feasible(spec: &crate::catalogue::ModelSpec, node: &crate::policy::Node) -> bool {
    let needed = usize::try_from(spec.min_devices.max(1)).unwrap_or(usize::MAX);
    let mut eligible: Vec<u64> = node
        .devices
        .iter()
        .map(|d| d.vram_total_mb)
        .filter(|&total| total >= spec.min_device_vram_mb)
        .collect();
    if eligible.len() < needed {
        return false;
    }
    eligible.sort_unstable_by(|a, b| b.cmp(a));
    eligible.iter().take(needed).sum::<u64>() >= spec.vram_mb
}

fn translate_error(e: TranslateError) -> GatewayError {
    match e {
        TranslateError::InvalidInput(message) => GatewayError::bad_request(message),
        TranslateError::Failed(message) => GatewayError::Internal(format!("translator: {message}")),
        // A plugin whose fail policy is `reject` failed: the message names it.
        TranslateError::Unavailable(message) => GatewayError::Unavailable {
            message,
            retry_after_ms: 1000,
        },
    }
}

/// Validate the head of a client request: a JSON object with a `model` string.
pub fn parse_head(body: &[u8]) -> Result<RequestHead, GatewayError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(GatewayError::bad_request("the body must be a JSON object"));
    }
    let head: RequestHead = serde_json::from_slice(body)
        .map_err(|e| GatewayError::bad_request(format!("invalid JSON body: {e}")))?;
    match &head.model {
        Some(m) if !m.is_empty() => Ok(head),
        _ => Err(GatewayError::BadRequest {
            message: "`model` is required".to_owned(),
            param: Some("model".to_owned()),
        }),
    }
}

/// A 404 for unknown routes.
pub fn unknown_route() -> GatewayError {
    GatewayError::Rejected {
        status: StatusCode::NOT_FOUND.as_u16(),
        message: "no such route; see /v1/models, /v1/chat/completions, /v1/messages".to_owned(),
        retry_after_ms: None,
    }
}
