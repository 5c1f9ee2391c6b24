//! Start a real gateway (`helexa::api::app` on loopback) in front of stand-in nodes.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helexa::catalogue::{self, CatalogueStore};
use helexa::config::{Config, Overrides};
use helexa::gateway::{AppState, Gateway};
use helexa::metrics::Metrics;
use helexa::policy::*;
use serde_json::Value;

pub const ALICE_KEY: &str = "sk-alice-0123456789";
pub const BOB_KEY: &str = "sk-bob-0123456789";

pub const CATALOGUE: &str = r#"
[[models]]
id = "qwen3-8b"
source = "Qwen/Qwen3-8B"
vram_mb = 1000
aliases = ["gpt-4o", "claude-sonnet-4-5"]
capabilities = ["chat", "tools", "reasoning"]
context_length = 4096

[[models]]
id = "llama-3b"
source = "meta-llama/Llama-3.2-3B-Instruct"
vram_mb = 1000

[[models]]
id = "big"
source = "org/big"
vram_mb = 1500
"#;

/// A running gateway.
pub struct Gw {
    pub url: String,
    pub state: AppState,
    pub http: reqwest::Client,
}

pub struct Options {
    pub auth: bool,
    pub queue_budget_secs: u64,
    pub stall_timeout_secs: u64,
    pub poll_interval: Duration,
    /// Catalogue TOML appended to [`CATALOGUE`].
    pub extra_catalogue: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth: false,
            queue_budget_secs: 5,
            stall_timeout_secs: 5,
            poll_interval: Duration::from_millis(100),
            extra_catalogue: "",
        }
    }
}

pub async fn start(nodes: &[(&str, &str)], policies: Arc<dyn Policies>, options: Options) -> Gw {
    let mut toml = String::new();
    for (name, endpoint) in nodes {
        toml.push_str(&format!(
            "[[nodes]]\nname = \"{name}\"\nendpoint = \"{endpoint}\"\nlabels = [\"test\"]\n"
        ));
    }
    toml.push_str(&format!(
        "[proxy]\nqueue_budget_secs = {}\nstall_timeout_secs = {}\nkeepalive_secs = 1\n",
        options.queue_budget_secs, options.stall_timeout_secs
    ));
    if options.auth {
        toml.push_str(&format!(
            "[auth]\nkeys = [{{ name = \"alice\", key = \"{ALICE_KEY}\" }}, {{ name = \"bob\", key_env = \"BOB\" }}]\n"
        ));
    }
    let env = |name: &str| (name == "BOB").then(|| BOB_KEY.to_owned());
    let config =
        Config::from_toml(&toml, "test", Path::new("."), &Overrides::default(), &env).unwrap();
    let names: Vec<String> = nodes.iter().map(|(n, _)| n.to_string()).collect();
    let text = format!("{CATALOGUE}{}", options.extra_catalogue);
    let specs = catalogue::parse(&text, "catalogue", &names).unwrap();
    let catalogue = Arc::new(CatalogueStore::from_specs(specs));
    let metrics = Metrics::new().unwrap();
    let state = Gateway::new(&config, catalogue, policies, metrics).unwrap();
    state.start_polling(options.poll_interval).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = helexa::api::app(Arc::clone(&state));
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Gw {
        url,
        state,
        http: reqwest::Client::new(),
    }
}

impl Gw {
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    pub fn metric(&self, needle: &str) -> f64 {
        let text = self.state.metrics().render().unwrap();
        text.lines()
            .filter(|l| l.starts_with(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Split an SSE body into `(event name, data)` pairs.
pub fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = None;
            let mut data = Vec::new();
            for line in e.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v);
                }
            }
            (name, data.join("\n"))
        })
        .collect()
}

/// Policies for tests of the routing path: a native router (or a scripted one, to reach
/// every kind of decision) and an LRU evictor that records its calls. Translation is
/// tested with the real runtime (`translated.rs`), so it fails here.
pub type RouteFn = dyn Fn(&RequestInfo, &Catalogue, &Fleet) -> Decision + Send + Sync;

pub struct TestPolicies {
    pub router: Box<RouteFn>,
    pub evictions: Mutex<Vec<(String, u64, String)>>,
    pub callers: Mutex<Vec<Option<String>>>,
}

