//! Safetensors files, and GGUF block-quantized tensors, read straight into page-locked staging
//! buffers and copied to the GPU from there, the next piece read while the last one is in
//! flight (safetensors: on by default, `HELEXA_ENGINE_STAGED_LOAD=0` goes back to candle's
//! loader; GGUF: on by default, `HELEXA_ENGINE_STAGED_GGUF=0` goes back to candle's reader).
//!
//! Why: candle's loader reads a whole shard into a fresh `Vec` (every page faulted in, then
//! copied) and copies each tensor from that pageable memory, which the driver stages through
//! its own small buffer before returning. On the H200 host a 16 GB BF16 model took 13 s to load
//! against 0.3 s of PCIe time (docs/benchmarks.md). Here each byte is copied once on the host
//! (page cache to pinned memory, by `read`) and the device copies run asynchronously from
//! pinned memory, overlapping the next read.
#![allow(
    unsafe_code,
    reason = "page-locked host buffers and uninitialised device buffers"
)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, PinnedHostSlice, result, sys,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::quantized::cuda::QCudaStorage;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Storage, Tensor, bail};

use crate::safetensors_header::{TensorInfo, read_header};

/// Bytes of each of the two staging buffers.
pub const STAGE_BYTES: usize = 64 << 20;

/// Whether safetensors shards load through a [`Loader`] on a GPU: yes unless
/// `HELEXA_ENGINE_STAGED_LOAD=0` (H200, BF16 8B: 14.8 s through candle's loader, 4.0 s here).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::fused::switch(&ON, "HELEXA_ENGINE_STAGED_LOAD")
}

/// Whether GGUF block-quantized weights load through a [`Loader`] on a GPU
/// ([`Loader::quantized`]): yes unless `HELEXA_ENGINE_STAGED_GGUF=0`. Candle's reader takes
/// each tensor into a fresh host buffer, copies it into typed blocks, the projections are
/// stacked in a third buffer, and the upload copies from pageable memory: on the H200 host
/// an 8.7 GB Q8_0 8B model loads in 7.1–11.9 s that way, 1.7 s here (Q4_K_M 2.9–5.6 → 1.3 s;
/// tenth session, same greedy tokens).
pub fn gguf_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::fused::switch(&ON, "HELEXA_ENGINE_STAGED_GGUF")
}

/// Loads safetensors shards and GGUF tensors onto one CUDA device through two page-locked
/// staging buffers of `stage_bytes`, allocated once for all of them.
pub struct Loader {
    device: Device,
    stages: Stages,
}

impl Loader {
    pub fn new(device: &Device, stage_bytes: usize) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        Ok(Self {
            device: device.clone(),
            stages: Stages::new(&stream, stage_bytes)?,
        })
    }

    /// The device the tensors go to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// GGUF block-quantized data, the byte ranges `parts` of `file` (`(offset, bytes)` each) in
    /// order, as one quantized tensor of `dims` (rows, columns) on the device, laid out as
    /// candle's quantized CUDA storage is (the data, then zero padding). Several parts stack
    /// their rows: a block never straddles rows, so stacking rows is concatenating bytes. The
    /// copies are queued on the device's stream, before anything can use the tensor.
    pub fn quantized(
        &mut self,
        file: &mut File,
        parts: &[(u64, usize)],
        dtype: GgmlDType,
        dims: &[usize],
    ) -> Result<QTensor> {
        let elems: usize = dims.iter().product();
        let bytes = elems / dtype.block_size() * dtype.type_size();
        if !elems.is_multiple_of(dtype.block_size())
            || parts.iter().map(|&(_, n)| n).sum::<usize>() != bytes
        {
            bail!("staged load: {dtype:?} parts {parts:?} do not make a {dims:?} tensor");
        }
        let dev = self.device.as_cuda_device()?;
        let storage = QCudaStorage::zeros(dev, elems, dtype)?;
        let base = storage.device_ptr()? as sys::CUdeviceptr;
        let stream = self.stages.stream.clone();
        // The raw copies below take the current context (the zeroing above set it, but not
        // visibly).
        stream.context().bind_to_thread().w()?;
        let mut at = 0;
        for &(offset, len) in parts {
            file.seek(SeekFrom::Start(offset))?;
            let mut done = 0;
            while done < len {
                let n = (len - done).min(self.stages.bytes);
                let host = self.stages.next()?;
                file.read_exact(&mut host[..n]).map_err(|e| {
                    candle_core::Error::msg(format!(
                        "staged load: {len} bytes at offset {offset}: {e}"
                    ))
                })?;
                let dst = base + (at + done) as sys::CUdeviceptr;
                // SAFETY: [dst, dst + n) lies inside the storage's allocation (at + done + n ≤
                // bytes, checked above, and the allocation holds bytes plus padding); the
                // source is page-locked and is not written again until the event recorded next
                // says this copy has finished; the stream is the one the storage was zeroed on,
                // so the copy lands after the zeroing.
                unsafe { result::memcpy_htod_async(dst, &host[..n], stream.cu_stream()) }.w()?;
                self.stages.sent()?;
                done += n;
            }
            at += len;
        }
        QTensor::new(QStorage::Cuda(storage), dims)
    }

    /// Every tensor of the shard `path`, in the file's dtypes; `None` when the shard holds a
    /// dtype other than BF16, F16 or F32 (nothing is read or allocated then: the caller takes
    /// candle's loader). Errors after that (I/O, device memory) are the load's.
    pub fn shard(&mut self, path: &Path) -> Result<Option<HashMap<String, Tensor>>> {
        let dev = self.device.as_cuda_device()?;
        let mut file = File::open(path)?;
        let Some((header, data_start)) = read_header(&mut file)? else {
            return Ok(None);
        };
        let mut tensors = HashMap::with_capacity(header.len());
        for (name, info) in header {
            let stages = &mut self.stages;
            let tensor = match info.dtype {
                DType::BF16 => upload::<half::bf16>(&mut file, data_start, &info, dev, stages)?,
                DType::F16 => upload::<half::f16>(&mut file, data_start, &info, dev, stages)?,
                _ => upload::<f32>(&mut file, data_start, &info, dev, stages)?,
            };
            tensors.insert(name, tensor);
        }
        // Only once the copies have finished may the buffers be refilled by the next shard's
        // reads (they would wait anyway) or freed; and errors of the copies surface here.
        self.stages.finish()?;
        Ok(Some(tensors))
    }
}

