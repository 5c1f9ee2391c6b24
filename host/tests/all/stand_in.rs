//! An in-process stand-in `helexa-node`: real HTTP on loopback, the node API's types,
//! scripted generation. It records every call so tests can check what the gateway did.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use helexa_node_api as api;
use serde_json::{Value, json};

/// What a chat completion produces.
#[derive(Debug, Clone)]
pub struct Script {
    /// Reasoning deltas (`reasoning_content`), streamed first.
    pub reasoning: Vec<&'static str>,
    /// Text deltas.
    pub text: Vec<&'static str>,
    /// A tool call `(id, name, argument fragments)`, streamed last.
    pub tool_call: Option<(&'static str, &'static str, Vec<&'static str>)>,
    /// Abort the connection after this many SSE events (a node dying mid-stream).
    pub die_after: Option<usize>,
    /// Go silent (connection open, nothing sent) after this many SSE events.
    pub stall_after: Option<usize>,
    /// Pause before each chunk.
    pub delay: Duration,
    /// Pause before a non-streamed answer (a long generation: nothing is sent meanwhile).
    pub answer_delay: Duration,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            reasoning: vec![],
            text: vec!["Hello", ", ", "world!"],
            tool_call: None,
            die_after: None,
            stall_after: None,
            delay: Duration::ZERO,
            answer_delay: Duration::ZERO,
        }
    }
}

impl Script {
    /// Thinking, then text, then a tool call with arguments split in three.
    pub fn full() -> Self {
        Script {
            reasoning: vec!["Let me ", "think."],
            text: vec!["Checking ", "the weather."],
            tool_call: Some((
                "call_1",
                "get_weather",
                vec!["{\"city\":", " \"Paris\"", "}"],
            )),
            ..Script::default()
        }
    }
}

/// The stand-in's state.
#[derive(Debug)]
pub struct NodeSim {
    /// Models it reports.
    pub models: Mutex<Vec<api::ModelInfo>>,
    /// Devices it reports.
    pub devices: Mutex<Vec<api::DeviceInfo>>,
    /// Calls in order: `load:ID`, `unload:ID`, `chat:MODEL`, `completions:MODEL`, `tokenize:MODEL`, `discovery`.
    pub calls: Mutex<Vec<String>>,
    /// The generation script.
    pub script: Mutex<Script>,
    /// Answer `/health` and `/models` with 500.
    pub failing: AtomicBool,
    /// Answer generation with this status and an OpenAI error (once per set).
    pub chat_status: Mutex<Option<u16>>,
    /// Answer every generation with this error until cleared.
    pub chat_error: Mutex<Option<ChatError>>,
    /// Last chat body received.
    pub last_chat: Mutex<Option<Value>>,
    /// Loads done.
    pub loads: AtomicUsize,
    /// How long a load takes.
    pub load_delay: Mutex<Duration>,
}

/// A scripted generation error: status, node error code, optional `Retry-After` (s).
#[derive(Debug, Clone)]
pub struct ChatError {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
    pub retry_after_secs: Option<u64>,
}

/// A model entry as a node reports it.
pub fn model(id: &str, state: api::ModelState, vram_mb: u64, idle_ms: u64) -> api::ModelInfo {
    api::ModelInfo {
        id: id.to_owned(),
        state,
        architecture: "qwen3".to_owned(),
        source: "test".to_owned(),
        quant: "bf16".to_owned(),
        context_length: 4096,
        capabilities: vec!["chat".to_owned(), "tools".to_owned()],
        tool_calls: true,
        reasoning: true,
        vram_mb,
        devices: vec![0],
        in_flight: 0,
        queue_depth: 0,
        idle_ms,
        error: None,
        progress: None,
    }
}

impl NodeSim {
    /// A node with one device of `vram_total_mb` and the given models.
    pub fn new(vram_total_mb: u64, models: Vec<api::ModelInfo>) -> Arc<NodeSim> {
        Arc::new(NodeSim {
            models: Mutex::new(models),
            devices: Mutex::new(vec![api::DeviceInfo {
                index: 0,
                name: "stand-in".to_owned(),
                vram_total_mb,
                vram_free_mb: vram_total_mb,
                compute_capability: 90,
                utilization_pct: None,
                temperature_c: None,
                fault: None,
            }]),
            calls: Mutex::new(Vec::new()),
            script: Mutex::new(Script::default()),
            failing: AtomicBool::new(false),
            chat_status: Mutex::new(None),
            chat_error: Mutex::new(None),
            last_chat: Mutex::new(None),
            loads: AtomicUsize::new(0),
            load_delay: Mutex::new(Duration::ZERO),
        })
    }

