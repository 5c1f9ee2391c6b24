//! Fused CUDA kernels for the small operations around the matrix products (`kernels/fused.cu`).
//!
//! At batch 1 a decoded token is ~20 kernel launches per layer, and each small one (a norm, a
//! residual add, a rotation, a softmax) costs ~5 µs of GPU time on an H200 whatever its size.
//! These kernels do the same work in fewer launches:
//! - [`add_rms_norm`]: residual add + RMSNorm (was 2 launches);
//! - [`silu_mul`]: the SwiGLU gate (was 2);
//! - [`qk_norm_rope_cache`]: per-head q/k RMSNorm, RoPE and the K/V cache writes (was ~8);
//! - [`decode_attention`]: one query over the cache, flash-decode style (was 4, and scales to
//!   long contexts by splitting the positions over thread blocks);
//! - [`gemv`]: the batch-1 matrix-vector product over dense 16-bit weights (cuBLAS's split-K
//!   GEMV and its reduction);
//! - [`quant_gemv`]: the batch-1 matrix-vector product over GGUF Q8_0/Q4_K/Q6_K blocks read in
//!   place (candle's MMVQ kernel and the launch that quantizes x before it), in
//!   `kernels/quant_gemv.cu`;
//! - [`quant_gemv_norm`] and [`gemv_norm`]: the product over a layer input still to be formed
//!   ([`PendingNorm`]): each block adds the residual and normalises in its prologue, which
//!   takes the two [`add_rms_norm`] launches per layer off a decoded token;
//! - [`gemv_swiglu`] / [`quant_gemv_swiglu`] (the SwiGLU gate in the gate/up product's
//!   epilogue) and [`decode_attention_roped`] (the q/k norms, RoPE and cache writes in the
//!   decode attention);
//! - [`causal_softmax`]: prefill's scale, causal mask and softmax over the scores (was 3, the
//!   mask a broadcast add of a host-built tensor);
//! - [`argmax`]: the greedy pick, so only the index leaves the device.
//!
//! Each has the unfused candle composition as its reference: [`applies`] is false on the CPU,
//! for other dtypes and when `HELEXA_ENGINE_KERNELS=0` (to measure the kernels' effect or rule
//! them out), and callers then take the unfused path.

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};

use crate::layers::{PendingNorm, RmsNorm, Rope};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub(crate) use cuda::{Keeping, KeptBuffers, start_keeping};
#[cfg(feature = "cuda")]
pub(crate) use launch::graph_edges;
#[cfg(all(test, feature = "cuda"))]
mod launch_sweep;

/// A performance switch: on unless the environment variable `name` is `0`, read once.
pub(crate) fn switch(cell: &'static OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| std::env::var(name).map_or(true, |v| v != "0"))
}

/// A switch off until measured: on only when the environment variable `name` is `1`, read once.
pub(crate) fn opt_in(cell: &'static OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| std::env::var(name).is_ok_and(|v| v == "1"))
}

/// A tuning number: the environment variable `name` when it parses into `range`, else
/// `default`, read once.
pub(crate) fn tuning(
    cell: &'static OnceLock<usize>,
    name: &str,
    range: std::ops::RangeInclusive<usize>,
    default: usize,
) -> usize {
    *cell.get_or_init(|| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| range.contains(n))
            .unwrap_or(default)
    })
}

/// Whether a capture allocates its kernels' buffers outside the graph and keeps them while the
/// graph lives, so that kernel follows kernel in the graph and launches overlap (`KeptBuffers`
/// in `fused/cuda.rs`): yes unless `HELEXA_ENGINE_GRAPH_KEEP=0`.
pub(crate) fn graph_keep_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch(&ON, "HELEXA_ENGINE_GRAPH_KEEP")
}

/// Whether the fused kernels are switched on (`HELEXA_ENGINE_KERNELS=0` turns them off).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch(&ON, "HELEXA_ENGINE_KERNELS")
}

thread_local! {
    /// Set while this thread captures a decode step into a CUDA graph (`step_graph`).
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is capturing a decode step into a CUDA graph: products must then take
/// the engine's own GEMV kernels (see `Linear::forward`).
pub fn capturing() -> bool {
    CAPTURING.get()
}

/// Marks this thread as capturing until the returned guard drops.
pub fn capture_scope() -> impl Drop {
    struct Scope;
    impl Drop for Scope {
        fn drop(&mut self) {
            CAPTURING.set(false);
        }
    }
    CAPTURING.set(true);
    Scope
}

/// Whether the fused kernels serve activations like `x`: on a CUDA device, in f32/bf16/f16,
/// and switched on.
pub fn applies(x: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && enabled()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Whether [`gemv`] serves `x · wᵀ`: one row of 16-bit activations on a CUDA device, a dense
/// contiguous weight of the same dtype, 16-byte-aligned rows; and neither
/// `HELEXA_ENGINE_KERNELS=0` nor `HELEXA_ENGINE_GEMV=0` (which turns off only this kernel).
pub fn gemv_applies(x: &Tensor, w: &Tensor) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let Ok((_, cols)) = w.dims2() else {
        return false;
    };
    switch(&ON, "HELEXA_ENGINE_GEMV")
        && applies(x)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && w.dtype() == x.dtype()
        && x.elem_count() == cols
        && cols.is_multiple_of(8)
        && x.is_contiguous()
        && w.is_contiguous()
        && x.layout().start_offset().is_multiple_of(8)
        && w.layout().start_offset().is_multiple_of(8)
}

/// `x · wᵀ` for one row `x` (any shape of `cols` elements) and `w` `(rows, cols)`; the result
/// has `x`'s shape with `rows` as its last dimension. Only call when [`gemv_applies`] holds.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::gemv(x, w)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// Queues the argmax of f32 `logits` into `out[0]` without waiting: a CUDA graph's last kernel,
/// whose result outlives the graph's own allocations. With `feed` (the graph's token id and
/// position words) the pick also becomes the next step's token and the position moves on, so
/// a replay queued before this pick is read runs the next step.
#[cfg(feature = "cuda")]
pub fn argmax_into(
    logits: &Tensor,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    feed: Option<[&Tensor; 2]>,
) -> Result<()> {
    cuda::argmax_into(logits, out, feed)
}

/// Rows `ids` (`u32` on the device) of `table` `(rows, cols)`, as `(n, cols)`: an embedding
/// lookup that, unlike candle's `index_select`, copies nothing from the host (a CUDA graph
/// step's token id lives on the device).
#[cfg(feature = "cuda")]
pub fn gather_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    cuda::gather_rows(table, ids)
}

/// Copies `value` into the one-`u32` device tensor `t`, in stream order (a CUDA graph's input,
/// written before each replay).
#[cfg(feature = "cuda")]
pub fn write_word(t: &Tensor, value: u32) -> Result<()> {
    cuda::write_word(t, value)
}

/// A page-locked host word, uninitialised, for a device-to-host copy on `stream` that the host
/// reads later (a replayed step's pick, read once its copy is done).
#[cfg(feature = "cuda")]
pub fn pinned_word(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>> {
    cuda::pinned_word(stream)
}

/// Drops the kernel handles this thread keeps (see `cuda::module_function`). They hold the
/// device's CUDA context; the worker calls this before re-creating a faulted device, so that
/// the old context is released rather than handed back.
pub fn forget_kernel_handles() {
    #[cfg(feature = "cuda")]
    cuda::forget_kernel_handles();
}

/// Warps per block of [`quant_gemv`] (`QG_WARPS` in the kernel; [`QUANT_GEMV_WIDE_WARPS`] in
/// its wide build), and the weights each warp stages in shared memory at a time (`QG_CHUNK`).
const QUANT_GEMV_WARPS: usize = 8;
const QUANT_GEMV_WIDE_WARPS: usize = 16;
const QUANT_GEMV_CHUNK: usize = 2048;
/// Most blocks per SM the quantized GEMV's registers allow at 8 warps a block (`QG_MIN_BLOCKS`
/// in the kernel; the wide build allows half as many).
const QUANT_GEMV_BLOCKS_PER_SM: usize = 4;

/// Most resident blocks per SM of `warps` warps (the registers' limit, as above).
fn quant_gemv_max_blocks(warps: usize) -> usize {
    QUANT_GEMV_BLOCKS_PER_SM * QUANT_GEMV_WARPS / warps.max(1)
}

/// Chunks each warp of [`quant_gemv`] has in flight over a `dtype` weight of `cols` columns at
/// 8 warps a block: 2 to 4 for every weight from `HELEXA_ENGINE_QUANT_GEMV_STAGES`, else the
/// block type's [`default_quant_gemv_stages`], or fewer where x is too wide for those to fit
/// the shared memory (Q8_0 at four stages holds up to ~19k columns, at two ~42k; a product
/// that does not fit would leave for candle's MMVQ). More stages hide more memory latency but
/// take more shared memory, so fewer blocks fit on an SM.
fn quant_gemv_stages(dtype: GgmlDType, cols: usize) -> usize {
    static STAGES: OnceLock<usize> = OnceLock::new();
    // 0: unset (outside the knob's range), so the block type's own default.
    match tuning(&STAGES, "HELEXA_ENGINE_QUANT_GEMV_STAGES", 2..=4, 0) {
        0 => {
            let fits = |stages| {
                quant_gemv_shared_bytes(dtype, cols, stages, QUANT_GEMV_WARPS)
                    <= QUANT_GEMV_SHARED_MAX
            };
            let preferred = quant_gemv_format(dtype).map_or(2, default_quant_gemv_stages);
            (3..=preferred).rev().find(|&s| fits(s)).unwrap_or(2)
        }
        n => n,
    }
}

/// Chunks in flight per warp by block type (the kernel name part): four for Q8_0, two for the
/// K-quants.
///
/// Measured in whole decode steps on the H200 (thirteenth session, call 2, step ms @0, with
/// the graph's launches overlapping): every weight at four stages took Q8_0 from 2.49 to
/// 2.41 ms (400.9 → 414.8 tok/s; @4096 355.5 → 364.3), at three 2.48; Q4_K_M went the other
/// way, 1.98 → 2.06 ms at four and 2.04 at three; same tokens in all. Most of Q8_0's gain is
/// its down product's (that one at three stages: 2.53 ms, call 3). (Before launches
/// overlapped, three and four stages were slower than two for every format: eighth session.)
/// Why the K-quants do not gain was not measured; a guess: their blocks carry more arithmetic
/// per byte (scales unpacked per sub-block), which already covers a chunk's latency, while
/// Q8_0's warps have the least work per byte.
fn default_quant_gemv_stages(format: &str) -> usize {
    if format == "q8_0" { 4 } else { 2 }
}

/// Whether a product of `rows` × `cols` gains from sharing each row between two warps (the
/// kernel's SPLIT) on a grid of `resident_warps`: the busiest warp takes ⌈rows / warps⌉ rows
/// plain and ⌈2·rows / warps⌉ half rows shared, so sharing pays where the second is less than
/// twice the first (over 4224 warps, 6144 or 5120 rows: three half rows against two rows; 1024
/// rows: one half row against one row; not 4096 rows: two half rows against one row). The
/// row's chunks must split evenly.
#[cfg_attr(
    not(feature = "cuda"),
    allow(dead_code, reason = "the CUDA launcher's choice, tested on the CPU")
)]
pub(crate) fn split_rows_pay(rows: usize, cols: usize, resident_warps: usize) -> bool {
    cols.is_multiple_of(2 * QUANT_GEMV_CHUNK)
        && sharing_rows_pays(rows, resident_warps, resident_warps)
}

/// Whether `rows` shared two warps to a row, over `split_warps` resident warps, finish in
/// fewer rounds of half rows than whole rows one to a warp take over `plain_warps` (for the
/// dense product a round is a wave of blocks).
#[cfg_attr(
    not(feature = "cuda"),
    allow(dead_code, reason = "the CUDA launcher's choice, tested on the CPU")
)]
pub(crate) fn sharing_rows_pays(rows: usize, plain_warps: usize, split_warps: usize) -> bool {
    (2 * rows).div_ceil(split_warps.max(1)) < 2 * rows.div_ceil(plain_warps.max(1))
}

/// How one quantized product launches: chunks in flight per warp (the kernel's `STAGES`), most
/// resident blocks per SM, and warps per block (8, or 16: the wide build).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QuantLaunchShape {
    stages: usize,
    blocks_per_sm: usize,
    warps: usize,
}

/// One weight's entry in the launch table: its format (kernel name part), rows and columns as
/// stored, and its launch.
#[derive(Debug, PartialEq, Eq)]
struct QuantLaunchEntry {
    format: String,
    rows: usize,
    cols: usize,
    shape: QuantLaunchShape,
}

