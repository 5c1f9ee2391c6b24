//! Greedy decode steps replayed from a CUDA graph (on by default; `HELEXA_ENGINE_GRAPH=0`
//! turns it off).
//!
//! Why: the host takes 1.8–3.0 ms to queue a quantized token's ~400 kernel launches on the
//! H200 machine, as long as the GPU takes to run them, so a slow or busy host core slowed the
//! token (docs/benchmarks.md, sixth session). A graph replays them with one launch: measured,
//! the host's share of a step fell from 51–79% to ~0%, and the step is then the GPU's own time
//! (seventh session).
//!
//! How (docs/plan-decode-graph.md):
//! - A replay re-runs the captured kernels with the arguments of the capture, so nothing that
//!   moves from token to token may be an argument. The step's token and position live in
//!   device words ([`StepGraph::write_inputs`]); the embedding and the two position-dependent
//!   kernels read them there ([`DevicePosition`]).
//! - The attention grid is sized for the end of a band of [`BAND`] positions, and the KV caches
//!   are reserved to the band's end before the capture. Nothing the graph captured then moves
//!   until the position leaves the band, or a prompt grows the caches; then the step is
//!   captured again.
//! - The fused kernels' buffers are allocated on a side stream outside the capture and kept
//!   until the graph goes (`HELEXA_ENGINE_GRAPH_KEEP=0` turns it off): allocated on the
//!   capturing stream, each was an allocation node and its free a free node between two
//!   kernels, so the driver captured no launch as a programmatic edge and no kernel overlapped
//!   the previous one (twelfth session: Q8_0 2.59 → 2.50 ms a token with it).
//! - The argmax writes into a device word that outlives the graph, read back after each replay.
//! - A replay runs only device work: the host's count of cached positions is advanced by hand
//!   ([`CausalLm::advance`]).
//! - Unless `HELEXA_ENGINE_GRAPH_AHEAD=0`, the next step's replay is queued before this
//!   step's token is read: the argmax feeds its pick and the next position into the
//!   device words (`argmax_feed_f32`), and each pick is copied into its own page-locked word.
//!   The GPU then goes from one step to the next without waiting for the host to read a token,
//!   queue the inputs and launch (~10 µs of host time a step, plus the copy and the launch's
//!   latency): on the H200, 0.01–0.03 ms a step in every format, same tokens (tenth session).
//!   A step queued ahead that the decode does not take (it stopped) wrote its
//!   position's cache row and nothing else the host counts: the next use of the model writes
//!   the inputs again and that row before it reads it.
//!
//! The kernels do for a device position what they do for the same position as an argument, so
//! tokens with and without the graph are expected to be the same bit for bit (the attention
//! grid's extra splits see no position and weigh 0 in the merge).

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaGraph, CudaSlice, CudaStream, PinnedHostSlice, sys,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor};

use crate::fused::{DevicePosition, KeptBuffers};
use crate::models::CausalLm;

/// Positions one capture serves: a step is captured again every `BAND` tokens.
const BAND: usize = 256;

/// Whether graph replay is on (`HELEXA_ENGINE_GRAPH=0` turns it off).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::fused::switch(&ON, "HELEXA_ENGINE_GRAPH")
}

/// Whether the next step's replay is queued before this step's token is read: yes unless
/// `HELEXA_ENGINE_GRAPH_AHEAD=0`.
pub fn ahead_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::fused::switch(&ON, "HELEXA_ENGINE_GRAPH_AHEAD")
}

/// A replay queued ahead: the step at `position`, whose token is the pick of the replay before
/// it; its own pick is copied into pick slot `slot`.
struct Ahead {
    position: usize,
    slot: usize,
}

/// A page-locked word a replay's pick is copied into, and the event recorded after each copy.
struct PickSlot {
    word: PinnedHostSlice<u32>,
    copied: CudaEvent,
}

/// What a [`StepGraph::step`] did.
pub enum Stepped {
    /// The step ran: its greedy token.
    Token(u32),
    /// The model's step cannot be captured (why); nothing ran.
    Refused(String),
}

/// One model's captured greedy step and the device words it reads and writes.
pub struct StepGraph {
    /// The step's token id (one `u32`).
    ids: Tensor,
    /// The step's position, and the end of the band the capture serves.
    at: DevicePosition,
    /// The greedy pick, written by the graph's last kernel.
    token: CudaSlice<u32>,
    graph: Option<CudaGraph>,
    /// The buffers the graph's kernels use, kept while it may run
    /// ([`crate::fused::graph_keep_enabled`]), and the stream they were allocated (and are
    /// freed) on.
    kept: Option<KeptBuffers>,
    side: Option<Arc<CudaStream>>,
    /// Whether replays are queued ahead ([`ahead_enabled`]): the graph's argmax then feeds
    /// the next step's inputs.
    ahead: bool,
    /// The replay queued ahead, if any, and the pick of the last replay read (its input).
    queued_ahead: Option<Ahead>,
    last_pick: Option<u32>,
    /// Where picks are copied with replays queued ahead: two, taken in turn, so the copy of one
    /// step's pick is not overwritten by the next step's.
    picks: Vec<PickSlot>,
    /// The caches' size when the graph was captured: it changes only when they grow, and so
    /// move.
    cache_bytes: usize,
    /// Host time of the last step until its work was queued (inputs written, graph launched).
    pub queued: Duration,
    /// Captures and replays so far (a capture's own first launch counts as a replay).
    pub captures: u32,
    pub replays: u32,
}

