//! Launches the kernels of `kernels/fused.cu` and `kernels/quant_gemv.cu` (PTX compiled by
//! build.rs) on candle's stream for the device, reading candle's buffers in place and wrapping
//! fresh buffers as tensors. Each launch may overlap the kernel before it (`launch.rs`).
//!
//! Unsafe because a kernel launch is: each launch below states the sizes it relies on. Buffers
//! a kernel writes that belong to an existing tensor (the KV cache) are passed through candle's
//! read guard: all work on a device runs on its one stream, in order, so no other kernel can see
//! the rows while they are written, and the guard keeps the buffer alive.
#![allow(
    unsafe_code,
    reason = "kernel launches and uninitialised device buffers"
)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, result,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::quantized::QTensor;
use candle_core::{DType, Layout, Result, Shape, Storage, StorageRef, Tensor, bail};

use super::launch::Args;
use super::{DevicePosition, QUANT_GEMV_WARPS, QUANT_GEMV_WIDE_WARPS, QkvInputs};
use crate::layers::{RmsNorm, RopeStyle};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const QUANT_GEMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quant_gemv.ptx"));
/// The same kernels with 16 warps per block (build.rs).
const QUANT_GEMV_WIDE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quant_gemv_wide.ptx"));
const FLASH_PREFILL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_prefill.ptx"));
const SAMPLE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sample.ptx"));

/// Blocks of the decode-attention grid to aim for: two per SM on an H200 (132 SMs), as many as fit
/// at once (92 registers × 256 threads); more only queue a second wave and lengthen the merge.
const ATTENTION_TARGET_BLOCKS: usize = 264;
/// Whether the decode attention kernel `f` may run its splits as a cluster on `stream`'s device:
/// the device launches clusters and `f` was compiled with the merge (PTX for compute 9.0+).
fn can_cluster(f: &CudaFunction, stream: &CudaStream) -> Result<bool> {
    Ok(device_attribute(
        stream.context(),
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH,
    )? != 0
        && f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_PTX_VERSION)
            .w()?
            >= 90)
}

/// [`can_cluster`] for the BF16 attention kernels on `device` (for the GPU tests).
#[cfg(test)]
pub(super) fn attention_can_cluster(device: &candle_core::Device) -> Result<bool> {
    let (f, stream) = function(device.as_cuda_device()?, "decode_attention_bf16_e4_g4")?;
    can_cluster(&f, &stream)
}

/// Launches of the decode attention that took the [`super::AttentionPlan`]'s paths: clustered,
/// and with the dot products summed together (for the GPU tests to check they ran).
#[cfg(test)]
pub(super) static PLANNED_LAUNCHES: [std::sync::atomic::AtomicUsize; 2] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 2];

/// Most splits the decode attention merges inside a cluster (the kernel's `merge_in_cluster`;
/// 8 is the portable cluster size).
pub(super) const ATTENTION_CLUSTER_MAX: usize = 8;
/// Threads per decode-attention block (`ATTN_WARPS` in the kernel).
const ATTENTION_THREADS: u32 = 256;
/// Warps per block of the GEMV (`GEMV_WARPS` in the kernel), one row each.
const GEMV_WARPS: usize = 8;
/// Warps per block of the q/k/v kernel (`ROPE_WARPS` in the kernel), one (token, head) each.
const ROPE_WARPS: usize = 4;

/// Runs `$f::<T>(args…, suffix)` for the tensor dtype `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg,)* "f32"),
            DType::BF16 => $f::<half::bf16>($($arg,)* "bf16"),
            DType::F16 => $f::<half::f16>($($arg,)* "f16"),
            other => bail!("fused kernels do not support {other:?}"),
        }
    };
}

/// A kernel of the module (loaded into the device's context on first use) and the device's
/// stream to launch it on.
fn function(dev: &CudaDevice, name: &str) -> Result<(CudaFunction, Arc<CudaStream>)> {
    module_function(dev, "helexa_fused", PTX, name)
}

thread_local! {
    /// Kernel handles by device, module and name, on the thread that launches them (a device's
    /// worker). Each holds its module and so the device's CUDA context.
    static FUNCTIONS: RefCell<HashMap<(DeviceId, &'static str, String), CudaFunction>> =
        RefCell::new(HashMap::new());
}

/// Drops this thread's kernel handles: a faulted device's context can only be released (and
/// a fresh one created) once nothing holds it.
pub fn forget_kernel_handles() {
    FUNCTIONS.with_borrow_mut(HashMap::clear);
    RESIDENT_WARPS.with_borrow_mut(HashMap::clear);
}

thread_local! {
    /// Warps of a 256-thread kernel of `fused.cu` resident on the whole device at once, by
    /// device and name: the driver's occupancy answer, asked once rather than per launch.
    static RESIDENT_WARPS: RefCell<HashMap<(DeviceId, String), usize>> =
        RefCell::new(HashMap::new());
}

/// [`RESIDENT_WARPS`] for the kernel `name` of `fused.cu`, launched in blocks of
/// `GEMV_WARPS` warps.
fn resident_gemv_warps(dev: &CudaDevice, name: &str) -> Result<usize> {
    let key = (dev.id(), name.to_owned());
    if let Some(w) = RESIDENT_WARPS.with_borrow(|m| m.get(&key).copied()) {
        return Ok(w);
    }
    let (f, stream) = function(dev, name)?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(grid(GEMV_WARPS * 32)?, 0, None)
        .w()?;
    let warps = usize::try_from(per_sm).unwrap_or(0) * sm_count(stream.context())? * GEMV_WARPS;
    RESIDENT_WARPS.with_borrow_mut(|m| m.insert(key, warps));
    Ok(warps)
}

/// A kernel of the PTX module `module` (loaded on first use) and the stream to launch it on.
///
/// Handles are kept per device (candle's id, new when a faulted device is re-created) and
/// name on the calling thread: candle's lookup asks the driver (`cuModuleGetFunction`, by
/// name) on every call, and a decoded token launches ~400 kernels, with the host's launch
/// path the limit of quantized decode on the H200 (docs/benchmarks.md).
fn module_function(
    dev: &CudaDevice,
    module: &'static str,
    ptx: &'static str,
    name: &str,
) -> Result<(CudaFunction, Arc<CudaStream>)> {
    let key = (dev.id(), module, name.to_owned());
    let cached = FUNCTIONS.with_borrow(|fs| fs.get(&key).cloned());
    let f = match cached {
        Some(f) => f,
        None => {
            let f = dev
                .get_or_load_custom_func(name, module, ptx)?
                .into_cuda_function();
            super::launch::note_omitted(name, &f);
            FUNCTIONS.with_borrow_mut(|fs| fs.insert(key, f.clone()));
            f
        }
    };
    Ok((f, dev.cuda_stream()))
}

/// A device attribute, asked of the driver once per device and thread (it does not change).
pub(super) fn device_attribute(ctx: &CudaContext, attribute: CUdevice_attribute) -> Result<i32> {
    thread_local! {
        static ATTRIBUTES: RefCell<HashMap<(usize, CUdevice_attribute), i32>> =
            RefCell::new(HashMap::new());
    }
    let key = (ctx.ordinal(), attribute);
    if let Some(v) = ATTRIBUTES.with_borrow(|a| a.get(&key).copied()) {
        return Ok(v);
    }
    let v = ctx.attribute(attribute).w()?;
    ATTRIBUTES.with_borrow_mut(|a| a.insert(key, v));
    Ok(v)
}

/// The buffer of a CUDA tensor's storage.
fn buffer<T: CudaDType>(storage: &Storage) -> Result<&CudaSlice<T>> {
    match storage {
        Storage::Cuda(s) => s.as_cuda_slice::<T>(),
        _ => bail!("fused kernels need CUDA tensors"),
    }
}

/// The elements of a tensor from its first one on.
fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
    Ok(buffer::<T>(storage)?.slice(layout.start_offset()..))
}

/// The device position of a [`DevicePosition`] (one `u32`, read by the kernels as an `int`),
/// from its storage guard (kept by the caller), if there is one.
fn position_view<'g>(
    guard: &'g Option<(StorageRef<'_>, &Layout)>,
) -> Result<Option<CudaView<'g, u32>>> {
    let Some((storage, layout)) = guard else {
        return Ok(None);
    };
    if layout.shape().elem_count() != 1 {
        bail!("a device position is one u32, got {:?}", layout.shape());
    }
    view::<u32>(storage, layout).map(Some)
}

/// Views of several tensors' elements at once, from their storage guards (kept by the caller).
fn views<'g, T: CudaDType, const N: usize>(
    guards: &'g [(StorageRef<'_>, &Layout); N],
) -> Result<[CudaView<'g, T>; N]> {
    let views: Vec<CudaView<'g, T>> = guards
        .iter()
        .map(|(s, l)| view::<T>(s, l))
        .collect::<Result<_>>()?;
    views
        .try_into()
        .map_err(|_| candle_core::Error::msg("views: one per guard"))
}

/// The dimensions of attention over the KV cache, checked: q `(1, heads, queries, hd)` and the
/// caches `(1, kv_heads, capacity, hd)`, all contiguous, the caches alike, heads a multiple of
/// kv_heads. Returns `(heads, queries, kv_heads, capacity, hd)`.
fn attention_dims(
    op: &str,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (_, h, q_len, hd) = q.dims4()?;
    let (_, kvh, cap, cache_hd) = k_cache.dims4()?;
    let contiguous = q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous();
    if !contiguous || cache_hd != hd || h % kvh != 0 || v_cache.dims() != k_cache.dims() {
        bail!(
            "{op}: q {:?} against caches {:?} and {:?} (contiguous, alike)",
            q.dims(),
            k_cache.dims(),
            v_cache.dims()
        );
    }
    Ok((h, q_len, kvh, cap, hd))
}

