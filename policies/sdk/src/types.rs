//! Plain Rust mirrors of the records in `wit/types.wit` (`helexa:policy@0.1.0`).
//!
//! Policy logic is written against these, never against generated bindings, so it
//! compiles and tests natively. Field names are the WIT names in snake_case; enum
//! cases serialise in snake_case (`"openai_chat"`, `"ready"`, `"unreachable"`), and
//! [`Decision`] is externally tagged (`{"serve": {...}}`, `{"retry_after": 500}`).
//! Lists and options may be omitted in JSON (they default to empty / `None`); any
//! unknown field is an error so that typos in case files do not pass silently.

use serde::{Deserialize, Serialize};

/// The API surface a client request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Surface {
    /// `POST /v1/chat/completions`.
    #[default]
    OpenaiChat,
    /// `POST /v1/completions`.
    OpenaiCompletions,
    /// `POST /v1/responses`.
    OpenaiResponses,
    /// `POST /v1/messages` (and `/v1/messages/count_tokens`).
    AnthropicMessages,
}

/// What the router knows about one client request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestInfo {
    /// The model name exactly as the client sent it: a catalogue id or an alias.
    pub model: String,
    /// Which API the client used.
    #[serde(default)]
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
    /// The name of the API key that authenticated the request, if auth is on.
    #[serde(default)]
    pub caller: Option<String>,
    /// `x-helexa-*` request headers, lower-cased, in arrival order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// Residency class of a catalogue entry whose `residency_priority` is unset.
pub const DEFAULT_RESIDENCY_PRIORITY: u32 = 100;
/// Residency class of an unset-priority entry that is pinned to named nodes.
pub const PINNED_RESIDENCY_PRIORITY: u32 = 1000;

/// One model of the gateway's catalogue (`models.toml`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueEntry {
    /// Canonical model id, e.g. `qwen3-8b`.
    pub id: String,
    /// Other names clients may use for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// VRAM the model needs once loaded (weights + KV budget), in MiB.
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
    /// Residency class; see [`CatalogueEntry::residency_class`].
    #[serde(default)]
    pub residency_priority: Option<u32>,
    /// Longest context (prompt + output) in tokens.
    #[serde(default)]
    pub context_length: u32,
}

impl CatalogueEntry {
    /// The effective residency class: `residency_priority` if set, else
    /// [`PINNED_RESIDENCY_PRIORITY`] for a model with a non-empty `pinned_on`, else
    /// [`DEFAULT_RESIDENCY_PRIORITY`] (the rule stated in `types.wit`).
    pub fn residency_class(&self) -> u32 {
        match self.residency_priority {
            Some(priority) => priority,
            None if !self.pinned_on.is_empty() => PINNED_RESIDENCY_PRIORITY,
            None => DEFAULT_RESIDENCY_PRIORITY,
        }
    }

    /// Whether `name` is this entry's id or one of its aliases.
    pub fn answers_to(&self, name: &str) -> bool {
        self.id == name || self.aliases.iter().any(|alias| alias == name)
    }
}

/// One accelerator (or the CPU) of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[serde(deny_unknown_fields)]
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
    #[serde(default = "default_residency_priority")]
    pub residency_priority: u32,
}

fn default_residency_priority() -> u32 {
    DEFAULT_RESIDENCY_PRIORITY
}

/// Node health as the gateway's poller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Answering and reporting no faults.
    Healthy,
    /// Answering, but a device or model is faulted or it is draining.
    Degraded,
    /// Not answering; probably transient.
    Unreachable,
}

/// Recent latency of a node, from the gateway's own measurements.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyStats {
    /// Median time to first token over the recent window, ms (0 = no samples).
    pub ttft_p50_ms: f32,
    /// Median inter-token latency, ms.
    pub itl_p50_ms: f32,
    /// Requests in the window.
    pub samples: u32,
}

/// One node of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique node name from the gateway config.
    pub name: String,
    /// Current health.
    pub health: Health,
    /// Operator labels (e.g. `gpu=h200`).
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

/// The whole fleet view.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Monotonic version; the host bumps it on every change.
    #[serde(default)]
    pub version: u64,
    /// Nodes in configuration order.
    pub nodes: Vec<Node>,
}

/// Serve on a node where the model is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServePlan {
    /// Node name.
    pub node: String,
    /// Nodes to try next, in order, if the first fails before the first byte.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

/// Load the model on a node, then serve there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadPlan {
    /// Node name.
    pub node: String,
    /// Device ordinals to load onto.
    pub devices: Vec<u32>,
    /// MiB that must be freed on the node first (0 = it fits now).
    pub free_mb_needed: u64,
}

/// Refuse the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    /// HTTP status (404 unknown/unhostable model, 503 transient, 429 busy, ...).
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
    /// Nothing can serve it right now but soon may: ask again after this many ms.
    RetryAfter(u32),
    /// Refuse (with a status and a reason).
    Reject(Rejection),
}

/// An expected failure of a policy (a fault is a trap instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum PolicyError {
    /// The input was not understood (the client gets a 400 with this message).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The policy's settings are wrong (reported at instantiation).
    #[error("bad settings: {0}")]
    BadSettings(String),
    /// Anything else; the host falls back to the default policy.
    #[error("internal policy error: {0}")]
    Internal(String),
}

/// One server-sent event to write to the client.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SseEvent {
    /// The `event:` field, if any.
    #[serde(default)]
    pub event: Option<String>,
    /// The `data:` field (JSON text, or `[DONE]`).
    pub data: String,
}
