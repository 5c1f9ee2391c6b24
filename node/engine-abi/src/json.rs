//! Serde types of the JSON control-plane calls, shared by the node and every engine.
//!
//! Control calls (`init`, `info`, `load_model`, `memory_report`, and the parameters and summary of
//! `generate`) cross the C ABI as UTF-8 JSON (pointer + length) so that fields can be added without
//! touching the `#[repr(C)]` vtable. Compatibility rules, which every type here follows:
//!
//! - Unknown fields are **ignored** (no `deny_unknown_fields`): a newer node may send fields an
//!   older engine of the same major version does not know yet, and vice versa.
//! - Every field added after ABI 1.0 must be optional or carry a `#[serde(default)]`.
//! - Enums are lower-case strings (`"stop"`, `"length"`, `"cancelled"`).
//!
//! Sizes are MiB (`*_mb`), token ids are `u32`, model handles are `u64` chosen by the engine.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Argument of `HelexaEngineEntry::init`. An empty JSON input (length 0) means `InitOptions::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitOptions {
    /// Device indices the engine may use; `None` = all devices it can see.
    #[serde(default)]
    pub devices: Option<Vec<u32>>,
}

/// Answer of `HelexaEngineV1::info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Compute backend: `"cpu"` or `"cuda"`.
    pub backend: String,
    /// Engine implementation name, e.g. `"helexa-engine-cuda"`.
    pub name: String,
    /// Engine implementation version (semver of the engine crate, not the ABI version).
    pub version: String,
    /// Devices the engine uses (the CPU backend reports one pseudo-device).
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// One compute device as seen by the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device index (CUDA ordinal; 0 for the CPU pseudo-device).
    pub index: u32,
    /// Human-readable name, e.g. `"NVIDIA H200"` or `"cpu"`.
    pub name: String,
    /// Total device memory in MiB (system memory for the CPU backend).
    pub vram_total_mb: u64,
    /// Free device memory in MiB at the time of the call.
    pub vram_free_mb: u64,
    /// CUDA compute capability as `"major.minor"` (e.g. `"9.0"`); `None` on the CPU backend.
    #[serde(default)]
    pub compute_capability: Option<String>,
}

/// Argument of `HelexaEngineV1::load_model`. The node has already downloaded every file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Model id as the node names it (for messages and metrics only).
    pub id: String,
    /// Architecture name from `config.json` (`"Qwen3ForCausalLM"`) or the gguf metadata.
    pub architecture: String,
    /// Local paths of the model files.
    pub files: ModelFiles,
    /// Requested compute dtype (`"bf16"`, `"f16"`, `"f32"`); `None` = engine default.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Devices to place the model on; `None` = engine's choice.
    #[serde(default)]
    pub devices: Option<Vec<u32>>,
    /// Context length to allocate the KV cache for; `None` = the model's maximum.
    #[serde(default)]
    pub context_length: Option<u32>,
    /// Prefill chunk size in tokens; `None` = engine default.
    #[serde(default)]
    pub prefill_chunk: Option<u32>,
}

/// Local files of a model: either safetensors (+ `config.json`) or one gguf file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFiles {
    /// `config.json` (required with safetensors).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Safetensors shards, in any order.
    #[serde(default)]
    pub safetensors: Vec<PathBuf>,
    /// A single gguf file.
    #[serde(default)]
    pub gguf: Option<PathBuf>,
}

/// Answer of `HelexaEngineV1::load_model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedModel {
    /// Handle to pass to `generate` / `unload_model`; never reused within one engine instance.
    pub handle: u64,
    /// Device memory the model occupies (weights + KV cache), MiB.
    pub vram_mb: u64,
    /// Devices the model was placed on.
    pub devices: Vec<u32>,
    /// Context length actually allocated.
    pub context_length: u32,
    /// Compute dtype actually used (`"bf16"`, `"f32"`, ...).
    pub dtype: String,
    /// Weight quantization (`"none"`, `"q4_k_m"`, `"q8_0"`, ...).
    pub quant: String,
    /// Vocabulary size of the model's output layer.
    pub vocab_size: u32,
}

/// Answer of `HelexaEngineV1::memory_report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Current state of every device.
    pub devices: Vec<DeviceInfo>,
    /// Memory held by every loaded model.
    pub models: Vec<ModelMemory>,
}

/// Memory held by one loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMemory {
    /// Handle returned by `load_model`.
    pub handle: u64,
    /// Device memory in MiB.
    pub vram_mb: u64,
}

/// Parameters of `HelexaEngineV1::generate` (the prompt ids travel separately as a `u32` array).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// Maximum number of tokens to generate (the engine also stops at the context length).
    pub max_tokens: u32,
    /// Token ids that end generation; the stop token is reported to `on_token` before stopping
    /// and named in `GenerateSummary::stop_id`.
    #[serde(default)]
    pub stop_ids: Vec<u32>,
    /// Sampling parameters; missing fields take the neutral values of `Sampling::default()`.
    #[serde(default)]
    pub sampling: Sampling,
}

/// Sampling parameters. The neutral value of every field disables that step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// Softmax temperature; `0` = greedy (argmax), which ignores every other field but the penalties.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; `0` = disabled.
    pub top_k: u32,
    /// Nucleus sampling mass; `1.0` = disabled.
    pub top_p: f32,
    /// Drop tokens below `min_p × p(max)`; `0.0` = disabled.
    pub min_p: f32,
    /// Multiplicative penalty on tokens already seen (prompt + output); `1.0` = disabled.
    pub repetition_penalty: f32,
    /// Additive penalty on tokens already generated; `0.0` = disabled.
    pub presence_penalty: f32,
    /// Additive penalty per occurrence in the generated tokens; `0.0` = disabled.
    pub frequency_penalty: f32,
    /// RNG seed; `None` = nondeterministic.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    /// Greedy decoding with every other step disabled.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

/// Summary delivered to `on_done` when generation ended without error (including cancellation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerateSummary {
    /// Number of prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV entries were reused from the prefix cache (not recomputed).
    pub reused_prompt_tokens: u32,
    /// Number of tokens delivered to `on_token` (including a stop token).
    pub generated_tokens: u32,
    /// Why generation ended.
    pub finish: Finish,
    /// The stop id that ended generation when `finish == Stop`.
    #[serde(default)]
    pub stop_id: Option<u32>,
    /// Where the decode steps' time went, when the engine measures it (optional: engines that
    /// do not may leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_timing: Option<DecodeTiming>,
}

/// The host's share of the decode steps (each token after the first): the time the engine's
/// host code took to queue a step's device work, against the step's whole time until its token
/// was known. When the two are close the host, not the device, sets the decode rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeTiming {
    /// Decode steps measured.
    pub steps: u32,
    /// Microseconds the host spent queuing them, in all.
    pub queued_us: u64,
    /// Microseconds they took in all, until each step's token was known.
    pub total_us: u64,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// A token of `stop_ids` was generated.
    Stop,
    /// `max_tokens` (or the context length) was reached.
    Length,
    /// `on_token` answered `Cancel`.
    Cancelled,
}