impl TestPolicies {
    pub fn new() -> Self {
        TestPolicies {
            router: Box::new(simple_route),
            evictions: Mutex::new(Vec::new()),
            callers: Mutex::new(Vec::new()),
        }
    }

    pub fn with_router(
        router: impl Fn(&RequestInfo, &Catalogue, &Fleet) -> Decision + Send + Sync + 'static,
    ) -> Self {
        TestPolicies {
            router: Box::new(router),
            ..TestPolicies::new()
        }
    }
}

/// Serve where ready; wait while loading; else load on the first reachable node, asking
/// to free what the model needs beyond the node's free memory.
pub fn simple_route(req: &RequestInfo, cat: &Catalogue, fleet: &Fleet) -> Decision {
    let Some(entry) = find_entry(cat, &req.model) else {
        return Decision::Reject(Rejection {
            status: 404,
            message: format!("unknown model {}", req.model),
            retry_after_ms: None,
        });
    };
    let up = || {
        fleet
            .nodes
            .iter()
            .filter(|n| n.health != Health::Unreachable)
    };
    let ready: Vec<String> = up()
        .filter(|n| {
            n.models
                .iter()
                .any(|m| m.id == entry.id && m.state == ModelState::Ready)
        })
        .map(|n| n.name.clone())
        .collect();
    if let Some((first, rest)) = ready.split_first() {
        return Decision::Serve(ServePlan {
            node: first.clone(),
            fallbacks: rest.to_vec(),
        });
    }
    if up().any(|n| {
        n.models
            .iter()
            .any(|m| m.id == entry.id && m.state == ModelState::Loading)
    }) {
        return Decision::RetryAfter(50);
    }
    let Some(node) = up().next() else {
        return Decision::RetryAfter(200);
    };
    let free: u64 = node.devices.iter().map(|d| d.vram_free_mb).sum();
    Decision::Load(LoadPlan {
        node: node.name.clone(),
        devices: vec![0],
        free_mb_needed: entry.vram_mb.saturating_sub(free),
    })
}

impl Policies for TestPolicies {
    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &Arc<Catalogue>,
        fleet: &Arc<Fleet>,
    ) -> Decision {
        self.callers.lock().unwrap().push(request.caller.clone());
        (self.router)(request, catalogue, fleet)
    }

    fn choose_victims(&self, on: &Node, need_mb: u64, incoming: &CatalogueEntry) -> Vec<String> {
        self.evictions
            .lock()
            .unwrap()
            .push((on.name.clone(), need_mb, incoming.id.clone()));
        let mut models: Vec<&ResidentModel> = on.models.iter().collect();
        models.sort_by_key(|m| std::cmp::Reverse(m.idle_ms));
        let mut freed = 0;
        let mut victims = Vec::new();
        for m in models {
            if freed >= need_mb {
                break;
            }
            freed += m.vram_mb;
            victims.push(m.id.clone());
        }
        victims
    }

    fn request_to_chat(&self, _: Surface, _: &str) -> Result<String, TranslateError> {
        Err(TranslateError::Failed("no translator in this test".into()))
    }

    fn response_from_chat(&self, _: Surface, _: &str, _: &str) -> Result<String, TranslateError> {
        Err(TranslateError::Failed("no translator in this test".into()))
    }

    fn response_stream(
        &self,
        _: Surface,
        _: &str,
        _: &str,
    ) -> Result<Box<dyn EventStream>, TranslateError> {
        Err(TranslateError::Failed("no translator in this test".into()))
    }

    fn describe(&self) -> Value {
        serde_json::json!([{"name": "test", "kind": "router"}])
    }
}

/// The Prometheus text the gateway's metrics listener at `metrics_url` serves.
pub async fn metrics_text(gw: &Gw, metrics_url: &str) -> String {
    gw.http
        .get(metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sum of `helexa_policy_calls_total` over the series carrying every `labels` pair
/// (`("plugin", "trap")`, …), read from the gateway's metrics listener at `metrics_url`.
pub async fn policy_calls(gw: &Gw, metrics_url: &str, labels: &[(&str, &str)]) -> u64 {
    let text = metrics_text(gw, metrics_url).await;
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| l.starts_with("helexa_policy_calls_total{"))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