/// The launch table for a decode graph whose kernels do not overlap (`HELEXA_ENGINE_GRAPH_KEEP=0`,
/// the default unless `HELEXA_ENGINE_QUANT_GEMV_LAUNCH` is set): the launch sweep's
/// choices on the H200 (`gpu-check.sh tune`) for the 8B weights where one beat the default
/// launch by over 2% alone. Eleventh session, with the SwiGLU kernels at three and four stages
/// and the wide build (`…x16`: 16 warps a block) swept too: e.g. Q8_0 down 16.75 → 15.69 µs
/// (2×2×16), Q4_K down 11.87 → 10.09 µs (4×1×16), Q6_K down 15.41 → 13.91 µs (2×1×16),
/// Q4_K gate/up 18.34 → 17.44 µs (3×2×16). In a whole decode step against the tenth
/// session's table: Q4_K_M 2.11 → 2.06 ms (visit 1, 8 warps) → 2.01 ms (visit 4, with the wide
/// build), Q8_0 2.64 → 2.61 ms; same tokens. Q8_0's gate/up at 3×2 (28.67 → 28.10 µs, under
/// the margin alone) was tried in the step too: 2.64 → 2.62 ms, same tokens (visit 3).
///
/// Once the graph's launches overlap (programmatic edges, the default since the twelfth
/// session) it loses: those shapes leave room on an SM, and the next kernel's blocks take it
/// early. With no table there (every weight at two stages, four blocks of 8 warps per SM) the
/// H200 read Q8_0 2.70 → 2.50 ms and Q4_K_M 2.08 → 1.99 ms a token, BF16 unchanged, same
/// tokens (twelfth session, visit 6). A weight without an entry here takes its block type's
/// default stages ([`default_quant_gemv_stages`]), chosen with launches overlapping.
const SEQUENTIAL_LAUNCH_TABLE: &str = "q8_0:6144x4096=3x1,q8_0:4096x12288=2x2x16,\
     q8_0:24576x4096=3x2,q4k:5120x4096=3x1,q4k:4096x4096=2x2x16,q4k:24576x4096=3x2x16,\
     q6k:4096x12288=2x1x16,q4k:4096x12288=4x1x16";

/// The launch table while the decode graph's launches overlap (the default): the MLP's down
/// product of an 8B model in the K-quants (Q4_K_M stores it as Q4_K in some layers, Q6_K in
/// the others) on the wide build (16 warps a block, two blocks per SM): one input prologue per
/// 16 warps over its 12288-value x. Measured in whole decode steps on the H200 (thirteenth
/// session, call 9, each setting a process on one machine): Q4_K_M 1.99 → 1.91 ms a token
/// (502.5 → 522.8 tok/s), same tokens. The launch sweep's whole table (call 8, every weight's
/// fastest shape launched alone) made Q4_K_M slower (2.21 ms) and moved Q8_0 by 0.7%, within
/// what machines differ by; Q8_0's down at three stages instead of its four was slower
/// (2.41 → 2.53 ms, call 3).
const OVERLAPPING_LAUNCH_TABLE: &str = "q4k:4096x12288=3x2x16,q6k:4096x12288=2x2x16";

/// Launch shapes chosen per weight, from `HELEXA_ENGINE_QUANT_GEMV_LAUNCH` (unset:
/// [`OVERLAPPING_LAUNCH_TABLE`] while the decode graph's launches overlap, else
/// [`SEQUENTIAL_LAUNCH_TABLE`]; empty or `none`: no table): entries
/// `FORMAT:ROWSxCOLS=STAGESxBLOCKS[xWARPS]` separated by commas, e.g. `q8_0:4096x12288=3x3` or
/// `q8_0:4096x12288=2x2x16` (the weight as stored: a stacked gate/up weight has twice the output
/// rows; WARPS a block, 8 unless 16 asks for the wide build). A weight without an entry
/// launches at [`quant_gemv_stages`], 8 warps a block and every block an SM holds. The launch sweep
/// (`src/fused/launch_sweep.rs`) measures the choices; this tries them in a whole decode step
/// without a rebuild.
fn quant_launch_table() -> &'static [QuantLaunchEntry] {
    static TABLE: OnceLock<Vec<QuantLaunchEntry>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let spec = std::env::var("HELEXA_ENGINE_QUANT_GEMV_LAUNCH").unwrap_or_else(|_| {
            if graph_keep_enabled() {
                OVERLAPPING_LAUNCH_TABLE.to_owned()
            } else {
                SEQUENTIAL_LAUNCH_TABLE.to_owned()
            }
        });
        parse_quant_launch_table(&spec).unwrap_or_else(|bad| {
            eprintln!("helexa-engine-cuda: HELEXA_ENGINE_QUANT_GEMV_LAUNCH ignored: malformed entry {bad:?}");
            Vec::new()
        })
    })
}

/// Parses a `HELEXA_ENGINE_QUANT_GEMV_LAUNCH` value; a malformed entry is the error (a format
/// the kernel reads, dimensions above 0, stages 2–4, warps 8 or 16, blocks 1 to what the
/// registers allow at those warps: 4 or 2).
fn parse_quant_launch_table(spec: &str) -> std::result::Result<Vec<QuantLaunchEntry>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty() && *e != "none")
        .map(|entry| {
            let parse = || -> Option<QuantLaunchEntry> {
                let (format, rest) = entry.split_once(':')?;
                let known = [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K]
                    .into_iter()
                    .filter_map(quant_gemv_format)
                    .any(|f| f == format);
                if !known {
                    return None;
                }
                let (dims, shape) = rest.split_once('=')?;
                let (rows, cols) = dims.split_once('x')?;
                let (stages, rest) = shape.split_once('x')?;
                let (blocks, warps) = rest.split_once('x').unwrap_or((rest, "8"));
                let warps = warps
                    .parse()
                    .ok()
                    .filter(|w| [QUANT_GEMV_WARPS, QUANT_GEMV_WIDE_WARPS].contains(w))?;
                let shape = QuantLaunchShape {
                    stages: stages.parse().ok().filter(|s| (2..=4).contains(s))?,
                    blocks_per_sm: blocks
                        .parse()
                        .ok()
                        .filter(|b| (1..=quant_gemv_max_blocks(warps)).contains(b))?,
                    warps,
                };
                Some(QuantLaunchEntry {
                    format: format.to_owned(),
                    rows: rows.parse().ok().filter(|&r: &usize| r > 0)?,
                    cols: cols.parse().ok().filter(|&c: &usize| c > 0)?,
                    shape,
                })
            };
            parse().ok_or_else(|| entry.to_owned())
        })
        .collect()
}

/// The launch shape of the quantized product over `w`: its table entry, else the default.
fn quant_launch_shape(w: &QTensor) -> QuantLaunchShape {
    // Not a matrix: no product takes it (`quant_gemv_applies`), and no entry matches.
    let (rows, cols) = w.shape().dims2().unwrap_or((0, 0));
    let default = QuantLaunchShape {
        stages: quant_gemv_stages(w.dtype(), cols),
        blocks_per_sm: QUANT_GEMV_BLOCKS_PER_SM,
        warps: QUANT_GEMV_WARPS,
    };
    let Some(format) = quant_gemv_format(w.dtype()) else {
        return default;
    };
    quant_launch_table()
        .iter()
        .find(|e| e.format == format && e.rows == rows && e.cols == cols)
        .map_or(default, |e| e.shape)
}

/// Dynamic shared memory [`quant_gemv`] may ask for: what every GPU from compute 8.0 grants a
/// block that opts in (99 KB on 8.6/8.9, more on 8.0 and 9.0).
const QUANT_GEMV_SHARED_MAX: usize = 96 * 1024;

/// The kernel name suffix of a GGUF block type [`quant_gemv`] reads.
fn quant_gemv_format(dtype: GgmlDType) -> Option<&'static str> {
    match dtype {
        GgmlDType::Q8_0 => Some("q8_0"),
        GgmlDType::Q4K => Some("q4k"),
        GgmlDType::Q6K => Some("q6k"),
        _ => None,
    }
}

/// Bytes of one row of `cols` weights in `dtype`'s blocks.
fn quant_row_bytes(dtype: GgmlDType, cols: usize) -> usize {
    cols / dtype.block_size() * dtype.type_size()
}

/// Shared memory a [`quant_gemv`] block needs: the chunk buffers of each warp, then x quantized
/// (one byte per value with 16 bytes of padding per 64 against bank conflicts, `QG_X_BYTES`,
/// and a scale and a sum per 32 values).
fn quant_gemv_shared_bytes(dtype: GgmlDType, cols: usize, stages: usize, warps: usize) -> usize {
    warps * stages * quant_row_bytes(dtype, QUANT_GEMV_CHUNK) + cols + cols / 4 + cols / 32 * 8
}

/// Whether [`quant_gemv`] serves `x · wᵀ`: one 16-byte-aligned row of activations on a CUDA
/// device, `w` in Q8_0, Q4_K or Q6_K with rows a multiple of 64 weights and of 16 bytes (true of
/// the usual model widths: 2048, 4096, 12288…), x small enough to sit quantized in shared
/// memory next to the chunk buffers (≥ 17k values at four stages, ~40k at the default two);
/// and neither `HELEXA_ENGINE_KERNELS=0` nor `HELEXA_ENGINE_QUANT_GEMV=0` (which turns off
/// only this kernel, leaving candle's MMVQ).
pub fn quant_gemv_applies(x: &Tensor, w: &QTensor) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let Ok((_, cols)) = w.shape().dims2() else {
        return false;
    };
    switch(&ON, "HELEXA_ENGINE_QUANT_GEMV")
        && applies(x)
        && quant_gemv_format(w.dtype()).is_some()
        && w.device().is_cuda()
        && x.elem_count() == cols
        && x.is_contiguous()
        && x.layout().start_offset().is_multiple_of(8)
        && cols.is_multiple_of(64)
        && quant_row_bytes(w.dtype(), cols).is_multiple_of(16)
        && {
            let shape = quant_launch_shape(w);
            quant_gemv_shared_bytes(w.dtype(), cols, shape.stages, shape.warps)
                <= QUANT_GEMV_SHARED_MAX
        }
}

/// `x · wᵀ` for one row `x` (any shape of `cols` elements) and quantized `w` `(rows, cols)`, x
/// quantized per 32 values as llama.cpp does; the result has `x`'s shape and dtype with `rows`
/// as its last dimension. Only call when [`quant_gemv_applies`] holds.
pub fn quant_gemv(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::quant_gemv(x, w, &quant_gemv_launch(w, false)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// Whether a layer's first quantized products form their input themselves, the residual add
/// and RMSNorm in their prologue ([`quant_gemv_norm`]), instead of a separate [`add_rms_norm`]
/// launch; `HELEXA_ENGINE_NORM_IN_PRODUCT=0` turns it off (the dense products' too, which
/// `HELEXA_ENGINE_DENSE_NORM_IN_PRODUCT=0` turns off alone).
fn norm_in_product_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch(&ON, "HELEXA_ENGINE_NORM_IN_PRODUCT")
}

/// Whether the pending input's parts suit a product's prologue: one row, delta like the
/// residual, the norm weight in the same dtype, all contiguous and 16-byte aligned, 16-bit.
fn pending_norm_fits(p: &PendingNorm<'_>) -> bool {
    let (x, delta, w) = (p.residual, p.delta, p.norm.weight());
    let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
    norm_in_product_enabled()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && delta.dtype() == x.dtype()
        && w.dtype() == x.dtype()
        && delta.dims() == x.dims()
        && w.dims() == [x.elem_count()]
        && aligned(delta)
        && aligned(w)
}

/// Whether a layer's first dense products form their input themselves ([`gemv_norm`]), as
/// the quantized ones do (`HELEXA_ENGINE_DENSE_NORM_IN_PRODUCT=0` turns it off). Measured on
/// the H200 (eighth session): BF16 decode 4.73 → 4.51 ms a token. The first try (a grid of
/// resident blocks taking rows in turn) had made it slower, 4.66 → 4.87 ms; this one keeps the
/// plain GEMV's grid, one warp per row, each block forming the input from registers.
fn dense_norm_in_product_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch(&ON, "HELEXA_ENGINE_DENSE_NORM_IN_PRODUCT")
}

/// Whether [`gemv_norm`] serves `norm(p) · wᵀ`: [`gemv_applies`] for the residual, the pending
/// parts fit, and the row fits the kernel's shared memory (16 values per thread).
pub fn gemv_norm_applies(p: &PendingNorm<'_>, w: &Tensor) -> bool {
    dense_norm_in_product_enabled()
        && gemv_applies(p.residual, w)
        && pending_norm_fits(p)
        && p.residual.elem_count() <= GEMV_NORM_MAX_COLS
}

/// Most columns of a dense product's formed input (`GEMV_NORM_MAX_COLS` in the kernel: 16 per
/// thread of its 256-thread block, kept in registers then in static shared memory).
const GEMV_NORM_MAX_COLS: usize = 4096;