/// Row stride of a `(1, rows, cols)` tensor whose rows are contiguous.
fn row_stride(layout: &Layout) -> Result<i64> {
    match layout.stride() {
        [_, rows, 1] => i64::try_from(*rows).map_err(candle_core::Error::wrap),
        other => bail!("fused kernels need contiguous rows, got strides {other:?}"),
    }
}

fn wrap<T: CudaDType>(buf: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone()));
    let t = Tensor::from_storage(storage, shape, BackpropOp::none(), false);
    keep(|| t.clone());
    t
}

thread_local! {
    /// While this thread captures a decode step with its buffers kept ([`KeptBuffers`]).
    static KEEPING: RefCell<Option<KeptBuffers>> = const { RefCell::new(None) };
}

/// The buffers a captured decode step's kernels allocated, allocated on a side stream outside
/// the capture and kept until the graph goes (`step_graph.rs`).
///
/// Why: a buffer allocated on the capturing stream becomes an allocation node of the graph,
/// and its free a free node, so the step's kernels never follow one another directly; the
/// driver then captures each programmatic launch as a full edge, and every kernel waits for
/// the previous one to drain before its first block starts (measured on the H200: a chain of
/// small kernels 2.46 µs a launch so, 2.22 µs with kernel following kernel, twelfth session).
/// Kept buffers are never reused within the graph, so nothing the overlap reorders can alias.
pub struct KeptBuffers {
    side: Arc<CudaStream>,
    buffers: Vec<Box<dyn std::any::Any>>,
}

impl KeptBuffers {
    /// Buffers allocated on `side` (a stream of the capturing device that is not capturing).
    pub fn new(side: Arc<CudaStream>) -> Self {
        Self {
            side,
            buffers: Vec::new(),
        }
    }

    /// How many buffers are kept.
    pub fn count(&self) -> usize {
        self.buffers.len()
    }
}

/// Keeps this thread's kernel buffers in `kept` until [`Keeping::finish`] hands them back (or
/// the guard drops: an error or a panic inside the capture, whose work never runs).
pub fn start_keeping(kept: KeptBuffers) -> Keeping {
    KEEPING.with_borrow_mut(|k| *k = Some(kept));
    Keeping
}

/// While it lives, this thread's kernel buffers are kept ([`start_keeping`]).
pub struct Keeping;

impl Keeping {
    /// Stops keeping; the buffers kept since, which the caller keeps as long as any work
    /// queued with them may run.
    pub fn finish(self) -> Option<KeptBuffers> {
        KEEPING.with_borrow_mut(Option::take)
    }
}

impl Drop for Keeping {
    fn drop(&mut self) {
        // After `finish`, already none.
        KEEPING.with_borrow_mut(Option::take);
    }
}

/// Keeps the buffer `buffer` gives while keeping is on; otherwise it is not asked for (a
/// launch outside a capture pays one thread-local read).
fn keep<B: 'static>(buffer: impl FnOnce() -> B) {
    KEEPING.with_borrow_mut(|k| {
        if let Some(k) = k {
            k.buffers.push(Box::new(buffer()));
        }
    });
}

/// `n` uninitialised elements for a kernel to write: on the device's stream, or while
/// keeping is on, on the side stream (kept by [`wrap`], or by [`keep`] for scratch).
///
/// # Safety
/// As `CudaDevice::alloc`: every element must be written before it is read.
unsafe fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    let side = KEEPING.with_borrow(|k| k.as_ref().map(|k| k.side.clone()));
    match side {
        // SAFETY: the caller's promise.
        Some(side) => unsafe { side.alloc::<T>(n) }.w(),
        // SAFETY: the caller's promise.
        None => unsafe { dev.alloc::<T>(n) },
    }
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(candle_core::Error::wrap)
}

fn grid(x: usize) -> Result<u32> {
    u32::try_from(x).map_err(candle_core::Error::wrap)
}

/// `bytes` of dynamic shared memory for launches of `f`, as the launch configuration wants
/// them; above the 48 KB every block gets, the function's opt-in (idempotent; a driver call, so
/// only made when needed).
fn dynamic_shared(f: &CudaFunction, bytes: usize) -> Result<u32> {
    if bytes > SHARED_MEMORY_DEFAULT {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            i32::try_from(bytes).map_err(candle_core::Error::wrap)?,
        )
        .w()?;
    }
    u32::try_from(bytes).map_err(candle_core::Error::wrap)
}

pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    by_dtype!(x.dtype(), add_rms_norm_t(x, delta, weight, eps))
}

/// `add_rms_norm_<T>`'s arguments in order: `[x, delta, weight]`, `[sum, normed]` (written),
/// cols and eps.
fn add_rms_norm_args<'a, T>(
    b: &mut Args<'a>,
    [x, delta, weight]: [&'a CudaView<'_, T>; 3],
    [sum, normed]: [&'a mut CudaSlice<T>; 2],
    cols: &'a i32,
    eps: &'a f32,
) {
    b.input(x)
        .input(delta)
        .output(sum)
        .output(normed)
        .input(weight);
    b.value(cols).value(eps);
}

fn add_rms_norm_t<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
    sfx: &str,
) -> Result<(Tensor, Tensor)> {
    let dev = x.device().as_cuda_device()?;
    let cols = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [cols] || !weight.is_contiguous() {
        bail!("rms norm weight {:?} for rows of {cols}", weight.dims());
    }
    let rows = x.elem_count() / cols;
    let guards = [x, delta, weight].map(Tensor::storage_and_layout);
    let [xv, dv, wv] = views::<T, 3>(&guards)?;
    // SAFETY: uninitialised, and every element is written by the kernel below.
    let mut sum = unsafe { alloc_out::<T>(dev, rows * cols) }?;
    // SAFETY: as `sum`.
    let mut normed = unsafe { alloc_out::<T>(dev, rows * cols) }?;
    let cols_arg = int(cols)?;
    let (f, stream) = function(dev, &format!("add_rms_norm_{sfx}"))?;
    let mut b = Args::new(&stream);
    add_rms_norm_args(
        &mut b,
        [&xv, &dv, &wv],
        [&mut sum, &mut normed],
        &cols_arg,
        &eps,
    );
    // One block per row: up to 1024 threads, each keeping ≤ 8 elements in registers.
    if cols > 8 * 1024 {
        bail!("add_rms_norm: rows of {cols} exceed 8 × 1024 elements");
    }
    let threads = cols.next_multiple_of(32).clamp(32, 1024);
    let cfg = LaunchConfig {
        grid_dim: (grid(rows)?, 1, 1),
        block_dim: (grid(threads)?, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x, delta, sum and normed hold rows × cols elements, weight cols; argument types
    // match `add_rms_norm_<T>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok((
        wrap(sum, dev, x.shape().clone()),
        wrap(normed, dev, x.shape().clone()),
    ))
}

pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    by_dtype!(gate.dtype(), silu_mul_t(gate, up))
}

