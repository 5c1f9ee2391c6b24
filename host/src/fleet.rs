//! The fleet poller: the gateway's view of its nodes, as routers see it.
//!
//! One task per node polls `GET /health` and `GET /models` every interval (and
//! `GET /discovery` once, and again after each reconnect) over a keep-alive client.
//! Health is debounced: one failed poll is noise, two in a row make a node
//! `unreachable`; one success makes it reachable again. After every poll the policy
//! [`Fleet`] is rebuilt and swapped in, with its version bumped only when something
//! changed, because a router instance is re-sent the whole fleet on each new version.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use helexa_node_api as api;
use serde_json::json;

use crate::catalogue::CatalogueStore;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::policy::{Device, Fleet, Health, LatencyStats, ModelState, Node, ResidentModel};

/// Consecutive failed polls after which a node counts as unreachable.
pub const FAILURES_UNTIL_UNREACHABLE: u32 = 2;
/// Latency samples kept per node.
const LATENCY_WINDOW: usize = 64;

/// Everything the gateway knows about one node.
#[derive(Debug)]
pub struct NodeHandle {
    /// Its configuration.
    pub config: NodeConfig,
    status: Mutex<NodeStatus>,
    latency: Mutex<VecDeque<(f32, f32)>>,
}

#[derive(Debug, Clone)]
struct NodeStatus {
    health: Health,
    failures: u32,
    discovery: Option<api::Discovery>,
    devices: Vec<api::DeviceInfo>,
    models: Vec<api::ModelInfo>,
    last_error: Option<String>,
}

/// The fleet: node handles, the current policy view and the poll client.
#[derive(Debug)]
pub struct FleetState {
    nodes: Vec<NodeHandle>,
    view: ArcSwap<Fleet>,
    rebuild_lock: Mutex<()>,
    catalogue: Arc<CatalogueStore>,
    metrics: Metrics,
    client: reqwest::Client,
}