    /// Calls recorded so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    /// Recompute free VRAM from the loaded models.
    fn update_free(&self) {
        let used: u64 = self.models.lock().unwrap().iter().map(|m| m.vram_mb).sum();
        for d in self.devices.lock().unwrap().iter_mut() {
            d.vram_free_mb = d.vram_total_mb.saturating_sub(used);
        }
    }

    /// Serve on an ephemeral loopback port; returns the base URL.
    pub async fn serve(self: &Arc<Self>) -> String {
        self.update_free();
        let app = Router::new()
            .route("/health", get(health))
            .route("/discovery", get(discovery))
            .route("/models", get(models))
            .route("/models/load", post(load))
            .route("/models/unload", post(unload))
            .route("/tokenize", post(tokenize))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .with_state(Arc::clone(self));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        format!("http://{addr}")
    }
}

type Sim = State<Arc<NodeSim>>;

fn error(status: u16, code: &str, message: &str) -> Response {
    let envelope = api::ErrorEnvelope::new("server_error", message).with_code(code);
    (StatusCode::from_u16(status).unwrap(), Json(envelope)).into_response()
}

async fn health(State(sim): Sim) -> Response {
    if sim.failing.load(Ordering::SeqCst) {
        return error(500, "down", "down");
    }
    Json(api::Health {
        status: api::NodeStatus::Ok,
        models: sim.models.lock().unwrap().clone(),
        devices: sim.devices.lock().unwrap().clone(),
    })
    .into_response()
}

async fn discovery(State(sim): Sim) -> Json<api::Discovery> {
    sim.record("discovery".to_owned());
    Json(api::Discovery {
        host: "stand-in".to_owned(),
        node_version: "0.0.0".to_owned(),
        engine: api::EngineInfo {
            backend: "cpu".to_owned(),
            name: "stand-in".to_owned(),
            version: "0".to_owned(),
            abi_version: "1.0".to_owned(),
        },
        devices: sim.devices.lock().unwrap().clone(),
    })
}

async fn models(State(sim): Sim) -> Response {
    if sim.failing.load(Ordering::SeqCst) {
        return error(500, "down", "down");
    }
    Json(api::ModelList {
        object: "list".to_owned(),
        data: sim.models.lock().unwrap().clone(),
    })
    .into_response()
}

async fn load(State(sim): Sim, Json(request): Json<api::LoadRequest>) -> Response {
    sim.record(format!("load:{}", request.id));
    let delay = *sim.load_delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    sim.loads.fetch_add(1, Ordering::SeqCst);
    let info = model(&request.id, api::ModelState::Ready, 1000, 0);
    sim.models.lock().unwrap().push(info.clone());
    sim.update_free();
    Json(api::LoadResponse {
        model: info,
        load_ms: delay.as_millis() as u64,
    })
    .into_response()
}

async fn unload(State(sim): Sim, Json(request): Json<api::UnloadRequest>) -> Response {
    sim.record(format!("unload:{}", request.id));
    sim.models.lock().unwrap().retain(|m| m.id != request.id);
    sim.update_free();
    Json(json!({"ok": true})).into_response()
}

async fn tokenize(
    State(sim): Sim,
    Json(request): Json<api::TokenizeRequest>,
) -> Json<api::TokenizeResponse> {
    sim.record(format!("tokenize:{}", request.model));
    // One "token" per whitespace-separated word of every message and tool, so tests can
    // predict the count.
    let words: usize = request
        .messages
        .iter()
        .flatten()
        .chain(request.tools.iter().flatten())
        .map(|m| m.to_string().split_whitespace().count())
        .sum();
    Json(api::TokenizeResponse {
        tokens: vec![1; words],
        count: words,
    })
}

