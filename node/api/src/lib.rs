//! Serde types of the node HTTP API (DESIGN.md §4).
//!
//! `helexa-node` serves these; the gateway (`helexa`) is their client. The
//! OpenAI-compatible generation routes (`/v1/chat/completions`, `/v1/completions`)
//! carry OpenAI's own JSON and are not re-modelled here: the gateway passes them
//! through. Everything else a gateway needs to know about a node is here.
//!
//! Fields are added, never renamed; unknown fields are ignored by readers so a newer
//! node can talk to an older gateway.

use serde::{Deserialize, Serialize};

/// Default port of `helexa-node`.
pub const DEFAULT_NODE_PORT: u16 = 13131;

/// Life-cycle state of a model on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Being loaded (downloading or reading weights).
    Loading,
    /// Servable.
    Ready,
    /// Being unloaded.
    Unloading,
    /// Poisoned by a device or model fault; the reason is in `error`.
    Failed,
}

/// Overall state of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Serving normally.
    Ok,
    /// Serving, but some model or device is faulted.
    Degraded,
    /// Finishing in-flight work before exit; accepts nothing new.
    Draining,
}

/// One device as reported by the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Ordinal on this node.
    pub index: u32,
    /// Human name (e.g. `NVIDIA H200`, `cpu`).
    pub name: String,
    /// Total memory, MiB.
    pub vram_total_mb: u64,
    /// Free memory, MiB.
    pub vram_free_mb: u64,
    /// CUDA compute capability as `major*10+minor`; 0 for CPU.
    #[serde(default)]
    pub compute_capability: u32,
    /// Utilisation in percent, when the backend knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_pct: Option<f32>,
    /// Temperature in °C, when the backend knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f32>,
    /// Set when a device fault poisoned this device's worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// A model known to a node (loaded, loading or failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The id it is served under.
    pub id: String,
    /// Life-cycle state.
    pub state: ModelState,
    /// Architecture (`qwen3`, `llama`, `qwen3_moe`).
    #[serde(default)]
    pub architecture: String,
    /// Where the weights came from (path or hub id).
    #[serde(default)]
    pub source: String,
    /// Weight format (`bf16`, `f32`, `Q4_K_M`, ...).
    #[serde(default)]
    pub quant: String,
    /// Longest context in tokens.
    #[serde(default)]
    pub context_length: u32,
    /// `chat`, `completion`, `tools`, `reasoning`.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The chat template can render tools and the output parser extracts tool calls.
    #[serde(default)]
    pub tool_calls: bool,
    /// The model has think markers; reasoning is streamed as `reasoning_content`.
    #[serde(default)]
    pub reasoning: bool,
    /// Memory it occupies, MiB.
    #[serde(default)]
    pub vram_mb: u64,
    /// Devices it occupies.
    #[serde(default)]
    pub devices: Vec<u32>,
    /// Requests generating now.
    #[serde(default)]
    pub in_flight: u32,
    /// Requests waiting for a slot.
    #[serde(default)]
    pub queue_depth: u32,
    /// Milliseconds since it last served (0 = serving now or never served).
    #[serde(default)]
    pub idle_ms: u64,
    /// Why it failed, when `state` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How far a load has got, while `state` is `loading`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<LoadProgress>,
}

/// How far a load has got: downloading files from the hub (bytes counted), then reading the
/// weights into the engine (one engine call; no byte count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadProgress {
    /// `resolving` (finding files), `downloading` or `loading_weights`.
    pub phase: String,
    /// Bytes downloaded so far.
    pub done_bytes: u64,
    /// Bytes of the files whose download has started (grows file by file; 0 = nothing to
    /// download).
    pub total_bytes: u64,
}

/// `GET /models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelInfo>,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Overall state.
    pub status: NodeStatus,
    /// Per-model load and state (pre-warmed models appear from start-up with
    /// `loading` until they are ready).
    pub models: Vec<ModelInfo>,
    /// Per-device memory.
    pub devices: Vec<DeviceInfo>,
}