/// `norm(residual + delta) · wᵀ` over dense `w` (with the SwiGLU gate folded in when `swiglu`,
/// as [`gemv_swiglu`]) and, when `write_sum`, the new residual, in one launch. Only call when
/// [`gemv_norm_applies`] holds.
pub fn gemv_norm(
    p: &PendingNorm<'_>,
    w: &Tensor,
    swiglu: bool,
    write_sum: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    {
        cuda::gemv_with(p.residual, w, swiglu, Some(&norm_input(p, write_sum)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, w, swiglu, write_sum);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// Whether [`quant_gemv_norm`] serves `norm(p) · wᵀ`: [`quant_gemv_applies`] for the
/// residual, and the pending parts fit.
pub fn quant_gemv_norm_applies(p: &PendingNorm<'_>, w: &QTensor) -> bool {
    quant_gemv_applies(p.residual, w) && pending_norm_fits(p)
}

/// `norm(residual + delta) · wᵀ` over quantized `w` and, when `write_sum`, the new residual
/// `residual + delta`, in one launch. Only call when [`quant_gemv_norm_applies`] holds.
pub fn quant_gemv_norm(
    p: &PendingNorm<'_>,
    w: &QTensor,
    write_sum: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    {
        cuda::quant_gemv_with(
            p.residual,
            w,
            &quant_gemv_launch(w, false)?,
            Some(&norm_input(p, write_sum)),
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, w, write_sum);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

#[cfg(feature = "cuda")]
fn norm_input<'a>(p: &PendingNorm<'a>, write_sum: bool) -> cuda::NormInput<'a> {
    cuda::NormInput {
        delta: p.delta,
        weight: p.norm.weight(),
        eps: p.norm.eps(),
        write_sum,
    }
}

/// Whether the layer's gate/up products write `silu(gate) · up` themselves, the SwiGLU gate
/// folded into their epilogue ([`gemv_swiglu`], [`quant_gemv_swiglu`]), instead of a separate
/// [`silu_mul`] launch (`HELEXA_ENGINE_GATE_IN_PRODUCT=0` turns it off). Measured on the H200
/// (eighth session), a token: BF16 4.73 → 4.71, Q8_0 2.83 → 2.79, Q4_K_M 2.47 → 2.42 ms, greedy
/// tokens identical; its GPU test checks it equals the separate gate bit for bit.
pub fn gate_in_product_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch(&ON, "HELEXA_ENGINE_GATE_IN_PRODUCT")
}

/// Whether [`gemv_swiglu`] serves the stacked gate/up weight `w` `(2·inter, cols)` over `x`.
pub fn gemv_swiglu_applies(x: &Tensor, w: &Tensor) -> bool {
    gate_in_product_enabled()
        && gemv_applies(x, w)
        && w.dims2().is_ok_and(|(rows, _)| rows.is_multiple_of(2))
}

/// `silu(x · gateᵀ) · (x · upᵀ)` for `w` the stacked `[gate; up]`, in one launch: the result has
/// `x`'s shape with `inter` (half `w`'s rows) as its last dimension. Only call when
/// [`gemv_swiglu_applies`] holds.
pub fn gemv_swiglu(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::gemv_with(x, w, true, None).map(|(y, _)| y)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// Whether [`quant_gemv_swiglu`] serves the stacked quantized gate/up weight `w` over `x`
/// (16-bit activations).
pub fn quant_gemv_swiglu_applies(x: &Tensor, w: &QTensor) -> bool {
    gate_in_product_enabled()
        && quant_gemv_applies(x, w)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && w.shape()
            .dims2()
            .is_ok_and(|(rows, _)| rows.is_multiple_of(2))
}

/// As [`gemv_swiglu`] over quantized `w`, its input `x` ready or, when `pending` (then `x` is
/// its residual), formed in the product's prologue as [`quant_gemv_norm`] does and the new
/// residual returned too. Only call when [`quant_gemv_swiglu_applies`] holds (and, pending,
/// [`quant_gemv_norm_applies`]).
pub fn quant_gemv_swiglu(
    x: &Tensor,
    pending: Option<&PendingNorm<'_>>,
    w: &QTensor,
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    {
        let norm = pending.map(|p| norm_input(p, true));
        cuda::quant_gemv_with(x, w, &quant_gemv_launch(w, true)?, norm.as_ref())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, pending, w);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// How [`quant_gemv`] launches over `w` (with the SwiGLU gate folded in when `swiglu`).
#[cfg(feature = "cuda")]
fn quant_gemv_launch(w: &QTensor, swiglu: bool) -> Result<cuda::QuantGemv> {
    let format = quant_gemv_format(w.dtype())
        .ok_or_else(|| candle_core::Error::msg("quant_gemv: unsupported block type"))?;
    let (_, cols) = w.shape().dims2()?;
    let shape = quant_launch_shape(w);
    Ok(cuda::QuantGemv {
        format,
        row_bytes: quant_row_bytes(w.dtype(), cols),
        shared_bytes: quant_gemv_shared_bytes(w.dtype(), cols, shape.stages, shape.warps),
        warps: shape.warps,
        stages: shape.stages,
        swiglu,
        blocks_per_sm: shape.blocks_per_sm,
        split_rows: quant_gemv_split_rows(),
        x_at_once: quant_x_at_once(),
        prefetch: weight_prefetch(),
    })
}

/// Shared memory of the staged kernel over dense 16-bit weights at two stages: the chunk
/// buffers (2048 weights of 2 bytes per warp and stage), then x in 16 bits.
#[cfg(feature = "cuda")]
fn staged_dense_shared_bytes(cols: usize) -> usize {
    QUANT_GEMV_WARPS * 2 * QUANT_GEMV_CHUNK * 2 + cols * 2
}

/// Whether the staged kernel takes a dense product over `cols` columns: whole 16-byte pieces,
/// and x fits the shared memory next to the chunk buffers (up to 16k columns).
#[cfg(feature = "cuda")]
pub(crate) fn staged_dense_fits(cols: usize) -> bool {
    cols.is_multiple_of(8) && staged_dense_shared_bytes(cols) <= QUANT_GEMV_SHARED_MAX
}

/// The staged kernel's launch over dense 16-bit weights of `cols` columns (a stacked
/// `[gate; up]` with the SwiGLU gate folded in when `swiglu`): two stages, as many blocks as
/// the shared memory holds (three per SM on the H200: 72 KB each), x read in steps (the
/// at-once path is for quantized x).
#[cfg(feature = "cuda")]
pub(crate) fn staged_dense_launch(cols: usize, swiglu: bool) -> cuda::QuantGemv {
    cuda::QuantGemv {
        format: cuda::DENSE_FORMAT,
        row_bytes: cols * 2,
        shared_bytes: staged_dense_shared_bytes(cols),
        warps: QUANT_GEMV_WARPS,
        stages: 2,
        swiglu,
        blocks_per_sm: QUANT_GEMV_BLOCKS_PER_SM,
        split_rows: false,
        x_at_once: false,
        prefetch: weight_prefetch(),
    }
}

/// Whether the quantized GEMV's prologue issues all its loads of a ready 16-bit x at once (up
/// to 12288 values, the down product's: one round trip to L2 instead of three); same bits.
/// `HELEXA_ENGINE_QUANT_X_AT_ONCE=0` turns it off.
#[cfg(feature = "cuda")]
pub(crate) fn quant_x_at_once() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch(&ON, "HELEXA_ENGINE_QUANT_X_AT_ONCE")
}

/// When the staged GEMV (quantized and dense) asks for its first weights: by default every
/// chunk its stages hold but one before waiting for the previous kernel, none asked of L2.
/// `HELEXA_ENGINE_GEMV_EARLY_CHUNKS=N` requests at most N before the wait (the rest after it);
/// `HELEXA_ENGINE_GEMV_L2_AFTER_WAIT=N` asks L2 for the N chunks per warp after those once the
/// previous kernel has finished, so the memory streams while each block forms its input.
/// Both keep the bits.
#[cfg(feature = "cuda")]
pub(crate) fn weight_prefetch() -> cuda::WeightPrefetch {
    static EARLY: OnceLock<usize> = OnceLock::new();
    static L2: OnceLock<usize> = OnceLock::new();
    // 8: no limit (the default; a kernel has at most three chunks to ask for early).
    let early = tuning(&EARLY, "HELEXA_ENGINE_GEMV_EARLY_CHUNKS", 0..=8, 8);
    cuda::WeightPrefetch {
        early_chunks: (early < 8).then_some(early),
        l2_chunks: tuning(&L2, "HELEXA_ENGINE_GEMV_L2_AFTER_WAIT", 0..=15, 0),
    }
}

/// Whether the quantized GEMV shares each row between two warps in the products that gain
/// (`cuda::split_rows_pay`: the q/k/v product of an 8B model): `HELEXA_ENGINE_QUANT_GEMV_SPLIT=1`,
/// off (slower on the H200, Q8_0 2.69 → 2.72 ms a token, tenth session; it sums a row in
/// another order, so outputs can differ in the last bit).
#[cfg(feature = "cuda")]
fn quant_gemv_split_rows() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    opt_in(&ON, "HELEXA_ENGINE_QUANT_GEMV_SPLIT")
}

/// The greedy pick from f32 logits `(1, vocab)`: the index of the largest, the lowest on ties
/// (as [`crate::sampling::argmax`]). On the GPU only the index crosses to the host.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    #[cfg(feature = "cuda")]
    if applies(logits) && logits.dtype() == DType::F32 && logits.is_contiguous() {
        return cuda::argmax(logits);
    }
    Ok(crate::sampling::argmax(
        &logits.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// Attention's output `(heads, len, hd)` as the o projection's input `(1, len, heads·hd)`.
pub fn heads_to_rows(x: &Tensor) -> Result<Tensor> {
    let (h, len, hd) = x.dims3()?;
    #[cfg(feature = "cuda")]
    {
        let aligned = |elems: usize| (elems * x.dtype().size_in_bytes()).is_multiple_of(16);
        if applies(x) && x.is_contiguous() && aligned(hd) && aligned(x.layout().start_offset()) {
            return cuda::heads_to_rows(x);
        }
    }
    x.reshape((1, h, len, hd))?
        .transpose(1, 2)?
        .reshape((1, len, h * hd))
}

/// How a draw on the device ended ([`sample`]).
pub enum Drawn {
    /// The token, picked on the device.
    Picked(u32),
    /// The penalties are applied to the logits in place, but the device left the draw to the
    /// host (no token kept, or rounding left the draw unclaimed): it draws from the penalised
    /// logits.
    Penalised,
    /// Nothing done (not on a CUDA device, or not f32 logits): the host does it all.
    NotHere,
}

/// Whether [`sample`] draws from `logits` on the device: f32, contiguous, on a CUDA device,
/// with the fused kernels on and `HELEXA_ENGINE_DEVICE_SAMPLING` not `0` (to measure the
/// difference).
pub fn samples_on_device(logits: &Tensor) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    cfg!(feature = "cuda")
        && switch(&ON, "HELEXA_ENGINE_DEVICE_SAMPLING")
        && applies(logits)
        && logits.dtype() == DType::F32
        && logits.is_contiguous()
}

/// Draws the next token from f32 logits `(1, vocab)` on the device as `draw` describes (the
/// semantics of [`crate::sampling::Sampler::sample`]); only the token crosses to the host.
pub fn sample(logits: &Tensor, draw: &crate::sampling::DeviceDraw) -> Result<Drawn> {
    static FOLD: OnceLock<bool> = OnceLock::new();
    let fold = opt_in(&FOLD, "HELEXA_ENGINE_SAMPLE_FOLD");
    sample_variant(logits, draw, fold)
}

/// [`sample`] with its histogram counting chosen: `fold` counts each thread's runs of equal
/// digits before the atomics (`HELEXA_ENGINE_SAMPLE_FOLD=1`, off until measured).
pub fn sample_variant(
    logits: &Tensor,
    draw: &crate::sampling::DeviceDraw,
    fold: bool,
) -> Result<Drawn> {
    #[cfg(feature = "cuda")]
    if samples_on_device(logits) {
        return cuda::sample(logits, draw, fold);
    }
    let _ = (logits, draw, fold);
    Ok(Drawn::NotHere)
}

/// `(x + delta, rms_norm(x + delta))` for `x`, `delta` of shape `(…, hidden)`: the new residual
/// stream and the next block's input.
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, norm: &RmsNorm) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if applies(x)
        && x.is_contiguous()
        && delta.is_contiguous()
        && x.dims() == delta.dims()
        && x.dim(candle_core::D::Minus1)? <= 8 * 1024
    {
        return cuda::add_rms_norm(x, delta, norm.weight(), norm.eps());
    }
    let sum = (x + delta)?;
    let normed = norm.forward(&sum)?;
    Ok((sum, normed))
}

/// `silu(gate) · up` for `gate`, `up` of shape `(1, len, intermediate)` (rows may be strided
/// views of one stacked projection).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if applies(gate) && gate.dims() == up.dims() && gate.rank() == 3 {
        return cuda::silu_mul(gate, up);
    }
    candle_nn::ops::silu(gate)? * up
}

/// What [`qk_norm_rope_cache`] works on: the outputs of the q, k and v projections (each
/// `(1, len, heads·head_dim)`, rows possibly strided), the per-head norms if the model has them,
/// the rotary tables, and the caches `(1, kv_heads, capacity, head_dim)` with room for rows
/// `offset..offset+len`.
pub struct QkvInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub q_norm: Option<&'a RmsNorm>,
    pub k_norm: Option<&'a RmsNorm>,
    pub rope: &'a Rope,
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub offset: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// A decode step replayed from a CUDA graph: the position is read on the device from here
    /// (`offset` is the one at capture, for the bounds check).
    pub at: Option<&'a DevicePosition>,
}

