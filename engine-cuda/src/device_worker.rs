//! One OS thread per device: the thread that owns the device and every model on it.
//!
//! A CUDA context is bound per thread and candle's tensors carry the device they live on, so the
//! engine gives each device it opens (the CPU counts as one) a named worker thread
//! (`helexa-dev-cuda:0`, `helexa-dev-cpu:0`, …). The worker creates the candle [`Device`], and
//! every load, forward pass, KV reset and free of a model placed there runs on it as a job sent
//! through a channel. Models live in the worker's own map keyed by handle; tensors never leave
//! the thread. Jobs on one device are therefore serialised, while models on different devices
//! still run concurrently.
//!
//! `generate` keeps the C ABI's promise that callbacks run on the calling thread: the worker
//! streams each sampled id back over a channel, the caller runs `on_token`, and a `Cancel` sets a
//! flag the worker reads before its next decode step (so at most one step is wasted). Sampling
//! and the next forward pass overlap with the caller's callback.
//!
//! A candle error classified as a device fault (see `device_error` in the crate root) marks the
//! device faulted and poisons **every** model on it: their later calls fail with `DEVICE_FAULT`
//! naming the cause, and loads on the device are refused. Unloading frees the poisoned models;
//! when the last one is gone the worker re-creates its `Device` (for CUDA a fresh context). If
//! that fails the device stays faulted, and each later load retries the re-creation first.
//!
//! Fault injection: `HELEXA_ENGINE_INJECT_FAULT=<after_n_tokens>[:<model-id substring>]`, read at
//! engine init, makes the first generate (of a model whose id contains the substring, when one is
//! given) that has produced `after_n_tokens` tokens fail its next forward pass with a device error,
//! once per engine life. It goes through the same path as a real CUDA error.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use helexa_engine_abi::json::{DecodeTiming, Finish, GenerateParams, GenerateSummary};

use crate::fused::Drawn;
use crate::models::CausalLm;
use crate::sampling::Sampler;
use crate::{EngineError, ErrorKind, describe, device_error};

/// The environment variable read at engine init to inject one device fault.
pub const INJECT_FAULT_ENV: &str = "HELEXA_ENGINE_INJECT_FAULT";

/// A device fault to inject once per engine life (see the module docs).
#[derive(Debug)]
pub struct FaultInjection {
    /// Tokens a generate must have produced before the fault fires.
    pub after_tokens: u32,
    /// Only models whose id contains this fire it.
    pub model_substring: Option<String>,
    fired: AtomicBool,
}

impl FaultInjection {
    pub fn new(after_tokens: u32, model_substring: Option<String>) -> Self {
        Self {
            after_tokens,
            model_substring,
            fired: AtomicBool::new(false),
        }
    }

    /// Parses `<after_n_tokens>[:<model-id substring>]`.
    pub fn parse(value: &str) -> Result<Self, EngineError> {
        let (count, model) = match value.split_once(':') {
            Some((c, m)) => (c, Some(m.to_owned()).filter(|m| !m.is_empty())),
            None => (value, None),
        };
        let after = count.trim().parse::<u32>().map_err(|_| {
            EngineError::new(
                ErrorKind::BadInput,
                format!(
                    "{INJECT_FAULT_ENV}={value:?}: expected <after_n_tokens>[:<model id substring>]"
                ),
            )
        })?;
        Ok(Self::new(after, model))
    }