impl StepGraph {
    /// Refuses a device whose buffers are freed synchronously (no stream-ordered allocation:
    /// a free inside the capture would synchronise) or on which cudarc orders buffers with
    /// events (it does when it manages several streams: event waits recorded before the
    /// capture do not belong in it).
    pub fn new(device: &Device) -> Result<Self> {
        Self::queuing_ahead(device, ahead_enabled())
    }

    /// As [`StepGraph::new`], with replays queued ahead or not whatever the environment says.
    pub fn queuing_ahead(device: &Device, ahead: bool) -> Result<Self> {
        let dev = device.as_cuda_device()?;
        let ctx = dev.cuda_stream().context().clone();
        if !ctx.has_async_alloc() || ctx.is_managing_stream_synchronization() {
            candle_core::bail!(
                "decode graphs need stream-ordered allocation and no per-buffer event tracking"
            );
        }
        Ok(Self {
            ids: Tensor::zeros(1, DType::U32, device)?,
            at: DevicePosition {
                position: Tensor::zeros(1, DType::U32, device)?,
                max_len: 0,
            },
            token: dev.cuda_stream().alloc_zeros::<u32>(1).w()?,
            graph: None,
            kept: None,
            side: crate::fused::graph_keep_enabled()
                .then(|| dev.cuda_stream().context().new_stream())
                .transpose()
                .w()?,
            ahead,
            queued_ahead: None,
            last_pick: None,
            picks: Vec::new(),
            cache_bytes: 0,
            queued: Duration::ZERO,
            captures: 0,
            replays: 0,
        })
    }

    /// The greedy token after `token`, which sits at `model.cache_len()`: a replay of the
    /// captured step, captured first when none serves this position. A step the model cannot
    /// capture is [`Stepped::Refused`], with the model as it was; on an error the caller must
    /// not trust the model's cache (as after any failed step).
    pub fn step(&mut self, model: &mut dyn CausalLm, token: u32) -> Result<Stepped> {
        let start = Instant::now();
        let position = model.cache_len();
        let len = position + 1;
        // A replay queued ahead runs this step when it is the one for this position and token;
        // any other is left to finish (it wrote only its position's cache row, and the inputs
        // are written again below).
        let queued = self.queued_ahead.take().filter(|a| {
            a.position == position && self.last_pick == Some(token) && self.serves(model, len)
        });
        let slot = if let Some(a) = queued {
            model.advance(1);
            a.slot
        } else if self.serves(model, len) {
            self.write_inputs(token, position)?;
            self.launch()?;
            model.advance(1);
            self.copy_pick(0)?
        } else {
            self.graph = None;
            let stream = self.token.stream().clone();
            // An error recorded before the capture belongs to earlier work: it fails the step
            // as any device error does, rather than passing for a refused capture.
            stream.context().check_err().w()?;
            self.write_inputs(token, position)?;
            let captured = self.capture(model, len);
            // A stream left capturing would fail every later step: not a refusal either.
            if stream.capture_status().w()?
                != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
            {
                candle_core::bail!("the stream is still capturing after the capture ended");
            }
            if let Err(e) = captured {
                // The capture may have counted the position in some layers' caches.
                model.truncate(position);
                return Ok(Stepped::Refused(crate::describe(&e)));
            }
            // The capture ran the step's host code (which counted the position) but queued
            // nothing; the first replay is this step's work.
            self.captures += 1;
            self.launch()?;
            self.copy_pick(0)?
        };
        // The next step queued before this one's pick is read, where the graph serves it.
        if self.ahead && self.serves(model, len + 1) {
            self.launch()?;
            let next = self.copy_pick(1 - slot)?;
            self.queued_ahead = Some(Ahead {
                position: len,
                slot: next,
            });
        }
        self.replays += 1;
        self.queued = start.elapsed();
        let picked = self.read_pick(slot)?;
        self.last_pick = Some(picked);
        Ok(Stepped::Token(picked))
    }

    /// Forgets the replay queued ahead, if any: the next step writes its inputs again.
    pub fn forget_queued(&mut self) {
        self.queued_ahead = None;
    }

    /// Whether the captured graph serves a step at attention length `len`: its band holds it
    /// and the caches have not moved since the capture.
    fn serves(&self, model: &dyn CausalLm, len: usize) -> bool {
        self.graph.is_some() && len <= self.at.max_len && model.cache_bytes() == self.cache_bytes
    }

