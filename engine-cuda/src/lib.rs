//! helexa's candle inference engine.
//!
//! [`Engine`] keeps a registry of loaded models (u64 handles), runs chunked prefill and token-by-
//! token decoding through each model's own KV cache, reuses the longest common prefix between
//! consecutive requests on a model, and samples (greedy, temperature, top-k/top-p/min-p,
//! penalties, seeded). Models are written here, one file per architecture under `models/`
//! (Qwen3, Llama, Qwen3-MoE), over a linear-layer type that takes dense safetensors weights or
//! GGUF block-quantized ones, so one model implementation serves both formats.
//!
//! Without features this is a CPU engine (what the tests load); `--features cuda` builds candle
//! with CUDA and places models on GPUs. `ffi` exports the C ABI of `helexa-engine-abi` over
//! [`Engine`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use candle_core::{DType, Device};
use helexa_engine_abi::json::{
    DeviceInfo, EngineInfo, Finish, GenerateParams, GenerateSummary, InitOptions, LoadSpec,
    LoadedModel, MemoryReport, ModelMemory,
};
pub use helexa_engine_abi::{ErrorKind, Flow};

#[allow(unsafe_code, reason = "C ABI exports")]
pub mod ffi;
pub mod layers;
pub mod models;
pub mod sampling;
pub mod weights;

use models::CausalLm;
use sampling::Sampler;

/// Prefill chunk when the load spec does not name one: long prompts go through the model this
/// many tokens at a time, bounding the attention score matrix to `chunk × context`.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// An engine failure: a kind (mapped to the C ABI's error kinds) and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct EngineError {
    pub kind: ErrorKind,
    pub message: String,
}

impl EngineError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The inference engine. `Send + Sync`: calls on different models run concurrently; calls on one
/// model are serialised by that model's lock.
pub struct Engine {
    devices: Vec<Device>,
    device_indices: Vec<u32>,
    backend: &'static str,
    next_handle: AtomicU64,
    models: RwLock<HashMap<u64, Arc<Slot>>>,
}

/// A loaded model: what was reported at load time plus its mutable state.
struct Slot {
    loaded: LoadedModel,
    id: String,
    weight_bytes: usize,
    state: Mutex<State>,
}

struct State {
    model: Box<dyn CausalLm>,
    /// Tokens whose keys/values are in the model's KV cache, in order.
    cached: Vec<u32>,
    /// Set when a forward pass failed on the device: the model refuses further work.
    poisoned: Option<String>,
    prefill_chunk: usize,
    /// Test hook: the next forward pass fails with this device error.
    injected_fault: Option<String>,
}

/// Whether a candle error came from the accelerator (as opposed to bad shapes or input).
fn device_error(e: &candle_core::Error) -> bool {
    use candle_core::Error as E;
    match e {
        E::Cuda(_) | E::Metal(_) => true,
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            device_error(inner)
        }
        _ => false,
    }
}

/// A candle error as one readable line set, without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set (messages travel to API clients).
pub fn describe(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => describe(inner),
        E::Context { inner, context } => format!("{context}: {}", describe(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), describe(inner)),
        other => other.to_string(),
    }
}

fn mib(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(1024 * 1024)
}

impl State {
    /// One forward pass, keeping `cached` in step with the KV cache and turning failures into
    /// engine errors: a device failure poisons the model, anything else resets its cache.
    fn forward(&mut self, tokens: &[u32], all_rows: bool) -> Result<Vec<Vec<f32>>, EngineError> {
        let result = match self.injected_fault.take() {
            Some(cause) => Err(candle_core::Error::Cuda(cause.into())),
            None => self
                .model
                .forward(tokens, all_rows)
                .and_then(|t| t.to_vec2::<f32>()),
        };
        match result {
            Ok(rows) => {
                self.cached.extend_from_slice(tokens);
                Ok(rows)
            }
            Err(e) => {
                self.model.truncate(0);
                self.cached.clear();
                let text = describe(&e);
                if device_error(&e) {
                    if text.contains("OUT_OF_MEMORY") {
                        return Err(EngineError::new(ErrorKind::OutOfMemory, text));
                    }
                    self.poisoned = Some(text.clone());
                    Err(EngineError::new(
                        ErrorKind::DeviceFault,
                        format!("device failure during forward pass: {text}"),
                    ))
                } else {
                    Err(EngineError::new(
                        ErrorKind::Internal,
                        format!("forward pass failed: {text}"),
                    ))
                }
            }
        }
    }