    /// The injection from the environment, if the variable is set.
    pub fn from_env() -> Result<Option<Self>, EngineError> {
        match std::env::var(INJECT_FAULT_ENV) {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether the fault fires now for `model_id` after `generated` tokens; true at most once.
    fn fire(&self, model_id: &str, generated: u32) -> bool {
        generated >= self.after_tokens
            && self
                .model_substring
                .as_deref()
                .is_none_or(|s| model_id.contains(s))
            && !self.fired.swap(true, Ordering::Relaxed)
    }
}

/// How a prompt is cut into forward passes (`LoadSpec.prefill_chunk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillChunks {
    /// This many tokens per pass.
    Fixed(usize),
    /// The spec named none: as many as [`AUTO_CHUNK_PAIRS`] allows, between 512 and 2048.
    Auto,
}

/// Query-key pairs one automatic chunk's attention scores may hold: 512 queries over 32k
/// positions, what the fixed default of 512 held at that context. Within it, a short prompt
/// goes through in chunks of up to 2048, which is faster (H200, 2048-token prompt, BF16:
/// 26.5k tok/s in chunks of 512, 28.9k in one; docs/benchmarks.md) without ever holding more
/// scores than before.
pub const AUTO_CHUNK_PAIRS: usize = 512 * 32 * 1024;

impl PrefillChunks {
    /// Tokens per pass for a prompt whose last position is `total`.
    pub fn size(self, total: usize) -> usize {
        match self {
            Self::Fixed(n) => n,
            Self::Auto => {
                let mut chunk = 2048;
                while chunk > 512 && chunk * total > AUTO_CHUNK_PAIRS {
                    chunk /= 2;
                }
                chunk
            }
        }
    }
}

/// A model owned by a worker, with its mutable state.
pub(crate) struct WorkerModel {
    pub model: Box<dyn CausalLm>,
    /// Served-as id (for fault injection and messages).
    pub id: String,
    /// Tokens whose keys/values are in the model's KV cache, in order.
    pub cached: Vec<u32>,
    /// Set when the model is unusable (its device faulted, or a call panicked).
    pub poisoned: Option<String>,
    pub prefill_chunk: PrefillChunks,
    /// Test hook: the next forward pass fails with this device error.
    pub injected_fault: Option<String>,
    /// Set by a forward pass that hit a device fault; the worker then faults the whole device.
    device_fault: Option<String>,
    /// KV cache bytes, published for `memory_report` without a round trip to the worker.
    pub cache_bytes: Arc<AtomicUsize>,
    /// Greedy decode steps replayed from a CUDA graph (unless `HELEXA_ENGINE_GRAPH=0`); `None` when
    /// off, not on a GPU, or after the model refused a capture.
    #[cfg(feature = "cuda")]
    step_graph: Option<crate::step_graph::StepGraph>,
}

impl WorkerModel {
    pub fn new(
        model: Box<dyn CausalLm>,
        id: String,
        prefill_chunk: PrefillChunks,
        cache_bytes: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            model,
            id,
            cached: Vec::new(),
            poisoned: None,
            prefill_chunk,
            injected_fault: None,
            device_fault: None,
            cache_bytes,
            #[cfg(feature = "cuda")]
            step_graph: None,
        }
    }