/// Engine identity in `GET /discovery`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// `cpu`, `cuda`, ...
    pub backend: String,
    /// Engine crate name.
    pub name: String,
    /// Engine version.
    pub version: String,
    /// C ABI version `major.minor`.
    pub abi_version: String,
}

/// `GET /discovery`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discovery {
    /// Host name.
    pub host: String,
    /// `helexa-node` version.
    pub node_version: String,
    /// The loaded engine.
    pub engine: EngineInfo,
    /// Devices.
    pub devices: Vec<DeviceInfo>,
}

/// `POST /models/load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// Id to serve the model under.
    pub id: String,
    /// A local directory, a local `.gguf` file, or a Hugging Face repo id
    /// (`org/name`, resolved in the local cache, else downloaded).
    pub source: String,
    /// For GGUF repos/dirs: which quantisation file (`Q4_K_M`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
    /// Compute dtype for safetensors weights (`bf16`, `f16`, `f32`); engine default if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Devices to load onto; engine chooses if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<u32>>,
    /// Context length to allocate; the model's own limit if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

/// `POST /models/load` success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadResponse {
    /// The loaded model.
    pub model: ModelInfo,
    /// Wall time of the load, ms.
    pub load_ms: u64,
}

/// `POST /models/unload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    /// Model id.
    pub id: String,
}

/// `POST /tokenize`: either raw `prompt` text, or chat `messages` (+ `tools`)
/// rendered with the model's template first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeRequest {
    /// Model id.
    pub model: String,
    /// Raw text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// OpenAI chat messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<serde_json::Value>>,
    /// OpenAI tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Extra template variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Add the assistant generation prompt (default true for messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_generation_prompt: Option<bool>,
}

/// `POST /tokenize` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeResponse {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// `tokens.len()`.
    pub count: usize,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeRequest {
    /// Model id.
    pub model: String,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    /// Decoded text.
    pub text: String,
}

/// `POST /apply-template` answer (the request is a [`TokenizeRequest`] with `messages`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyTemplateResponse {
    /// The rendered prompt text.
    pub prompt: String,
}

/// Machine-readable error codes of the node API (`error.code`).
pub mod error_code {
    /// `/models/load`: `config.json` names an architecture the engine lacks.
    pub const UNKNOWN_ARCHITECTURE: &str = "unknown_architecture";
    /// `/models/load`: a required file is missing.
    pub const MISSING_FILES: &str = "missing_files";
    /// `/models/load`: the requested quantisation is not in the source.
    pub const QUANT_NOT_FOUND: &str = "quant_not_found";
    /// `/models/load`: the model does not fit in free memory.
    pub const INSUFFICIENT_MEMORY: &str = "insufficient_memory";
    /// The model id is not loaded on this node.
    pub const MODEL_NOT_FOUND: &str = "model_not_found";
    /// The model is loading; retry later.
    pub const MODEL_LOADING: &str = "model_loading";
    /// The model failed (device fault); it is being recovered.
    pub const MODEL_FAILED: &str = "model_failed";
    /// Admission: the queue is full.
    pub const OVERLOADED: &str = "overloaded";
}

/// The OpenAI error envelope: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// The inside of [`ErrorEnvelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// A code from [`error_code`], if any.
    #[serde(default)]
    pub code: Option<String>,
    /// The offending request field, if any.
    #[serde(default)]
    pub param: Option<String>,
}

impl ErrorEnvelope {
    /// Build an envelope.
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            error: ErrorBody {
                message: message.into(),
                kind: kind.to_owned(),
                code: None,
                param: None,
            },
        }
    }

    /// With a machine-readable code.
    pub fn with_code(mut self, code: &str) -> Self {
        self.error.code = Some(code.to_owned());
        self
    }

    /// With the offending parameter.
    pub fn with_param(mut self, param: &str) -> Self {
        self.error.param = Some(param.to_owned());
        self
    }
}
