//! Shared state of the server: the engine, the models it holds, admission, metrics, draining.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use helexa_engine_abi::json::{LoadSpec, LoadedModel};
use helexa_node_api::{LoadRequest, ModelInfo, ModelState, error_code};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::Backend;
use crate::config::Admission;
use crate::detok::ModelTokenizer;
use crate::error_http::ApiError;
use crate::metrics::Metrics;
use crate::source::{self, GenerationDefaults, ResolvedModel};
use crate::template::ChatTemplate;

/// Cheap to clone; everything behind one `Arc`.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub backend: Arc<dyn Backend>,
    pub admission: Admission,
    pub cache_dir: Option<std::path::PathBuf>,
    pub metrics: Metrics,
    pub draining: AtomicBool,
    pub started: Instant,
    models: RwLock<HashMap<String, Slot>>,
    /// One lock per model id so concurrent loads of one id run once (single flight).
    load_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Waits before each automatic reload of a model that hit a device fault (one attempt per
    /// entry; empty disables recovery).
    recovery_delays: Mutex<Vec<Duration>>,
    /// Progress of the loads under way, by model id (shown in `/models` while `loading`).
    load_progress: Mutex<HashMap<String, Arc<source::LoadCounter>>>,
}

/// Default waits before the automatic reload attempts of a faulted model: 3 tries at 1 s,
/// 2 s and 4 s, long enough for a device reset to settle, short enough to stay unnoticed.
pub const DEFAULT_RECOVERY_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// A model id's life-cycle entry.
#[derive(Clone)]
enum Slot {
    Loading(ModelInfo),
    Ready(Arc<Model>),
    /// Load failed, or the engine reported a device fault while serving; a model that faulted
    /// keeps its engine handle here so an unload or reload can free it.
    Failed(ModelInfo, Option<Arc<Model>>),
}

/// A loaded, servable model.
pub struct Model {
    /// Id it is served under.
    pub id: String,
    /// Where it came from.
    pub source: String,
    /// Architecture.
    pub architecture: String,
    /// Weight format.
    pub quant: String,
    /// What the engine reported.
    pub loaded: LoadedModel,
    /// Tokenizer, markers, eos ids.
    pub tokenizer: ModelTokenizer,
    /// Chat template, when the model has one.
    pub template: Option<ChatTemplate>,
    /// Sampling defaults of `generation_config.json`.
    pub defaults: GenerationDefaults,
    /// Admission gate.
    pub gate: Gate,
    /// Milliseconds after server start of the last request (0 = never).
    last_used_ms: AtomicU64,
    /// The request it was loaded from, so a device fault can reload it unattended.
    request: LoadRequest,
}

impl Model {
    /// The API view.
    pub fn info(&self, started: Instant) -> ModelInfo {
        let supports_tools = self
            .template
            .as_ref()
            .is_some_and(ChatTemplate::mentions_tools)
            && self.tokenizer.markers.tool_start.is_some();
        let reasoning = self.tokenizer.markers.think_start.is_some();
        let mut capabilities = vec!["completion".to_owned()];
        if self.template.is_some() {
            capabilities.insert(0, "chat".into());
        }
        if supports_tools {
            capabilities.push("tools".into());
        }
        if reasoning {
            capabilities.push("reasoning".into());
        }
        let in_flight = self.gate.in_flight();
        let last = self.last_used_ms.load(Ordering::Relaxed);
        let idle_ms = if in_flight > 0 || last == 0 {
            0
        } else {
            (started.elapsed().as_millis() as u64).saturating_sub(last)
        };
        ModelInfo {
            id: self.id.clone(),
            state: ModelState::Ready,
            architecture: self.architecture.clone(),
            source: self.source.clone(),
            quant: self.quant.clone(),
            context_length: self.loaded.context_length,
            capabilities,
            tool_calls: supports_tools,
            reasoning,
            vram_mb: self.loaded.vram_mb,
            devices: self.loaded.devices.clone(),
            in_flight,
            queue_depth: self.gate.queued.load(Ordering::Relaxed),
            idle_ms,
            error: None,
            progress: None,
        }
    }