    /// Replays greedy decode steps from a CUDA graph unless `HELEXA_ENGINE_GRAPH=0`, when `device`
    /// is a GPU (see `step_graph`).
    pub fn use_step_graph(&mut self, device: &candle_core::Device) {
        #[cfg(feature = "cuda")]
        if crate::step_graph::enabled() {
            self.replay_steps_on(device);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
    }

    /// Replays greedy decode steps from a CUDA graph on `device` (a GPU; otherwise nothing).
    #[cfg(feature = "cuda")]
    fn replay_steps_on(&mut self, device: &candle_core::Device) {
        if device.is_cuda() {
            match crate::step_graph::StepGraph::new(device) {
                Ok(g) => self.step_graph = Some(g),
                Err(e) => eprintln!("helexa-engine-cuda: no decode graph for {}: {e}", self.id),
            }
        }
    }

    /// Forgets a decode step queued ahead of its token (`HELEXA_ENGINE_GRAPH_AHEAD`): it
    /// serves only the decode that queued it, since the next call may change what the cache
    /// holds before the same position comes round. Its replay finishes on the stream unread.
    fn forget_queued_step(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(graph) = &mut self.step_graph {
            graph.forget_queued();
        }
    }

    /// The greedy token after `token`, a decode step: replayed from the captured graph when
    /// there is one, else a plain forward pass.
    fn decode_greedy(&mut self, token: u32, timing: &mut StepTiming) -> Result<u32, EngineError> {
        #[cfg(feature = "cuda")]
        if let Some(mut graph) = self.step_graph.take() {
            use crate::step_graph::Stepped;
            let start = Instant::now();
            match self.run(&[token], |m| graph.step(m, token))? {
                Stepped::Token(picked) => {
                    timing.record(graph.queued, start.elapsed());
                    self.step_graph = Some(graph);
                    return Ok(picked);
                }
                Stepped::Refused(why) => {
                    // Nothing ran (`run` counted the token as cached all the same): the graph
                    // stays off for this model and the step runs as usual.
                    self.cached.pop();
                    eprintln!(
                        "helexa-engine-cuda: decode graph off for {}: {why}",
                        self.id
                    );
                }
            }
        }
        self.forward_greedy(&[token], timing)
    }

    /// A forward pass over `tokens` (the last prompt chunk or one decoded token) whose pick is
    /// the plain argmax of the last position: only the index leaves the device.
    fn forward_greedy(
        &mut self,
        tokens: &[u32],
        timing: &mut StepTiming,
    ) -> Result<u32, EngineError> {
        self.pick_next(tokens, timing, crate::fused::argmax)
    }

    /// A forward pass over `tokens` whose next token is drawn on the device when it can be
    /// ([`crate::fused::sample`]): only the token leaves it; otherwise the logits do, penalised
    /// or not, for the host's draw.
    fn forward_sampled(
        &mut self,
        tokens: &[u32],
        sampler: &mut Sampler,
        seen: &[u32],
        timing: &mut StepTiming,
    ) -> Result<Next, EngineError> {
        self.pick_next(tokens, timing, |logits| {
            let host_row = |l: &candle_core::Tensor| l.flatten_all()?.to_vec1::<f32>();
            if !crate::fused::samples_on_device(logits) {
                return Ok(Next::Logits(host_row(logits)?));
            }
            // Only now: the draw takes its uniform number from the request's generator.
            let draw = sampler.device_draw(seen);
            Ok(match crate::fused::sample(logits, &draw)? {
                Drawn::Picked(t) => Next::Picked(t),
                Drawn::Penalised => Next::Penalised(host_row(logits)?),
                Drawn::NotHere => Next::Logits(host_row(logits)?),
            })
        })
    }

    /// A forward pass over `tokens`, then `pick` of what follows from the last position's
    /// logits, timed as a step: the host's queuing (until the forward pass returns) and the
    /// whole step (until the pick is back).
    fn pick_next<R>(
        &mut self,
        tokens: &[u32],
        timing: &mut StepTiming,
        pick: impl FnOnce(&candle_core::Tensor) -> candle_core::Result<R>,
    ) -> Result<R, EngineError> {
        self.run(tokens, |m| {
            let start = Instant::now();
            let logits = m.forward(tokens, false)?;
            let queued = start.elapsed();
            let next = pick(&logits)?;
            timing.record(queued, start.elapsed());
            Ok(next)
        })
    }

    /// A forward pass over `tokens` (`step` runs it on the model and reads the result), keeping
    /// `cached` in step with the KV cache and turning failures into engine errors: a device
    /// failure records a device fault, anything else resets the cache.
    fn run<R>(
        &mut self,
        tokens: &[u32],
        step: impl FnOnce(&mut dyn CausalLm) -> candle_core::Result<R>,
    ) -> Result<R, EngineError> {
        let result = match self.injected_fault.take() {
            Some(cause) => Err(candle_core::Error::Cuda(cause.into())),
            None => step(self.model.as_mut()),
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
                    self.device_fault = Some(text.clone());
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

    /// Runs `tokens` through the model in the same prefill chunks as `generate`; returns the
    /// logits of every position (`Engine::forward_logits`).
    pub fn prefill_all_rows(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        let size = self.plan_prefill(tokens.len());
        let mut out = Vec::new();
        for chunk in tokens.chunks(size) {
            out.extend(self.run(chunk, |m| m.forward(chunk, true)?.to_vec2::<f32>())?);
        }
        Ok(out)
    }

    /// Plans the KV cache for `len` more tokens and the first generated one; returns the
    /// prefill chunk size.
    fn plan_prefill(&mut self, len: usize) -> usize {
        let positions = self.model.cache_len() + len + 1;
        self.model.plan(positions.min(self.model.max_positions()));
        self.prefill_chunk.size(positions)
    }

    /// Runs every prefill chunk of `tokens` (not empty) but the last, computing no logits (nobody
    /// reads them, and the host need not wait for them); returns the last chunk, whose forward
    /// pass also picks the next token.
    fn prefill_all_but_last<'t>(&mut self, tokens: &'t [u32]) -> Result<&'t [u32], EngineError> {
        let size = self.plan_prefill(tokens.len());
        let last = (tokens.len() - 1) / size * size;
        for chunk in tokens[..last].chunks(size) {
            self.run(chunk, |m| m.extend(chunk))?;
        }
        Ok(&tokens[last..])
    }

    pub fn check_prompt(&self, prompt: &[u32], extra: usize) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::new(ErrorKind::BadInput, "empty prompt"));
        }
        let vocab = self.model.vocab_size();
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::new(
                ErrorKind::BadInput,
                format!("token id {t} out of range (vocabulary size {vocab})"),
            ));
        }
        let ctx = self.model.max_positions();
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

    /// The decode loop on the worker: streams each sampled id through `tokens`; stops early when
    /// `cancel` is set or the caller hung up.
    fn generate(
        &mut self,
        request: &GenerateParams,
        prompt: &[u32],
        tokens: &Sender<Msg>,
        cancel: &AtomicBool,
        inject: Option<&FaultInjection>,
    ) -> Result<GenerateSummary, EngineError> {
        // Room for at least one generated token after the prompt.
        self.check_prompt(prompt, 1)?;
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last prompt token is recomputed: its logits start decoding.
        let reuse = common.min(prompt.len() - 1);
        self.model.truncate(reuse);
        self.cached.truncate(reuse);
        let mut generated = 0u32;
        self.maybe_inject(inject, generated);
        let mut sampler = Sampler::new(&request.sampling);
        let greedy = sampler.is_plain_greedy();
        let ctx = self.model.max_positions();
        // Sized once for the whole decode (the context bounds it) so no token reallocates.
        let mut seen = Vec::with_capacity(ctx.max(prompt.len()) + 1);
        seen.extend_from_slice(prompt);
        // The first token is picked as every later one: on the device where it can be.
        let last = self.prefill_all_but_last(&prompt[reuse..])?;
        // The first token's step is the prompt's last chunk: timed apart from the decode steps.
        let mut first_step = StepTiming::default();
        let mut next = if greedy {
            Next::Picked(self.forward_greedy(last, &mut first_step)?)
        } else {
            self.forward_sampled(last, &mut sampler, &seen, &mut first_step)?
        };
        let mut timing = StepTiming::default();
        let (finish, stop_id) = loop {
            if generated >= request.max_tokens {
                break (Finish::Length, None);
            }
            let token = match &mut next {
                Next::Logits(logits) => sampler.sample(logits, &seen),
                Next::Penalised(logits) => sampler.sample_penalised(logits),
                Next::Picked(token) => *token,
            };
            sampler.observe(token);
            seen.push(token);
            generated += 1;
            let hung_up = tokens.send(Msg::Token(token)).is_err();
            if request.stop_ids.contains(&token) {
                break (Finish::Stop, Some(token));
            }
            if hung_up || cancel.load(Ordering::Relaxed) {
                break (Finish::Cancelled, None);
            }
            if generated >= request.max_tokens || self.cached.len() + 1 > ctx {
                break (Finish::Length, None);
            }
            self.maybe_inject(inject, generated);
            next = if greedy {
                Next::Picked(self.decode_greedy(token, &mut timing)?)
            } else {
                self.forward_sampled(&[token], &mut sampler, &seen, &mut timing)?
            };
        };
        Ok(GenerateSummary {
            prompt_tokens: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
            reused_prompt_tokens: u32::try_from(reuse).unwrap_or(u32::MAX),
            generated_tokens: generated,
            finish,
            stop_id,
            decode_timing: timing.summary(),
        })
    }

    fn maybe_inject(&mut self, inject: Option<&FaultInjection>, generated: u32) {
        if let Some(plan) = inject
            && plan.fire(&self.id, generated)
        {
            self.injected_fault = Some(format!(
                "CUDA_ERROR_INJECTED: fault injected by {INJECT_FAULT_ENV} after {generated} tokens"
            ));
        }
    }
}