/// One tensor's bytes read piece by piece into the staging buffers and copied to a fresh
/// device buffer of `T`.
fn upload<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    file: &mut File,
    data_start: u64,
    info: &TensorInfo,
    dev: &CudaDevice,
    stages: &mut Stages,
) -> Result<Tensor> {
    let bytes = usize::try_from(info.end - info.start).map_err(candle_core::Error::wrap)?;
    let elems = bytes / std::mem::size_of::<T>();
    // SAFETY: every byte is written by the copies below, queued on the device's stream before
    // anything can read the tensor; the loader waits for them before returning it.
    let mut buf: CudaSlice<T> = unsafe { dev.alloc::<T>(elems) }?;
    file.seek(SeekFrom::Start(data_start + info.start))?;
    {
        // SAFETY: `u8` has no invalid bit patterns and the view covers exactly the buffer.
        let mut dst = unsafe { buf.transmute_mut::<u8>(bytes) }
            .ok_or_else(|| candle_core::Error::msg("staged load: device buffer view"))?;
        let stream = stages.stream.clone();
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(stages.bytes);
            let host = stages.next()?;
            file.read_exact(&mut host[..n])?;
            // From page-locked memory the copy runs asynchronously: the buffer is not written
            // again until the event recorded next says it has finished.
            stream
                .memcpy_htod(&host[..n], &mut dst.slice_mut(done..done + n))
                .w()?;
            stages.sent()?;
            done += n;
        }
    }
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone()));
    Ok(Tensor::from_storage(
        storage,
        info.shape.clone(),
        BackpropOp::none(),
        false,
    ))
}

/// Two page-locked buffers used in turn, each with the event of the last copy from it.
struct Stages {
    stream: Arc<CudaStream>,
    buffers: [PinnedHostSlice<u8>; 2],
    copied: [Option<CudaEvent>; 2],
    bytes: usize,
    current: usize,
}

impl Stages {
    fn new(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self> {
        if bytes == 0 {
            bail!("staged load: empty staging buffers");
        }
        let ctx = stream.context();
        // SAFETY: the buffers are written (by `read`) before any copy reads them.
        let alloc = || unsafe { ctx.alloc_pinned::<u8>(bytes) }.w();
        Ok(Self {
            stream: stream.clone(),
            buffers: [alloc()?, alloc()?],
            copied: [None, None],
            bytes,
            current: 1,
        })
    }

    /// The other buffer, once the copy from it has finished.
    fn next(&mut self) -> Result<&mut [u8]> {
        self.current ^= 1;
        if let Some(event) = self.copied[self.current].take() {
            event.synchronize().w()?;
        }
        self.buffers[self.current].as_mut_slice().w()
    }

    /// Records the copy just queued from the current buffer.
    fn sent(&mut self) -> Result<()> {
        self.copied[self.current] = Some(self.stream.record_event(None).w()?);
        Ok(())
    }

    /// Waits for the copies still in flight.
    fn finish(&mut self) -> Result<()> {
        for event in self.copied.iter_mut().filter_map(Option::take) {
            event.synchronize().w()?;
        }
        Ok(())
    }
}

impl Drop for Stages {
    /// On an error path copies may still be reading the buffers, which are freed right after:
    /// wait for the whole stream (its events may have been taken already).
    fn drop(&mut self) {
        if self.copied.iter().any(Option::is_some) {
            let _ = self.stream.synchronize();
        }
    }
}

/// The staged loader against candle's, tensor by tensor, bit for bit (needs the `cuda` feature
/// and a device; `scripts/device/gpu-check.sh check`).
#[cfg(test)]
mod gpu_tests {
    use super::*;
    use crate::test_support::same_bits;