/// Where a decode step captured into a CUDA graph reads its position: a device `u32` tensor of
/// one element, written before each replay, since a graph's kernel arguments are fixed at
/// capture. `max_len` is the longest attention length the graph serves: its attention grid is
/// sized for it.
pub struct DevicePosition {
    pub position: Tensor,
    pub max_len: usize,
}

/// Per-head q/k normalisation, rotary embedding at positions `offset..offset+len`, and the K/V
/// cache writes at the same rows, in one kernel. Returns q as `(1, heads, len, head_dim)`. Only
/// call when [`applies`] holds.
pub fn qk_norm_rope_cache(inputs: &QkvInputs<'_>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::qk_norm_rope_cache(inputs)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = inputs;
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// `softmax(scores · scale)` with the causal mask applied by position: `scores` `(kv_heads,
/// groups·len, offset + len)` hold queries `offset..offset+len` (row `r` is query `r % len`)
/// against every cached key. Only call when [`applies`] holds and `scores` is contiguous.
pub fn causal_softmax(scores: &Tensor, len: usize, offset: usize, scale: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::causal_softmax(scores, len, offset, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (scores, len, offset, scale);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// Whether [`flash_prefill`] serves a prefill chunk: a kernel for this head size and dtype,
/// and `HELEXA_ENGINE_FLASH_PREFILL=1` (off by default: written without a GPU at hand, not yet
/// checked on one).
pub fn flash_prefill_applies(head_dim: usize, dtype: DType) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    opt_in(&ON, "HELEXA_ENGINE_FLASH_PREFILL") && flash_prefill_supported(head_dim, dtype)
}

/// Whether `kernels/flash_prefill.cu` has a kernel for this head size and dtype.
pub fn flash_prefill_supported(head_dim: usize, dtype: DType) -> bool {
    matches!(head_dim, 64 | 128) && matches!(dtype, DType::BF16 | DType::F16)
}

/// Causal attention of queries `q` `(1, heads, len, head_dim)` at positions
/// `offset..offset+len` over the caches `(1, kv_heads, capacity, head_dim)`, whose rows
/// `0..offset+len` are written, without materialising the scores; returns `(1, len,
/// heads·head_dim)`. Only call when [`applies`] holds and [`flash_prefill_supported`] does.
pub fn flash_prefill(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    offset: usize,
    scale: f32,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::flash_prefill(q, k_cache, v_cache, offset, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k_cache, v_cache, offset, scale);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// Whether a decode step's q/k norms, RoPE and cache writes run inside the decode attention
/// ([`decode_attention_roped`]) instead of [`qk_norm_rope_cache`] before it:
/// `HELEXA_ENGINE_ROPE_IN_ATTENTION=0` turns it off. Measured on the H200 (eighth session), a
/// token: BF16 4.73 → 4.68, Q8_0 2.83 → 2.80, Q4_K_M 2.47 → 2.43 ms, greedy tokens identical;
/// its GPU test expects the same output and caches bit for bit.
pub fn rope_in_attention_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch(&ON, "HELEXA_ENGINE_ROPE_IN_ATTENTION")
}

/// [`decode_attention`] over one raw token `i` (its q/k/v projections, not yet normed or
/// rotated, and nothing of it in the caches yet): the kernel forms q, writes the token's k and
/// v rows at `i.offset` and attends over `i.offset + 1` positions. Only call when [`applies`]
/// and [`decode_attention_supported`] hold.
pub fn decode_attention_roped(i: &QkvInputs<'_>, scale: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::decode_attention_roped(i, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (i, scale);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// How a decode attention split over several blocks merges their partials.
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SplitMerge {
    /// A second launch (`attn_combine`) reads them from global memory.
    Kernel,
    /// The split blocks of each KV head run as one thread-block cluster and the first merges
    /// the others' partials from their shared memory (compute 9.0+, at most 8 splits: every
    /// context up to 256 positions; the merge kernel otherwise).
    Cluster,
}

/// How the decode attention runs (the switches below, each measured on the H200; the GPU tests
/// of the merge and the sums expect the plain path's bits, the one split's stays within a bf16
/// step of it).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttentionPlan {
    /// [`SplitMerge::Cluster`] with `HELEXA_ENGINE_ATTENTION_CLUSTER=1`. The merge launch is
    /// one of the two per layer that make the attention cost ~0.23–0.26 ms of a token in the
    /// stream (seventh session's sweep).
    pub merge: SplitMerge,
    /// On unless `HELEXA_ENGINE_ATTENTION_SUMS=0`: the graph's attention with the rope folded in
    /// (16-bit types) sums a round's q·k dot products over the warp together (`warp_sums` in
    /// the kernel: 2–2.5 shuffles per sum instead of 5): at long contexts the kernel is bound by
    /// instructions, 80 of a round's ~470 being shuffles. Ninth session, H200: @4096 step
    /// 4.75 / 3.10 / 2.59 → 4.61 / 2.94 / 2.43 ms (BF16 / Q8_0 / Q4_K_M), same tokens.
    pub warp_sums: bool,
    /// Positions up to which the decode attention runs one split per KV head
    /// (`HELEXA_ENGINE_ATTENTION_ONE_SPLIT=N`, default 256, the graph's band; 32 is the
    /// first measured path): no merge launch, each block taking every position, so a
    /// replayed step's first 256 positions launch one kernel for the attention instead of
    /// two. Past it the attention splits one per 32 positions, up to the blocks that fill the
    /// GPU, as before.
    pub one_split: usize,
}

#[cfg(feature = "cuda")]
impl AttentionPlan {
    /// The first measured path: a merge launch, one warp reduction per dot product.
    #[cfg(test)]
    pub(crate) const PLAIN: Self = Self {
        merge: SplitMerge::Kernel,
        warp_sums: false,
        one_split: 32,
    };
}

/// The [`AttentionPlan`] the environment asks for (read once).
#[cfg(feature = "cuda")]
pub(crate) fn attention_plan() -> AttentionPlan {
    static CLUSTER: OnceLock<bool> = OnceLock::new();
    static SUMS: OnceLock<bool> = OnceLock::new();
    static ONE_SPLIT: OnceLock<usize> = OnceLock::new();
    AttentionPlan {
        merge: if opt_in(&CLUSTER, "HELEXA_ENGINE_ATTENTION_CLUSTER") {
            SplitMerge::Cluster
        } else {
            SplitMerge::Kernel
        },
        warp_sums: switch(&SUMS, "HELEXA_ENGINE_ATTENTION_SUMS"),
        one_split: tuning(
            &ONE_SPLIT,
            "HELEXA_ENGINE_ATTENTION_ONE_SPLIT",
            1..=65536,
            256,
        ),
    }
}

/// Whether [`decode_attention`] has a kernel for this head size and grouping.
pub fn decode_attention_supported(head_dim: usize, groups: usize) -> bool {
    matches!(head_dim, 64 | 128 | 256)
        && matches!(groups, 1 | 2 | 4 | 8)
        && !(head_dim == 256 && groups == 8)
}

/// Attention of one query `q` `(1, heads, 1, head_dim)` over the first `len` positions of the
/// caches `(1, kv_heads, capacity, head_dim)`; returns `(1, 1, heads·head_dim)`. Only call when
/// [`applies`] and [`decode_attention_supported`] hold.
/// With `at`, the length is the device position plus one, up to `at.max_len` (`len`, the one at
/// capture, is checked against the caches).
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    scale: f32,
    at: Option<&DevicePosition>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::decode_attention_planned(q, k_cache, v_cache, len, scale, at, None, attention_plan())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k_cache, v_cache, len, scale, at);
        candle_core::bail!("fused kernels need the cuda feature")
    }
}

/// On the CPU every entry point takes candle's path; these pin what that path computes.
#[cfg(test)]
mod cpu_tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn fallbacks_compute_the_unfused_ops() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, -2.0, 3.0, 0.5]]], &dev).expect("x");
        let d = Tensor::new(&[[[0.5f32, 0.5, -1.0, 0.5]]], &dev).expect("delta");
        assert!(!applies(&x));
        let norm = RmsNorm::new(Tensor::new(&[1f32, 2.0, 1.0, 1.0], &dev).expect("w"), 1e-6);
        let (sum, normed) = add_rms_norm(&x, &d, &norm).expect("add_rms_norm");
        let sum_v: Vec<f32> = sum.flatten_all().and_then(|t| t.to_vec1()).expect("sum");
        assert_eq!(sum_v, [1.5, -1.5, 2.0, 1.0]);
        let rms = (sum_v.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-6).sqrt();
        let want: Vec<f32> = [1.5f32, -3.0, 2.0, 1.0].iter().map(|v| v / rms).collect();
        let got: Vec<f32> = normed
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("normed");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let gated: Vec<f32> = silu_mul(&x, &d)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("silu_mul");
        let silu = |v: f32| v / (1.0 + (-v).exp());
        for ((g, a), b) in gated
            .iter()
            .zip([1f32, -2.0, 3.0, 0.5])
            .zip([0.5f32, 0.5, -1.0, 0.5])
        {
            assert!((g - silu(a) * b).abs() < 1e-6);
        }
    }

    #[test]
    fn quant_gemv_is_gpu_only_and_sized_for_its_formats() {
        let w = Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
        let x = Tensor::zeros((1, 1, 256), candle_core::DType::F32, &Device::Cpu).expect("x");
        assert!(!quant_gemv_applies(&x, &q));
        // Chunks of 2048 weights are whole 16-byte loads in each format.
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            assert!(quant_gemv_format(dtype).is_some());
            assert_eq!(
                quant_row_bytes(dtype, QUANT_GEMV_CHUNK) % 16,
                0,
                "{dtype:?}"
            );
        }
        assert_eq!(quant_row_bytes(GgmlDType::Q8_0, 4096), 4352);
        assert_eq!(quant_gemv_format(GgmlDType::Q4_0), None);
        // x of 12288 values (an 8B model's MLP) fits, with two blocks per SM.
        assert!(
            quant_gemv_shared_bytes(GgmlDType::Q8_0, 12288, 4, QUANT_GEMV_WARPS)
                <= QUANT_GEMV_SHARED_MAX
        );
    }

    #[test]
    fn default_stages_follow_the_block_type_and_fit_the_shared_memory() {
        // CI leaves HELEXA_ENGINE_QUANT_GEMV_STAGES unset; with it set this checks the knob.
        if std::env::var_os("HELEXA_ENGINE_QUANT_GEMV_STAGES").is_some() {
            return;
        }
        // An 8B model's widths: Q8_0 at four stages, the K-quants at two.
        for cols in [4096, 12288] {
            assert_eq!(quant_gemv_stages(GgmlDType::Q8_0, cols), 4, "{cols}");
            assert_eq!(quant_gemv_stages(GgmlDType::Q4K, cols), 2, "{cols}");
            assert_eq!(quant_gemv_stages(GgmlDType::Q6K, cols), 2, "{cols}");
        }
        // A 32B or 70B model's down product (25600 or 28672 columns): fewer stages, so it
        // still fits rather than leaving for MMVQ.
        for cols in [25600, 28672] {
            let stages = quant_gemv_stages(GgmlDType::Q8_0, cols);
            assert!(stages < 4, "{cols}: {stages}");
            assert!(
                quant_gemv_shared_bytes(GgmlDType::Q8_0, cols, stages, QUANT_GEMV_WARPS)
                    <= QUANT_GEMV_SHARED_MAX,
                "{cols}"
            );
        }
    }

    #[test]
    fn argmax_takes_the_lowest_index_on_ties() {
        let logits = Tensor::new(&[[0.5f32, 2.0, -1.0, 2.0]], &Device::Cpu).expect("logits");
        assert_eq!(argmax(&logits).expect("argmax"), 1);
    }

    #[test]
    fn rows_are_shared_where_that_shortens_the_busiest_warp() {
        // Over 4224 warps (an H200 at four blocks of eight warps per SM): the 8B q/k/v (6144),
        // Q4_K_M's q/k (5120) and v (1024) gain; o and down (4096), the output (151936) do not.
        for (rows, pays) in [
            (6144, true),
            (5120, true),
            (1024, true),
            (4096, false),
            (151_936, false),
        ] {
            assert_eq!(split_rows_pay(rows, 4096, 4224), pays, "{rows} rows");
        }
        // A row's chunks must split evenly.
        assert!(!split_rows_pay(6144, 2048, 4224));
        // The dense kernel: its split twin may hold fewer blocks per SM. 9216 rows over
        // 132 SMs of eight-warp blocks gain at four or six blocks, not at five.
        let warps = |blocks: usize| blocks * 132 * 8;
        assert!(sharing_rows_pays(9216, warps(4), warps(4)));
        assert!(!sharing_rows_pays(9216, warps(5), warps(5)));
        assert!(sharing_rows_pays(9216, warps(6), warps(6)));
        assert!(sharing_rows_pays(6144, warps(4), warps(4)));
        // The plain kernel at six blocks, its twin at five: 6144 rows take one wave whole and
        // two halved, so not shared.
        assert!(!sharing_rows_pays(6144, warps(6), warps(5)));
    }

    #[test]
    fn quant_launch_table_reads_entries_and_refuses_malformed_ones() {
        let entry = |format: &str, rows, cols, stages, blocks_per_sm, warps| QuantLaunchEntry {
            format: format.to_owned(),
            rows,
            cols,
            shape: QuantLaunchShape {
                stages,
                blocks_per_sm,
                warps,
            },
        };
        assert_eq!(
            parse_quant_launch_table(" q8_0:4096x12288=3x3, q4k:24576x4096=2x2 ,q6k:1x64=4x2x16"),
            Ok(vec![
                entry("q8_0", 4096, 12288, 3, 3, 8),
                entry("q4k", 24576, 4096, 2, 2, 8),
                entry("q6k", 1, 64, 4, 2, 16)
            ])
        );
        assert_eq!(parse_quant_launch_table(""), Ok(Vec::new()));
        assert_eq!(parse_quant_launch_table("none"), Ok(Vec::new()));
        assert_eq!(
            parse_quant_launch_table(SEQUENTIAL_LAUNCH_TABLE).map(|t| t.len()),
            Ok(8),
            "the table for launches that do not overlap"
        );
        assert_eq!(
            parse_quant_launch_table(OVERLAPPING_LAUNCH_TABLE).map(|t| t.len()),
            Ok(2),
            "the table for overlapping launches"
        );
        for bad in [
            "q8_0:4096x12288=5x3",
            "q8_0:4096x12288=3x0",
            "q8_0=3x3",
            "q8_0:4096=3x3",
            "Q8_0:4096x12288=3x3",
            "q8_0:0x12288=3x3",
            "q8_0:4096x12288=3x3x12",
            "q8_0:4096x12288=3x3x16",
            "x",
        ] {
            assert_eq!(parse_quant_launch_table(bad), Err(bad.to_owned()), "{bad}");
        }
    }
}