/// How long decode steps took: the host queuing each step's device work (the model's forward
/// returns once its kernels are queued), and the whole step until its token was known. Sent
/// back in the summary ([`DecodeTiming`]); when the two are close, the host's launch path, not
/// the device, sets the decode rate.
#[derive(Default)]
struct StepTiming {
    steps: u32,
    queued: Duration,
    total: Duration,
}

impl StepTiming {
    fn record(&mut self, queued: Duration, total: Duration) {
        self.steps += 1;
        self.queued += queued;
        self.total += total;
    }

    fn summary(&self) -> Option<DecodeTiming> {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        (self.steps > 0).then(|| DecodeTiming {
            steps: self.steps,
            queued_us: us(self.queued),
            total_us: us(self.total),
        })
    }
}

/// What the decode loop samples the next token from: the logits on the host (before or after
/// the device applied the penalties), or the token already picked on the device.
enum Next {
    Logits(Vec<f32>),
    Penalised(Vec<f32>),
    Picked(u32),
}

/// What the worker streams back to a `generate` caller.
pub(crate) enum Msg {
    Token(u32),
    Done(Result<GenerateSummary, EngineError>),
}

/// Opens the device with a given index on the current thread.
pub(crate) type Opener = fn(u32) -> Result<Device, String>;

/// The state a worker thread owns: the device and its models.
pub(crate) struct WorkerState {
    pub device: Device,
    index: u32,
    label: String,
    open: Opener,
    pub models: HashMap<u64, WorkerModel>,
    /// The handle a model job is running on, so a panic can poison that model.
    current: Option<u64>,
    /// Why the device is faulted, shared with the engine for reporting.
    fault: Arc<Mutex<Option<String>>>,
    inject: Option<Arc<FaultInjection>>,
}

