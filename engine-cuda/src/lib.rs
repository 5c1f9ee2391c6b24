//! helexa's candle inference engine.
//!
//! [`Engine`] keeps a registry of loaded models (u64 handles), runs chunked prefill and token-by-
//! token decoding through each model's own KV cache, reuses the longest common prefix between
//! consecutive requests on a model, and samples (greedy, temperature, top-k/top-p/min-p,
//! penalties, seeded). Models are written here, one file per architecture under `models/`
//! (Qwen3, Llama, Qwen3-MoE), over a linear-layer type that takes dense safetensors weights or
//! GGUF block-quantized ones, so one model implementation serves both formats. Each device has
//! a worker thread that owns it and its models ([`device_worker`]); a device fault poisons every
//! model of that device, and `HELEXA_ENGINE_INJECT_FAULT` injects one for testing.
//!
//! Without features this is a CPU engine (what the tests load); `--features cuda` builds candle
//! with CUDA and places models on GPUs. `ffi` exports the C ABI of `helexa-engine-abi` over
//! [`Engine`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, mpsc};

use candle_core::{DType, Device};
use helexa_engine_abi::json::{
    DeviceInfo, EngineInfo, Finish, GenerateParams, GenerateSummary, InitOptions, LoadSpec,
    LoadedModel, MemoryReport, ModelMemory,
};
pub use helexa_engine_abi::{ErrorKind, Flow};

pub mod device_worker;
#[allow(unsafe_code, reason = "C ABI exports")]
pub mod ffi;
pub mod fused;
pub mod layers;
pub mod models;
mod safetensors_header;
pub mod sampling;
#[cfg(feature = "cuda")]
mod staged_load;
#[cfg(feature = "cuda")]
mod step_graph;
#[cfg(all(test, feature = "cuda"))]
mod test_support;
pub mod weights;

use device_worker::{DeviceWorker, Msg, Opener, PrefillChunks, WorkerModel};
pub use device_worker::{FaultInjection, INJECT_FAULT_ENV};

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

/// The inference engine. `Send + Sync`: each device has a worker thread owning it and its
/// models (see [`device_worker`]); calls on models of different devices run concurrently, calls
/// on one device are serialised by its worker.
pub struct Engine {
    workers: Vec<DeviceWorker>,
    backend: &'static str,
    next_handle: AtomicU64,
    models: RwLock<HashMap<u64, Arc<Slot>>>,
}

/// What the engine knows of a loaded model off the worker thread.
struct Slot {
    loaded: LoadedModel,
    /// Position of the model's device in `Engine::workers`.
    worker: usize,
    weight_bytes: usize,
    /// KV cache bytes, published by the worker after each call.
    cache_bytes: Arc<AtomicUsize>,
}

/// Options of [`Engine::with_options`] beyond the ABI's `InitOptions`.
#[derive(Debug, Default)]
pub struct EngineOptions {
    /// A device fault to inject once (what `HELEXA_ENGINE_INJECT_FAULT` sets).
    pub inject_fault: Option<FaultInjection>,
    /// CPU build only: how many CPU pseudo-devices (each with its own worker thread) to offer,
    /// indices `0..n`; default 1. Lets tests exercise per-device isolation without a GPU.
    pub cpu_devices: Option<u32>,
}