/// Each kernel against the unfused candle composition it replaces, on the GPU (run by
/// `scripts/device/gpu-check.sh check`; needs the `cuda` feature and a device).
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use candle_core::{D, DType, Device, Tensor};

    use super::*;
    use crate::layers::{RopeScaling, RopeStyle};
    use crate::test_support::{cuda_context, rel_diff, same_bits};

    fn device() -> Device {
        Device::new_cuda(0).expect("a CUDA device")
    }

    fn random(shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, dev)
            .and_then(|t| t.to_dtype(dtype))
            .expect("random tensor")
    }

    /// A pending layer input's parts: a residual row, a delta row and a norm over `cols`.
    fn pending_parts(cols: usize, dtype: DType, dev: &Device) -> (Tensor, Tensor, RmsNorm) {
        let row = || random(&[1, 1, cols], dtype, dev);
        (
            row(),
            row(),
            RmsNorm::new(random(&[cols], dtype, dev), 1e-6),
        )
    }

    /// The pending input of [`pending_parts`].
    fn pending(parts: &(Tensor, Tensor, RmsNorm)) -> PendingNorm<'_> {
        PendingNorm {
            residual: &parts.0,
            delta: &parts.1,
            norm: &parts.2,
        }
    }

    /// bf16 keeps 8 bits of mantissa: a different summation order may move a value by an ulp.
    fn tolerance(dtype: DType) -> f32 {
        if dtype == DType::F32 { 1e-5 } else { 1e-2 }
    }

    #[test]
    fn heads_to_rows_matches_transpose() {
        let dev = device();
        for dtype in [DType::BF16, DType::F32] {
            let x = random(&[8, 37, 128], dtype, &dev);
            let want = x
                .reshape((1, 8, 37, 128))
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.reshape((1, 37, 8 * 128)))
                .expect("reference");
            let got = heads_to_rows(&x).expect("kernel");
            assert_eq!(got.dims(), want.dims());
            assert!(
                rel_diff(&got, &want) == 0.0,
                "{dtype:?}: a copy must be exact"
            );
        }
    }

    #[test]
    fn add_rms_norm_matches_add_then_norm() {
        let dev = device();
        for dtype in [DType::F32, DType::BF16] {
            for rows in [1, 5] {
                let x = random(&[1, rows, 4096], dtype, &dev);
                let d = random(&[1, rows, 4096], dtype, &dev);
                let norm = RmsNorm::new(random(&[4096], dtype, &dev), 1e-6);
                let (sum, normed) =
                    cuda::add_rms_norm(&x, &d, norm.weight(), norm.eps()).expect("fused");
                let want_sum = (&x + &d).expect("add");
                let want = norm.forward(&want_sum).expect("norm");
                assert_eq!(rel_diff(&sum, &want_sum), 0.0, "{dtype:?} sum");
                let e = rel_diff(&normed, &want);
                assert!(e <= tolerance(dtype), "{dtype:?} rows {rows}: {e}");
            }
        }
    }

    /// Programmatic dependent launch lets each kernel start before the previous one ends; each
    /// must still see its inputs complete. A chain of dependent products and norms queued back
    /// to back must give, bit for bit, what it gives with the device synchronised after every
    /// launch (where nothing can overlap).
    #[test]
    fn dependent_launches_see_their_inputs() {
        let dev = device();
        let cols = 4096;
        let dense = random(&[cols, cols], DType::BF16, &dev);
        let quant = QTensor::quantize(&random(&[cols, cols], DType::F32, &dev), GgmlDType::Q8_0)
            .expect("quantize");
        let norm = RmsNorm::new(random(&[cols], DType::BF16, &dev), 1e-6);
        let x0 = random(&[1, 1, cols], DType::BF16, &dev);
        let chain = |sync: bool| {
            let settle = || {
                if sync {
                    dev.synchronize().expect("synchronize");
                }
            };
            let (mut residual, mut x) = (x0.clone(), x0.clone());
            for step in 0..32 {
                let y = if step % 2 == 0 {
                    quant_gemv(&x, &quant)
                } else {
                    gemv(&x, &dense)
                }
                .expect("product");
                settle();
                (residual, x) = add_rms_norm(&residual, &y, &norm).expect("add_rms_norm");
                settle();
            }
            x.flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .expect("x")
        };
        assert_eq!(chain(false), chain(true));
    }

    /// Flash attention for a prefill chunk against the materialised composition in f32: scores,
    /// causal mask, softmax, values (within the rounding of P to the element type).
    #[test]
    fn flash_prefill_matches_materialised_attention() {
        let dev = device();
        let (h, kvh, cap) = (8, 2, 1024);
        for dtype in [DType::BF16, DType::F16] {
            for hd in [64, 128] {
                for (len, offset) in [(64, 0), (100, 37), (130, 500)] {
                    let case = format!("{dtype:?} hd {hd} len {len} offset {offset}");
                    let total = offset + len;
                    let q = random(&[1, h, len, hd], dtype, &dev);
                    let k_cache = random(&[1, kvh, cap, hd], dtype, &dev);
                    let v_cache = random(&[1, kvh, cap, hd], dtype, &dev);
                    #[allow(clippy::cast_precision_loss, reason = "head_dim is small")]
                    let scale = 1.0 / (hd as f32).sqrt();
                    assert!(flash_prefill_supported(hd, dtype), "{case}");
                    let got = flash_prefill(&q, &k_cache, &v_cache, offset, scale).expect(&case);
                    let f32s = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
                    let groups = h / kvh;
                    // The cached rows 0..total of a cache, as (kv_heads, total, hd) f32.
                    let rows = |c: &Tensor| {
                        f32s(
                            &c.narrow(2, 0, total)
                                .and_then(|r| r.squeeze(0))
                                .expect("rows"),
                        )
                    };
                    let (k, v) = (rows(&k_cache), rows(&v_cache));
                    let mask =
                        crate::layers::causal_mask(len, offset, DType::F32, &dev).expect("mask");
                    let want = f32s(&q)
                        .reshape((kvh, groups * len, hd))
                        .and_then(|q| q.matmul(&k.t()?))
                        .and_then(|s| s * f64::from(scale))
                        .and_then(|s| s.reshape((kvh, groups, len, total)))
                        .and_then(|s| s.broadcast_add(&mask))
                        .and_then(|s| s.reshape((kvh, groups * len, total)))
                        .and_then(|s| candle_nn::ops::softmax_last_dim(&s))
                        .and_then(|p| p.matmul(&v))
                        .and_then(|o| o.reshape((1, h, len, hd)))
                        .and_then(|o| o.transpose(1, 2))
                        .and_then(|o| o.reshape((1, len, h * hd)))
                        .expect("materialised");
                    let e = rel_diff(&got, &want);
                    assert!(e <= 2e-2, "{case}: {e}");
                }
            }
        }
    }

    #[test]
    fn causal_softmax_matches_scale_mask_softmax() {
        let dev = device();
        for dtype in [DType::F32, DType::BF16] {
            for (len, offset) in [(5, 7), (64, 0), (300, 1000)] {
                let (kvh, groups, total) = (2, 4, offset + len);
                let scores = random(&[kvh, groups * len, total], dtype, &dev);
                let scale = 0.088_388_35;
                let got = causal_softmax(&scores, len, offset, scale).expect("fused");
                let mask = crate::layers::causal_mask(len, offset, dtype, &dev).expect("mask");
                let want = (&scores * f64::from(scale))
                    .and_then(|a| a.reshape((kvh, groups, len, total)))
                    .and_then(|a| a.broadcast_add(&mask))
                    .and_then(|a| a.reshape((kvh, groups * len, total)))
                    .and_then(|a| candle_nn::ops::softmax_last_dim(&a))
                    .expect("unfused");
                let e = rel_diff(&got, &want);
                assert!(
                    e <= tolerance(dtype),
                    "{dtype:?} len {len} offset {offset}: {e}"
                );
            }
        }
    }

    #[test]
    fn gemv_matches_matmul() {
        let dev = device();
        for dtype in [DType::BF16, DType::F16] {
            for (rows, cols) in [
                (1, 64),
                (7, 4096),
                (6144, 4096),
                (4096, 12288),
                (1000, 2056),
            ] {
                // A row range of a larger matrix, as the stacked projections' views are.
                let stacked = random(&[rows + 16, cols], dtype, &dev);
                let w = stacked.narrow(0, 16, rows).expect("rows");
                let x = random(&[1, 1, cols], dtype, &dev);
                assert!(gemv_applies(&x, &w), "{dtype:?} {rows}×{cols}");
                let got = gemv(&x, &w).expect("gemv");
                let want = x
                    .reshape((1, cols))
                    .and_then(|x| x.matmul(&w.t()?))
                    .expect("matmul");
                let e = rel_diff(&got.reshape((1, rows)).expect("shape"), &want);
                assert!(e <= tolerance(dtype), "{dtype:?} {rows}×{cols}: {e}");
            }
        }
    }

    /// The plain dense product (not staged) with rows shared where that pays (`share`) or
    /// never; and whether they were.
    fn gemv_sharing(
        x: &Tensor,
        w: &Tensor,
        norm: Option<&cuda::NormInput<'_>>,
        share: bool,
    ) -> Result<(Tensor, bool)> {
        let launch = cuda::DenseGemv {
            share_rows: share,
            staged: cuda::StagedDense::Off,
        };
        cuda::gemv_as(x, w, false, norm, launch).map(|(y, _, shared)| (y, shared))
    }

    /// The staged kernel over dense weights (`HELEXA_ENGINE_GEMV_STAGED`) gives the plain
    /// kernel's bits: plain, with the norm formed in the product (at most 4096 columns), with
    /// the SwiGLU gate; over the 8B shapes (6144 rows: two per warp of an H200's staged grid,
    /// 4096 × 12288: several chunks per row), a width whose pieces do not fill the last group
    /// of four (4104 = 513 pieces) nor the last chunk, and both 16-bit types.
    #[test]
    fn staged_dense_products_match_the_plain_kernel() {
        let dev = device();
        for dtype in [DType::BF16, DType::F16] {
            for (rows, cols) in [(6144, 4096), (4096, 12288), (300, 4104)] {
                let w = random(&[2 * rows, cols], dtype, &dev);
                let x = random(&[1, 1, cols], dtype, &dev);
                let (_, delta, norm) = pending_parts(cols, dtype, &dev);
                let p = PendingNorm {
                    residual: &x,
                    delta: &delta,
                    norm: &norm,
                };
                let normed = norm_input(&p, true);
                // A formed input is at most GEMV_NORM_MAX_COLS wide in the plain kernel.
                let inputs = if cols <= GEMV_NORM_MAX_COLS {
                    vec![None, Some(&normed)]
                } else {
                    vec![None]
                };
                for swiglu in [false, true] {
                    for &input in &inputs {
                        let run = |staged| {
                            let launch = cuda::DenseGemv {
                                share_rows: false,
                                staged,
                            };
                            cuda::gemv_as(&x, &w, swiglu, input, launch).expect("product")
                        };
                        let (got, got_sum, _) = run(cuda::StagedDense::All);
                        let (want, want_sum, _) = run(cuda::StagedDense::Off);
                        let case = format!(
                            "{dtype:?} {rows}×{cols} swiglu {swiglu} norm {}",
                            input.is_some()
                        );
                        assert!(same_bits(&got, &want), "{case}");
                        if let (Some(g), Some(w)) = (got_sum, want_sum) {
                            assert!(same_bits(&g, &w), "{case}: residual");
                        }
                    }
                }
            }
        }
    }

    /// Dense rows shared by two warps (`HELEXA_ENGINE_GEMV_SPLIT`) give the plain product
    /// within a bf16 step, with and without the norm formed in the product, where the launcher
    /// shares them (the 8B models' q/k/v: 6144 rows of 4096); and it does share them there.
    #[test]
    fn dense_rows_shared_by_two_warps_match_the_plain_product() {
        let dev = device();
        let (rows, cols) = (6144, 4096);
        let w = random(&[rows, cols], DType::BF16, &dev);
        let parts = pending_parts(cols, DType::BF16, &dev);
        let (residual, normed) = (&parts.0, norm_input(&pending(&parts), false));
        let (plain, _) = gemv_sharing(residual, &w, Some(&normed), false).expect("plain");
        let (split, shared) = gemv_sharing(residual, &w, Some(&normed), true).expect("split");
        // 61 registers: four blocks per SM, 4224 warps on an H200, so 6144 rows are shared.
        assert!(shared, "the normed q/k/v product's rows were not shared");
        let e = rel_diff(&split, &plain);
        assert!(e < 1e-2, "norm: {e}");
        // Without the norm the kernel holds more blocks per SM, how many depends on the
        // compiled registers (the tenth session's H200 did not share 9216 rows, as estimated
        // from 38 registers): one past a whole wave of rows is shared at any occupancy near
        // it, so of these counts at least one must be.
        let mut shared_any = false;
        for rows in [9216, 4225, 6337, 8449, 12673] {
            let w = random(&[rows, cols], DType::BF16, &dev);
            let (plain, _) = gemv_sharing(residual, &w, None, false).expect("plain");
            let (split, shared) = gemv_sharing(residual, &w, None, true).expect("split");
            let e = rel_diff(&split, &plain);
            assert!(e < 1e-2, "plain {rows} rows (shared: {shared}): {e}");
            shared_any |= shared;
        }
        assert!(shared_any, "no product without the norm shared its rows");
    }

    /// Rows shared by two warps (`HELEXA_ENGINE_QUANT_GEMV_SPLIT`) give the plain product up
    /// to the order of one addition per row: within one bf16 step of it. The shapes are the
    /// q/k/v product of the 8B models (Q8_0's stacked 6144 rows, Q4_K_M's q/k 5120), with and
    /// without the norm formed in the product; the test also checks the split kernel ran.
    #[test]
    fn rows_shared_by_two_warps_match_the_plain_product() {
        let dev = device();
        let ctx = cuda_context(&dev);
        let sms = cuda::sm_count(&ctx).expect("SMs");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            for (rows, cols) in [(6144, 4096), (5120, 4096)] {
                let case = format!("{dtype:?} {rows}×{cols}");
                let w = random(&[rows, cols], DType::F32, &dev);
                let q = QTensor::quantize(&w, dtype).expect("quantize");
                // Both launches spelled out: the environment's stages or split switch must
                // not make them the same kernel.
                let launch = |split_rows| cuda::QuantGemv {
                    stages: 2,
                    shared_bytes: quant_gemv_shared_bytes(dtype, cols, 2, QUANT_GEMV_WARPS),
                    blocks_per_sm: QUANT_GEMV_BLOCKS_PER_SM,
                    warps: QUANT_GEMV_WARPS,
                    split_rows,
                    ..quant_gemv_launch(&q, false).expect("launch")
                };
                let (plain, split) = (launch(false), launch(true));
                let resident = cuda::quant_gemv_blocks_per_sm(&ctx, &plain).expect("blocks")
                    * sms
                    * plain.warps;
                assert!(
                    cuda::uses_split_kernel(&split, rows, cols, true, resident)
                        && !cuda::uses_split_kernel(&plain, rows, cols, true, resident),
                    "{case}: over {resident} warps the split kernel would not run"
                );
                let parts = pending_parts(cols, DType::BF16, &dev);
                let (residual, normed) = (&parts.0, norm_input(&pending(&parts), false));
                for input in [None, Some(&normed)] {
                    let run = |launch: &cuda::QuantGemv| {
                        cuda::quant_gemv_with(residual, &q, launch, input)
                            .expect("product")
                            .0
                    };
                    let e = rel_diff(&run(&split), &run(&plain));
                    assert!(e < 1e-2, "{case} norm {}: {e}", input.is_some());
                }
            }
        }
    }

    #[test]
    fn quant_gemv_matches_candles_quantized_matmul() {
        use candle_core::Module;
        use candle_core::quantized::QMatMul;
        let dev = device();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            // Several rows per warp (6144 > 8 warps × 4 blocks × 132 SMs), several chunks per
            // row (12288), a partial last chunk (2560), and widths for the grid's edges.
            for (rows, cols) in [
                (5, 2048),
                (6144, 4096),
                (4096, 12288),
                (1000, 2560),
                (33, 512),
            ] {
                let case = format!("{dtype:?} {rows}×{cols}");
                let w = random(&[rows, cols], DType::F32, &dev);
                let q = QTensor::quantize(&w, dtype).expect("quantize");
                let x32 = random(&[1, 1, cols], DType::F32, &dev);
                for act in [DType::F32, DType::BF16, DType::F16] {
                    let x = x32.to_dtype(act).expect("x");
                    if !quant_gemv_applies(&x, &q) {
                        // Q6_K rows of 2 or 10 blocks (420, 2100 bytes) are not whole 16-byte
                        // loads; every other case must be served.
                        assert!(
                            !quant_row_bytes(dtype, cols).is_multiple_of(16),
                            "{case} not served"
                        );
                        continue;
                    }
                    let got = quant_gemv(&x, &q).expect("quant_gemv");
                    assert_eq!(got.dims(), [1, 1, rows], "{case}");
                    assert_eq!(got.dtype(), act, "{case}");
                    // The reference is the dequantized weights times x in f32. Both this kernel
                    // and candle's MMVQ round x to 8 bits per value first (as llama.cpp does),
                    // which costs a fraction of a percent of the largest output; MMVQ also keeps
                    // x's scales and sums in f16. So: within 2% of the reference, and no further
                    // from it than MMVQ (plus 0.1% for summation order).
                    let dense = q
                        .dequantize(&dev)
                        .and_then(|d| x32.reshape((1, cols))?.matmul(&d.t()?))
                        .expect("dense");
                    let mmvq = QMatMul::QTensor(std::sync::Arc::new(
                        QTensor::quantize(&w, dtype).expect("quantize"),
                    ))
                    .forward(&x)
                    .expect("mmvq");
                    let flat = |t: &Tensor| t.reshape((1, rows)).expect("shape");
                    let e = rel_diff(&flat(&got), &dense);
                    let e_mmvq = rel_diff(&flat(&mmvq), &dense);
                    let half = if act == DType::F32 { 0.0 } else { 1e-2 };
                    assert!(e <= 2e-2, "{case} {act:?} vs dequantized: {e}");
                    assert!(
                        e <= e_mmvq + 1e-3 + half,
                        "{case} {act:?}: {e} vs dequantized, MMVQ {e_mmvq}"
                    );
                }
            }
        }
    }

    /// The layer input formed in a quantized product's prologue gives the product of the input
    /// formed apart (add_rms_norm, then the product) and the same residual, bit for bit: the
    /// arithmetic is the same up to the order of the sum of squares, which can move a normed
    /// element by one rounding (hence the 16-bit tolerance on the products).
    #[test]
    fn products_forming_their_input_match_the_separate_norm() {
        let dev = device();
        // 4096: the row fits the block's registers (one round trip to L2); 6144: the general
        // two-pass prologue.
        for (cols, dtype) in [(4096, DType::BF16), (4096, DType::F16), (6144, DType::BF16)] {
            let (x, delta, norm) = pending_parts(cols, dtype, &dev);
            let p = PendingNorm {
                residual: &x,
                delta: &delta,
                norm: &norm,
            };
            let (want_sum, normed) = add_rms_norm(&x, &delta, &norm).expect("add_rms_norm");
            let check_sum = |sum: Option<Tensor>, write: bool, case: &str| match sum {
                Some(sum) => {
                    assert!(write, "{case}: a residual nobody asked for");
                    assert_eq!(rel_diff(&sum, &want_sum), 0.0, "{case} residual");
                }
                None => assert!(!write, "{case}: no residual"),
            };
            if cols <= GEMV_NORM_MAX_COLS {
                // Dense (HELEXA_ENGINE_DENSE_NORM_IN_PRODUCT): against gemv over the formed input.
                let case = format!("{dtype:?} dense {cols}");
                let w = random(&[6144, cols], dtype, &dev);
                for write in [true, false] {
                    let (got, sum) = gemv_norm(&p, &w, false, write).expect("gemv_norm");
                    let e = rel_diff(&got, &gemv(&normed, &w).expect("gemv"));
                    assert!(e <= tolerance(dtype), "{case}: {e}");
                    check_sum(sum, write, &case);
                }
            }
            for format in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
                let case = format!("{dtype:?} {format:?} {cols}");
                let w = random(&[6144, cols], DType::F32, &dev);
                let q = QTensor::quantize(&w, format).expect("quantize");
                assert!(quant_gemv_norm_applies(&p, &q), "{case}");
                for write in [true, false] {
                    let (got, sum) = quant_gemv_norm(&p, &q, write).expect("quant_gemv_norm");
                    let want = quant_gemv(&normed, &q).expect("quant_gemv");
                    let e = rel_diff(&got, &want);
                    assert!(e <= tolerance(dtype), "{case}: {e}");
                    check_sum(sum, write, &case);
                }
            }
        }
    }

    /// The dense product forming its input at widths below a block's 16 values per thread
    /// (some threads hold no element) and a row count that leaves idle warps in the last block.
    #[test]
    fn dense_products_forming_narrow_inputs_match_the_separate_norm() {
        let dev = device();
        for cols in [2560, 1024] {
            let (x, delta, norm) = pending_parts(cols, DType::BF16, &dev);
            let p = PendingNorm {
                residual: &x,
                delta: &delta,
                norm: &norm,
            };
            let (want_sum, normed) = add_rms_norm(&x, &delta, &norm).expect("add_rms_norm");
            let w = random(&[1003, cols], DType::BF16, &dev);
            let (got, sum) = gemv_norm(&p, &w, false, true).expect("gemv_norm");
            let e = rel_diff(&got, &gemv(&normed, &w).expect("gemv"));
            assert!(e <= tolerance(DType::BF16), "{cols}: {e}");
            assert_eq!(
                rel_diff(&sum.expect("residual"), &want_sum),
                0.0,
                "{cols} residual"
            );
            let (gated, _) = gemv_norm(&p, &w.narrow(0, 0, 1000).expect("pairs"), true, false)
                .expect("gemv_norm swiglu");
            let (y, _) =
                gemv_norm(&p, &w.narrow(0, 0, 1000).expect("pairs"), false, false).expect("y");
            let gate = y.narrow(D::Minus1, 0, 500).expect("gate");
            let up = y.narrow(D::Minus1, 500, 500).expect("up");
            let want = silu_mul(&gate, &up).expect("silu_mul");
            assert_eq!(rel_diff(&gated, &want), 0.0, "{cols} gated");
        }
    }

    /// The SwiGLU gate folded into the gate/up product equals the product then the separate
    /// gate kernel bit for bit (the same sums, rounded and gated the same way): dense and
    /// quantized, over a ready input and over one formed in the prologue.
    #[test]
    fn products_with_the_gate_folded_in_match_the_separate_gate() {
        let dev = device();
        let cols = 4096;
        let halves = |y: &Tensor, inter: usize| {
            let gate = y.narrow(D::Minus1, 0, inter).expect("gate");
            let up = y.narrow(D::Minus1, inter, inter).expect("up");
            silu_mul(&gate, &up).expect("silu_mul")
        };
        for dtype in [DType::BF16, DType::F16] {
            let x = random(&[1, 1, cols], dtype, &dev);
            // 12288: an 8B model's width, several waves of blocks; 100: a partial block.
            for inter in [12288, 100] {
                let case = format!("{dtype:?} dense {inter}");
                let w = random(&[2 * inter, cols], dtype, &dev);
                let got = gemv_swiglu(&x, &w).expect("gemv_swiglu");
                assert_eq!(got.dims(), [1, 1, inter], "{case}");
                let want = halves(&gemv(&x, &w).expect("gemv"), inter);
                assert_eq!(rel_diff(&got, &want), 0.0, "{case}");
            }
            let (_, delta, norm) = pending_parts(cols, dtype, &dev);
            let p = PendingNorm {
                residual: &x,
                delta: &delta,
                norm: &norm,
            };
            // Dense over a formed input: the gate folded into gemv_norm.
            let w = random(&[2 * 12288, cols], dtype, &dev);
            let (got, sum) = gemv_norm(&p, &w, true, true).expect("gemv_norm swiglu");
            let (y, want_sum) = gemv_norm(&p, &w, false, true).expect("gemv_norm");
            let case = format!("{dtype:?} dense formed");
            assert_eq!(rel_diff(&got, &halves(&y, 12288)), 0.0, "{case}");
            let (sum, want_sum) = (sum.expect("residual"), want_sum.expect("residual"));
            assert_eq!(rel_diff(&sum, &want_sum), 0.0, "{case} residual");
            for format in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
                // More pairs than an H200's grid has warps (528 blocks × 8): some warps take a
                // second pair, after an up row.
                let inter = 5000;
                let case = format!("{dtype:?} {format:?}");
                let w = random(&[2 * inter, cols], DType::F32, &dev);
                let q = QTensor::quantize(&w, format).expect("quantize");
                let (got, none) = quant_gemv_swiglu(&x, None, &q).expect("ready");
                assert!(none.is_none(), "{case}: a residual from a ready input");
                let want = halves(&quant_gemv(&x, &q).expect("quant_gemv"), inter);
                assert_eq!(rel_diff(&got, &want), 0.0, "{case} ready");
                let (got, sum) = quant_gemv_swiglu(&x, Some(&p), &q).expect("pending");
                let (y, want_sum) = quant_gemv_norm(&p, &q, true).expect("quant_gemv_norm");
                assert_eq!(rel_diff(&got, &halves(&y, inter)), 0.0, "{case} pending");
                let (sum, want_sum) = (sum.expect("residual"), want_sum.expect("residual"));
                assert_eq!(rel_diff(&sum, &want_sum), 0.0, "{case} residual");
            }
        }
    }

    /// The launch shape and the prologue do not touch the arithmetic: the SwiGLU product at
    /// three and four stages and with its weights requested after the wait or asked of L2
    /// (`WeightPrefetch`), a ready x quantized with all its loads at once (`x_at_once`, at
    /// 3, 5 and 6 of its steps: 6144, 10240 and the down product's 12288 values), and the
    /// wide build over a ready x give the bits of two stages, of the stepped loop and of 8
    /// warps, in every format; the wide build forming a norm stays within a bf16 step. (The
    /// weights are quantized on the host, most of the test's time: 2500 gate/up pairs, more
    /// than the 2112 warps of Q8_0's four-stage grid on an H200, so warps take a second pair.)
    #[test]
    fn quant_gemv_stages_and_prologue_keep_the_bits() {
        let dev = device();
        for format in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let cols = 4096;
            let x = random(&[1, 1, cols], DType::BF16, &dev);
            let (_, delta, norm) = pending_parts(cols, DType::BF16, &dev);
            let p = PendingNorm {
                residual: &x,
                delta: &delta,
                norm: &norm,
            };
            let w = random(&[2 * 2500, cols], DType::F32, &dev);
            let q = QTensor::quantize(&w, format).expect("quantize");
            let at = |stages| cuda::QuantGemv {
                stages,
                shared_bytes: quant_gemv_shared_bytes(format, cols, stages, QUANT_GEMV_WARPS),
                warps: QUANT_GEMV_WARPS,
                ..quant_gemv_launch(&q, true).expect("launch")
            };
            for input in [None, Some(norm_input(&p, true))] {
                let run = |stages| {
                    cuda::quant_gemv_with(&x, &q, &at(stages), input.as_ref())
                        .expect("swiglu")
                        .0
                };
                let want = run(2);
                for stages in [3, 4] {
                    let case =
                        format!("{format:?} swiglu stages {stages} norm {}", input.is_some());
                    assert!(same_bits(&run(stages), &want), "{case}");
                }
                // Weights requested after the wait, or asked of L2 after it: the same bits.
                for (stages, early, l2) in [(2, 0, 0), (3, 1, 2), (2, 1, 15), (4, 0, 3)] {
                    let launch = cuda::QuantGemv {
                        prefetch: cuda::WeightPrefetch {
                            early_chunks: Some(early),
                            l2_chunks: l2,
                        },
                        ..at(stages)
                    };
                    let got =
                        cuda::quant_gemv_with(&x, &q, &launch, input.as_ref()).expect("prefetch");
                    let case = format!(
                        "{format:?} swiglu stages {stages}, {early} chunks early, {l2} to L2"
                    );
                    assert!(same_bits(&got.0, &want), "{case}");
                }
            }
            for cols in [6144, 10240, 12288] {
                let x = random(&[1, 1, cols], DType::BF16, &dev);
                let w = random(&[1000, cols], DType::F32, &dev);
                let q = QTensor::quantize(&w, format).expect("quantize");
                let prologue = |x_at_once| {
                    let launch = cuda::QuantGemv {
                        x_at_once,
                        ..quant_gemv_launch(&q, false).expect("launch")
                    };
                    cuda::quant_gemv(&x, &q, &launch).expect("product")
                };
                let case = format!("{format:?} {cols} columns, x at once");
                let want = prologue(true);
                assert!(same_bits(&want, &prologue(false)), "{case}");
                // The wide build (16 warps a block) quantizes x alike: the same bits.
                let wide = cuda::QuantGemv {
                    warps: QUANT_GEMV_WIDE_WARPS,
                    stages: 2,
                    shared_bytes: quant_gemv_shared_bytes(format, cols, 2, QUANT_GEMV_WIDE_WARPS),
                    blocks_per_sm: 2,
                    ..quant_gemv_launch(&q, false).expect("launch")
                };
                let got = cuda::quant_gemv(&x, &q, &wide).expect("wide");
                assert!(
                    same_bits(&got, &want),
                    "{format:?} {cols} columns, 16 warps"
                );
            }
            // The wide build forming the norm (its squares summed in another order) and folding
            // the SwiGLU gate: within a bf16 step of 8 warps.
            let wide = |launch: cuda::QuantGemv| cuda::QuantGemv {
                warps: QUANT_GEMV_WIDE_WARPS,
                shared_bytes: quant_gemv_shared_bytes(format, cols, 2, QUANT_GEMV_WIDE_WARPS),
                stages: 2,
                blocks_per_sm: 1,
                ..launch
            };
            let input = norm_input(&p, true);
            let (got, got_sum) =
                cuda::quant_gemv_with(&x, &q, &wide(at(2)), Some(&input)).expect("wide");
            let (want, want_sum) =
                cuda::quant_gemv_with(&x, &q, &at(2), Some(&input)).expect("narrow");
            let e = rel_diff(&got, &want);
            assert!(e < 1e-2, "{format:?} swiglu norm, 16 warps: {e}");
            let (g, w) = (got_sum.expect("residual"), want_sum.expect("residual"));
            assert!(same_bits(&g, &w), "{format:?} 16 warps: the residual");
        }
    }

    /// The decode attention over a raw token (q/k norms, RoPE and cache writes folded in)
    /// equals qk_norm_rope_cache then the decode attention bit for bit: output and both
    /// caches. Both rope styles, with and without per-head norms, one split and several, every
    /// head size and a grouping of each size, the 16- and 32-bit types, and the position read
    /// on the device (a replayed graph's wider grid, whose owner of the new row is not its last
    /// split).
    #[test]
    fn attention_forming_its_token_matches_the_separate_rope_kernel() {
        let full = [(32, 8, 128), (32, 4, 128), (16, 8, 64), (16, 4, 256)];
        let mut cases = Vec::new();
        for dtype in [DType::BF16, DType::F32, DType::F16] {
            for style in [RopeStyle::Half, RopeStyle::Interleaved] {
                // (offset, norms, position on the device)
                for run in [
                    (5, true, false),
                    (700, true, false),
                    (300, false, false),
                    (300, true, true),
                ] {
                    cases.push((dtype, style, full[0], run));
                }
            }
        }
        for shape in &full[1..] {
            for run in [(5, true, false), (700, true, false), (300, true, true)] {
                cases.push((DType::BF16, RopeStyle::Half, *shape, run));
            }
        }
        for (dtype, style, (h, kvh, hd), (offset, norms, on_device)) in cases {
            let case = format!(
                "{dtype:?} {style:?} {h}/{kvh}×{hd} offset {offset} norms {norms} at {on_device}"
            );
            // A graph's band: its grid sized for 300 positions past this one.
            let token = RopedCase::new(
                dtype,
                style,
                (h, kvh, hd),
                offset,
                norms,
                on_device.then_some(offset + 301),
            );
            let ((k1, v1), (k2, v2)) = (token.caches(), token.caches());
            let roped = qk_norm_rope_cache(&token.inputs(&k1, &v1)).expect("rope kernel");
            let want = decode_attention(&roped, &k1, &v1, offset + 1, 0.088, token.at.as_ref())
                .expect("attention");
            let got = decode_attention_roped(&token.inputs(&k2, &v2), 0.088).expect("folded");
            assert_eq!(rel_diff(&got, &want), 0.0, "{case}: output");
            assert_eq!(rel_diff(&k2, &k1), 0.0, "{case}: k cache");
            assert_eq!(rel_diff(&v2, &v1), 0.0, "{case}: v cache");
        }
    }

    #[test]
    fn splits_merged_in_a_cluster_match_the_merge_kernel() {
        use super::cuda::decode_attention_planned;
        // Clustered where the device launches clusters and the kernels carry the merge (built
        // for compute 9.0+, as scripts/device/pack.sh builds them); else the merge kernel runs,
        // which must give the same bits too.
        let can_cluster = cuda::attention_can_cluster(&device()).expect("cluster support");
        eprintln!("decode attention clusters here: {can_cluster}");

        let dev = device();
        let cap = 512;
        let shapes = [(32, 8, 128), (32, 4, 128), (16, 8, 64), (16, 4, 256)];
        let mut cases = Vec::new();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            // (length, on the device: a graph's band of 256 positions, its empty splits too)
            for run in [
                (1, false),
                (2, false),
                (33, false),
                (100, false),
                (256, false),
            ] {
                cases.push((dtype, shapes[0], run));
            }
            cases.push((dtype, shapes[0], (100, true)));
        }
        for shape in &shapes[1..] {
            for run in [(33, false), (200, false), (70, true)] {
                cases.push((DType::BF16, *shape, run));
            }
        }
        for (dtype, (h, kvh, hd), (len, on_device)) in cases {
            let case = format!("{dtype:?} {h}/{kvh}×{hd} len {len} at {on_device}");
            let q = random(&[1, h, 1, hd], dtype, &dev);
            let k = random(&[1, kvh, cap, hd], dtype, &dev);
            let v = (random(&[1, kvh, cap, hd], dtype, &dev) * 0.5).expect("v");
            let at = on_device.then(|| DevicePosition {
                position: Tensor::new(&[u32::try_from(len - 1).expect("position")], &dev)
                    .expect("position"),
                max_len: 256,
            });
            let run = |merge| {
                let plan = AttentionPlan {
                    merge,
                    ..AttentionPlan::PLAIN
                };
                decode_attention_planned(&q, &k, &v, len, 0.088, at.as_ref(), None, plan)
                    .expect("attention")
            };
            let want = run(SplitMerge::Kernel);
            let before = planned_launches(0);
            let got = run(SplitMerge::Cluster);
            let longest = if on_device { 256 } else { len };
            let splits = cuda::attention_split_count(longest, kvh, AttentionPlan::PLAIN.one_split);
            let expected =
                usize::from((2..=cuda::ATTENTION_CLUSTER_MAX).contains(&splits) && can_cluster);
            assert_eq!(planned_launches(0) - before, expected, "{case}: clustered");
            assert!(same_bits(&got, &want), "{case}");
        }
        // With the token's rope and cache writes folded in, the position as an argument and on
        // the device (a graph's band of 256 positions: 8 splits).
        for offset in [0, 40, 255] {
            for graph in [false, true] {
                let case = RopedCase::new(
                    DType::BF16,
                    RopeStyle::Half,
                    shapes[0],
                    offset,
                    true,
                    graph.then_some(256),
                );
                let plan = AttentionPlan {
                    merge: SplitMerge::Cluster,
                    ..AttentionPlan::PLAIN
                };
                let name = format!("rope offset {offset} graph {graph}");
                let before = planned_launches(0);
                case.expect_same(plan, &name);
                let longest = if graph { 256 } else { offset + 1 };
                let splits = cuda::attention_split_count(
                    longest,
                    shapes[0].1,
                    AttentionPlan::PLAIN.one_split,
                );
                let clustered = planned_launches(0) - before;
                let expected =
                    usize::from((2..=cuda::ATTENTION_CLUSTER_MAX).contains(&splits) && can_cluster);
                assert_eq!(clustered, expected, "{name}: clustered");
            }
        }
    }

    #[test]
    fn one_split_up_to_a_length_is_the_same_on_the_device_and_close_to_split() {
        // One split up to 256 positions (a graph's first band) against the plain split every
        // 32: the same attention summed in another order. A replayed step's attention (its
        // position on the device, the grid sized for the band's end) must give the bits of a
        // launch with the position as an argument: the kernel counts its splits as the
        // launcher does (a device kernel that split every 32 regardless covered only the first
        // split's positions, caught on the H200 in the tenth session).
        for one_split in [1, 100, 256] {
            let plan = AttentionPlan {
                warp_sums: true,
                one_split,
                ..AttentionPlan::PLAIN
            };
            for shape in [(32, 8, 128), (16, 4, 64)] {
                for offset in [0usize, 31, 40, 99, 100, 200, 255, 256, 700] {
                    let name = format!("one split to {one_split} {shape:?} offset {offset}");
                    let band_end = (offset + 1).next_multiple_of(256);
                    let case =
                        RopedCase::new(DType::BF16, RopeStyle::Half, shape, offset, true, None);
                    let [want, ..] = case.run(AttentionPlan::PLAIN);
                    let [arg, k_arg, v_arg] = case.run(plan);
                    let [dev, k_dev, v_dev] = case.with_band(Some(band_end)).run(plan);
                    let e = rel_diff(&arg, &want);
                    assert!(e < 1e-2, "{name}: {e} against the plain split");
                    for (what, (g, w)) in [
                        ("output", (&dev, &arg)),
                        ("k", (&k_dev, &k_arg)),
                        ("v", (&v_dev, &v_arg)),
                    ] {
                        assert!(same_bits(g, w), "{name}: {what} on the device");
                    }
                }
            }
        }
    }

    #[test]
    fn dot_products_summed_together_match_one_reduction_each() {
        let plan = AttentionPlan {
            warp_sums: true,
            ..AttentionPlan::PLAIN
        };
        let shapes = [
            (32, 8, 128),
            (32, 4, 128),
            (16, 8, 64),
            (16, 4, 256),
            (8, 8, 128),
        ];
        for dtype in [DType::BF16, DType::F16] {
            for shape in shapes {
                // Several rounds per block at the longer offsets (a band's grid of 33 splits).
                for offset in [0, 40, 700, 3000] {
                    let case = RopedCase::new(
                        dtype,
                        RopeStyle::Half,
                        shape,
                        offset,
                        true,
                        Some(offset + 300),
                    );
                    let name = format!("{dtype:?} {shape:?} offset {offset}");
                    let before = planned_launches(1);
                    case.expect_same(plan, &name);
                    assert_eq!(
                        planned_launches(1) - before,
                        1,
                        "{name}: the summing kernel"
                    );
                }
            }
        }
    }

    /// One raw token's decode attention with the rope folded in, over random earlier positions:
    /// the inputs, made once, so that two paths see the same.
    struct RopedCase {
        shape: (usize, usize, usize),
        offset: usize,
        /// The token's q, k and v projections (parts of one row, as the q/k/v product writes).
        q: Tensor,
        k: Tensor,
        v: Tensor,
        /// The q and k norms, when the model has them.
        norms: Option<(RmsNorm, RmsNorm)>,
        rope: Rope,
        history: Tensor,
        /// The position on the device, with the graph's grid sized for this many positions.
        at: Option<DevicePosition>,
    }

    impl RopedCase {
        const CAP: usize = 4096;

        fn new(
            dtype: DType,
            style: RopeStyle,
            shape: (usize, usize, usize),
            offset: usize,
            norms: bool,
            band_end: Option<usize>,
        ) -> Self {
            let dev = device();
            let (h, kvh, hd) = shape;
            let rope = Rope::new(hd, 1e6, &RopeScaling::None, style, Self::CAP, &dev)
                .and_then(|r| r.in_dtype(dtype))
                .expect("rope");
            let qkv = random(&[1, 1, (h + 2 * kvh) * hd], dtype, &dev);
            let part = |from, n| qkv.narrow(D::Minus1, from, n).expect("part");
            let norm = || RmsNorm::new(random(&[hd], dtype, &dev), 1e-6);
            Self {
                shape,
                offset,
                q: part(0, h * hd),
                k: part(h * hd, kvh * hd),
                v: part((h + kvh) * hd, kvh * hd),
                norms: norms.then(|| (norm(), norm())),
                rope,
                history: random(&[1, kvh, Self::CAP, hd], dtype, &dev),
                at: device_position(offset, band_end, &dev),
            }
        }

        /// The same inputs with the position on the device (a graph's band ending at
        /// `band_end`), or as an argument (`None`).
        fn with_band(&self, band_end: Option<usize>) -> Self {
            Self {
                q: self.q.clone(),
                k: self.k.clone(),
                v: self.v.clone(),
                norms: self.norms.clone(),
                rope: self.rope.clone(),
                history: self.history.clone(),
                at: device_position(self.offset, band_end, self.q.device()),
                ..*self
            }
        }

        /// Fresh caches holding the earlier positions: k and v (half of k).
        fn caches(&self) -> (Tensor, Tensor) {
            let k = self.history.copy().expect("k cache");
            let v = (&self.history * 0.5).expect("v cache");
            (k, v)
        }

        /// The token as the attention takes it, over these caches.
        fn inputs<'a>(&'a self, k_cache: &'a Tensor, v_cache: &'a Tensor) -> QkvInputs<'a> {
            let (h, kvh, hd) = self.shape;
            QkvInputs {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                q_norm: self.norms.as_ref().map(|(q, _)| q),
                k_norm: self.norms.as_ref().map(|(_, k)| k),
                rope: &self.rope,
                k_cache,
                v_cache,
                offset: self.offset,
                heads: h,
                kv_heads: kvh,
                head_dim: hd,
                at: self.at.as_ref(),
            }
        }

        /// The output and both caches after one run with `plan`, on fresh copies of the caches.
        fn run(&self, plan: AttentionPlan) -> [Tensor; 3] {
            let (k_cache, v_cache) = self.caches();
            let inputs = self.inputs(&k_cache, &v_cache);
            let out = cuda::decode_attention_planned(
                &self.q,
                &k_cache,
                &v_cache,
                self.offset + 1,
                0.088,
                self.at.as_ref(),
                Some(&inputs),
                plan,
            )
            .expect("folded attention");
            [out, k_cache, v_cache]
        }

        /// Asserts `plan` gives the plain path's output and caches, bit for bit.
        fn expect_same(&self, plan: AttentionPlan, case: &str) {
            let (want, got) = (self.run(AttentionPlan::PLAIN), self.run(plan));
            for (what, (g, w)) in ["output", "k cache", "v cache"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                assert!(same_bits(g, w), "{case}: {what}");
            }
        }
    }

    /// A decode step's position `offset` on the device, for a graph's band ending at
    /// `band_end` (`None`: the position is an argument).
    fn device_position(
        offset: usize,
        band_end: Option<usize>,
        dev: &Device,
    ) -> Option<DevicePosition> {
        band_end.map(|max_len| DevicePosition {
            position: Tensor::new(&[u32::try_from(offset).expect("offset")], dev)
                .expect("position"),
            max_len,
        })
    }

    /// Launches of the attention that took a plan's path so far (0: clustered, 1: summing).
    fn planned_launches(which: usize) -> usize {
        cuda::PLANNED_LAUNCHES[which].load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn argmax_matches_the_host_sampler_including_ties() {
        let dev = device();
        for n in [1, 1001, 151_936] {
            let mut host: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 0.01).collect();
            for case in 0..3 {
                if case == 1 {
                    // Equal maxima far apart: the lowest index wins.
                    host[n / 2] = 1e3;
                    host[n - 1] = 1e3;
                }
                if case == 2 {
                    host.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                }
                let t = Tensor::from_slice(&host, (1, n), &dev).expect("logits");
                let want = crate::sampling::argmax(&host);
                assert_eq!(argmax(&t).expect("argmax"), want, "n {n} case {case}");
            }
        }
    }

    #[test]
    fn silu_mul_matches_on_strided_halves() {
        let dev = device();
        for dtype in [DType::F32, DType::BF16] {
            for rows in [1, 3] {
                let both = random(&[1, rows, 2 * 1536], dtype, &dev);
                let gate = both.narrow(D::Minus1, 0, 1536).expect("gate");
                let up = both.narrow(D::Minus1, 1536, 1536).expect("up");
                let got = cuda::silu_mul(&gate, &up).expect("fused");
                let want = (candle_nn::ops::silu(&gate).expect("silu") * &up).expect("mul");
                assert_eq!(rel_diff(&got, &want), 0.0, "{dtype:?} rows {rows}");
            }
        }
    }

    #[test]
    fn qk_norm_rope_cache_matches_the_unfused_steps() {
        let dev = device();
        let (h, kvh, hd) = (8, 2, 128);
        for dtype in [DType::F32, DType::BF16] {
            for style in [RopeStyle::Half, RopeStyle::Interleaved] {
                for (len, offset) in [(1, 37), (6, 0)] {
                    let rope = Rope::new(hd, 1e6, &RopeScaling::None, style, 256, &dev)
                        .and_then(|r| r.in_dtype(dtype))
                        .expect("rope");
                    let qkv = random(&[1, len, (h + 2 * kvh) * hd], dtype, &dev);
                    let q = qkv.narrow(D::Minus1, 0, h * hd).expect("q");
                    let k = qkv.narrow(D::Minus1, h * hd, kvh * hd).expect("k");
                    let v = qkv.narrow(D::Minus1, (h + kvh) * hd, kvh * hd).expect("v");
                    let q_norm = RmsNorm::new(random(&[hd], dtype, &dev), 1e-6);
                    let k_norm = RmsNorm::new(random(&[hd], dtype, &dev), 1e-6);
                    let k_cache = Tensor::zeros((1, kvh, 256, hd), dtype, &dev).expect("cache");
                    let v_cache = Tensor::zeros((1, kvh, 256, hd), dtype, &dev).expect("cache");
                    let got_q = qk_norm_rope_cache(&QkvInputs {
                        q: &q,
                        k: &k,
                        v: &v,
                        q_norm: Some(&q_norm),
                        k_norm: Some(&k_norm),
                        rope: &rope,
                        k_cache: &k_cache,
                        v_cache: &v_cache,
                        offset,
                        heads: h,
                        kv_heads: kvh,
                        head_dim: hd,
                        at: None,
                    })
                    .expect("fused");
                    let unfused = |x: &Tensor, heads: usize, n: &RmsNorm| {
                        let x = x.reshape((1, len, heads, hd)).expect("reshape");
                        let x = n.forward(&x).expect("norm").transpose(1, 2).expect("t");
                        rope.apply(&x, offset).expect("rope")
                    };
                    let rows = |c: &Tensor| c.narrow(2, offset, len).expect("rows");
                    let want_v = v.reshape((1, len, kvh, hd)).and_then(|v| v.transpose(1, 2));
                    let case = format!("{dtype:?} {style:?} len {len}");
                    let e = rel_diff(&got_q, &unfused(&q, h, &q_norm));
                    assert!(e <= tolerance(dtype), "{case}: q {e}");
                    let e = rel_diff(&rows(&k_cache), &unfused(&k, kvh, &k_norm));
                    assert!(e <= tolerance(dtype), "{case}: k {e}");
                    assert_eq!(
                        rel_diff(&rows(&v_cache), &want_v.expect("v")),
                        0.0,
                        "{case}: v"
                    );
                }
            }
        }
    }

    #[test]
    fn decode_attention_matches_softmax_attention() {
        let dev = device();
        for dtype in [DType::F32, DType::BF16] {
            for (h, kvh, hd) in [(32, 8, 128), (16, 16, 64), (8, 4, 256)] {
                for len in [1usize, 31, 33, 300, 4096] {
                    let cap = len.next_multiple_of(256);
                    let q = random(&[1, h, 1, hd], dtype, &dev);
                    let k_cache = random(&[1, kvh, cap, hd], dtype, &dev);
                    let v_cache = random(&[1, kvh, cap, hd], dtype, &dev);
                    let scale = 1.0 / (hd as f32).sqrt();
                    let got =
                        decode_attention(&q, &k_cache, &v_cache, len, scale, None).expect("fused");
                    let f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
                    let k = f32(&k_cache.narrow(2, 0, len).expect("k").squeeze(0).expect("k"));
                    let v = f32(&v_cache.narrow(2, 0, len).expect("v").squeeze(0).expect("v"));
                    let qg = f32(&q).reshape((kvh, h / kvh, hd)).expect("q");
                    let att = (qg.matmul(&k.t().expect("t")).expect("qk") * f64::from(scale))
                        .expect("scale");
                    let p = candle_nn::ops::softmax_last_dim(&att).expect("softmax");
                    let want = p
                        .matmul(&v)
                        .expect("pv")
                        .reshape((1, 1, h * hd))
                        .expect("out");
                    let e = rel_diff(&got, &want);
                    assert!(
                        e <= tolerance(dtype),
                        "{dtype:?} {h}/{kvh}×{hd} len {len}: {e}"
                    );
                }
            }
        }
    }
}