impl WorkerState {
    /// Refuses work on a faulted device; when it holds no models, tries to re-create it first.
    pub fn ensure_usable(&mut self) -> Result<&Device, EngineError> {
        if self.models.is_empty() && self.fault_cause().is_some() {
            self.reopen();
        }
        if let Some(cause) = self.fault_cause() {
            return Err(EngineError::new(
                ErrorKind::DeviceFault,
                format!("device {} is faulted: {cause}", self.label),
            ));
        }
        Ok(&self.device)
    }

    fn fault_cause(&self) -> Option<String> {
        self.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Drops the old device (releasing its context) and opens a fresh one; on failure the
    /// device stays faulted with the reason.
    fn reopen(&mut self) {
        self.device = Device::Cpu;
        crate::fused::forget_kernel_handles();
        let outcome = (self.open)(self.index);
        let mut fault = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(device) => {
                self.device = device;
                *fault = None;
            }
            Err(why) => {
                *fault = Some(format!(
                    "re-creating the device after a fault failed: {why}"
                ));
            }
        }
    }

    /// Runs `f` on a loaded model, refusing poisoned ones; a device fault during `f` faults
    /// the device and poisons every model on it.
    pub fn with_model<T>(
        &mut self,
        handle: u64,
        f: impl FnOnce(&mut WorkerModel, Option<&FaultInjection>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let inject = self.inject.clone();
        let model = self
            .models
            .get_mut(&handle)
            .ok_or_else(|| crate::unknown(handle))?;
        if let Some(cause) = &model.poisoned {
            return Err(EngineError::new(
                ErrorKind::DeviceFault,
                format!(
                    "model {handle} ({}) is unusable after a device failure: {cause}",
                    model.id
                ),
            ));
        }
        self.current = Some(handle);
        let result = f(model, inject.as_deref());
        model.forget_queued_step();
        self.current = None;
        model
            .cache_bytes
            .store(model.model.cache_bytes(), Ordering::Relaxed);
        if let Some(cause) = model.device_fault.take() {
            self.fault_device(&cause);
        }
        result
    }

    /// Marks the device faulted and poisons every model on it.
    fn fault_device(&mut self, cause: &str) {
        *self.fault.lock().unwrap_or_else(PoisonError::into_inner) = Some(cause.to_owned());
        for m in self.models.values_mut() {
            m.poisoned
                .get_or_insert_with(|| format!("device {} faulted: {cause}", self.label));
        }
    }

    /// Frees a model; the last model of a faulted device going re-creates the device.
    pub fn unload(&mut self, handle: u64) -> Result<(), EngineError> {
        self.models
            .remove(&handle)
            .ok_or_else(|| crate::unknown(handle))?;
        if self.models.is_empty() && self.fault_cause().is_some() {
            self.reopen();
        }
        Ok(())
    }

    /// The decode loop of one `generate` call (see [`WorkerModel::generate`]).
    pub fn generate(
        &mut self,
        handle: u64,
        request: &GenerateParams,
        prompt: &[u32],
        tokens: &Sender<Msg>,
        cancel: &AtomicBool,
    ) -> Result<GenerateSummary, EngineError> {
        self.with_model(handle, |m, inject| {
            m.generate(request, prompt, tokens, cancel, inject)
        })
    }
}

/// A job run on a worker thread.
pub(crate) type Job = Box<dyn FnOnce(&mut WorkerState) + Send>;

/// The engine's handle on one device's worker thread.
pub(crate) struct DeviceWorker {
    pub index: u32,
    pub label: String,
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Why the device is faulted (`None` when healthy).
    pub fault: Arc<Mutex<Option<String>>>,
}

impl DeviceWorker {
    /// Starts the worker for device `index` (labelled e.g. `cuda:0`) and opens the device on it.
    pub fn spawn(
        index: u32,
        label: String,
        open: Opener,
        inject: Option<Arc<FaultInjection>>,
    ) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let fault = Arc::new(Mutex::new(None));
        let worker_fault = fault.clone();
        let worker_label = label.clone();
        let thread = std::thread::Builder::new()
            .name(format!("helexa-dev-{label}"))
            .spawn(move || {
                let device = match open(index) {
                    Ok(d) => {
                        let _ = ready_tx.send(Ok(()));
                        d
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let state = WorkerState {
                    device,
                    index,
                    label: worker_label,
                    open,
                    models: HashMap::new(),
                    current: None,
                    fault: worker_fault,
                    inject,
                };
                run(state, &rx);
            })
            .map_err(|e| {
                EngineError::new(
                    ErrorKind::Internal,
                    format!("starting the worker thread for {label}: {e}"),
                )
            })?;
        let opened = ready_rx.recv().unwrap_or_else(|_| {
            Err("the device worker exited while opening the device".to_owned())
        });
        if let Err(why) = opened {
            let _ = thread.join();
            return Err(EngineError::new(
                ErrorKind::DeviceFault,
                format!("{label}: {why}"),
            ));
        }
        Ok(Self {
            index,
            label,
            tx: Some(tx),
            thread: Some(thread),
            fault,
        })
    }

    /// Sends a job; the worker is gone only if the engine is being dropped.
    pub fn send(&self, job: Job) -> Result<(), EngineError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| self.gone())
    }