async fn completions(State(sim): Sim, Json(body): Json<Value>) -> Response {
    sim.record(format!(
        "completions:{}",
        body["model"].as_str().unwrap_or("")
    ));
    Json(json!({
        "id": "cmpl-1", "object": "text_completion", "model": body["model"],
        "choices": [{"index": 0, "text": "Hello, world!", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    }))
    .into_response()
}

async fn chat(State(sim): Sim, Json(body): Json<Value>) -> Response {
    let model = body["model"].as_str().unwrap_or("").to_owned();
    sim.record(format!("chat:{model}"));
    *sim.last_chat.lock().unwrap() = Some(body.clone());
    if let Some(status) = sim.chat_status.lock().unwrap().take() {
        return error(status, "overloaded", "scripted failure");
    }
    let scripted = sim.chat_error.lock().unwrap().clone();
    if let Some(e) = scripted {
        let mut response = error(e.status, e.code, e.message);
        if let Some(secs) = e.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, secs.into());
        }
        return response;
    }
    if !sim.models.lock().unwrap().iter().any(|m| m.id == model) {
        return error(404, api::error_code::MODEL_NOT_FOUND, "model not loaded");
    }
    let script = sim.script.lock().unwrap().clone();
    if body["stream"].as_bool() == Some(true) {
        stream_chat(&model, script)
    } else {
        tokio::time::sleep(script.answer_delay).await;
        Json(complete_chat(&model, &script)).into_response()
    }
}

fn complete_chat(model: &str, script: &Script) -> Value {
    let mut message = json!({"role": "assistant", "content": script.text.concat()});
    if !script.reasoning.is_empty() {
        message["reasoning_content"] = json!(script.reasoning.concat());
    }
    let mut finish = "stop";
    if let Some((id, name, args)) = &script.tool_call {
        message["tool_calls"] = json!([{
            "id": id, "type": "function", "function": {"name": name, "arguments": args.concat()}
        }]);
        finish = "tool_calls";
    }
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    })
}

/// The chunks of a streamed chat completion, as the node would send them.
pub fn chat_chunks(model: &str, script: &Script) -> Vec<Value> {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut chunks = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for r in &script.reasoning {
        chunks.push(chunk(json!({"reasoning_content": r}), Value::Null));
    }
    for t in &script.text {
        chunks.push(chunk(json!({"content": t}), Value::Null));
    }
    let mut finish = "stop";
    if let Some((id, name, args)) = &script.tool_call {
        chunks.push(chunk(
            json!({"tool_calls": [{"index": 0, "id": id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]}),
            Value::Null,
        ));
        for a in args {
            chunks.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}),
                Value::Null,
            ));
        }
        finish = "tool_calls";
    }
    chunks.push(chunk(json!({}), json!(finish)));
    let mut usage = chunk(json!({}), Value::Null);
    usage["choices"] = json!([]);
    usage["usage"] = json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18});
    chunks.push(usage);
    chunks
}

fn stream_chat(model: &str, script: Script) -> Response {
    let mut events: Vec<Bytes> = chat_chunks(model, &script)
        .iter()
        .map(|c| Bytes::from(format!("data: {c}\n\n")))
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let die_after = script.die_after;
    let stall_after = script.stall_after;
    let delay = script.delay;
    let stream = futures::stream::unfold(
        (events.into_iter(), 0usize),
        move |(mut it, n)| async move {
            if die_after.is_some_and(|d| n > d) {
                return None;
            }
            if die_after == Some(n) {
                // An error item makes hyper abort the connection mid-body: a dead node.
                return Some((Err(std::io::Error::other("node died")), (it, n + 1)));
            }
            if stall_after == Some(n) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let next = it.next()?;
            Some((Ok(next), (it, n + 1)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// A "node" that accepts connections, reads the start of each request, then closes the
/// connection without answering (a node crashing mid-request). Returns its URL and the
/// number of generation requests it has received so far.
pub async fn closing_node() -> (String, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                // Only generation requests count, not the fleet poller's.
                if matches!(socket.read(&mut buffer).await, Ok(n) if buffer[..n].starts_with(b"POST /v1/"))
                {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                drop(socket);
            });
        }
    });
    (url, received)
}