impl FleetState {
    /// A fleet of `nodes`, all unreachable until their first successful poll.
    pub fn new(
        nodes: Vec<NodeConfig>,
        catalogue: Arc<CatalogueStore>,
        metrics: Metrics,
        poll_timeout: Duration,
    ) -> Result<FleetState, reqwest::Error> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(poll_timeout)
            .timeout(poll_timeout)
            .build()?;
        let nodes = nodes
            .into_iter()
            .map(|config| NodeHandle {
                config,
                status: Mutex::new(NodeStatus {
                    health: Health::Unreachable,
                    failures: 0,
                    discovery: None,
                    devices: Vec::new(),
                    models: Vec::new(),
                    last_error: Some("not polled yet".to_owned()),
                }),
                latency: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW)),
            })
            .collect();
        let state = FleetState {
            nodes,
            view: ArcSwap::from_pointee(Fleet::default()),
            rebuild_lock: Mutex::new(()),
            catalogue,
            metrics,
            client,
        };
        state.rebuild();
        Ok(state)
    }

    /// The current policy view (cheap: an `Arc` clone).
    pub fn view(&self) -> Arc<Fleet> {
        self.view.load_full()
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeHandle> {
        self.nodes.iter().find(|n| n.config.name == name)
    }

    /// All nodes in configuration order.
    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// Start one polling task per node.
    pub fn spawn_pollers(self: &Arc<Self>, interval: Duration) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.nodes.len())
            .map(|index| {
                let fleet = Arc::clone(self);
                tokio::spawn(async move {
                    // The first poll already happened (`Gateway::start_polling`).
                    let first = tokio::time::Instant::now() + interval;
                    let mut ticker = tokio::time::interval_at(first, interval);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        ticker.tick().await;
                        fleet.poll_index(index).await;
                    }
                })
            })
            .collect()
    }

    /// Poll every node once now (start-up, tests).
    pub async fn poll_all(&self) {
        futures::future::join_all((0..self.nodes.len()).map(|i| self.poll_index(i))).await;
    }

    /// Poll node `name` now, e.g. right after the gateway loaded or unloaded a model
    /// there, so the next routing decision sees it.
    pub async fn refresh(&self, name: &str) {
        if let Some(index) = self.nodes.iter().position(|n| n.config.name == name) {
            self.poll_index(index).await;
        }
    }

    async fn poll_index(&self, index: usize) {
        let Some(node) = self.nodes.get(index) else {
            return;
        };
        let base = &node.config.endpoint;
        let need_discovery = lock(&node.status).discovery.is_none();
        let discovery = if need_discovery {
            Some(
                self.get_json::<api::Discovery>(&format!("{base}/discovery"))
                    .await,
            )
        } else {
            None
        };
        let (health_url, models_url) = (format!("{base}/health"), format!("{base}/models"));
        let (health, models) = futures::join!(
            self.get_json::<api::Health>(&health_url),
            self.get_json::<api::ModelList>(&models_url),
        );
        {
            let mut status = lock(&node.status);
            match (health, models, discovery) {
                (Ok(health), Ok(models), discovery) => {
                    if let Some(Ok(d)) = discovery {
                        status.discovery = Some(d);
                    }
                    if status.health == Health::Unreachable {
                        tracing::info!(node = %node.config.name, "node reachable");
                    }
                    status.failures = 0;
                    status.health = match health.status {
                        api::NodeStatus::Ok => Health::Healthy,
                        api::NodeStatus::Degraded | api::NodeStatus::Draining => Health::Degraded,
                    };
                    status.devices = health.devices;
                    status.models = models.data;
                    status.last_error = None;
                }
                (health, models, _) => {
                    let error = health.err().or(models.err()).unwrap_or_default();
                    status.failures = status.failures.saturating_add(1);
                    if status.failures >= FAILURES_UNTIL_UNREACHABLE {
                        if status.health != Health::Unreachable {
                            tracing::warn!(node = %node.config.name, %error, "node unreachable");
                        }
                        status.health = Health::Unreachable;
                        // Ask again after reconnecting: the node may have been replaced.
                        status.discovery = None;
                        status.models.clear();
                    }
                    status.last_error = Some(error);
                }
            }
        }
        self.rebuild();
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: status {}", response.status()));
        }
        response
            .json::<T>()
            .await
            .map_err(|e| format!("GET {url}: bad body: {e}"))
    }

    /// Rebuild the policy view from the node statuses; bump the version only on change.
    pub fn rebuild(&self) {
        let _serialised = lock(&self.rebuild_lock);
        let catalogue = self.catalogue.current();
        let nodes: Vec<Node> = self
            .nodes
            .iter()
            .map(|handle| {
                let status = lock(&handle.status).clone();
                let latency = handle.latency_stats();
                let name = &handle.config.name;
                self.metrics
                    .node_health
                    .with_label_values(&[name])
                    .set(match status.health {
                        Health::Healthy => 1.0,
                        Health::Degraded => 0.5,
                        Health::Unreachable => 0.0,
                    });
                for d in &status.devices {
                    let index = d.index.to_string();
                    self.metrics
                        .vram_total
                        .with_label_values(&[name, &index])
                        .set(d.vram_total_mb as f64);
                    self.metrics
                        .vram_free
                        .with_label_values(&[name, &index])
                        .set(d.vram_free_mb as f64);
                }
                Node {
                    name: name.clone(),
                    health: status.health,
                    labels: handle.config.labels.clone(),
                    devices: status
                        .devices
                        .iter()
                        .map(|d| Device {
                            index: d.index,
                            vram_total_mb: d.vram_total_mb,
                            vram_free_mb: d.vram_free_mb,
                            compute_capability: d.compute_capability,
                        })
                        .collect(),
                    models: status
                        .models
                        .iter()
                        .map(|m| ResidentModel {
                            id: m.id.clone(),
                            state: match m.state {
                                api::ModelState::Loading => ModelState::Loading,
                                api::ModelState::Ready => ModelState::Ready,
                                api::ModelState::Unloading => ModelState::Unloading,
                                api::ModelState::Failed => ModelState::Failed,
                            },
                            vram_mb: m.vram_mb,
                            devices: m.devices.clone(),
                            idle_ms: m.idle_ms,
                            in_flight: m.in_flight,
                            queue_depth: m.queue_depth,
                            residency_priority: catalogue
                                .find(&m.id)
                                .map_or(100, |spec| spec.effective_priority()),
                        })
                        .collect(),
                    latency,
                }
            })
            .collect();
        let current = self.view.load();
        if current.nodes != nodes || current.version == 0 {
            self.view.store(Arc::new(Fleet {
                version: current.version + 1,
                nodes,
            }));
        }
    }

    /// The `nodes` part of `GET /health`.
    pub fn health_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.nodes
                .iter()
                .map(|handle| {
                    let status = lock(&handle.status).clone();
                    json!({
                        "name": handle.config.name,
                        "endpoint": handle.config.endpoint,
                        "health": status.health,
                        "last_error": status.last_error,
                        "engine": status.discovery.as_ref().map(|d| &d.engine),
                        "devices": status.devices,
                        "models": status.models.iter().map(|m| json!({
                            "id": m.id, "state": m.state, "in_flight": m.in_flight,
                            "queue_depth": m.queue_depth, "idle_ms": m.idle_ms,
                            "progress": m.progress,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    }
}

impl NodeHandle {
    /// Record one proxied request's latency (time to first token, mean gap between
    /// chunks), both in ms; feeds `LatencyStats` at the next rebuild.
    pub fn record_latency(&self, ttft_ms: f32, itl_ms: f32) {
        let mut window = lock(&self.latency);
        if window.len() == LATENCY_WINDOW {
            window.pop_front();
        }
        window.push_back((ttft_ms, itl_ms));
    }

    fn latency_stats(&self) -> LatencyStats {
        let window = lock(&self.latency);
        if window.is_empty() {
            return LatencyStats::default();
        }
        let median = |mut v: Vec<f32>| {
            v.sort_by(f32::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        LatencyStats {
            ttft_p50_ms: median(window.iter().map(|s| s.0).collect()),
            itl_p50_ms: median(window.iter().map(|s| s.1).filter(|v| *v > 0.0).collect()),
            samples: window.len() as u32,
        }
    }

    /// Current health (debounced).
    pub fn health(&self) -> Health {
        lock(&self.status).health
    }
}

/// Lock a mutex, ignoring poisoning: every critical section here leaves the data valid.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