    /// Runs `f` on the worker and waits for its result.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut WorkerState) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Box::new(move |state| {
            let _ = tx.send(f(state));
        }))?;
        rx.recv().unwrap_or_else(|_| Err(self.gone()))
    }

    fn gone(&self) -> EngineError {
        EngineError::new(
            ErrorKind::Internal,
            format!(
                "the worker thread of device {} dropped the call (it panicked)",
                self.label
            ),
        )
    }

    pub fn fault(&self) -> Option<String> {
        self.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for DeviceWorker {
    /// Closes the queue and waits, so models and the device are freed on their own thread
    /// before the engine is gone.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The worker loop: runs jobs until the engine drops its sender. A panicking job poisons the
/// model it was running on (its KV cache is in an unknown state) and the worker carries on.
fn run(mut state: WorkerState, rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut state)));
        if outcome.is_err()
            && let Some(handle) = state.current.take()
            && let Some(m) = state.models.get_mut(&handle)
        {
            m.poisoned
                .get_or_insert_with(|| "a previous call panicked".to_owned());
        }
    }
    // Models, then the device, are dropped here on the thread that owns them.
    state.models.clear();
}

/// Where one teacher-forced step's logits put the greedy pick (a measurement aid, for the
/// tests: where two builds' greedy tokens part, how close the call was).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StepMargin {
    /// The greedy pick and its lead over the runner-up, in logits.
    pub top: u32,
    pub lead: f32,
    /// The token fed next and its lead over every other token (negative when not the pick).
    pub forced: u32,
    pub forced_lead: f32,
}

#[cfg(test)]
impl StepMargin {
    fn of(logits: &[f32], forced: u32) -> Self {
        let top = crate::sampling::argmax(logits);
        let best_but = |skip: u32| {
            logits
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != skip as usize)
                .map(|(_, &v)| v)
                .fold(f32::NEG_INFINITY, f32::max)
        };
        Self {
            top,
            lead: logits[top as usize] - best_but(top),
            forced,
            forced_lead: logits[forced as usize] - best_but(forced),
        }
    }
}

