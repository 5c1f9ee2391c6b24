//! Safetensors files read straight into page-locked staging buffers and copied to the GPU from
//! there, the next piece read while the last one is in flight (on by default;
//! `HELEXA_ENGINE_STAGED_LOAD=0` goes back to candle's loader).
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
    CudaEvent, CudaSlice, CudaStream, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
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

/// Loads safetensors shards onto one CUDA device through two page-locked staging buffers of
/// `stage_bytes`, allocated once for all the shards.
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