    /// Record use (for `idle_ms`).
    pub fn touch(&self, started: Instant) {
        self.last_used_ms.store(
            started.elapsed().as_millis().max(1) as u64,
            Ordering::Relaxed,
        );
    }
}

/// Per-model admission: `max_in_flight` generations, `max_queue` waiting, waits bounded by
/// `queue_timeout`. Over the queue limit → 429; waited too long → 503; both with `Retry-After`.
pub struct Gate {
    semaphore: Arc<Semaphore>,
    limits: Admission,
    queued: AtomicU32,
}

/// Held while a generation runs.
pub struct Permit {
    _permit: OwnedSemaphorePermit,
}

impl Gate {
    fn new(limits: Admission) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(limits.max_in_flight as usize)),
            limits,
            queued: AtomicU32::new(0),
        }
    }

    /// Generations running now.
    pub fn in_flight(&self) -> u32 {
        self.limits.max_in_flight - self.semaphore.available_permits() as u32
    }

    /// Wait for a slot.
    pub async fn admit(&self, model: &str, metrics: &Metrics) -> Result<Permit, ApiError> {
        if let Ok(permit) = self.semaphore.clone().try_acquire_owned() {
            return Ok(Permit { _permit: permit });
        }
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.limits.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            metrics
                .rejected
                .with_label_values(&[model, "queue_full"])
                .inc();
            return Err(ApiError::queue_full(
                format!(
                    "model {model:?} has {} requests running and {} queued (the limit); retry later",
                    self.limits.max_in_flight, self.limits.max_queue
                ),
                1,
            ));
        }
        metrics.queued.with_label_values(&[model]).inc();
        let waited = tokio::time::timeout(
            self.limits.queue_timeout,
            self.semaphore.clone().acquire_owned(),
        )
        .await;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        metrics.queued.with_label_values(&[model]).dec();
        match waited {
            Ok(Ok(permit)) => Ok(Permit { _permit: permit }),
            Ok(Err(_)) => Err(ApiError::unavailable(
                error_code::MODEL_LOADING,
                format!("model {model:?} is being unloaded"),
                5,
            )),
            Err(_) => {
                metrics
                    .rejected
                    .with_label_values(&[model, "queue_timeout"])
                    .inc();
                Err(ApiError::unavailable(
                    error_code::OVERLOADED,
                    format!(
                        "model {model:?} stayed busy for {} ms; retry later",
                        self.limits.queue_timeout.as_millis()
                    ),
                    2,
                ))
            }
        }
    }
}