    /// Every block-quantized tensor of the GGUF fixtures (Q8_0, Q4_K, Q6_K), alone and stacked
    /// as the projections read them (q/k/v, q/k, gate/up), against candle's reader (stacked on
    /// the host, as `Projections::stack_quantized` does) byte for byte: through a loader with
    /// small buffers (every tensor several pieces, pieces splitting blocks), and through the
    /// file's own loader taking turns with candle's reads on the file's one reader. Single
    /// tensors also dequantize to the same values as candle's upload.
    #[test]
    fn staged_gguf_tensors_equal_candles() {
        let dev = crate::open_cuda(0).expect("a CUDA device");
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        let mut total = 0;
        for file in [
            "tiny-qwen3/gguf/tiny-qwen3-Q8_0.gguf",
            "tiny-qwen3/gguf/tiny-qwen3-Q4_K_M.gguf",
            "tiny-qwen3/gguf/tiny-qwen3-Q6_K.gguf",
        ] {
            let path = fixtures.join(file);
            let g = crate::weights::GgufFile::open(&path).expect("gguf");
            let mut names: Vec<&str> = g.content.tensor_infos.keys().map(String::as_str).collect();
            names.sort_unstable();
            let mut stacks: Vec<Vec<String>> = names.iter().map(|&n| vec![n.to_owned()]).collect();
            for layer in 0.. {
                let name = |t: &str| format!("blk.{layer}.{t}.weight");
                if !g.has_tensor(&name("attn_q")) {
                    break;
                }
                stacks.push(vec![name("attn_q"), name("attn_k"), name("attn_v")]);
                stacks.push(vec![name("attn_q"), name("attn_k")]);
                stacks.push(vec![name("ffn_gate"), name("ffn_up")]);
            }
            let mut small = Loader::new(&dev, 4096 + 48).expect("staging buffers");
            let (mut stacked, mut checked) = (0, 0);
            for stack in &stacks {
                let stack: Vec<&str> = stack.iter().map(String::as_str).collect();
                let Some(ranges) = g.stacked_ranges(&stack) else {
                    continue;
                };
                stacked += usize::from(stack.len() > 1);
                let mut want = Vec::new();
                for n in &stack {
                    let host = g.qtensor(n, &Device::Cpu).expect("read");
                    want.extend_from_slice(&host.data().expect("bytes"));
                }
                let dims = [ranges.rows, ranges.cols];
                let mut f = File::open(&path).expect("open");
                let pieces = small
                    .quantized(&mut f, &ranges.parts, ranges.dtype, &dims)
                    .expect("staged in pieces");
                let whole = g
                    .staged_with(&stack, &dev)
                    .expect("staged")
                    .expect("a stageable stack");
                for got in [&pieces, &whole] {
                    assert_eq!(got.shape().dims(), dims, "{file} {stack:?}");
                    assert_eq!(got.dtype(), ranges.dtype, "{file} {stack:?}");
                    assert!(
                        got.data().expect("device bytes") == want,
                        "{file} {stack:?}"
                    );
                }
                if let [n] = stack[..] {
                    let candles = g.qtensor(n, &dev).expect("candle's upload");
                    let values = |q: &QTensor| q.dequantize(&dev).expect("dequantize");
                    assert!(same_bits(&values(&whole), &values(&candles)), "{file} {n}");
                }
                checked += 1;
            }
            assert!(
                stacked >= 2,
                "{file}: only {stacked} stacks of several tensors"
            );
            assert!(checked > 10, "{file}: only {checked} reads checked");
            total += checked;
        }
        assert!(total > 30, "only {total} reads checked");
    }

    #[test]
    fn staged_tensors_equal_candles() {
        let dev = crate::open_cuda(0).expect("a CUDA device");
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-qwen3/model.safetensors");
        let want = candle_core::safetensors::load(&path, &dev).expect("candle's load");
        // Small buffers: most tensors take several pieces, each buffer reused many times, the
        // odd size leaving a partial last piece.
        for stage in [4096, 1000, STAGE_BYTES] {
            let mut loader = Loader::new(&dev, stage).expect("staging buffers");
            let got = loader
                .shard(&path)
                .expect("staged load")
                .expect("a shard of BF16/F16/F32 tensors");
            assert_eq!(got.len(), want.len(), "stage {stage}");
            for (name, w) in &want {
                let g = &got[name];
                assert_eq!((g.dtype(), g.dims()), (w.dtype(), w.dims()), "{name}");
                assert!(same_bits(g, w), "stage {stage}: {name} differs");
            }
        }
    }
}