/// Whether a candle error came from the accelerator (as opposed to bad shapes or input).
pub(crate) fn device_error(e: &candle_core::Error) -> bool {
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

impl Engine {
    /// Creates an engine on the given devices (CPU build: only device 0, the CPU), with the
    /// fault injection of `HELEXA_ENGINE_INJECT_FAULT` when it is set.
    pub fn new(init: &InitOptions) -> Result<Engine, EngineError> {
        let options = EngineOptions {
            inject_fault: FaultInjection::from_env()?,
            cpu_devices: None,
        };
        Engine::with_options(init, options)
    }

    /// [`Engine::new`] with explicit options (tests set fault injection here rather than
    /// through the process environment).
    pub fn with_options(init: &InitOptions, options: EngineOptions) -> Result<Engine, EngineError> {
        let requested = init.devices.clone().filter(|d| !d.is_empty());
        let inject = options.inject_fault.map(Arc::new);
        let (indices, backend, open): (Vec<u32>, _, Opener) = if cfg!(feature = "cuda") {
            (requested.unwrap_or_else(|| vec![0]), "cuda", open_cuda)
        } else {
            let available: Vec<u32> = (0..options.cpu_devices.unwrap_or(1).max(1)).collect();
            let indices = match requested {
                Some(d) if d.iter().any(|i| !available.contains(i)) => {
                    return Err(EngineError::new(
                        ErrorKind::BadInput,
                        format!("the CPU engine has devices {available:?}, got {d:?}"),
                    ));
                }
                Some(d) => d,
                None => available,
            };
            (indices, "cpu", open_cpu)
        };
        let workers = indices
            .iter()
            .map(|&i| DeviceWorker::spawn(i, format!("{backend}:{i}"), open, inject.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Engine {
            workers,
            backend,
            next_handle: AtomicU64::new(1),
            models: RwLock::new(HashMap::new()),
        })
    }

    fn device_infos(&self) -> Vec<DeviceInfo> {
        if self.backend == "cpu" {
            let (total, free) = host_memory_mb();
            self.workers
                .iter()
                .map(|w| DeviceInfo {
                    index: w.index,
                    name: device_name("cpu", w),
                    vram_total_mb: total,
                    vram_free_mb: free,
                    compute_capability: None,
                })
                .collect()
        } else {
            self.workers
                .iter()
                .map(|w| {
                    let probe = probe_cuda(w.index);
                    let name = match &probe {
                        Ok(p) => format!("{} ({})", w.label, p.name),
                        Err(why) => format!("{} (unqueried: {why})", w.label),
                    };
                    let probe = probe.ok();
                    DeviceInfo {
                        index: w.index,
                        name: device_name(&name, w),
                        vram_total_mb: probe.as_ref().map_or(0, |p| p.total_mb),
                        vram_free_mb: probe.as_ref().map_or(0, |p| p.free_mb),
                        compute_capability: probe.map(|p| p.compute_capability),
                    }
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

    /// Why each faulted device is faulted, by device index (empty when all are healthy).
    pub fn device_faults(&self) -> Vec<(u32, String)> {
        self.workers
            .iter()
            .filter_map(|w| w.fault().map(|f| (w.index, f)))
            .collect()
    }

    /// Loads a model. Unknown architectures are `Unsupported`, missing files `NotFound` (naming
    /// the path), malformed configs, missing tensors or shape mismatches `BadInput`; a faulted
    /// device `DeviceFault`.
    pub fn load(&self, spec: &LoadSpec) -> Result<LoadedModel, EngineError> {
        let worker = match spec.devices.as_deref() {
            None | Some([]) => 0,
            Some([d]) => self
                .workers
                .iter()
                .position(|w| w.index == *d)
                .ok_or_else(|| {
                    EngineError::new(
                        ErrorKind::BadInput,
                        format!(
                            "device {d} is not one of this engine's devices {:?}",
                            self.workers.iter().map(|w| w.index).collect::<Vec<_>>()
                        ),
                    )
                })?,
            Some(many) => {
                return Err(EngineError::new(
                    ErrorKind::Unsupported,
                    format!("models span one device in this engine, got {many:?}"),
                ));
            }
        };
        let prefill_chunk = match spec.prefill_chunk {
            None => PrefillChunks::Auto,
            Some(0) => {
                return Err(EngineError::new(
                    ErrorKind::BadInput,
                    "prefill_chunk must be > 0",
                ));
            }
            Some(c) => PrefillChunks::Fixed(c as usize),
        };
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let index = self.workers[worker].index;
        let cache_bytes = Arc::new(AtomicUsize::new(0));
        let worker_cache = cache_bytes.clone();
        let spec_owned = spec.clone();
        let (info, weight_bytes) = self.workers[worker].call(move |w| {
            let spec = &spec_owned;
            // Owned, so the worker can be borrowed again to insert the model.
            let device = &w.ensure_usable()?.clone();
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
            let mut worker_model =
                WorkerModel::new(model, spec.id.clone(), prefill_chunk, worker_cache);
            worker_model.use_step_graph(device);
            w.models.insert(handle, worker_model);
            Ok((info, weight_bytes))
        })?;
        let slot = Slot {
            loaded: info.clone(),
            worker,
            weight_bytes,
            cache_bytes,
        };
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle, Arc::new(slot));
        Ok(info)
    }

    /// Frees a model (on its device's thread). A faulted device whose last model goes is
    /// re-created.
    pub fn unload(&self, model: u64) -> Result<(), EngineError> {
        let slot = self
            .models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&model)
            .ok_or_else(|| unknown(model))?;
        self.workers[slot.worker].call(move |w| w.unload(model))
    }

    pub fn memory(&self) -> MemoryReport {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<ModelMemory> = models
            .iter()
            .map(|(&handle, slot)| ModelMemory {
                handle,
                vram_mb: mib(slot.weight_bytes + slot.cache_bytes.load(Ordering::Relaxed)),
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

    /// Runs `f` on `model` on its device's worker, refusing poisoned models.
    fn on_model<T: Send + 'static>(
        &self,
        model: u64,
        f: impl FnOnce(&mut WorkerModel, Option<&FaultInjection>) -> Result<T, EngineError>
        + Send
        + 'static,
    ) -> Result<T, EngineError> {
        let slot = self.slot(model)?;
        self.workers[slot.worker].call(move |w| w.with_model(model, f))
    }

    /// Generates up to `request.max_tokens` tokens after `prompt`, streaming each to `on_token`
    /// (a stop token is delivered, then generation ends). Reuses the KV cache of the longest
    /// common prefix with the previous request on this model. The model's device worker runs
    /// the decode loop; `on_token` runs on the calling thread.
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
        let slot = self.slot(model)?;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let worker_cancel = cancel.clone();
        let params = request.clone();
        let prompt_owned = prompt.to_vec();
        self.workers[slot.worker].send(Box::new(move |w| {
            let result = w.generate(model, &params, &prompt_owned, &tx, &worker_cancel);
            let _ = tx.send(Msg::Done(result));
        }))?;
        // Tokens delivered to `on_token`, and the one it cancelled on.
        let mut delivered = 0u32;
        let mut cancelled_on = None;
        for msg in rx {
            match msg {
                Msg::Token(token) => {
                    if cancelled_on.is_some() {
                        // Sampled by the worker before it saw the flag: never delivered.
                        continue;
                    }
                    delivered += 1;
                    if on_token(token) == Flow::Cancel {
                        cancel.store(true, Ordering::Relaxed);
                        cancelled_on = Some(token);
                    }
                }
                Msg::Done(result) => {
                    return match (cancelled_on, result) {
                        // A stop token ends generation as `Stop` even when cancelled on.
                        (Some(t), Ok(mut summary)) if !request.stop_ids.contains(&t) => {
                            summary.finish = Finish::Cancelled;
                            summary.generated_tokens = delivered;
                            summary.stop_id = None;
                            Ok(summary)
                        }
                        (_, result) => result,
                    };
                }
            }
        }
        Err(EngineError::new(
            ErrorKind::Internal,
            format!("generation on model {model} panicked on its device worker"),
        ))
    }

    /// Testing aid: logits (f32) for every position of `prompt` as a fresh sequence, computed
    /// through the same chunked prefill as `generate`. Leaves the prompt in the KV cache.
    pub fn forward_logits(&self, model: u64, prompt: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        let prompt = prompt.to_vec();
        self.on_model(model, move |st, _| {
            st.check_prompt(&prompt, 0)?;
            st.model.truncate(0);
            st.cached.clear();
            st.prefill_all_rows(&prompt)
        })
    }

    /// Testing aid: the next forward pass of `model` fails as if the device had reported `cause`
    /// (which faults the device, poisoning every model on it).
    #[doc(hidden)]
    pub fn inject_device_fault(&self, model: u64, cause: &str) -> Result<(), EngineError> {
        let cause = cause.to_owned();
        self.on_model(model, move |st, _| {
            st.injected_fault = Some(cause);
            Ok(())
        })
    }

    /// Testing aid: the name of the thread that owns `model` (seen from inside a call on it).
    #[doc(hidden)]
    pub fn model_thread_name(&self, model: u64) -> Result<String, EngineError> {
        self.on_model(model, |_, _| {
            Ok(std::thread::current()
                .name()
                .unwrap_or("<unnamed>")
                .to_owned())
        })
    }
}

/// The device's name, with its fault when it has one: `DeviceInfo` has no state field, and the
/// name is what `/health` and `memory_report` consumers already show.
fn device_name(base: &str, w: &DeviceWorker) -> String {
    match w.fault() {
        Some(cause) => format!("{base} (faulted: {cause})"),
        None => base.to_owned(),
    }
}

fn open_cpu(_index: u32) -> Result<Device, String> {
    Ok(Device::Cpu)
}

/// What the CUDA driver says about a device (name, memory, compute capability).
#[cfg_attr(
    not(feature = "cuda"),
    allow(dead_code, reason = "only the cuda build constructs it")
)]
struct CudaProbe {
    name: String,
    total_mb: u64,
    free_mb: u64,
    compute_capability: String,
}

/// Queries the driver on the calling thread, not the device's worker: `info` must answer while a
/// generation occupies the worker. It retains the device's primary context (the one candle
/// uses, already alive while the engine holds the device) only for the duration of the query.
#[cfg(feature = "cuda")]
fn probe_cuda(index: u32) -> Result<CudaProbe, String> {
    use candle_core::cuda::cudarc::driver::CudaContext;
    let ctx = CudaContext::new(index as usize).map_err(|e| e.to_string())?;
    let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
    let (free, total) = ctx.mem_get_info().map_err(|e| e.to_string())?;
    Ok(CudaProbe {
        name: ctx.name().map_err(|e| e.to_string())?,
        total_mb: mib(total),
        free_mb: mib(free),
        compute_capability: format!("{major}.{minor}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn probe_cuda(_index: u32) -> Result<CudaProbe, String> {
    Err("built without the cuda feature".to_owned())
}

#[allow(unsafe_code, reason = "turning off cudarc's event tracking")]
pub(crate) fn open_cuda(index: u32) -> Result<Device, String> {
    let device = Device::new_cuda(index as usize)
        .map_err(|e| format!("cuda device {index}: {}", describe(&e)))?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device
        && std::env::var("HELEXA_ENGINE_EVENT_TRACKING").map_or(true, |v| v != "1")
    {
        // cudarc gives every buffer two CUDA events for cross-stream ordering: two driver calls
        // on each allocation and two on each free, ~4 per kernel at batch 1. A device's work all
        // runs on its worker thread's one stream, so there is nothing to order. (The one other
        // stream, where a captured decode step's kept buffers are allocated and freed, is
        // synchronised with by hand: `step_graph.rs`.) With tracking on, releasing those
        // buffers failed (CUDA_ERROR_INVALID_VALUE in the launch sweeps, thirteenth session;
        // their frees would wait on events recorded inside the capture).
        // SAFETY: no buffer of this device is used on another stream unordered (see above).
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

pub(crate) fn unknown(model: u64) -> EngineError {
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
