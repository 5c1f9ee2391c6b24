//! Plain domain types of the policy contract, mirroring `wit/types.wit` (helexa:policy@0.1.0).
//!
//! These are the host's own definitions: the gateway builds and reads them, and only
//! `crate::wit` converts them to and from the generated bindings of a particular WIT
//! version. The serde shape matches the policy SDK's plain types (snake_case fields,
//! kebab-free snake_case enum tags), so the router/evictor JSON case files under
//! `policies/*/tests/cases/` deserialize into either.

use serde::{Deserialize, Serialize};

/// The API surface a client request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Surface {
    /// `POST /v1/chat/completions`.
    OpenaiChat,
    /// `POST /v1/completions`.
    OpenaiCompletions,
    /// `POST /v1/responses`.
    OpenaiResponses,
    /// `POST /v1/messages` (and `/v1/messages/count_tokens`).
    AnthropicMessages,
}

/// What the router knows about one client request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// The model name exactly as the client sent it: a catalogue id or an alias.
    pub model: String,
    /// Which API the client used.
    pub surface: Surface,
    /// Rough prompt size in tokens; 0 when unknown.
    #[serde(default)]
    pub prompt_tokens_estimate: u32,
    /// `max_tokens` (or equivalent) when the client set one.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Whether the client asked for a streamed response.
    #[serde(default)]
    pub stream: bool,
    /// The configured name of the API key that authenticated the request.
    #[serde(default)]
    pub caller: Option<String>,
    /// `x-helexa-*` request headers, lower-cased, in arrival order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// One model of the gateway's catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogueEntry {
    /// Canonical model id.
    pub id: String,
    /// Other names clients may use for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// VRAM the model needs once loaded, in MiB.
    pub vram_mb: u64,
    /// Fewest devices it must be spread over.
    #[serde(default)]
    pub min_devices: u32,
    /// Each of those devices must have at least this much total VRAM, in MiB.
    #[serde(default)]
    pub min_device_vram_mb: u64,
    /// If non-empty, only these nodes (by name) may host it.
    #[serde(default)]
    pub pinned_on: Vec<String>,
    /// Residency class; unset means 100 (1000 when pinned).
    #[serde(default)]
    pub residency_priority: Option<u32>,
    /// Longest context (prompt + output) in tokens.
    #[serde(default)]
    pub context_length: u32,
}

/// The catalogue as the gateway holds it: versioned so routers are only told when it changes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Catalogue {
    /// Monotonic version; bump it on every change (the runtime pushes the catalogue into a
    /// router instance only when this differs from what the instance last saw).
    pub version: u64,
    /// The models.
    pub entries: Vec<CatalogueEntry>,
}

/// One accelerator (or the CPU) of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Device ordinal on its node.
    pub index: u32,
    /// Total memory in MiB.
    pub vram_total_mb: u64,
    /// Free memory in MiB as the node last reported it.
    pub vram_free_mb: u64,
    /// CUDA compute capability as `major * 10 + minor`; 0 for CPU.
    #[serde(default)]
    pub compute_capability: u32,
}

/// Where a model on a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Being loaded; not servable yet.
    Loading,
    /// Loaded and servable.
    Ready,
    /// Being unloaded.
    Unloading,
    /// Poisoned by a fault; not servable until reloaded.
    Failed,
}

/// A model resident (or becoming resident) on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResidentModel {
    /// Catalogue id.
    pub id: String,
    /// Life-cycle state.
    pub state: ModelState,
    /// VRAM it occupies, in MiB.
    pub vram_mb: u64,
    /// Devices it occupies.
    #[serde(default)]
    pub devices: Vec<u32>,
    /// Milliseconds since it last served a request (0 = serving now).
    #[serde(default)]
    pub idle_ms: u64,
    /// Requests being generated now.
    #[serde(default)]
    pub in_flight: u32,
    /// Requests admitted but waiting for a slot.
    #[serde(default)]
    pub queue_depth: u32,
    /// Its residency class.
    #[serde(default = "default_priority")]
    pub residency_priority: u32,
}

fn default_priority() -> u32 {
    100
}

/// Node health as the gateway's poller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Answering and reporting no faults.
    Healthy,
    /// Answering, but something is faulted or it is draining.
    Degraded,
    /// Not answering.
    Unreachable,
}

/// Recent latency of a node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Median time to first token, ms (0 = no samples).
    #[serde(default)]
    pub ttft_p50_ms: f32,
    /// Median inter-token latency, ms.
    #[serde(default)]
    pub itl_p50_ms: f32,
    /// Requests in the window.
    #[serde(default)]
    pub samples: u32,
}

/// One node of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique node name.
    pub name: String,
    /// Current health.
    pub health: Health,
    /// Operator labels.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Devices.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// Resident models.
    #[serde(default)]
    pub models: Vec<ResidentModel>,
    /// Recent latency.
    #[serde(default)]
    pub latency: LatencyStats,
}

impl Node {
    /// Whether `model_id` is resident here and ready to serve.
    pub fn has_ready(&self, model_id: &str) -> bool {
        self.models
            .iter()
            .any(|m| m.id == model_id && m.state == ModelState::Ready)
    }
}

/// The whole fleet view.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Fleet {
    /// Monotonic version; bump it on every change (see [`Catalogue::version`]).
    #[serde(default)]
    pub version: u64,
    /// Nodes in configuration order.
    pub nodes: Vec<Node>,
}

/// Serve on a node where the model is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServePlan {
    /// Node name.
    pub node: String,
    /// Nodes to try next, in order, if the first fails before the first byte.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

/// Load the model on a node, then serve there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadPlan {
    /// Node name.
    pub node: String,
    /// Device ordinals to load onto.
    pub devices: Vec<u32>,
    /// MiB that must be freed on the node first (the evictor chooses victims).
    #[serde(default)]
    pub free_mb_needed: u64,
}

/// Refuse the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// HTTP status.
    pub status: u16,
    /// A message a person can act on; it reaches the client.
    pub message: String,
    /// For 429/503: when to retry, in ms.
    #[serde(default)]
    pub retry_after_ms: Option<u32>,
}

/// The router's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Serve on a node where the model is ready.
    Serve(ServePlan),
    /// Load first, then serve.
    Load(LoadPlan),
    /// Ask again after this many ms.
    RetryAfter(u32),
    /// Refuse.
    Reject(Rejection),
}

/// One server-sent event to write to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SseEvent {
    /// The `event:` field, if any.
    #[serde(default)]
    pub event: Option<String>,
    /// The `data:` field.
    pub data: String,
}

/// The three kinds of policy (one WIT world each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// World `router`, interface `routing`.
    Router,
    /// World `evictor`, interface `eviction`.
    Evictor,
    /// World `translator`, interface `translation`.
    Translator,
}

impl PolicyKind {
    /// The WIT interface a component of this kind must export (without package/version).
    pub fn interface(self) -> &'static str {
        match self {
            PolicyKind::Router => "routing",
            PolicyKind::Evictor => "eviction",
            PolicyKind::Translator => "translation",
        }
    }

    /// Lower-case name, as used in metrics labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Router => "router",
            PolicyKind::Evictor => "evictor",
            PolicyKind::Translator => "translator",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