#[cfg(test)]
impl WorkerModel {
    /// Teacher-forced greedy steps from an empty cache: the `prompt`, then each of `tokens` in
    /// turn; per step, where its logits put the pick against the token fed next (the first
    /// from the prompt's logits).
    pub(crate) fn forced_margins(
        &mut self,
        prompt: &[u32],
        tokens: &[u32],
    ) -> Result<Vec<StepMargin>, EngineError> {
        self.model.truncate(0);
        self.cached.clear();
        let mut feed = self.prefill_all_but_last(prompt)?.to_vec();
        let mut margins = Vec::with_capacity(tokens.len());
        for &forced in tokens {
            let logits = self.run(&feed, |m| {
                m.forward(&feed, false)?
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()
            })?;
            margins.push(StepMargin::of(&logits, forced));
            feed = vec![forced];
        }
        Ok(margins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Automatic chunks are as long as they may be, and never hold more query-key pairs than
    /// chunks of 512 did at 32k positions.
    #[test]
    fn automatic_chunks_bound_the_scores() {
        assert_eq!(PrefillChunks::Auto.size(2049), 2048);
        assert_eq!(PrefillChunks::Auto.size(8192), 2048);
        assert_eq!(PrefillChunks::Auto.size(8193), 1024);
        assert_eq!(PrefillChunks::Auto.size(32 * 1024), 512);
        assert_eq!(PrefillChunks::Auto.size(128 * 1024), 512);
        for total in [1, 700, 4000, 9000, 20_000, 32 * 1024] {
            let chunk = PrefillChunks::Auto.size(total);
            assert!(chunk * total <= AUTO_CHUNK_PAIRS, "{total}: chunk {chunk}");
        }
        assert_eq!(PrefillChunks::Fixed(96).size(50_000), 96);
    }

    #[test]
    fn forced_margins_follow_the_greedy_decode() {
        let fixture = |p: &str| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fixtures/tiny-qwen3")
                .join(p)
        };
        let (config, safetensors) = (fixture("config.json"), [fixture("model.safetensors")]);
        let model = crate::models::load(&crate::models::LoadRequest {
            architecture: "qwen3",
            config: Some(&config),
            safetensors: &safetensors,
            gguf: None,
            dtype: candle_core::DType::F32,
            device: &Device::Cpu,
            context_length: Some(256),
        })
        .expect("load")
        .model;
        let mut m = WorkerModel::new(
            model,
            "tiny".into(),
            PrefillChunks::Fixed(8),
            Arc::new(AtomicUsize::new(0)),
        );
        let prompt: Vec<u32> = (1..20).map(|i| i * 37 % 1000).collect();
        let params = GenerateParams {
            max_tokens: 12,
            stop_ids: Vec::new(),
            sampling: Default::default(),
        };
        let (tx, rx) = mpsc::channel();
        m.generate(&params, &prompt, &tx, &AtomicBool::new(false), None)
            .expect("generate");
        let greedy: Vec<u32> = rx
            .try_iter()
            .filter_map(|msg| match msg {
                Msg::Token(t) => Some(t),
                Msg::Done(_) => None,
            })
            .collect();
        assert_eq!(greedy.len(), 12);
        // Fed its own greedy tokens, every step's pick is the token fed next, ahead.
        let margins = m.forced_margins(&prompt, &greedy).expect("margins");
        assert_eq!(margins.len(), greedy.len());
        for (step, (s, &t)) in margins.iter().zip(&greedy).enumerate() {
            assert_eq!((s.top, s.forced), (t, t), "step {step}");
            assert!(
                s.lead >= 0.0 && s.lead == s.forced_lead,
                "step {step}: {s:?}"
            );
        }
        // A token that is not the pick trails it by the pick's lead over it, or more.
        let other = (greedy[0] + 1) % 1000;
        let s = m.forced_margins(&prompt, &[other]).expect("margin")[0];
        assert!(s.forced_lead < 0.0 && s.forced_lead <= -s.lead, "{s:?}");
    }
}

/// Decode steps replayed from a CUDA graph against plain ones (needs the `cuda` feature and a
/// device; `scripts/device/gpu-check.sh check`).
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use std::path::{Path, PathBuf};

    use candle_core::DType;
    use helexa_engine_abi::json::Sampling;

