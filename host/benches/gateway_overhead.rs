//! Gateway overhead: the latency the gateway adds to a request, measured against calling
//! the node directly, in one run (DESIGN.md §9). A stand-in node and the real gateway
//! (`helexa::api::app`, real routing through a `Policies` implementation, real proxy)
//! run in-process on loopback; requests are sequential and alternate between the two
//! paths so drift affects both alike.
//!
//! - non-streaming: N = 2000 chat completions each way; added p50/p99 of the whole
//!   request;
//! - streaming: 500 streamed completions of 16 chunks each way; every chunk carries the
//!   time the node wrote it, so the client measures each chunk's delivery latency;
//!   added p50/p99 per chunk.
//!
//! Run: `cargo bench -p helexa --bench gateway_overhead`. Target: p99 added ≤ 250 µs
//! for passthrough.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use helexa::catalogue::{self, CatalogueStore};
use helexa::config::{Config, Overrides};
use helexa::gateway::Gateway;
use helexa::metrics::Metrics;
use helexa::policy::*;
use helexa_node_api as api;
use serde_json::{Value, json};

const REQUESTS: usize = 2000;
const STREAM_REQUESTS: usize = 500;
const CHUNKS: usize = 16;
const CHUNK_SPACING: Duration = Duration::from_millis(1);

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn nanos_now() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn model_info() -> api::ModelInfo {
    api::ModelInfo {
        id: "m".into(),
        state: api::ModelState::Ready,
        architecture: "qwen3".into(),
        source: "bench".into(),
        quant: "bf16".into(),
        context_length: 4096,
        capabilities: vec![],
        tool_calls: false,
        reasoning: false,
        vram_mb: 1000,
        devices: vec![0],
        in_flight: 0,
        queue_depth: 0,
        idle_ms: 0,
        error: None,
        progress: None,
    }
}