    /// With replays queued ahead, queues the copy of the last replay's pick into pick slot
    /// `slot` (0 or 1), allocating the slots on first use. Returns the slot.
    fn copy_pick(&mut self, slot: usize) -> Result<usize> {
        if !self.ahead {
            return Ok(slot); // read by `read_pick` once the stream is done
        }
        let stream = self.token.stream().clone();
        while self.picks.len() <= slot {
            // Read only after the copy below into it has finished (`read_pick`).
            let word = crate::fused::pinned_word(&stream)?;
            // The default flags: waiting on it spins as a stream synchronisation does (the
            // page-locked word's own event blocks the thread, which the OS wakes later).
            let copied = stream.context().new_event(None).w()?;
            self.picks.push(PickSlot { word, copied });
        }
        let pick = &mut self.picks[slot];
        stream.memcpy_dtoh(&self.token, &mut pick.word).w()?;
        pick.copied.record(&stream).w()?;
        Ok(slot)
    }

    /// The last replay's pick: with replays queued ahead, the one copied into slot `slot` once
    /// its copy is done (the replay queued after it may still run); else read once the stream
    /// has finished.
    fn read_pick(&self, slot: usize) -> Result<u32> {
        let picked = if self.ahead {
            let pick = &self.picks[slot];
            pick.copied.synchronize().w()?;
            // The copy is done, so the word's own event (recorded with it) is too.
            pick.word.as_slice().w()?.first().copied()
        } else {
            let stream = self.token.stream().clone();
            stream.clone_dtoh(&self.token).w()?.first().copied()
        };
        picked.ok_or_else(|| candle_core::Error::msg("the graph's argmax returned nothing"))
    }

    /// Captures the step at attention length `len` for the band that holds it.
    fn capture(&mut self, model: &mut dyn CausalLm, len: usize) -> Result<()> {
        let band_end = len.next_multiple_of(BAND).min(model.max_positions());
        model.reserve_positions(band_end)?;
        self.at.max_len = band_end;
        self.cache_bytes = model.cache_bytes();
        let stream = self.token.stream().clone();
        if self.kept.is_some() {
            // The old graph's buffers go once no replay of it may still run.
            stream.synchronize().w()?;
            self.kept = None;
        }
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let scope = crate::fused::capture_scope();
        let keeping = self
            .side
            .as_ref()
            .map(|side| crate::fused::start_keeping(KeptBuffers::new(side.clone())));
        // With replays queued ahead, the argmax feeds the next step's token and position.
        let feed = self.ahead.then_some([&self.ids, &self.at.position]);
        let queued = model
            .forward_at(&self.ids, &self.at)
            .and_then(|logits| crate::fused::argmax_into(&logits, &mut self.token, feed));
        drop(scope);
        let kept = keeping.and_then(crate::fused::Keeping::finish);
        // A failed operation inside the capture leaves its error recorded for later (a buffer
        // freed in a drop cannot return one), and cudarc's `end_capture` would return that
        // error before ending the capture, leaving the stream capturing. Take it first; the
        // capture must end whatever happened.
        let pending = stream.context().check_err().w();
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
        queued?;
        pending?;
        self.graph = graph?;
        let Some(captured) = &self.graph else {
            candle_core::bail!("the decode step's capture produced no graph");
        };
        if let Some(side) = &self.side {
            // The side stream's allocations are done before any replay reads them.
            side.synchronize().w()?;
        }
        report_edges(captured, kept.as_ref().map_or(0, KeptBuffers::count))?;
        self.kept = kept;
        Ok(())
    }

    fn launch(&self) -> Result<()> {
        match &self.graph {
            Some(g) => g.launch().w(),
            None => candle_core::bail!("no captured decode step"),
        }
    }

    /// Writes the step's token and position into the device words the graph reads, on the
    /// stream the graph runs on (so before it, in order).
    fn write_inputs(&self, token: u32, position: usize) -> Result<()> {
        let position =
            u32::try_from(position).map_err(|_| candle_core::Error::msg("position beyond u32"))?;
        crate::fused::write_word(&self.ids, token)?;
        crate::fused::write_word(&self.at.position, position)
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        if self.kept.is_some() {
            // The kept buffers are freed on the side stream, which does not wait for a replay
            // still running on the graph's.
            let _ = self.token.stream().synchronize();
        }
    }
}

/// With `HELEXA_ENGINE_GRAPH_REPORT=1`, prints the first captured step's kernel nodes and how
/// many of its edges are programmatic (each kernel's blocks may start before the previous
/// kernel drains) rather than full ones: a diagnostic for the device visits.
fn report_edges(graph: &CudaGraph, kept: usize) -> Result<()> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if crate::fused::opt_in(&ON, "HELEXA_ENGINE_GRAPH_REPORT")
        && !REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        let e = crate::fused::graph_edges(graph.cu_graph())?;
        eprintln!(
            "decode graph: {} nodes ({} kernels, {} allocations and frees), {} edges ({} programmatic), {kept} buffers kept",
            e.nodes, e.kernel_nodes, e.memory_nodes, e.edges, e.programmatic_edges
        );
    }
    Ok(())
}
