//! Safetensors files read straight into page-locked staging buffers and copied to the GPU from
//! there, the next piece read while the last one is in flight (`HELEXA_ENGINE_STAGED_LOAD=1`,
//! off until measured).
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

/// Bytes of each of the two staging buffers.
pub const STAGE_BYTES: usize = 64 << 20;

/// Whether safetensors shards load through [`load`] on a GPU: `HELEXA_ENGINE_STAGED_LOAD=1`.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::fused::opt_in(&ON, "HELEXA_ENGINE_STAGED_LOAD")
}

/// Every tensor of the safetensors file `path`, on `device` (a CUDA device) in the file's
/// dtypes (BF16, F16, F32; others are refused, and the caller takes candle's loader), copied
/// through two staging buffers of `stage_bytes` (a multiple of 8).
pub fn load(path: &Path, device: &Device, stage_bytes: usize) -> Result<HashMap<String, Tensor>> {
    let dev = device.as_cuda_device()?;
    let mut file = File::open(path)?;
    let (header, data_start) = read_header(&mut file)?;
    let stream = dev.cuda_stream();
    let mut stages = Stages::new(&stream, stage_bytes)?;
    let mut tensors = HashMap::with_capacity(header.len());
    for (name, info) in header {
        let tensor = match info.dtype {
            DType::BF16 => upload::<half::bf16>(&mut file, data_start, &info, dev, &mut stages)?,
            DType::F16 => upload::<half::f16>(&mut file, data_start, &info, dev, &mut stages)?,
            DType::F32 => upload::<f32>(&mut file, data_start, &info, dev, &mut stages)?,
            other => bail!("{}: {name} is {other:?}", path.display()),
        };
        tensors.insert(name, tensor);
    }
    // The staging buffers are freed on return: every copy from them must have finished.
    stages.finish()?;
    Ok(tensors)
}

/// Where one tensor lies in the file: its dtype, shape and byte range after the header.
struct TensorInfo {
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The file's header (tensor name → where it lies) and where its data begins.
fn read_header(file: &mut File) -> Result<(Vec<(String, TensorInfo)>, u64)> {
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!("safetensors header of {len} bytes");
    }
    let mut json = vec![0u8; usize::try_from(len).map_err(candle_core::Error::wrap)?];
    file.read_exact(&mut json)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(candle_core::Error::wrap)?;
    let mut tensors = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match v["dtype"].as_str() {
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            Some("F32") => DType::F32,
            other => bail!("{name}: dtype {other:?} is not staged"),
        };
        let numbers = |key: &str| -> Option<Vec<usize>> {
            v[key]
                .as_array()?
                .iter()
                .map(|n| n.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        };
        let (Some(shape), Some(offsets)) = (numbers("shape"), numbers("data_offsets")) else {
            bail!("{name}: malformed header entry {v}");
        };
        let [start, end] = offsets[..] else {
            bail!("{name}: data_offsets {offsets:?}");
        };
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if end < start || end - start != bytes {
            bail!("{name}: {bytes} bytes of {shape:?} {dtype:?} against offsets {start}..{end}");
        }
        tensors.push((
            name,
            TensorInfo {
                dtype,
                shape,
                start,
                end,
            },
        ));
    }
    Ok((tensors, 8 + len))
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
    let bytes = info.end - info.start;
    let elems = bytes / std::mem::size_of::<T>();
    // SAFETY: every byte is written by the copies below before the tensor is used (they are
    // queued on the device's one stream, ahead of any kernel that reads it).
    let mut buf: CudaSlice<T> = unsafe { dev.alloc::<T>(elems) }?;
    file.seek(SeekFrom::Start(
        data_start + u64::try_from(info.start).map_err(candle_core::Error::wrap)?,
    ))?;
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
    fn finish(mut self) -> Result<()> {
        for event in self.copied.iter_mut().filter_map(Option::take) {
            event.synchronize().w()?;
        }
        Ok(())
    }
}

/// The staged loader against candle's, tensor by tensor, bit for bit (needs the `cuda` feature
/// and a device; `scripts/device/gpu-check.sh check`).
#[cfg(test)]
mod gpu_tests {
    use super::*;

    #[test]
    fn staged_tensors_equal_candles() {
        let dev = crate::open_cuda(0).expect("a CUDA device");
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-qwen3/model.safetensors");
        let want = candle_core::safetensors::load(&path, &dev).expect("candle's load");
        // Small buffers: most tensors take several pieces, each buffer reused many times.
        for stage in [4096, STAGE_BYTES] {
            let got = load(&path, &dev, stage).expect("staged load");
            assert_eq!(got.len(), want.len(), "stage {stage}");
            for (name, w) in &want {
                let g = &got[name];
                assert_eq!((g.dtype(), g.dims()), (w.dtype(), w.dims()), "{name}");
                let bytes = |t: &Tensor| -> Vec<u8> {
                    let flat = t.flatten_all().expect("flatten");
                    match t.dtype() {
                        DType::BF16 => flat
                            .to_vec1::<half::bf16>()
                            .expect("values")
                            .iter()
                            .flat_map(|v| v.to_bits().to_le_bytes())
                            .collect(),
                        DType::F16 => flat
                            .to_vec1::<half::f16>()
                            .expect("values")
                            .iter()
                            .flat_map(|v| v.to_bits().to_le_bytes())
                            .collect(),
                        _ => flat
                            .to_vec1::<f32>()
                            .expect("values")
                            .iter()
                            .flat_map(|v| v.to_bits().to_le_bytes())
                            .collect(),
                    }
                };
                assert!(bytes(g) == bytes(w), "stage {stage}: {name} differs");
            }
        }
    }
}