    /// Runs `tokens` through the model in prefill chunks; returns the logits of the last
    /// position, or of every position when `all_rows`.
    fn prefill(&mut self, tokens: &[u32], all_rows: bool) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut out = Vec::new();
        for chunk in tokens.chunks(self.prefill_chunk) {
            let rows = self.forward(chunk, all_rows)?;
            if all_rows {
                out.extend(rows);
            } else {
                out = rows;
            }
        }
        Ok(out)
    }
}

impl Engine {
    /// Creates an engine on the given devices (CPU build: only device 0, the CPU).
    pub fn new(init: &InitOptions) -> Result<Engine, EngineError> {
        let requested = init.devices.clone().filter(|d| !d.is_empty());
        if cfg!(feature = "cuda") {
            let indices = requested.unwrap_or_else(|| vec![0]);
            let devices = indices
                .iter()
                .map(|&i| {
                    Device::new_cuda(i as usize).map_err(|e| {
                        EngineError::new(
                            ErrorKind::DeviceFault,
                            format!("cuda device {i}: {}", describe(&e)),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Engine::with_devices(devices, indices, "cuda"))
        } else {
            if let Some(d) = requested
                && d != [0]
            {
                return Err(EngineError::new(
                    ErrorKind::BadInput,
                    format!("the CPU engine has one device (0), got {d:?}"),
                ));
            }
            Ok(Engine::with_devices(vec![Device::Cpu], vec![0], "cpu"))
        }
    }

    fn with_devices(devices: Vec<Device>, device_indices: Vec<u32>, backend: &'static str) -> Self {
        Engine {
            devices,
            device_indices,
            backend,
            next_handle: AtomicU64::new(1),
            models: RwLock::new(HashMap::new()),
        }
    }

    fn device_infos(&self) -> Vec<DeviceInfo> {
        if self.backend == "cpu" {
            let (total, free) = host_memory_mb();
            vec![DeviceInfo {
                index: 0,
                name: "cpu".to_owned(),
                vram_total_mb: total,
                vram_free_mb: free,
                compute_capability: None,
            }]
        } else {
            // candle does not expose device names or memory; report what we know.
            self.device_indices
                .iter()
                .map(|&i| DeviceInfo {
                    index: i,
                    name: format!("cuda:{i}"),
                    vram_total_mb: 0,
                    vram_free_mb: 0,
                    compute_capability: None,
                })
                .collect()
        }
    }

    pub fn info(&self) -> EngineInfo {
        EngineInfo {
            backend: self.backend.to_owned(),
            name: env!("CARGO_PKG_NAME").to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            devices: self.device_infos(),
        }
    }

    /// Loads a model. Unknown architectures are `Unsupported`, missing files `NotFound` (naming
    /// the path), malformed configs, missing tensors or shape mismatches `BadInput`.
    pub fn load(&self, spec: &LoadSpec) -> Result<LoadedModel, EngineError> {
        let (device, index) = match spec.devices.as_deref() {
            None | Some([]) => (&self.devices[0], self.device_indices[0]),
            Some([d]) => {
                let pos = self
                    .device_indices
                    .iter()
                    .position(|x| x == d)
                    .ok_or_else(|| {
                        EngineError::new(
                            ErrorKind::BadInput,
                            format!(
                                "device {d} is not one of this engine's devices {:?}",
                                self.device_indices
                            ),
                        )
                    })?;
                (&self.devices[pos], *d)
            }
            Some(many) => {
                return Err(EngineError::new(
                    ErrorKind::Unsupported,
                    format!("models span one device in this engine, got {many:?}"),
                ));
            }
        };
        let dtype = match spec.dtype.as_deref() {
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
            Some("f32" | "float32") => DType::F32,
            Some("bf16" | "bfloat16") => DType::BF16,
            Some("f16" | "float16") => DType::F16,
            Some(other) => {
                return Err(EngineError::new(
                    ErrorKind::Unsupported,
                    format!("unsupported dtype {other:?} (f32, bf16, f16)"),
                ));
            }
        };
        let prefill_chunk = match spec.prefill_chunk {
            None => DEFAULT_PREFILL_CHUNK,
            Some(0) => {
                return Err(EngineError::new(
                    ErrorKind::BadInput,
                    "prefill_chunk must be > 0",
                ));
            }
            Some(c) => c as usize,
        };
        let loaded = models::load(&models::LoadRequest {
            architecture: &spec.architecture,
            config: spec.files.config.as_deref(),
            safetensors: &spec.files.safetensors,
            gguf: spec.files.gguf.as_deref(),
            dtype,
            device,
            context_length: spec.context_length.map(|c| c as usize),
        })
        .map_err(|e| EngineError::new(e.kind, format!("loading {}: {}", spec.id, e.message)))?;
        let model = loaded.model;
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let weight_bytes = model.weight_bytes();
        let info = LoadedModel {
            handle,
            vram_mb: mib(weight_bytes),
            devices: vec![index],
            context_length: u32::try_from(model.max_positions()).unwrap_or(u32::MAX),
            dtype: dtype_name(dtype).to_owned(),
            quant: loaded.quant,
            vocab_size: u32::try_from(model.vocab_size()).unwrap_or(u32::MAX),
        };
        let slot = Slot {
            loaded: info.clone(),
            id: spec.id.clone(),
            weight_bytes,
            state: Mutex::new(State {
                model,
                cached: Vec::new(),
                poisoned: None,
                prefill_chunk,
                injected_fault: None,
            }),
        };
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle, Arc::new(slot));
        Ok(info)
    }

    pub fn unload(&self, model: u64) -> Result<(), EngineError> {
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&model)
            .map(|_| ())
            .ok_or_else(|| unknown(model))
    }

    pub fn memory(&self) -> MemoryReport {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<ModelMemory> = models
            .iter()
            .map(|(&handle, slot)| {
                // A model busy generating reports its weights only rather than blocking.
                let cache = slot.state.try_lock().map_or(0, |s| s.model.cache_bytes());
                ModelMemory {
                    handle,
                    vram_mb: mib(slot.weight_bytes + cache),
                }
            })
            .collect();
        list.sort_by_key(|m| m.handle);
        MemoryReport {
            devices: self.device_infos(),
            models: list,
        }
    }

    /// What `load` reported for a model.
    pub fn loaded(&self, model: u64) -> Result<LoadedModel, EngineError> {
        Ok(self.slot(model)?.loaded.clone())
    }

    fn slot(&self, model: u64) -> Result<Arc<Slot>, EngineError> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&model)
            .cloned()
            .ok_or_else(|| unknown(model))
    }