impl AppState {
    /// New state around an engine.
    pub fn new(
        backend: Arc<dyn Backend>,
        admission: Admission,
        cache_dir: Option<std::path::PathBuf>,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self(Arc::new(Inner {
            backend,
            admission,
            cache_dir,
            metrics: Metrics::new()?,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            models: RwLock::new(HashMap::new()),
            load_locks: Mutex::new(HashMap::new()),
            recovery_delays: Mutex::new(DEFAULT_RECOVERY_DELAYS.to_vec()),
            load_progress: Mutex::new(HashMap::new()),
        })))
    }

    /// Sets the waits before the automatic reload attempts of a model that hit a device fault
    /// (one attempt per entry; empty disables recovery). Tests shorten them.
    pub fn set_recovery_delays(&self, delays: Vec<Duration>) {
        *self
            .0
            .recovery_delays
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = delays;
    }

    /// Stop admitting work (SIGTERM); in-flight requests finish.
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    /// Whether draining.
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// All models in API form, sorted by id.
    pub fn model_infos(&self) -> Vec<ModelInfo> {
        let models = self.0.models.read().unwrap_or_else(|e| e.into_inner());
        let progress = self
            .0
            .load_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut infos: Vec<ModelInfo> = models
            .values()
            .map(|slot| match slot {
                Slot::Loading(info) => ModelInfo {
                    progress: progress.get(&info.id).map(|c| c.snapshot()),
                    ..info.clone()
                },
                Slot::Failed(info, _) => info.clone(),
                Slot::Ready(model) => model.info(self.0.started),
            })
            .collect();
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos
    }

    /// A servable model, or the error to answer with.
    pub fn model(&self, id: &str) -> Result<Arc<Model>, ApiError> {
        let models = self.0.models.read().unwrap_or_else(|e| e.into_inner());
        match models.get(id) {
            Some(Slot::Ready(model)) => Ok(model.clone()),
            Some(Slot::Loading(_)) => Err(ApiError::unavailable(
                error_code::MODEL_LOADING,
                format!("model {id:?} is loading; retry shortly"),
                5,
            )),
            Some(Slot::Failed(info, _)) => Err(ApiError::unavailable(
                error_code::MODEL_FAILED,
                format!(
                    "model {id:?} failed: {}",
                    info.error.as_deref().unwrap_or("unknown error")
                ),
                30,
            )),
            None => Err(ApiError::model_not_found(id)),
        }
    }

    fn set_slot(&self, id: &str, slot: Option<Slot>) {
        let mut models = self.0.models.write().unwrap_or_else(|e| e.into_inner());
        match slot {
            Some(slot) => models.insert(id.to_owned(), slot),
            None => models.remove(id),
        };
    }

    /// The engine reported a device fault while `model` was generating. A device fault poisons
    /// every model on that device in the engine, so the slots of all ready models sharing a
    /// device with it become `Failed` (visible in `/models` and `/health`); later requests get
    /// 503 `model_failed` until they are reloaded, which `spawn_recovery` does in the
    /// background. Only slots still holding these very models are changed (a reload may have
    /// replaced one meanwhile).
    pub fn mark_failed(&self, model: &Arc<Model>, reason: &str) {
        let mut models = self.0.models.write().unwrap_or_else(|e| e.into_inner());
        let Some(Slot::Ready(current)) = models.get(&model.id) else {
            return;
        };
        if !Arc::ptr_eq(current, model) {
            return;
        }
        let devices = &model.loaded.devices;
        let group: Vec<Arc<Model>> = models
            .values()
            .filter_map(|slot| match slot {
                Slot::Ready(m)
                    if Arc::ptr_eq(m, model)
                        || m.loaded.devices.iter().any(|d| devices.contains(d)) =>
                {
                    Some(m.clone())
                }
                _ => None,
            })
            .collect();
        for m in &group {
            let error = if Arc::ptr_eq(m, model) {
                format!("engine device fault: {reason}")
            } else {
                format!(
                    "engine device fault on device {:?} (while serving {}): {reason}",
                    m.loaded.devices, model.id
                )
            };
            tracing::error!(id = %m.id, %error, "device fault; model marked failed");
            self.0
                .metrics
                .device_faults
                .with_label_values(&[&m.id])
                .inc();
            let mut info = m.info(self.0.started);
            info.state = ModelState::Failed;
            info.error = Some(error);
            models.insert(m.id.clone(), Slot::Failed(info, Some(m.clone())));
        }
        drop(models);
        self.spawn_recovery(group);
    }

    /// Reloads models that hit a device fault from the requests they were loaded with, in the
    /// background, with bounded attempts and backoff. Each attempt first frees every faulted
    /// engine handle of the group (the engine re-creates a faulted device only once it holds
    /// none of its models), then loads each model again, so they come back `ready` without an
    /// operator: the slots read `failed` (with the reason), then `loading`, then `ready`, while
    /// models on other devices keep serving. A model leaves the group when someone else unloads
    /// or reloads its id; everything stops when the node drains.
    fn spawn_recovery(&self, group: Vec<Arc<Model>>) {
        let delays = self
            .0
            .recovery_delays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if delays.is_empty() || group.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            let attempts = delays.len();
            let mut pending = group;
            for (attempt, delay) in delays.into_iter().enumerate() {
                tokio::time::sleep(delay).await;
                if this.is_draining() {
                    return;
                }
                pending.retain(|m| this.is_failed(&m.id));
                for m in &pending {
                    this.release_faulted(m).await;
                }
                let mut failed = Vec::new();
                for m in pending {
                    if !this.is_failed(&m.id) {
                        continue;
                    }
                    tracing::info!(id = %m.id, attempt = attempt + 1, attempts, "reloading a model after a device fault");
                    let outcome = this.load_detached(m.request.clone()).await;
                    let label = if outcome.is_ok() { "recovered" } else { "failed" };
                    this.0
                        .metrics
                        .recoveries
                        .with_label_values(&[&m.id, label])
                        .inc();
                    match outcome {
                        Ok(_) => tracing::info!(id = %m.id, "model recovered after a device fault"),
                        Err(error) => {
                            tracing::warn!(id = %m.id, message = %error.envelope.error.message, "reload after a device fault failed");
                            failed.push(m);
                        }
                    }
                }
                pending = failed;
                if pending.is_empty() {
                    return;
                }
            }
            for m in &pending {
                tracing::error!(id = %m.id, attempts, "gave up recovering a model after a device fault");
                this.0
                    .metrics
                    .recoveries
                    .with_label_values(&[&m.id, "gave_up"])
                    .inc();
            }
        });
    }

    fn is_failed(&self, id: &str) -> bool {
        matches!(
            self.0
                .models
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(id),
            Some(Slot::Failed(..))
        )
    }

    /// Frees the engine handle of `model` if its slot still holds it as faulted; the slot stays
    /// `Failed` (without a handle) until the reload replaces it.
    async fn release_faulted(&self, model: &Arc<Model>) {
        let lock = {
            let mut locks = self.0.load_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(model.id.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let info = match self
            .0
            .models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&model.id)
        {
            Some(Slot::Failed(info, Some(m))) if Arc::ptr_eq(m, model) => info.clone(),
            _ => return,
        };
        self.release(model).await;
        self.set_slot(&model.id, Some(Slot::Failed(info, None)));
    }

    /// Load a model (single flight per id; an already-loaded id with the same source is
    /// returned as is).
    ///
    /// The work runs in its own task, so a caller that goes away (gateway timeout, client
    /// disconnect) cannot leave the slot `Loading` forever or lose the engine handle: the load
    /// finishes and records its outcome regardless.
    pub async fn load(&self, request: LoadRequest) -> Result<ModelInfo, ApiError> {
        if request.id.trim().is_empty() {
            return Err(ApiError::bad_param("id", "`id` must not be empty"));
        }
        if request.source.trim().is_empty() {
            return Err(ApiError::bad_param("source", "`source` must not be empty"));
        }
        if self.is_draining() {
            return Err(ApiError::unavailable(
                error_code::OVERLOADED,
                "the node is shutting down",
                10,
            ));
        }
        let this = self.clone();
        tokio::spawn(async move { this.load_detached(request).await })
            .await
            .map_err(ApiError::internal)?
    }

    async fn load_detached(&self, request: LoadRequest) -> Result<ModelInfo, ApiError> {
        let lock = {
            let mut locks = self.0.load_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(request.id.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        // A model that faulted still holds engine memory: free it before loading again.
        let faulted = {
            let models = self.0.models.read().unwrap_or_else(|e| e.into_inner());
            match models.get(&request.id) {
                Some(Slot::Failed(_, Some(model))) => Some(model.clone()),
                _ => None,
            }
        };
        if let Some(model) = faulted {
            self.release(&model).await;
            self.set_slot(&request.id, None);
        }
        if let Ok(model) = self.model(&request.id) {
            if model.source == request.source {
                return Ok(model.info(self.0.started));
            }
            return Err(ApiError::coded(
                StatusCode::CONFLICT,
                "model_exists",
                format!(
                    "id {:?} already serves {}; unload it first",
                    request.id, model.source
                ),
            ));
        }
        let placeholder = ModelInfo {
            id: request.id.clone(),
            state: ModelState::Loading,
            architecture: String::new(),
            source: request.source.clone(),
            quant: request.quant.clone().unwrap_or_default(),
            context_length: 0,
            capabilities: Vec::new(),
            tool_calls: false,
            reasoning: false,
            vram_mb: 0,
            devices: Vec::new(),
            in_flight: 0,
            queue_depth: 0,
            idle_ms: 0,
            error: None,
            progress: None,
        };
        self.set_slot(&request.id, Some(Slot::Loading(placeholder.clone())));
        let counter = Arc::new(source::LoadCounter::default());
        self.progress_map()
            .insert(request.id.clone(), Arc::clone(&counter));
        let outcome = self.load_inner(&request, &counter).await;
        self.progress_map().remove(&request.id);
        match outcome {
            Ok(model) => {
                self.0.metrics.loads.with_label_values(&["ok"]).inc();
                let info = model.info(self.0.started);
                self.set_slot(&request.id, Some(Slot::Ready(Arc::new(model))));
                Ok(info)
            }
            Err(error) => {
                self.0.metrics.loads.with_label_values(&["error"]).inc();
                let engine_fault = error.status == StatusCode::INTERNAL_SERVER_ERROR
                    || error.envelope.error.code.as_deref() == Some(error_code::MODEL_FAILED);
                if engine_fault {
                    // Keep an engine failure visible in /health so operators see why; refused
                    // preflights (bad source, no memory) leave nothing behind.
                    let mut failed = placeholder;
                    failed.state = ModelState::Failed;
                    failed.error = Some(error.envelope.error.message.clone());
                    self.set_slot(&request.id, Some(Slot::Failed(failed, None)));
                } else {
                    self.set_slot(&request.id, None);
                }
                Err(error)
            }
        }
    }

    fn progress_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<source::LoadCounter>>> {
        self.0
            .load_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    async fn load_inner(
        &self,
        request: &LoadRequest,
        progress: &Arc<source::LoadCounter>,
    ) -> Result<Model, ApiError> {
        let hub = source::HubOptions {
            progress: Some(Arc::clone(progress)),
            ..source::HubOptions::from_env(self.0.cache_dir.as_deref())
        };
        let resolved: ResolvedModel =
            source::resolve_with(&request.source, request.quant.as_deref(), &hub).await?;
        let backend = self.0.backend.clone();
        let memory = tokio::task::spawn_blocking(move || backend.memory())
            .await
            .map_err(ApiError::internal)??;
        let free_mb: u64 = memory
            .devices
            .iter()
            .filter(|d| {
                request
                    .devices
                    .as_ref()
                    .is_none_or(|wanted| wanted.contains(&d.index))
            })
            .map(|d| d.vram_free_mb)
            .sum();
        let need_mb = resolved.weight_bytes.div_ceil(1024 * 1024);
        if need_mb > free_mb {
            return Err(ApiError::coded(
                StatusCode::INSUFFICIENT_STORAGE,
                error_code::INSUFFICIENT_MEMORY,
                format!(
                    "{} needs at least {need_mb} MiB for its weights but the devices have {free_mb} MiB free; unload a model or choose a smaller quantisation",
                    request.source
                ),
            ));
        }
        let meta = resolved.clone();
        let (tokenizer, template) = tokio::task::spawn_blocking(move || {
            let template = match &meta.files.gguf {
                Some(gguf) => match ChatTemplate::from_gguf(gguf)? {
                    Some(t) => Some(t),
                    None => ChatTemplate::from_model_dir(&meta.meta_dir)?,
                },
                None => ChatTemplate::from_model_dir(&meta.meta_dir)?,
            };
            let eos_token = template
                .as_ref()
                .and_then(|t| t.eos_token().map(str::to_owned));
            let tokenizer =
                ModelTokenizer::from_file(&meta.tokenizer, &meta.eos_ids, eos_token.as_deref())?;
            Ok::<_, crate::Error>((tokenizer, template))
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| match e {
            crate::Error::Tokenizer(m) | crate::Error::Template(m) => ApiError::coded(
                StatusCode::BAD_REQUEST,
                error_code::MISSING_FILES,
                format!("model files are unusable: {m}"),
            ),
            other => ApiError::internal(other),
        })?;
        let spec = LoadSpec {
            id: request.id.clone(),
            architecture: resolved.architecture.clone(),
            files: resolved.files.clone(),
            dtype: request.dtype.clone(),
            devices: request.devices.clone(),
            context_length: request.context_length,
            prefill_chunk: None,
        };
        let backend = self.0.backend.clone();
        progress.loading_weights.store(true, Ordering::Relaxed);
        let loaded = tokio::task::spawn_blocking(move || backend.load_model(&spec))
            .await
            .map_err(ApiError::internal)??;
        tracing::info!(id = %request.id, source = %request.source, handle = loaded.handle, vram_mb = loaded.vram_mb, "model loaded");
        Ok(Model {
            id: request.id.clone(),
            source: request.source.clone(),
            architecture: resolved.architecture,
            quant: if loaded.quant == "none" {
                loaded.dtype.clone()
            } else {
                loaded.quant.clone()
            },
            loaded,
            tokenizer,
            template,
            defaults: resolved.generation_defaults,
            gate: Gate::new(self.0.admission),
            last_used_ms: AtomicU64::new(0),
            request: request.clone(),
        })
    }

    /// Unload: waits for the model's in-flight generations, then frees it in the engine.
    ///
    /// Runs in its own task (like [`Self::load`]) so a caller that goes away cannot leave the
    /// slot `Unloading` forever.
    pub async fn unload(&self, id: &str) -> Result<(), ApiError> {
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.unload_detached(&id).await })
            .await
            .map_err(ApiError::internal)?
    }

    async fn unload_detached(&self, id: &str) -> Result<(), ApiError> {
        let slot = {
            let models = self.0.models.read().unwrap_or_else(|e| e.into_inner());
            models.get(id).cloned()
        };
        let model = match slot {
            Some(Slot::Ready(model)) => model,
            Some(Slot::Failed(_, faulted)) => {
                if let Some(model) = faulted {
                    self.release(&model).await;
                }
                self.set_slot(id, None);
                return Ok(());
            }
            Some(Slot::Loading(_)) => {
                return Err(ApiError::unavailable(
                    error_code::MODEL_LOADING,
                    format!("model {id:?} is loading; unload it when it is ready"),
                    5,
                ));
            }
            None => return Err(ApiError::model_not_found(id)),
        };
        {
            let mut models = self.0.models.write().unwrap_or_else(|e| e.into_inner());
            let mut info = model.info(self.0.started);
            info.state = ModelState::Unloading;
            // Unloading reads as "not servable": new requests get 503 model_loading.
            models.insert(id.to_owned(), Slot::Loading(info));
        }
        let result = self.drain_and_unload(&model).await;
        self.set_slot(id, None);
        result
    }

    /// Wait for the model's running generations, close its gate, free it in the engine.
    async fn drain_and_unload(&self, model: &Model) -> Result<(), ApiError> {
        // Taking every permit waits for running generations and closes the gate for queued ones.
        let permits = model.gate.semaphore.clone();
        let all = model.gate.limits.max_in_flight;
        let _all = permits.clone().acquire_many_owned(all).await;
        permits.close();
        let backend = self.0.backend.clone();
        let handle = model.loaded.handle;
        tokio::task::spawn_blocking(move || backend.unload_model(handle))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)
    }

    /// Free a faulted model's engine handle; the engine may refuse after a fault, which is
    /// logged and otherwise ignored (the slot goes away either way).
    async fn release(&self, model: &Model) {
        if let Err(error) = self.drain_and_unload(model).await {
            tracing::warn!(id = %model.id, message = %error.envelope.error.message, "freeing a faulted model failed");
        }
    }
}
