//! Helpers shared by the GPU tests of several modules.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::CudaContext;
use candle_core::{DType, Device, Tensor};

/// Whether two tensors hold the same values bit for bit (signed zeros and NaN payloads
/// included).
pub fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| -> Vec<u32> {
        let flat = t.flatten_all().expect("flatten");
        match t.dtype() {
            DType::BF16 => flat
                .to_vec1::<half::bf16>()
                .map(|v| v.iter().map(|x| u32::from(x.to_bits())).collect()),
            DType::F16 => flat
                .to_vec1::<half::f16>()
                .map(|v| v.iter().map(|x| u32::from(x.to_bits())).collect()),
            _ => flat
                .to_dtype(DType::F32)
                .and_then(|t| t.to_vec1::<f32>())
                .map(|v| v.iter().map(|x| x.to_bits()).collect()),
        }
        .expect("values")
    };
    a.dtype() == b.dtype() && a.dims() == b.dims() && bits(a) == bits(b)
}

/// Largest difference relative to the largest reference magnitude.
pub fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .expect("f32")
    };
    let (g, w) = (f(got), f(want));
    assert_eq!(g.dims(), w.dims());
    let scale = w
        .abs()
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>());
    let diff = (g - &w).and_then(|t| t.abs()).and_then(|t| t.max(0));
    diff.and_then(|t| t.to_scalar::<f32>()).expect("diff") / scale.expect("scale").max(1e-6)
}

/// The CUDA context of a CUDA device.
pub fn cuda_context(dev: &Device) -> Arc<CudaContext> {
    dev.as_cuda_device()
        .expect("a CUDA device")
        .cuda_stream()
        .context()
        .clone()
}