fn silu_mul_t<T: CudaDType + DeviceRepr>(gate: &Tensor, up: &Tensor, sfx: &str) -> Result<Tensor> {
    let dev = gate.device().as_cuda_device()?;
    let (_, rows, cols) = gate.dims3()?;
    let (gs, gl) = gate.storage_and_layout();
    let (us, ul) = up.storage_and_layout();
    let (gv, uv) = (view::<T>(&gs, gl)?, view::<T>(&us, ul)?);
    let (g_stride, u_stride) = (row_stride(gl)?, row_stride(ul)?);
    let n = rows * cols;
    // SAFETY: every element is written by the kernel below.
    let mut out = unsafe { alloc_out::<T>(dev, n) }?;
    let (rows_arg, cols_arg) = (int(rows)?, int(cols)?);
    let (f, stream) = function(dev, &format!("silu_mul_{sfx}"))?;
    let mut b = Args::new(&stream);
    b.input(&gv)
        .input(&uv)
        .output(&mut out)
        .value(&rows_arg)
        .value(&cols_arg);
    b.value(&g_stride).value(&u_stride);
    let cfg = LaunchConfig {
        grid_dim: (grid(n.div_ceil(256).clamp(1, 1 << 16))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: gate/up rows are `*_stride` apart with `cols` valid elements each, out holds
    // rows × cols; argument types match `silu_mul_<T>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok(wrap(out, dev, (1, rows, cols)))
}

pub fn qk_norm_rope_cache(i: &QkvInputs<'_>) -> Result<Tensor> {
    by_dtype!(i.q.dtype(), qk_norm_rope_cache_t(i))
}

fn qk_norm_rope_cache_t<T: CudaDType + DeviceRepr>(i: &QkvInputs<'_>, sfx: &str) -> Result<Tensor> {
    let dev = i.q.device().as_cuda_device()?;
    let (_, len, _) = i.q.dims3()?;
    let (h, kvh, hd) = (i.heads, i.kv_heads, i.head_dim);
    let (_, cache_heads, cap, cache_hd) = i.k_cache.dims4()?;
    let (cos, sin) = i.rope.tables();
    if hd > 256 || hd % 2 != 0 || cache_heads != kvh || cache_hd != hd {
        bail!(
            "qk_norm_rope_cache: head_dim {hd}, cache {:?}",
            i.k_cache.dims()
        );
    }
    if i.offset + len > cap || i.offset + len > cos.dim(0)? || cos.dtype() != i.q.dtype() {
        bail!(
            "qk_norm_rope_cache: rows {}..{} beyond the cache or rope tables",
            i.offset,
            i.offset + len
        );
    }
    if !i.k_cache.is_contiguous() || !i.v_cache.is_contiguous() {
        bail!("qk_norm_rope_cache: the caches must be contiguous");
    }
    let guards = [i.q, i.k, i.v, i.k_cache, i.v_cache, cos, sin].map(Tensor::storage_and_layout);
    let [qv, kv, vv, kc, vc, cv, sv] = views::<T, 7>(&guards)?;
    let strides = [guards[0].1, guards[1].1, guards[2].1].map(row_stride);
    let [qs, ks, vs] = strides;
    let (qs, ks, vs) = (qs?, ks?, vs?);
    // Norm weights, or a null pointer for a model without per-head norms.
    let norm_guards = [i.q_norm, i.k_norm].map(|n| n.map(|n| n.weight().storage_and_layout()));
    let norm_views = norm_guards
        .iter()
        .map(|g| g.as_ref().map(|(s, l)| view::<T>(s, l)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let eps = i.q_norm.or(i.k_norm).map_or(0.0, RmsNorm::eps);
    let null: u64 = 0;
    let at_guard = i.at.map(|at| at.position.storage_and_layout());
    let at = position_view(&at_guard)?;
    let units = len * (h + 2 * kvh);
    // SAFETY: every element is written by the kernel below (one warp per q head and token).
    let mut q_out = unsafe { alloc_out::<T>(dev, h * len * hd) }?;
    let ints = [len, h, kvh, hd, cap, i.offset].map(int);
    let [len_a, h_a, kvh_a, hd_a, cap_a, off_a] = ints;
    let (len_a, h_a, kvh_a, hd_a, cap_a, off_a) = (len_a?, h_a?, kvh_a?, hd_a?, cap_a?, off_a?);
    let style: i32 = match i.rope.style() {
        RopeStyle::Half => 0,
        RopeStyle::Interleaved => 1,
    };
    // With a device position, the `_at` twin (one more argument); otherwise the plain kernel.
    let at_part = if at.is_some() { "at_" } else { "" };
    let (f, stream) = function(dev, &format!("qk_norm_rope_cache_{at_part}{sfx}"))?;
    let mut b = Args::new(&stream);
    b.input(&qv)
        .input(&kv)
        .input(&vv)
        .value(&qs)
        .value(&ks)
        .value(&vs);
    for w in &norm_views {
        match w {
            Some(w) => b.input(w),
            None => b.value(&null),
        };
    }
    b.input(&cv)
        .input(&sv)
        .output(&mut q_out)
        .input(&kc)
        .input(&vc);
    b.value(&len_a)
        .value(&h_a)
        .value(&kvh_a)
        .value(&hd_a)
        .value(&cap_a)
        .value(&off_a);
    b.value(&eps).value(&style);
    if let Some(at) = &at {
        b.input(at);
    }
    let cfg = LaunchConfig {
        grid_dim: (grid(units.div_ceil(ROPE_WARPS))?, 1, 1),
        block_dim: (grid(ROPE_WARPS * 32)?, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: q/k/v rows hold heads × hd elements `*_stride` apart; the caches hold kv_heads ×
    // cap × hd and rows offset..offset+len < cap (checked); the rope tables cover the positions
    // (checked; with a device position, the caller keeps it below cap - len for the graph's
    // life); q_out holds heads × len × hd; argument types match `qk_norm_rope_cache_[at_]<T>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok(wrap(q_out, dev, (1, h, len, hd)))
}

/// `decode_attention` over the raw token `i` (its q/k/v projections of one token): the q/k
/// norms, RoPE and the cache writes of `qk_norm_rope_cache` done in the attention kernel.
pub fn decode_attention_roped(i: &QkvInputs<'_>, scale: f32) -> Result<Tensor> {
    decode_attention_planned(
        i.q,
        i.k_cache,
        i.v_cache,
        i.offset + 1,
        scale,
        i.at,
        Some(i),
        super::attention_plan(),
    )
}

/// `decode_attention` (over the raw token `rope`, when given) run as `plan` says.
#[allow(
    clippy::too_many_arguments,
    reason = "the attention's operands, the raw token and the plan"
)]
pub(super) fn decode_attention_planned(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    scale: f32,
    at: Option<&DevicePosition>,
    rope: Option<&QkvInputs<'_>>,
    plan: super::AttentionPlan,
) -> Result<Tensor> {
    by_dtype!(
        q.dtype(),
        decode_attention_t(q, k_cache, v_cache, len, scale, at, rope, plan)
    )
}

/// The attention dimensions of a raw token `i`, checked: q, k and v one row each of heads ×
/// head_dim (kv_heads × head_dim), read whole; the caches as `attention_dims` wants them; the
/// rope tables in the activations' dtype. Returns `(heads, 1, kv_heads, capacity, hd)`.
fn raw_token_dims(i: &QkvInputs<'_>) -> Result<(usize, usize, usize, usize, usize)> {
    let (h, kvh, hd) = (i.heads, i.kv_heads, i.head_dim);
    let (_, cache_heads, cap, cache_hd) = i.k_cache.dims4()?;
    let row = |t: &Tensor, n: usize| {
        t.elem_count() == n
            && t.dims3().is_ok_and(|(b, l, _)| b * l == 1)
            && t.stride().last() == Some(&1)
    };
    let (cos, _) = i.rope.tables();
    if !row(i.q, h * hd)
        || !row(i.k, kvh * hd)
        || !row(i.v, kvh * hd)
        || cache_heads != kvh
        || cache_hd != hd
        || h % kvh != 0
        || i.v_cache.dims() != i.k_cache.dims()
        || !i.k_cache.is_contiguous()
        || !i.v_cache.is_contiguous()
        || cos.dtype() != i.q.dtype()
        || [i.q_norm, i.k_norm]
            .iter()
            .flatten()
            .any(|n| n.weight().dims() != [hd] || !n.weight().is_contiguous())
    {
        bail!(
            "decode_attention: raw token q {:?} k {:?} v {:?} against caches {:?}",
            i.q.dims(),
            i.k.dims(),
            i.v.dims(),
            i.k_cache.dims()
        );
    }
    Ok((h, 1, kvh, cap, hd))
}

/// Positions per split of the decode attention past its one-split length: splits enough to
/// fill the GPU at long contexts.
const ATTENTION_SPLIT_POSITIONS: usize = 32;

/// Splits of the decode attention over `len` positions for `kv_heads` KV heads: one up to
/// `one_split` positions ([`super::AttentionPlan::one_split`]: no merge launch), else one per
/// [`ATTENTION_SPLIT_POSITIONS`], at most the blocks that fill the GPU. The kernel counts the
/// same for a device length (`decode_attention`'s `pos_at`), and no length below `len` counts
/// more, so a graph's grid sized for the longest length it serves holds every shorter one's.
pub(super) fn attention_split_count(len: usize, kv_heads: usize, one_split: usize) -> usize {
    if len <= one_split {
        1
    } else {
        len.div_ceil(ATTENTION_SPLIT_POSITIONS)
            .clamp(1, attention_max_splits(kv_heads))
    }
}

/// Most splits per KV head: [`ATTENTION_TARGET_BLOCKS`] over the KV heads.
fn attention_max_splits(kv_heads: usize) -> usize {
    ATTENTION_TARGET_BLOCKS.div_ceil(kv_heads)
}

#[allow(
    clippy::too_many_arguments,
    reason = "the attention's operands, and the raw token when the rope is folded in"
)]
fn decode_attention_t<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    scale: f32,
    at: Option<&DevicePosition>,
    rope: Option<&QkvInputs<'_>>,
    plan: super::AttentionPlan,
    sfx: &str,
) -> Result<Tensor> {
    let dev = q.device().as_cuda_device()?;
    let (h, q_len, kvh, cap, hd) = match rope {
        None => attention_dims("decode_attention", q, k_cache, v_cache)?,
        Some(i) => raw_token_dims(i)?,
    };
    let longest = at.map_or(len, |at| at.max_len.max(len));
    // With the rope folded in, the rope tables must cover every position the launch may write.
    let positions = rope.map_or(Ok(usize::MAX), |i| i.rope.tables().0.dim(0))?;
    if q_len != 1 || len == 0 || longest > cap || longest > positions {
        bail!("decode_attention: {q_len} queries over {longest} of {cap} cached positions");
    }
    let groups = h / kvh;
    if !super::decode_attention_supported(hd, groups) {
        bail!("decode_attention: no kernel for head_dim {hd} with {groups} heads per KV head");
    }
    let max_splits = attention_max_splits(kvh);
    // Positions per split for this length; their count reduced to what that chunk needs.
    let chunk = len.div_ceil(attention_split_count(len, kvh, plan.one_split));
    // With a device position the grid must hold the splits of every length up to the longest
    // the graph serves: the unreduced count, which no shorter length exceeds (the reduced
    // count of the longest can be smaller than a shorter length's).
    let splits = if at.is_some() {
        attention_split_count(longest, kvh, plan.one_split)
    } else {
        len.div_ceil(chunk)
    };
    let guards = [q, k_cache, v_cache].map(Tensor::storage_and_layout);
    // Each lane moves its hd/32 elements of a row in one vector load.
    if guards
        .iter()
        .any(|(_, l)| l.start_offset() % (hd / 32) != 0)
    {
        bail!(
            "decode_attention: q or a cache not aligned to {} elements",
            hd / 32
        );
    }
    let [qv, kv, vv] = views::<T, 3>(&guards)?;
    let at_guard = at.map(|at| at.position.storage_and_layout());
    let pos = position_view(&at_guard)?;
    // SAFETY: every element is written: by the attention kernel with one split, by its
    // cluster's first block when clustered, else by the merge kernel; the partials (unused
    // when clustered) by the attention kernel for every (head, split).
    let mut out = unsafe { alloc_out::<T>(dev, h * hd) }?;
    let parts = if splits > 1 { splits } else { 1 };
    // SAFETY: as `out`.
    let mut part_o = unsafe { alloc_out::<f32>(dev, h * parts * hd) }?;
    // SAFETY: as `out`.
    let mut part_ml = unsafe { alloc_out::<f32>(dev, h * parts * 2) }?;
    let (cap_a, len_a, chunk_a, max_splits_a, one_split_a) = (
        int(cap)?,
        int(len)?,
        int(chunk)?,
        int(max_splits)?,
        int(plan.one_split)?,
    );
    let at_part = if pos.is_some() { "at_" } else { "" };
    let rope_part = if rope.is_some() { "rope_" } else { "" };
    // The warp_sums kernels exist for the graph's attention with the rope folded in, 16-bit.
    let sums_part = if plan.warp_sums && rope.is_some() && pos.is_some() && sfx != "f32" {
        "tr_"
    } else {
        ""
    };
    let name = format!(
        "decode_attention_{rope_part}{at_part}{sums_part}{sfx}_e{}_g{groups}",
        hd / 32
    );
    let (f, stream) = function(dev, &name)?;
    // The raw token's parts (rope only): k, v, the norm weights (or nulls), the rope tables.
    let raw_guards = rope.map(|i| {
        let (cos, sin) = i.rope.tables();
        [i.k, i.v, cos, sin].map(Tensor::storage_and_layout)
    });
    let raw = raw_guards.as_ref().map(views::<T, 4>).transpose()?;
    let norm_guards =
        rope.map(|i| [i.q_norm, i.k_norm].map(|n| n.map(|n| n.weight().storage_and_layout())));
    let norm_views = norm_guards
        .iter()
        .flatten()
        .map(|g| g.as_ref().map(|(s, l)| view::<T>(s, l)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let eps = rope
        .and_then(|i| i.q_norm.or(i.k_norm))
        .map_or(0.0, RmsNorm::eps);
    let style: i32 = match rope.map(|i| i.rope.style()) {
        Some(RopeStyle::Interleaved) => 1,
        _ => 0,
    };
    let mut b = Args::new(&stream);
    b.input(&qv)
        .input(&kv)
        .input(&vv)
        .output(&mut out)
        .output(&mut part_o)
        .output(&mut part_ml);
    b.value(&cap_a).value(&len_a).value(&chunk_a).value(&scale);
    if let Some([k, v, cos, sin]) = &raw {
        b.input(k).input(v);
        for w in &norm_views {
            b.input_or_null(w.as_ref());
        }
        b.input(cos).input(sin).value(&eps).value(&style);
    }
    if let Some(pos) = &pos {
        b.input(pos).value(&max_splits_a).value(&one_split_a);
    }
    // The split blocks of each KV head as one cluster, merged inside the launch (the kernel's
    // `merge_in_cluster`), when asked, the GPU launches clusters and the kernel was compiled
    // with the merge (PTX for compute 9.0+: built for less, it writes the partials as usual).
    let clustered = plan.merge == super::SplitMerge::Cluster
        && (2..=ATTENTION_CLUSTER_MAX).contains(&splits)
        && can_cluster(&f, &stream)?;
    if clustered {
        b.cluster((1, grid(splits)?, 1));
        #[cfg(test)]
        PLANNED_LAUNCHES[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    #[cfg(test)]
    if !sums_part.is_empty() {
        PLANNED_LAUNCHES[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let cfg = LaunchConfig {
        grid_dim: (grid(kvh)?, grid(splits)?, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: q holds heads × hd, the caches kv_heads × cap × hd with len ≤ cap, all three
    // aligned to the hd/32 elements a lane loads at once (checked; with a device position,
    // the caller keeps it below max_len ≤ cap for the graph's life), the partials heads ×
    // splits × (hd | 2); with the rope folded in, k and v hold kv_heads × hd,
    // the norm weights hd (or are null) and the rope tables cover every position up to the
    // longest (checked); the kernel's template matches hd and groups (its name); argument
    // types match `decode_attention_[rope_][at_][tr_]<T>_e<hd/32>_g<groups>`.
    unsafe { b.launch(&f, cfg) }?;
    if splits > 1 && !clustered {
        let (splits_a, hd_a) = (int(splits)?, int(hd)?);
        let (f, stream) = function(dev, &format!("attn_combine_{sfx}"))?;
        let mut b = Args::new(&stream);
        b.input(&part_o)
            .input(&part_ml)
            .output(&mut out)
            .value(&splits_a)
            .value(&hd_a);
        let cfg = LaunchConfig {
            grid_dim: (grid(h)?, 1, 1),
            block_dim: (grid(hd.max(splits).next_multiple_of(32))?, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the partials were written above for heads × splits (≤ 1024, the kernel's
        // ATTN_MAX_SPLITS, since splits ≤ ATTENTION_TARGET_BLOCKS); out holds heads × hd.
        unsafe { b.launch(&f, cfg) }?;
    }
    // Scratch the replayed graph still writes (the partials).
    keep(|| part_o);
    keep(|| part_ml);
    Ok(wrap(out, dev, (1, 1, h * hd)))
}

pub fn causal_softmax(scores: &Tensor, len: usize, offset: usize, scale: f32) -> Result<Tensor> {
    by_dtype!(scores.dtype(), causal_softmax_t(scores, len, offset, scale))
}

fn causal_softmax_t<T: CudaDType + DeviceRepr>(
    scores: &Tensor,
    len: usize,
    offset: usize,
    scale: f32,
    sfx: &str,
) -> Result<Tensor> {
    let dev = scores.device().as_cuda_device()?;
    let (_, rows, total) = scores.dims3()?;
    if !scores.is_contiguous() || len == 0 || rows % len != 0 || offset + len != total {
        bail!(
            "causal_softmax: scores {:?} for {len} queries after {offset}",
            scores.dims()
        );
    }
    let n = scores.elem_count();
    let (ss, sl) = scores.storage_and_layout();
    let sv = view::<T>(&ss, sl)?;
    // SAFETY: every element is written by the kernel below (a block per row).
    let mut probs = unsafe { alloc_out::<T>(dev, n) }?;
    let (len_a, total_a, offset_a) = (int(len)?, int(total)?, int(offset)?);
    let (f, stream) = function(dev, &format!("causal_softmax_{sfx}"))?;
    let mut b = Args::new(&stream);
    b.input(&sv).output(&mut probs);
    b.value(&len_a)
        .value(&total_a)
        .value(&offset_a)
        .value(&scale);
    let blocks = scores.elem_count() / total;
    let cfg = LaunchConfig {
        grid_dim: (grid(blocks)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: scores and probs hold rows × total elements (rows of `total`, checked
    // contiguous); argument types match `causal_softmax_<T>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok(wrap(probs, dev, scores.shape().clone()))
}

pub fn heads_to_rows(x: &Tensor) -> Result<Tensor> {
    by_dtype!(x.dtype(), heads_to_rows_t(x))
}

fn heads_to_rows_t<T: CudaDType + DeviceRepr>(x: &Tensor, sfx: &str) -> Result<Tensor> {
    let dev = x.device().as_cuda_device()?;
    let (h, len, hd) = x.dims3()?;
    let (xs, xl) = x.storage_and_layout();
    let xv = view::<T>(&xs, xl)?;
    let n = h * len * hd;
    // SAFETY: every element is written by the kernel below (each row by its 16-byte pieces).
    let mut out = unsafe { alloc_out::<T>(dev, n) }?;
    let [h_a, len_a, hd_a] = [h, len, hd].map(int);
    let (h_a, len_a, hd_a) = (h_a?, len_a?, hd_a?);
    let (f, stream) = function(dev, &format!("heads_to_rows_{sfx}"))?;
    let mut b = Args::new(&stream);
    b.input(&xv)
        .output(&mut out)
        .value(&h_a)
        .value(&len_a)
        .value(&hd_a);
    let pieces = n * std::mem::size_of::<T>() / 16;
    let cfg = LaunchConfig {
        grid_dim: (grid(pieces.div_ceil(256).clamp(1, 1 << 16))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds h × len × hd contiguous elements (checked by the caller, as that
    // hd × size is a multiple of 16 bytes), out the same count; argument types match
    // `heads_to_rows_<T>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok(wrap(out, dev, (1, len, h * hd)))
}

pub fn flash_prefill(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    offset: usize,
    scale: f32,
) -> Result<Tensor> {
    by_dtype!(
        q.dtype(),
        flash_prefill_t(q, k_cache, v_cache, offset, scale)
    )
}

/// Queries per block of `flash_prefill` (`FP_ROWS`), and its threads (`FP_WARPS` × 32).
const FLASH_ROWS: usize = 64;
const FLASH_THREADS: u32 = 128;

fn flash_prefill_t<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    offset: usize,
    scale: f32,
    sfx: &str,
) -> Result<Tensor> {
    let dev = q.device().as_cuda_device()?;
    let (h, len, kvh, cap, hd) = attention_dims("flash_prefill", q, k_cache, v_cache)?;
    if offset + len > cap {
        bail!(
            "flash_prefill: queries {offset}..{} beyond {cap} cached positions",
            offset + len
        );
    }
    if !super::flash_prefill_supported(hd, q.dtype()) {
        bail!(
            "flash_prefill: no kernel for head_dim {hd} in {:?}",
            q.dtype()
        );
    }
    let guards = [q, k_cache, v_cache].map(Tensor::storage_and_layout);
    let [qv, kv, vv] = views::<T, 3>(&guards)?;
    // SAFETY: every element is written by the kernel below (each (query, head) row by the
    // block of its 64 queries and its head).
    let mut out = unsafe { alloc_out::<T>(dev, len * h * hd) }?;
    let ints = [h, kvh, len, cap, offset].map(int);
    let [h_a, kvh_a, len_a, cap_a, off_a] = ints;
    let (h_a, kvh_a, len_a, cap_a, off_a) = (h_a?, kvh_a?, len_a?, cap_a?, off_a?);
    let (f, stream) = module_function(
        dev,
        "helexa_flash_prefill",
        FLASH_PREFILL_PTX,
        &format!("flash_prefill_{sfx}_hd{hd}"),
    )?;
    // Q, K, V tiles, P (elements), S and O (f32): see the kernel's header.
    let elem = std::mem::size_of::<T>();
    let shared =
        3 * FLASH_ROWS * hd * elem + FLASH_ROWS * FLASH_ROWS * (4 + elem) + FLASH_ROWS * hd * 4;
    let shared_u32 = dynamic_shared(&f, shared)?;
    let mut b = Args::new(&stream);
    b.input(&qv).input(&kv).input(&vv).output(&mut out);
    b.value(&h_a)
        .value(&kvh_a)
        .value(&len_a)
        .value(&cap_a)
        .value(&off_a)
        .value(&scale);
    let cfg = LaunchConfig {
        grid_dim: (grid(len.div_ceil(FLASH_ROWS))?, grid(h)?, 1),
        block_dim: (FLASH_THREADS, 1, 1),
        shared_mem_bytes: shared_u32,
    };
    // SAFETY: q holds heads × len × hd, the caches kv_heads × cap × hd with the chunk's rows
    // offset..offset+len < cap written (checked), out len × heads × hd; the shared memory is
    // the kernel's layout for hd (opted in above); argument types match
    // `flash_prefill_<T>_hd<hd>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok(wrap(out, dev, (1, len, h * hd)))
}

pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    gemv_as(x, w, false, None, DenseGemv::from_env()).map(|(y, _, _)| y)
}

/// `gemv` with the SwiGLU gate folded in when `swiglu` (`w` the stacked `[gate; up]`, an even
/// number of rows; the result has half `w`'s rows), over `norm(x + delta)` when `norm` is given
/// (at most `GEMV_NORM_MAX_COLS` columns; also the new residual when `norm.write_sum`).
pub fn gemv_with(
    x: &Tensor,
    w: &Tensor,
    swiglu: bool,
    norm: Option<&NormInput<'_>>,
) -> Result<(Tensor, Option<Tensor>)> {
    gemv_as(x, w, swiglu, norm, DenseGemv::from_env()).map(|(y, r, _)| (y, r))
}

/// How the dense batch-1 product launches: the environment's switches ([`DenseGemv::from_env`])
/// or a test's or the launch sweep's choice.
#[derive(Clone, Copy, Debug)]
pub struct DenseGemv {
    /// Share rows between two warps where that pays ([`super::sharing_rows_pays`]; not with
    /// the SwiGLU gate; a row is then summed in another order, so outputs can differ in the
    /// last bit). Only for the plain kernel.
    pub share_rows: bool,
    /// Which products run the staged kernel (`staged_gemv_…` in `kernels/quant_gemv.cu`, the
    /// quantized products' pipeline over 16-bit weights; same bits as the plain kernel).
    pub staged: StagedDense,
}

/// Which dense products run the staged kernel. Launch sweep on the H200 (eleventh session,
/// visit 2; BF16, µs per launch, plain → staged): q/k/v 15.57 → 15.26, o 11.17 → 10.84, down
/// 29.05 → 26.26, output 284.7 → 273.9, but gate/up with the SwiGLU gate 47.94 → 49.76.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StagedDense {
    /// None: every dense product is `fused.cu`'s gemv.
    Off,
    /// Every product but those with the SwiGLU gate folded in: the default.
    ButGateUp,
    /// Every dense product.
    All,
}

impl DenseGemv {
    /// `HELEXA_ENGINE_GEMV_SPLIT=1` shares rows (off: within noise on the H200, tenth
    /// session); `HELEXA_ENGINE_GEMV_STAGED` = `0` (no product), `all`, or by default every
    /// product but gate/up.
    pub fn from_env() -> Self {
        static SPLIT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        static STAGED: std::sync::OnceLock<StagedDense> = std::sync::OnceLock::new();
        Self {
            share_rows: super::opt_in(&SPLIT, "HELEXA_ENGINE_GEMV_SPLIT"),
            staged: *STAGED.get_or_init(|| {
                match std::env::var("HELEXA_ENGINE_GEMV_STAGED").as_deref() {
                    Ok("0") => StagedDense::Off,
                    Ok("all") => StagedDense::All,
                    _ => StagedDense::ButGateUp,
                }
            }),
        }
    }

    /// Whether a product over `cols` columns (with the SwiGLU gate when `swiglu`) runs staged.
    fn stages(&self, swiglu: bool, cols: usize) -> bool {
        let asked = match self.staged {
            StagedDense::Off => false,
            StagedDense::ButGateUp => !swiglu,
            StagedDense::All => true,
        };
        asked && super::staged_dense_fits(cols)
    }
}

/// `QuantGemv::format` of the staged kernel over dense 16-bit weights.
pub const DENSE_FORMAT: &str = "dense";

/// `gemv_with` launched as `launch` says; also whether the rows were shared.
pub fn gemv_as(
    x: &Tensor,
    w: &Tensor,
    swiglu: bool,
    norm: Option<&NormInput<'_>>,
    launch: DenseGemv,
) -> Result<(Tensor, Option<Tensor>, bool)> {
    by_dtype!(x.dtype(), gemv_t(x, w, swiglu, norm, launch))
}

/// A product's input formed in its prologue: `norm(x + delta)` with the norm's `weight` and
/// `eps`, as `add_rms_norm` computes it (`residual_norm_scale` in `kernels/common.cuh`).
pub struct NormInput<'a> {
    pub delta: &'a Tensor,
    pub weight: &'a Tensor,
    pub eps: f32,
    /// Whether the kernel also stores the new residual `x + delta` (one product of a layer's
    /// input does).
    pub write_sum: bool,
}

/// The norm input's device buffers, checked against x: delta like x, the weight `(cols,)`,
/// both 16-byte aligned; and the residual buffer when asked for (uninitialised: block 0 writes
/// it whole).
struct NormBuffers<'g, T: CudaDType> {
    delta: CudaView<'g, T>,
    weight: CudaView<'g, T>,
    sum: Option<CudaSlice<T>>,
}

fn norm_buffers<'g, T: CudaDType + DeviceRepr>(
    op: &str,
    x: &Tensor,
    norm: &NormInput<'_>,
    guards: &'g [(StorageRef<'_>, &Layout); 2],
    dev: &CudaDevice,
) -> Result<NormBuffers<'g, T>> {
    let cols = x.elem_count();
    let aligned = guards.iter().all(|(_, l)| l.start_offset() % 8 == 0);
    if norm.delta.dims() != x.dims()
        || !norm.delta.is_contiguous()
        || norm.weight.dims() != [cols]
        || !norm.weight.is_contiguous()
        || !aligned
    {
        bail!(
            "{op}: norm input delta {:?} / weight {:?} against x {:?}",
            norm.delta.dims(),
            norm.weight.dims(),
            x.dims()
        );
    }
    let [delta, weight] = views::<T, 2>(guards)?;
    // SAFETY: uninitialised; block 0 of the kernel writes every element.
    let sum = norm
        .write_sum
        .then(|| unsafe { alloc_out::<T>(dev, cols) })
        .transpose()?;
    Ok(NormBuffers { delta, weight, sum })
}

/// Appends the norm input's kernel arguments (`delta, norm_w, sum` or null).
fn norm_args<'a, T: CudaDType>(b: &mut Args<'a>, n: &'a mut NormBuffers<'_, T>) {
    b.input(&n.delta).input(&n.weight);
    match n.sum.as_mut() {
        Some(sum) => b.output(sum),
        None => b.null(),
    };
}

/// The rows a product over a weight of `w_rows` writes: all, or with the SwiGLU gate folded in,
/// one per gate/up pair.
fn output_rows(w_rows: usize, swiglu: bool) -> Result<usize> {
    match swiglu {
        false => Ok(w_rows),
        true if w_rows.is_multiple_of(2) => Ok(w_rows / 2),
        true => bail!("a stacked gate/up weight has an even number of rows, got {w_rows}"),
    }
}

/// `y` shaped as `x` with `rows` as its last dimension.
fn product_shape(x: &Tensor, rows: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = rows;
    }
    dims
}

/// The residual, shaped as `x`, if the kernel wrote one.
fn residual<T: CudaDType>(
    n: Option<NormBuffers<'_, T>>,
    dev: &CudaDevice,
    x: &Tensor,
) -> Option<Tensor> {
    n.and_then(|n| n.sum)
        .map(|sum| wrap(sum, dev, x.shape().clone()))
}

/// The dense batch-1 product launched as `launch` says; also whether the rows were shared.
fn gemv_t<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    w: &Tensor,
    swiglu: bool,
    norm: Option<&NormInput<'_>>,
    launch: DenseGemv,
    sfx: &str,
) -> Result<(Tensor, Option<Tensor>, bool)> {
    let dev = x.device().as_cuda_device()?;
    let (w_rows, cols) = w.dims2()?;
    if x.elem_count() != cols || cols % 8 != 0 || !x.is_contiguous() || !w.is_contiguous() {
        bail!("gemv: x {:?} against w {:?}", x.dims(), w.dims());
    }
    if norm.is_some() && cols > super::GEMV_NORM_MAX_COLS {
        bail!(
            "gemv: a formed input of {cols} columns exceeds {}",
            super::GEMV_NORM_MAX_COLS
        );
    }
    let rows = output_rows(w_rows, swiglu)?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    if xl.start_offset() % 8 != 0 || wl.start_offset() % 8 != 0 {
        bail!("gemv: operands not 16-byte aligned");
    }
    let (xv, wv) = (view::<T>(&xs, xl)?, view::<T>(&ws, wl)?);
    if launch.stages(swiglu, cols) {
        let stream = dev.cuda_stream();
        let (w_ptr, _w_guard) = wv.device_ptr(&stream);
        let staged = super::staged_dense_launch(cols, swiglu);
        return staged_gemv_t::<T>(x, w_ptr, w_rows, cols, &staged, norm, sfx)
            .map(|(y, r)| (y, r, false));
    }
    let norm_guards = norm.map(|n| [n.delta, n.weight].map(Tensor::storage_and_layout));
    let mut norm_bufs = match (norm, &norm_guards) {
        (Some(n), Some(g)) => Some(norm_buffers::<T>("gemv", x, n, g, dev)?),
        _ => None,
    };
    // SAFETY: every element is written by the kernel below (one warp or pair of warps per row).
    let mut y = unsafe { alloc_out::<T>(dev, rows) }?;
    let (rows_a, cols_a) = (int(rows)?, int(cols)?);
    let eps = norm.map_or(0.0, |n| n.eps);
    let plain = match (norm.is_some(), swiglu) {
        (false, false) => "gemv",
        (false, true) => "gemv_swiglu",
        (true, false) => "gemv_norm",
        (true, true) => "gemv_norm_swiglu",
    };
    let (mut name, mut split) = (format!("{plain}_{sfx}"), false);
    if launch.share_rows && !swiglu && cols.is_multiple_of(16) {
        let split_name = if norm.is_some() {
            format!("gemv_norm_split_{sfx}")
        } else {
            format!("gemv_split_{sfx}")
        };
        // Whole rows in waves of the plain kernel's resident warps against half rows in waves
        // of the split kernel's (it may hold fewer blocks per SM).
        if super::sharing_rows_pays(
            rows,
            resident_gemv_warps(dev, &name)?,
            resident_gemv_warps(dev, &split_name)?,
        ) {
            (name, split) = (split_name, true);
        }
    }
    let (f, stream) = function(dev, &name)?;
    let mut b = Args::new(&stream);
    b.input(&wv)
        .input(&xv)
        .output(&mut y)
        .value(&rows_a)
        .value(&cols_a);
    if let Some(n) = norm_bufs.as_mut() {
        norm_args(&mut b, n);
        b.value(&eps);
    }
    // A split row takes two warps.
    let rows_per_block = if split { GEMV_WARPS / 2 } else { GEMV_WARPS };
    let cfg = LaunchConfig {
        grid_dim: (grid(rows.div_ceil(rows_per_block))?, 1, 1),
        block_dim: (grid(GEMV_WARPS * 32)?, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: w holds rows × cols (with swiglu, 2·rows × cols) and x cols elements, both
    // 16-byte aligned with cols % 8 == 0 (checked: the kernel reads 8 elements at a time); y
    // holds rows; with a norm input, delta, the norm weight and sum (if any) hold cols
    // elements, 16-byte aligned (checked), and cols fits the kernel's static shared row
    // (checked); argument types match `gemv_[norm_][swiglu_|split_]<T>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok((
        wrap(y, dev, product_shape(x, rows)),
        residual(norm_bufs, dev, x),
        split,
    ))
}

/// How to launch the quantized GEMV for one weight (worked out by the caller in `fused.rs`).
pub struct QuantGemv {
    /// Kernel name part of the block type (`q8_0`, `q4k`, `q6k`), or [`DENSE_FORMAT`] for
    /// 16-bit weights of the activations' type (the `staged_gemv_…` kernels).
    pub format: &'static str,
    /// Bytes of one weight row.
    pub row_bytes: usize,
    /// Dynamic shared memory per block.
    pub shared_bytes: usize,
    /// Warps per block (`QG_WARPS` in the kernel): 8, or 16 from its wide build.
    pub warps: usize,
    /// Chunks in flight per warp (the kernel's `STAGES`).
    pub stages: usize,
    /// The weight is a stacked `[gate; up]` and the product writes `silu(gate) · up`.
    pub swiglu: bool,
    /// Most blocks to keep resident per SM (the grid is that many per SM, or fewer where the
    /// shared memory or the rows allow fewer): what the registers allow at `warps` unless a
    /// launch sweep asks for fewer.
    pub blocks_per_sm: usize,
    /// Share each row between two warps where that pays ([`super::split_rows_pay`]; 16-bit
    /// activations, two stages, not with `swiglu`).
    pub split_rows: bool,
    /// Quantize a ready 16-bit x with all its loads issued at once where it is short enough
    /// ([`super::quant_x_at_once`]).
    pub x_at_once: bool,
    /// When the kernel asks for its first weights ([`super::weight_prefetch`]).
    pub prefetch: WeightPrefetch,
}

/// When the staged GEMV asks for its first weights around the wait for the previous kernel.
/// Neither setting changes the arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WeightPrefetch {
    /// Chunks per warp requested before the wait, at most `stages - 1` (`None`: all of them,
    /// the rest requested after it).
    pub early_chunks: Option<usize>,
    /// Chunks per warp after those asked of L2 once the previous kernel has finished, while
    /// the block forms its input (at most 15).
    pub l2_chunks: usize,
}

impl WeightPrefetch {
    /// The kernel's `prologue` argument (`PROLOGUE_…` in `kernels/quant_gemv.cu`), with
    /// `x_at_once` as its bit 0.
    fn prologue(&self, stages: usize, x_at_once: bool) -> i32 {
        let early = self
            .early_chunks
            .unwrap_or(stages - 1)
            .min(stages - 1)
            .min(7);
        let l2 = self.l2_chunks.min(15);
        i32::from(x_at_once) | (early as i32) << 1 | (l2 as i32) << 4
    }
}

/// Dynamic shared memory a block gets without opting in.
const SHARED_MEMORY_DEFAULT: usize = 48 * 1024;
/// Shared memory the driver reserves per block on top of what the kernel asks for.
const SHARED_MEMORY_RESERVED: usize = 1024;

/// Whether `launch` over `rows` × `cols` runs the split-row kernel: asked for, 16-bit
/// activations, two stages, not SwiGLU (the kernels that exist), and [`super::split_rows_pay`].
pub fn uses_split_kernel(
    launch: &QuantGemv,
    rows: usize,
    cols: usize,
    sixteen_bit: bool,
    resident_warps: usize,
) -> bool {
    launch.split_rows
        && launch.warps == QUANT_GEMV_WARPS
        && sixteen_bit
        && launch.stages == 2
        && !launch.swiglu
        && super::split_rows_pay(rows, cols, resident_warps)
}

/// The device's multiprocessors (at least 1).
pub fn sm_count(ctx: &CudaContext) -> Result<usize> {
    let n = device_attribute(
        ctx,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )?;
    Ok(usize::try_from(n).unwrap_or(1).max(1))
}

/// Blocks of the quantized GEMV resident per SM for `launch`: as many as the shared memory
/// holds, at most `launch.blocks_per_sm` (itself at most what the registers allow).
pub fn quant_gemv_blocks_per_sm(ctx: &CudaContext, launch: &QuantGemv) -> Result<usize> {
    let sm_shared = device_attribute(
        ctx,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
    )?;
    Ok(
        (usize::try_from(sm_shared).unwrap_or(0) / (launch.shared_bytes + SHARED_MEMORY_RESERVED))
            .clamp(
                1,
                launch
                    .blocks_per_sm
                    .clamp(1, super::quant_gemv_max_blocks(launch.warps)),
            ),
    )
}

pub fn quant_gemv(x: &Tensor, w: &QTensor, launch: &QuantGemv) -> Result<Tensor> {
    by_dtype!(x.dtype(), quant_gemv_t(x, w, launch, None)).map(|(y, _)| y)
}

/// `quant_gemv` over `norm(x + delta)` when `norm` is given (16-bit activations; also the new
/// residual when `norm.write_sum`), with the SwiGLU gate folded in when `launch.swiglu`.
pub fn quant_gemv_with(
    x: &Tensor,
    w: &QTensor,
    launch: &QuantGemv,
    norm: Option<&NormInput<'_>>,
) -> Result<(Tensor, Option<Tensor>)> {
    by_dtype!(x.dtype(), quant_gemv_t(x, w, launch, norm))
}

fn quant_gemv_t<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    w: &QTensor,
    launch: &QuantGemv,
    norm: Option<&NormInput<'_>>,
    sfx: &str,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = x.device().as_cuda_device()?;
    let (w_rows, cols) = w.shape().dims2()?;
    let stream = dev.cuda_stream();
    let (w_ptr, _w_guard) = w.device_ptr_with_guard(&stream)?;
    // The guard keeps the weight alive until after the launch is queued.
    staged_gemv_t::<T>(x, w_ptr as u64, w_rows, cols, launch, norm, sfx)
}

/// The staged GEMV (`kernels/quant_gemv.cu`) over the `w_rows` × `cols` weight at device
/// address `w_addr` (kept alive by the caller until this returns), as `launch` says.
fn staged_gemv_t<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    w_addr: u64,
    w_rows: usize,
    cols: usize,
    launch: &QuantGemv,
    norm: Option<&NormInput<'_>>,
    sfx: &str,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = x.device().as_cuda_device()?;
    if x.elem_count() != cols || !x.is_contiguous() || !launch.row_bytes.is_multiple_of(16) {
        bail!("staged gemv: x {:?} against w ({w_rows}, {cols})", x.dims());
    }
    if !w_addr.is_multiple_of(16) {
        bail!("staged gemv: weight not 16-byte aligned");
    }
    let rows = output_rows(w_rows, launch.swiglu)?;
    let (xs, xl) = x.storage_and_layout();
    let xv = view::<T>(&xs, xl)?;
    let norm_guards = norm.map(|n| [n.delta, n.weight].map(Tensor::storage_and_layout));
    let mut norm_bufs = match (norm, &norm_guards) {
        (Some(n), Some(g)) => Some(norm_buffers::<T>("staged gemv", x, n, g, dev)?),
        _ => None,
    };
    let ctx = dev.cuda_stream().context().clone();
    let sms = sm_count(&ctx)?;
    // As many blocks as are resident at once; warps then take further rows in turn.
    let per_sm = quant_gemv_blocks_per_sm(&ctx, launch)?;
    let split = uses_split_kernel(
        launch,
        rows,
        cols,
        sfx != "f32",
        per_sm * sms * launch.warps,
    );
    let variant = match (norm.is_some(), launch.swiglu, split) {
        (false, false, false) => "",
        (true, false, false) => "_norm",
        (false, true, _) => "_swiglu",
        (true, true, _) => "_norm_swiglu",
        (false, false, true) => "_split",
        (true, false, true) => "_norm_split",
    };
    let dense = launch.format == DENSE_FORMAT;
    let name = if dense {
        format!("staged_gemv{variant}_{sfx}_s{}", launch.stages)
    } else {
        format!(
            "quant_gemv{variant}_{}_{sfx}_s{}",
            launch.format, launch.stages
        )
    };
    let (f, stream) = match launch.warps {
        QUANT_GEMV_WARPS => module_function(dev, "helexa_quant_gemv", QUANT_GEMV_PTX, &name)?,
        QUANT_GEMV_WIDE_WARPS => {
            module_function(dev, "helexa_quant_gemv_wide", QUANT_GEMV_WIDE_PTX, &name)?
        }
        w => bail!("staged gemv: no build with {w} warps a block"),
    };
    // SAFETY: every element is written by the kernel below (one warp per row).
    let mut y = unsafe { alloc_out::<T>(dev, rows) }?;
    // A split row takes two warps.
    let rows_per_block = if split {
        launch.warps / 2
    } else {
        launch.warps
    };
    let blocks = rows.div_ceil(rows_per_block).min(per_sm * sms);
    let (rows_a, cols_a, row_bytes_a) = (int(rows)?, int(cols)?, int(launch.row_bytes)?);
    let eps = norm.map_or(0.0, |n| n.eps);
    let prologue = launch.prefetch.prologue(launch.stages, launch.x_at_once);
    let mut b = Args::new(&stream);
    b.value(&w_addr).input(&xv).output(&mut y);
    b.value(&rows_a).value(&cols_a).value(&row_bytes_a);
    if let Some(n) = norm_bufs.as_mut() {
        norm_args(&mut b, n);
        b.value(&eps);
    } else if launch.swiglu || split || dense {
        // quant_gemv_swiglu_…, quant_gemv_split_… and every staged_gemv_… take the norm
        // parameters too, unused.
        b.null().null().null().value(&eps);
    }
    b.value(&prologue);
    // At the default two stages most products stay under 48 KB and skip the opt-in.
    let shared = dynamic_shared(&f, launch.shared_bytes)?;
    let cfg = LaunchConfig {
        grid_dim: (grid(blocks)?, 1, 1),
        block_dim: (grid(launch.warps * 32)?, 1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: w points at rows × row_bytes bytes of the block type the kernel is named for
    // (16-bit T for staged_gemv_…), 16-byte aligned (checked), kept alive by the caller until
    // after the launch is queued; x holds cols elements and y rows (with swiglu the weight has
    // 2·rows, checked); with a norm input, delta, the norm weight and sum (if any) hold cols
    // elements, 16-byte aligned (checked); shared_bytes is what the kernel lays out for cols
    // (opted in above); argument types match `quant_gemv_[norm_][swiglu_|split_]<format>_<T>`
    // or `staged_gemv_[norm_][swiglu_]<T>`, prologue last (the weight pointer travels as a
    // u64, the size of a device pointer).
    unsafe { b.launch(&f, cfg) }?;
    Ok((
        wrap(y, dev, product_shape(x, rows)),
        residual(norm_bufs, dev, x),
    ))
}

pub fn argmax(logits: &Tensor) -> Result<u32> {
    let dev = logits.device().as_cuda_device()?;
    // SAFETY: written by the kernel `argmax_into` queues.
    let mut out = unsafe { dev.alloc::<u32>(1) }?;
    argmax_into(logits, &mut out, None)?;
    let picked = dev.cuda_stream().clone_dtoh(&out).w()?;
    picked
        .first()
        .copied()
        .ok_or_else(|| candle_core::Error::msg("argmax returned nothing"))
}

pub fn gather_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    by_dtype!(table.dtype(), gather_rows_t(table, ids))
}

fn gather_rows_t<T: CudaDType + DeviceRepr>(
    table: &Tensor,
    ids: &Tensor,
    sfx: &str,
) -> Result<Tensor> {
    let dev = table.device().as_cuda_device()?;
    let (_, cols) = table.dims2()?;
    let n = ids.elem_count();
    if !table.is_contiguous() || !ids.is_contiguous() || ids.dtype() != DType::U32 || n == 0 {
        bail!(
            "gather_rows: table {:?}, ids {:?}",
            table.dims(),
            ids.dims()
        );
    }
    let (ts, tl) = table.storage_and_layout();
    let (is, il) = ids.storage_and_layout();
    let tv = view::<T>(&ts, tl)?;
    let iv = view::<u32>(&is, il)?;
    // SAFETY: every element is written by the kernel below (one block per id).
    let mut out = unsafe { alloc_out::<T>(dev, n * cols) }?;
    let cols_a = int(cols)?;
    let (f, stream) = function(dev, &format!("gather_rows_{sfx}"))?;
    let mut b = Args::new(&stream);
    b.input(&tv).input(&iv).output(&mut out).value(&cols_a);
    let cfg = LaunchConfig {
        grid_dim: (grid(n)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: table holds rows × cols elements; ids hold n u32 below rows (token ids, which the
    // engine checks against the vocabulary before they reach a model); out holds n × cols;
    // argument types match `gather_rows_<T>`.
    unsafe { b.launch(&f, cfg) }?;
    Ok(wrap(out, dev, (n, cols)))
}

/// Copies `value` into the one-`u32` device tensor `t`, queued on its device's stream.
pub fn write_word(t: &Tensor, value: u32) -> Result<()> {
    let dev = t.device().as_cuda_device()?;
    let stream = dev.cuda_stream();
    let (storage, layout) = t.storage_and_layout();
    if layout.shape().elem_count() != 1 || layout.start_offset() != 0 {
        bail!("write_word: {:?} is not one u32", layout.shape());
    }
    let slice = buffer::<u32>(&storage)?;
    let (ptr, _guard) = slice.device_ptr(&stream);
    // SAFETY: `ptr` is the tensor's one u32, alive while `storage` is borrowed; the source is
    // pageable host memory, which the driver stages before returning, so it may go out of
    // scope after the call.
    unsafe { result::memcpy_htod_async(ptr, &[value], stream.cu_stream()) }.w()
}

/// A page-locked host word for `stream`'s context, for a device-to-host copy read later (a
/// replayed step's pick), uninitialised until a copy writes it.
pub fn pinned_word(stream: &Arc<CudaStream>) -> Result<PinnedHostSlice<u32>> {
    // SAFETY: the caller reads the word only after a copy into it has finished.
    unsafe { stream.context().alloc_pinned::<u32>(1) }.w()
}

/// Queues the argmax of `logits` (f32) into `out[0]`, without waiting for it; with `feed`
/// (a replayed step's token id and position words, one `u32` each), also into the first, and
/// the second one on (`argmax_feed_f32`).
pub fn argmax_into(
    logits: &Tensor,
    out: &mut CudaSlice<u32>,
    feed: Option<[&Tensor; 2]>,
) -> Result<()> {
    let dev = logits.device().as_cuda_device()?;
    let n = logits.elem_count();
    let (ls, ll) = logits.storage_and_layout();
    if !ll.start_offset().is_multiple_of(4) {
        bail!("argmax: logits not 16-byte aligned");
    }
    if out.is_empty() {
        bail!("argmax: no room for the index");
    }
    let lv = view::<f32>(&ls, ll)?;
    let n_a = int(n)?;
    let feed_guards = feed.map(|words| words.map(Tensor::storage_and_layout));
    let words = feed_guards
        .as_ref()
        .map(|g| {
            g.iter()
                .map(|(s, l)| {
                    if l.shape().elem_count() != 1 || l.start_offset() != 0 {
                        bail!("argmax: a fed word is one u32, got {:?}", l.shape());
                    }
                    view::<u32>(s, l)
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    let name = if words.is_some() {
        "argmax_feed_f32"
    } else {
        "argmax_f32"
    };
    let (f, stream) = function(dev, name)?;
    let mut b = Args::new(&stream);
    b.input(&lv).value(&n_a).output(out);
    // Written in place, as the KV caches are.
    for word in words.iter().flatten() {
        b.input(word);
    }
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: logits hold n f32 values from a 16-byte boundary (checked), out at least one u32
    // (checked), each fed word one u32 (checked); argument types match `argmax_f32` or
    // `argmax_feed_f32`.
    unsafe { b.launch(&f, cfg) }
}

/// Warps of the sampling block, and the digits per radix round (`SAMPLE_WARPS`, `RADIX_BINS` in
/// the kernel): each warp keeps a count and a weight per digit in shared memory.
const SAMPLE_WARPS: usize = 32;
const SAMPLE_BINS: usize = 256;

pub fn sample(
    logits: &Tensor,
    d: &crate::sampling::DeviceDraw,
    fold: bool,
) -> Result<super::Drawn> {
    let dev = logits.device().as_cuda_device()?;
    let n = logits.elem_count();
    let (ls, ll) = logits.storage_and_layout();
    let lv = view::<f32>(&ls, ll)?;
    let stream = dev.cuda_stream();
    // The penalty lists travel only when there are some (most requests have none): an empty
    // one is a null pointer, which the kernel never reads (its length is 0), rather than an
    // allocation and an upload per token.
    let upload = |v: &[u32]| (!v.is_empty()).then(|| stream.clone_htod(v)).transpose();
    let repeated = upload(d.repeated).w()?;
    let generated = upload(&d.generated).w()?;
    let subtract = (!d.subtract.is_empty())
        .then(|| stream.clone_htod(&d.subtract))
        .transpose()
        .w()?;
    let padded = n.next_multiple_of(4);
    // SAFETY: written by the kernel below before it reads them: every key and weight (its
    // first passes), the result (thread 0 of its one block).
    let (mut okeys, mut weights, mut out) = unsafe {
        (
            dev.alloc::<u32>(padded)?,
            dev.alloc::<f32>(padded)?,
            dev.alloc::<u32>(2)?,
        )
    };
    let ints = [n, d.repeated.len(), d.generated.len()].map(int);
    let [n_a, n_rep, n_gen] = ints;
    let (n_a, n_rep, n_gen) = (n_a?, n_rep?, n_gen?);
    let fold = i32::from(fold);
    let (f, stream) = module_function(dev, "helexa_sample", SAMPLE_PTX, "sample_f32")?;
    let shared = dynamic_shared(&f, SAMPLE_WARPS * SAMPLE_BINS * 8)?;
    let mut b = Args::new(&stream);
    b.input(&lv)
        .value(&n_a)
        .input_or_null(repeated.as_ref())
        .value(&n_rep)
        .value(&d.repetition_penalty)
        .input_or_null(generated.as_ref())
        .input_or_null(subtract.as_ref())
        .value(&n_gen)
        .value(&d.temperature)
        .value(&d.top_k)
        .value(&d.top_p)
        .value(&d.min_p)
        .value(&d.uniform)
        .output(&mut okeys)
        .output(&mut weights)
        .value(&fold)
        .output(&mut out);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32 * SAMPLE_WARPS as u32, 1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: the logits hold n f32 values (contiguous, checked by the caller), written in
    // place on the one stream as the KV cache is (see the module's docs); the lists hold
    // n_rep and n_gen elements (null when 0: the kernel's loops over them do not run); the scratch n rounded up to 4 each (fresh allocations:
    // 16-byte aligned); out two u32; the shared memory is the
    // kernel's per-warp histograms (opted in above); argument types match `sample_f32`.
    unsafe { b.launch(&f, cfg) }?;
    let got = stream.clone_dtoh(&out).w()?;
    Ok(match got[..] {
        [token, 0] => super::Drawn::Picked(token),
        _ => super::Drawn::Penalised,
    })
}

/// A measurement aid (ignored; `gpu-check.sh tests graph_boundary`): what a kernel boundary
/// costs inside a replayed CUDA graph. A chain of small kernels (the residual add + RMSNorm of
/// one 4096-wide row) is captured and replayed in four ways: each launch allocating its
/// outputs as a decode step's do (the capture then holds an allocation and a free node between
/// kernels), or writing into buffers allocated before the capture (kernel follows kernel), each
/// with the programmatic attribute and without. It prints µs per launch and the captured
/// graph's edges; the replays' results are not checked (the chain's arithmetic is the norm
/// tests').
#[cfg(test)]
mod graph_boundary {
    use super::*;
    use crate::fused::graph_edges;
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};

    const CHAIN: usize = 200;
    const REPLAYS: usize = 100;

    fn replay_us(graph: &CudaGraph, stream: &CudaStream) -> f64 {
        for _ in 0..10 {
            graph.launch().expect("replay");
        }
        stream.synchronize().expect("sync");
        let start = std::time::Instant::now();
        for _ in 0..REPLAYS {
            graph.launch().expect("replay");
        }
        stream.synchronize().expect("sync");
        start.elapsed().as_secs_f64() * 1e6 / (REPLAYS * CHAIN) as f64
    }

    fn capture(stream: &Arc<CudaStream>, body: &mut dyn FnMut()) -> CudaGraph {
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .expect("begin capture");
        body();
        stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .expect("end capture")
            .expect("a graph")
    }

    #[test]
    #[ignore = "a measurement on a GPU"]
    fn graph_boundary_cost() {
        // Opened as the engine opens it (no per-buffer event tracking).
        let dev = crate::open_cuda(0).expect("a CUDA device");
        let cuda = dev.as_cuda_device().expect("cuda");
        let stream = cuda.cuda_stream();
        let cols = 4096;
        let row = |seed: f64| {
            Tensor::arange(0f32, cols as f32, &dev)
                .and_then(|t| t.affine(1e-3, seed))
                .expect("row")
        };
        let (x, delta, w) = (row(0.1), row(0.2), row(1.0));
        let (f, _) = function(cuda, "add_rms_norm_f32").expect("kernel");
        let guards = [&delta, &w].map(Tensor::storage_and_layout);
        let [dv, wv] = views::<f32, 2>(&guards).expect("views");
        let mut bufs: Vec<CudaSlice<f32>> = (0..3)
            .map(|_| stream.alloc_zeros::<f32>(cols).expect("buffer"))
            .collect();
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols_arg = int(cols).expect("cols");
        let eps = 1e-6f32;
        let launch =
            |inputs: [&CudaView<'_, f32>; 3], outputs: [&mut CudaSlice<f32>; 2], plain: bool| {
                let mut b = Args::new(&stream);
                if plain {
                    b.plain();
                }
                add_rms_norm_args(&mut b, inputs, outputs, &cols_arg, &eps);
                // SAFETY: x, delta, sum, normed and the weight hold cols f32 each.
                unsafe { b.launch(&f, cfg) }.expect("launch");
            };
        for plain in [false, true] {
            let pdl = if plain { "plain" } else { "programmatic" };
            let allocating = capture(&stream, &mut || {
                let mut cur = x.clone();
                for _ in 0..CHAIN {
                    let g = cur.storage_and_layout();
                    let xv = view::<f32>(&g.0, g.1).expect("view");
                    // SAFETY: every element is written by the kernel.
                    let (mut sum, mut normed) =
                        unsafe { (dev_alloc(cuda, cols), dev_alloc(cuda, cols)) };
                    launch([&xv, &dv, &wv], [&mut sum, &mut normed], plain);
                    drop(g);
                    cur = wrap(sum, cuda, x.shape().clone());
                    drop(normed);
                }
            });
            let e = graph_edges(allocating.cu_graph()).expect("edges");
            println!(
                "graph boundary: allocating, {pdl}: {:.2} µs per launch ({e:?})",
                replay_us(&allocating, &stream)
            );
            drop(allocating);
            let preallocated = capture(&stream, &mut || {
                for i in 0..CHAIN {
                    let (a, rest) = bufs.split_at_mut(1);
                    let (b1, b2) = rest.split_at_mut(1);
                    let (src, sum, normed) = match i % 2 {
                        0 => (&a[0], &mut b1[0], &mut b2[0]),
                        _ => (&b1[0], &mut a[0], &mut b2[0]),
                    };
                    launch([&src.slice(..), &dv, &wv], [sum, normed], plain);
                }
            });
            let e = graph_edges(preallocated.cu_graph()).expect("edges");
            println!(
                "graph boundary: preallocated, {pdl}: {:.2} µs per launch ({e:?})",
                replay_us(&preallocated, &stream)
            );
        }
    }

    /// `cols` uninitialised f32 on the device's stream.
    unsafe fn dev_alloc(cuda: &CudaDevice, cols: usize) -> CudaSlice<f32> {
        // SAFETY: the caller writes every element before reading it.
        unsafe { cuda.alloc::<f32>(cols) }.expect("alloc")
    }
}