    /// Locks a model for a call, refusing poisoned ones.
    fn with_state<T>(
        &self,
        model: u64,
        f: impl FnOnce(&mut State, &Slot) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let slot = self.slot(model)?;
        let mut guard = slot.state.lock().unwrap_or_else(|p| {
            // A panic mid-forward leaves the KV cache in an unknown state.
            let mut g = p.into_inner();
            g.poisoned
                .get_or_insert_with(|| "a previous call panicked".to_owned());
            g
        });
        if let Some(cause) = &guard.poisoned {
            return Err(EngineError::new(
                ErrorKind::DeviceFault,
                format!(
                    "model {model} ({}) is unusable after a device failure: {cause}",
                    slot.id
                ),
            ));
        }
        f(&mut guard, &slot)
    }

    fn check_prompt(state: &State, prompt: &[u32], extra: usize) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::new(ErrorKind::BadInput, "empty prompt"));
        }
        let vocab = state.model.vocab_size();
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::new(
                ErrorKind::BadInput,
                format!("token id {t} out of range (vocabulary size {vocab})"),
            ));
        }
        let ctx = state.model.max_positions();
        if prompt.len() + extra > ctx {
            return Err(EngineError::new(
                ErrorKind::BadInput,
                format!(
                    "prompt of {} tokens does not fit the context length {ctx}",
                    prompt.len()
                ),
            ));
        }
        Ok(())
    }

    /// Generates up to `request.max_tokens` tokens after `prompt`, streaming each to `on_token`
    /// (a stop token is delivered, then generation ends). Reuses the KV cache of the longest
    /// common prefix with the previous request on this model.
    pub fn generate(
        &self,
        model: u64,
        request: &GenerateParams,
        prompt: &[u32],
        on_token: &mut dyn FnMut(u32) -> Flow,
    ) -> Result<GenerateSummary, EngineError> {
        let s = &request.sampling;
        if s.temperature.is_nan() || s.temperature < 0.0 || s.top_p.is_nan() || s.min_p.is_nan() {
            return Err(EngineError::new(
                ErrorKind::BadInput,
                format!("invalid sampling parameters: {s:?}"),
            ));
        }
        self.with_state(model, |st, _| {
            // Room for at least one generated token after the prompt.
            Self::check_prompt(st, prompt, 1)?;
            let common = st
                .cached
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            // At least the last prompt token is recomputed: its logits start decoding.
            let reuse = common.min(prompt.len() - 1);
            st.model.truncate(reuse);
            st.cached.truncate(reuse);
            let mut logits = st.prefill(&prompt[reuse..], false)?.pop().ok_or_else(|| {
                EngineError::new(ErrorKind::Internal, "prefill returned no logits")
            })?;
            let mut sampler = Sampler::new(&request.sampling);
            let mut seen = prompt.to_vec();
            let mut generated = 0u32;
            let ctx = st.model.max_positions();
            let (finish, stop_id) = loop {
                if generated >= request.max_tokens {
                    break (Finish::Length, None);
                }
                let token = sampler.sample(&mut logits, &seen);
                sampler.observe(token);
                seen.push(token);
                generated += 1;
                let flow = on_token(token);
                if request.stop_ids.contains(&token) {
                    break (Finish::Stop, Some(token));
                }
                if flow == Flow::Cancel {
                    break (Finish::Cancelled, None);
                }
                if generated >= request.max_tokens || st.cached.len() + 1 > ctx {
                    break (Finish::Length, None);
                }
                logits = st.forward(&[token], false)?.pop().ok_or_else(|| {
                    EngineError::new(ErrorKind::Internal, "decode returned no logits")
                })?;
            };
            Ok(GenerateSummary {
                prompt_tokens: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
                reused_prompt_tokens: u32::try_from(reuse).unwrap_or(u32::MAX),
                generated_tokens: generated,
                finish,
                stop_id,
            })
        })
    }

    /// Testing aid: logits (f32) for every position of `prompt` as a fresh sequence, computed
    /// through the same chunked prefill as `generate`. Leaves the prompt in the KV cache.
    pub fn forward_logits(&self, model: u64, prompt: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.with_state(model, |st, _| {
            Self::check_prompt(st, prompt, 0)?;
            st.model.truncate(0);
            st.cached.clear();
            st.prefill(prompt, true)
        })
    }

    /// Testing aid: the next forward pass of `model` fails as if the device had reported `cause`.
    #[doc(hidden)]
    pub fn inject_device_fault(&self, model: u64, cause: &str) -> Result<(), EngineError> {
        self.with_state(model, |st, _| {
            st.injected_fault = Some(cause.to_owned());
            Ok(())
        })
    }
}

fn unknown(model: u64) -> EngineError {
    EngineError::new(
        ErrorKind::NotFound,
        format!("no loaded model with handle {model}"),
    )
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// Total and available host memory in MiB from `/proc/meminfo` (0 where unavailable).
fn host_memory_mb() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}