    use super::*;
    use crate::models::{LoadRequest, load};

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(path)
    }

    /// Greedy tokens of `prompt` and the tokens after them, over two requests: the second
    /// reuses part of the first's cache, so the position moves back under a captured graph.
    fn decode(m: &mut WorkerModel, prompt: &[u32]) -> Vec<Vec<u32>> {
        let params = GenerateParams {
            max_tokens: 300,
            stop_ids: Vec::new(),
            sampling: Sampling::default(),
        };
        [prompt, &prompt[..20]]
            .iter()
            .map(|p| {
                let (tx, rx) = mpsc::channel();
                m.generate(&params, p, &tx, &AtomicBool::new(false), None)
                    .expect("generate");
                rx.try_iter()
                    .filter_map(|msg| match msg {
                        Msg::Token(t) => Some(t),
                        Msg::Done(_) => None,
                    })
                    .collect()
            })
            .collect()
    }

    /// A measurement aid, not a check (ignored unless asked for): the logit margins of a greedy
    /// decode replayed teacher-forced, for `scripts/device/parting_margins.py`, which says where
    /// two builds' greedy tokens part and runs this under each build's switches. The request is
    /// a JSON file named by `HELEXA_MARGINS`: `{"config", "safetensors": [...], "gguf",
    /// "prompt": [...], "tokens": [...], "out"}` (paths; config and safetensors or gguf).
    #[test]
    #[ignore = "a measurement aid run by scripts/device/parting_margins.py"]
    fn margins_along_a_forced_decode() {
        let request: serde_json::Value = serde_json::from_slice(
            &std::fs::read(std::env::var("HELEXA_MARGINS").expect("HELEXA_MARGINS")).expect("read"),
        )
        .expect("json");
        let path = |k: &str| request[k].as_str().map(PathBuf::from);
        let ids = |k: &str| -> Vec<u32> {
            request[k]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| u32::try_from(v.as_u64().expect("id")).expect("id"))
                .collect()
        };
        let safetensors: Vec<PathBuf> = request["safetensors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(PathBuf::from))
                    .collect()
            })
            .unwrap_or_default();
        let (config, gguf) = (path("config"), path("gguf"));
        let dev = crate::open_cuda(0).expect("a CUDA device");
        let model = load(&LoadRequest {
            architecture: "qwen3",
            config: config.as_deref(),
            safetensors: &safetensors,
            gguf: gguf.as_deref(),
            dtype: DType::BF16,
            device: &dev,
            context_length: None,
        })
        .expect("load")
        .model;
        let cache = Arc::new(AtomicUsize::new(0));
        let mut m = WorkerModel::new(model, "margins".into(), PrefillChunks::Auto, cache);
        let margins = m
            .forced_margins(&ids("prompt"), &ids("tokens"))
            .expect("margins");
        let steps: Vec<serde_json::Value> = margins
            .iter()
            .map(|s| {
                serde_json::json!({"top": s.top, "lead": s.lead, "forced": s.forced,
                                   "forced_lead": s.forced_lead})
            })
            .collect();
        let out = path("out").expect("out");
        std::fs::write(&out, serde_json::to_vec(&steps).expect("json")).expect("write");
    }

    /// The kernels read a device position exactly as they read it as an argument, and the
    /// attention's extra splits weigh nothing, so a replayed step decodes the same tokens,
    /// across a band boundary (a second capture) and a cache reused from a shorter prefix.
    /// A model with a product the engine's GEMV kernels do not serve (here Q4_K_M's Q6_K rows
    /// of 210 bytes, which candle's MMVQ takes) is refused once and decodes plainly, with the
    /// same tokens.
    #[test]
    fn replayed_decode_steps_equal_plain_ones() {
        // Opened as the engine opens it (no per-buffer event tracking).
        let dev = crate::open_cuda(0).expect("a CUDA device");
        let config = fixture("tiny-qwen3/config.json");
        let safetensors = [fixture("tiny-qwen3/model.safetensors")];
        let q8_0 = fixture("tiny-qwen3/gguf/tiny-qwen3-Q8_0.gguf");
        let q4_k_m = fixture("tiny-qwen3/gguf/tiny-qwen3-Q4_K_M.gguf");
        // A checkpoint's config, safetensors and GGUF file, and whether its step is captured.
        type Files<'a> = (Option<&'a Path>, &'a [PathBuf], Option<&'a Path>);
        let cases: [(&str, Files, bool); 3] = [
            ("bf16", (Some(&config), &safetensors, None), true),
            ("q8_0", (None, &[], Some(&q8_0)), true),
            ("q4_k_m", (None, &[], Some(&q4_k_m)), false),
        ];
        let prompt: Vec<u32> = (1..60).map(|i| i * 37 % 1000).collect();
        for (name, (config, safetensors, gguf), captured) in cases {
            let model = || {
                load(&LoadRequest {
                    architecture: "qwen3",
                    config,
                    safetensors,
                    gguf,
                    dtype: DType::BF16,
                    device: &dev,
                    context_length: Some(1024),
                })
                .expect("load")
                .model
            };
            let cache = || Arc::new(AtomicUsize::new(0));
            let mut plain = WorkerModel::new(model(), "plain".into(), PrefillChunks::Auto, cache());
            let want = decode(&mut plain, &prompt);
            // Replayed, then replayed with each next step queued before the token is read
            // (`HELEXA_ENGINE_GRAPH_AHEAD`): the first request's last queued step is left
            // unread, and the second request's position moves back past it.
            for ahead in [false, true] {
                let name = format!("{name} ahead {ahead}");
                let mut replayed =
                    WorkerModel::new(model(), "replayed".into(), PrefillChunks::Auto, cache());
                let graph = crate::step_graph::StepGraph::queuing_ahead(&dev, ahead);
                replayed.step_graph = Some(graph.expect("graph"));
                let got = decode(&mut replayed, &prompt);
                assert_eq!(got, want, "{name}");
                if !captured {
                    assert!(replayed.step_graph.is_none(), "{name}: captured after all");
                    continue;
                }
                let graph = replayed
                    .step_graph
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: the graph went off"));
                // 299 decode steps a request (the first token comes from the prompt's last
                // chunk): lengths 60..=358 cross the band end at 256; the second request (19
                // positions reused, lengths 21..=319) replays the second capture.
                assert!(graph.captures >= 2, "{name}: {} captures", graph.captures);
                assert_eq!(graph.replays, 2 * 299, "{name}");
            }
        }
    }
}