async fn start_node() -> String {
    let health = || async {
        Json(api::Health {
            status: api::NodeStatus::Ok,
            models: vec![model_info()],
            devices: vec![],
        })
    };
    let models = || async {
        Json(api::ModelList {
            object: "list".into(),
            data: vec![model_info()],
        })
    };
    let discovery = || async {
        Json(api::Discovery {
            host: "bench".into(),
            node_version: "0".into(),
            engine: api::EngineInfo {
                backend: "cpu".into(),
                name: "bench".into(),
                version: "0".into(),
                abi_version: "1.0".into(),
            },
            devices: vec![],
        })
    };
    let app = Router::new()
        .route("/health", get(health))
        .route("/models", get(models))
        .route("/discovery", get(discovery))
        .route("/v1/chat/completions", post(chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn chat(Json(body): Json<Value>) -> Response {
    if body["stream"].as_bool() != Some(true) {
        return Json(json!({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant",
                "content": "The quick brown fox jumps over the lazy dog. ".repeat(8)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 42, "completion_tokens": 80, "total_tokens": 122}
        }))
        .into_response();
    }
    let stream = futures::stream::unfold(0usize, |i| async move {
        if i > CHUNKS {
            return None;
        }
        if i == CHUNKS {
            return Some((
                Ok::<Bytes, std::convert::Infallible>(Bytes::from_static(b"data: [DONE]\n\n")),
                i + 1,
            ));
        }
        if i > 0 {
            tokio::time::sleep(CHUNK_SPACING).await;
        }
        let chunk = format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"t\":{},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token\"}},\"finish_reason\":null}}]}}\n\n",
            nanos_now()
        );
        Some((Ok(Bytes::from(chunk)), i + 1))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Serve on the one node: what a router answers when the model is loaded there.
struct BenchPolicies;

impl Policies for BenchPolicies {
    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &Arc<Catalogue>,
        fleet: &Arc<Fleet>,
    ) -> Decision {
        match find_entry(catalogue, &request.model) {
            Some(entry) => match fleet
                .nodes
                .iter()
                .find(|n| n.models.iter().any(|m| m.id == entry.id))
            {
                Some(node) => Decision::Serve(ServePlan {
                    node: node.name.clone(),
                    fallbacks: vec![],
                }),
                None => Decision::RetryAfter(100),
            },
            None => Decision::Reject(Rejection {
                status: 404,
                message: "unknown".into(),
                retry_after_ms: None,
            }),
        }
    }
    fn choose_victims(&self, _: &Node, _: u64, _: &CatalogueEntry) -> Vec<String> {
        vec![]
    }
    fn request_to_chat(&self, _: Surface, body: &str) -> Result<String, TranslateError> {
        Ok(body.to_owned())
    }
    fn response_from_chat(
        &self,
        _: Surface,
        _: &str,
        body: &str,
    ) -> Result<String, TranslateError> {
        Ok(body.to_owned())
    }
    fn response_stream(
        &self,
        _: Surface,
        _: &str,
        _: &str,
    ) -> Result<Box<dyn EventStream>, TranslateError> {
        Err(TranslateError::Failed("not benchmarked".into()))
    }
    fn describe(&self) -> Value {
        json!("bench")
    }
}

/// The embedded default router if the runtime has one, else the native stand-in.
fn policies(registry: &prometheus::Registry) -> (Arc<dyn Policies>, &'static str) {
    match helexa::policy::load(&Default::default(), registry) {
        Ok(p) => (Arc::new(p), "embedded wasm default policies"),
        Err(e) => {
            eprintln!(
                "(default policies unavailable: {e}; using a native serve-where-loaded router)"
            );
            (Arc::new(BenchPolicies), "native serve-where-loaded router")
        }
    }
}

async fn start_gateway(node: &str) -> (String, &'static str) {
    let toml = format!("[[nodes]]\nname = \"a\"\nendpoint = \"{node}\"\n");
    let config = Config::from_toml(
        &toml,
        "bench",
        Path::new("."),
        &Overrides::default(),
        &|_| None,
    )
    .unwrap();
    let specs = catalogue::parse(
        "[[models]]\nid = \"m\"\nsource = \"x\"\nvram_mb = 1000\n",
        "bench",
        &["a".into()],
    )
    .unwrap();
    let metrics = Metrics::new().unwrap();
    let (policies, which) = policies(&metrics.registry);
    let gateway = Gateway::new(
        &config,
        Arc::new(CatalogueStore::from_specs(specs)),
        policies,
        metrics,
    )
    .unwrap();
    gateway.start_polling(Duration::from_secs(1)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).unwrap());
    let app = helexa::api::app(gateway);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, which)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Summary {
    p50: Duration,
    p99: Duration,
}

fn summarise(mut v: Vec<Duration>) -> Summary {
    v.sort();
    Summary {
        p50: percentile(&v, 0.50),
        p99: percentile(&v, 0.99),
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn added(gw: Duration, direct: Duration) -> f64 {
    micros(gw) - micros(direct)
}

async fn one_request(client: &reqwest::Client, url: &str, body: &Bytes) -> Duration {
    let started = Instant::now();
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    response.bytes().await.unwrap();
    started.elapsed()
}

/// Delivery latency of every chunk of one streamed request.
async fn one_stream(client: &reqwest::Client, url: &str, body: &Bytes, out: &mut Vec<Duration>) {
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        let now = nanos_now();
        let text = std::str::from_utf8(&chunk).unwrap();
        for part in text.split("\"t\":").skip(1) {
            let sent: u64 = part
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            out.push(Duration::from_nanos(now.saturating_sub(sent)));
        }
    }
}

fn main() {
    EPOCH.get_or_init(Instant::now);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let node = start_node().await;
        let (gateway, which) = start_gateway(&node).await;
        let client = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
        let request = Bytes::from(
            json!({"model": "m", "max_tokens": 64, "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write one sentence about foxes and dogs, please."}]})
            .to_string(),
        );
        let stream_request = Bytes::from(
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        );

        for _ in 0..200 {
            one_request(&client, &node, &request).await;
            one_request(&client, &gateway, &request).await;
        }
        let (mut direct, mut via) = (Vec::with_capacity(REQUESTS), Vec::with_capacity(REQUESTS));
        for _ in 0..REQUESTS {
            direct.push(one_request(&client, &node, &request).await);
            via.push(one_request(&client, &gateway, &request).await);
        }
        let (d, g) = (summarise(direct), summarise(via));

        let (mut direct_chunks, mut via_chunks) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            one_stream(&client, &node, &stream_request, &mut Vec::new()).await;
            one_stream(&client, &gateway, &stream_request, &mut Vec::new()).await;
        }
        for _ in 0..STREAM_REQUESTS {
            one_stream(&client, &node, &stream_request, &mut direct_chunks).await;
            one_stream(&client, &gateway, &stream_request, &mut via_chunks).await;
        }
        let chunks = direct_chunks.len();
        let (ds, gs) = (summarise(direct_chunks), summarise(via_chunks));

        println!("gateway overhead ({which}; tokio 2 workers; loopback)");
        println!("non-streaming, N={REQUESTS} sequential requests each way");
        println!("  direct   p50 {:8.1} µs   p99 {:8.1} µs", micros(d.p50), micros(d.p99));
        println!("  gateway  p50 {:8.1} µs   p99 {:8.1} µs", micros(g.p50), micros(g.p99));
        println!("  added    p50 {:8.1} µs   p99 {:8.1} µs", added(g.p50, d.p50), added(g.p99, d.p99));
        println!("streaming, {STREAM_REQUESTS} requests x {CHUNKS} chunks each way ({chunks} chunks), per-chunk delivery");
        println!("  direct   p50 {:8.1} µs   p99 {:8.1} µs", micros(ds.p50), micros(ds.p99));
        println!("  gateway  p50 {:8.1} µs   p99 {:8.1} µs", micros(gs.p50), micros(gs.p99));
        println!("  added    p50 {:8.1} µs   p99 {:8.1} µs", added(gs.p50, ds.p50), added(gs.p99, ds.p99));
    });
}
