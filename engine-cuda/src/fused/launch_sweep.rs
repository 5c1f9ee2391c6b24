//! What one quantized decode product costs inside a replayed CUDA graph, for each launch shape
//! the kernel allows (chunks in flight per warp, resident blocks per SM): the measurement that
//! chooses a launch per product instead of one for all (three and four stages lost when given
//! to every product, eighth session, yet the down product runs at 63% of the bandwidth).
//!
//! An ignored GPU test, run by `scripts/device/gpu-check.sh gemv-sweep`: for the four products
//! of a Qwen3-8B layer (q/k/v and gate/up with the RMSNorm formed in the product, gate/up with
//! the SwiGLU gate folded in, o and down plain) in Q8_0, Q4_K and Q6_K, it captures a graph of
//! back-to-back launches, replays it, and prints µs per launch and the share of 4.4 TB/s. The
//! weights rotate over copies that together exceed the L2 cache, so each launch reads its bytes
//! from memory as a decode step does. Every launch shape must give the default's bits (the
//! arithmetic does not depend on it): the one assertion, which makes it a test as well.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use super::cuda::{self, NormInput, QuantGemv};
use super::{
    QUANT_GEMV_BLOCKS_PER_SM, QUANT_GEMV_SHARED_MAX, quant_gemv_format, quant_gemv_shared_bytes,
    quant_row_bytes,
};
use crate::test_support::same_bits;

/// Bytes the rotated weight copies span at least: twice the H200's 50 MB L2 and more.
const ROTATION_BYTES: usize = 256 << 20;
/// Launches per captured graph, and replays timed.
const LAUNCHES: usize = 64;
const REPLAYS: usize = 10;
/// The bandwidth the ratios are taken against (the ceiling).
const BANDWIDTH: f64 = 4.4e12;

/// One product of a layer: output rows, input columns, and how its input arrives.
struct Product {
    name: &'static str,
    rows: usize,
    cols: usize,
    norm: bool,
    swiglu: bool,
}

const PRODUCTS: [Product; 4] = [
    Product {
        name: "q/k/v",
        rows: 6144,
        cols: 4096,
        norm: true,
        swiglu: false,
    },
    Product {
        name: "o",
        rows: 4096,
        cols: 4096,
        norm: false,
        swiglu: false,
    },
    Product {
        name: "gate/up",
        rows: 12288,
        cols: 4096,
        norm: true,
        swiglu: true,
    },
    Product {
        name: "down",
        rows: 4096,
        cols: 12288,
        norm: false,
        swiglu: false,
    },
];

/// `copies` weights of `rows × cols` in `dtype`, each on its own device memory: 256 random
/// rows quantized once, their bytes tiled (quantizing 100M weights per copy would take minutes).
fn rotated_weights(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    copies: usize,
    dev: &Device,
) -> Vec<QTensor> {
    const TILE: usize = 256;
    let tile = Tensor::randn(0f32, 1f32, (TILE, cols), &Device::Cpu).expect("tile");
    let tile = QTensor::quantize(&tile, dtype).expect("quantize");
    let tile = tile.data().expect("tile bytes");
    let row_bytes = quant_row_bytes(dtype, cols);
    let bytes: Vec<u8> = (0..rows)
        .flat_map(|r| &tile[(r % TILE) * row_bytes..][..row_bytes])
        .copied()
        .collect();
    (0..copies)
        .map(|_| {
            let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&bytes), dev, dtype)
                .expect("upload");
            QTensor::new(storage, (rows, cols)).expect("weight")
        })
        .collect()
}

/// The µs per launch of `launch` over the rotated weights, replayed from a graph.
fn time_launches(
    dev: &Device,
    weights: &[QTensor],
    run: &dyn Fn(&QTensor) -> Result<Tensor>,
) -> Result<f64> {
    let stream = dev.as_cuda_device()?.cuda_stream();
    stream.synchronize().w()?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .w()?;
    let scope = super::capture_scope();
    // Each output is freed inside the capture, as the decode step's are: a graph whose
    // allocations outlive it cannot be launched again until they are freed.
    let queued: Result<()> =
        (0..LAUNCHES).try_for_each(|i| run(&weights[i % weights.len()]).map(drop));
    drop(scope);
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
    queued?;
    let graph = graph?.ok_or_else(|| candle_core::Error::msg("the capture produced no graph"))?;
    graph.launch().w()?; // warm-up: first replay uploads the graph
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(timing).w()?;
    for _ in 0..REPLAYS {
        graph.launch().w()?;
    }
    let end = stream.record_event(timing).w()?;
    let ms = start.elapsed_ms(&end).w()?;
    Ok(f64::from(ms) * 1e3 / (REPLAYS * LAUNCHES) as f64)
}

#[test]
#[ignore = "a measurement aid run by scripts/device/gpu-check.sh gemv-sweep"]
fn quant_gemv_launch_sweep() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let randn = |n: usize| {
        Tensor::randn(0f32, 1f32, (1, 1, n), &dev)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("row")
    };
    println!("format product rows×cols stages blocks/SM: µs per launch, share of 4.4 TB/s");
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        let format = quant_gemv_format(dtype).expect("a format the kernel reads");
        for p in &PRODUCTS {
            let w_rows = if p.swiglu { 2 * p.rows } else { p.rows };
            let weight_bytes = w_rows * quant_row_bytes(dtype, p.cols);
            let weights = rotated_weights(
                dtype,
                w_rows,
                p.cols,
                ROTATION_BYTES.div_ceil(weight_bytes).max(2),
                &dev,
            );
            let (x, delta) = (randn(p.cols), randn(p.cols));
            let norm_weight = randn(p.cols).flatten_all().expect("norm weight");
            let norm = p.norm.then_some(NormInput {
                delta: &delta,
                weight: &norm_weight,
                eps: 1e-6,
                write_sum: false,
            });
            let launch_with = |stages: usize, blocks_per_sm: usize| QuantGemv {
                format,
                row_bytes: quant_row_bytes(dtype, p.cols),
                shared_bytes: quant_gemv_shared_bytes(dtype, p.cols, stages),
                warps: super::QUANT_GEMV_WARPS,
                stages,
                swiglu: p.swiglu,
                blocks_per_sm,
            };
            let product = |launch: &QuantGemv, w: &QTensor| {
                cuda::quant_gemv_with(&x, w, launch, norm.as_ref()).map(|(y, _)| y)
            };
            let want = product(&launch_with(2, QUANT_GEMV_BLOCKS_PER_SM), &weights[0])
                .expect("default launch");
            // The SwiGLU kernels exist at two stages only.
            let stages: &[usize] = if p.swiglu { &[2] } else { &[2, 3, 4] };
            for &s in stages {
                if quant_gemv_shared_bytes(dtype, p.cols, s) > QUANT_GEMV_SHARED_MAX {
                    continue;
                }
                for blocks in 1..=QUANT_GEMV_BLOCKS_PER_SM {
                    let launch = launch_with(s, blocks);
                    let case = format!(
                        "{format} {} {}×{} stages {s} blocks/SM {blocks}",
                        p.name, p.rows, p.cols
                    );
                    let got = product(&launch, &weights[0]).expect("launch");
                    assert!(
                        same_bits(&got, &want),
                        "{case}: not the default launch's bits"
                    );
                    let us =
                        time_launches(&dev, &weights, &|w| product(&launch, w)).expect("timed");
                    let share = weight_bytes as f64 / (us * 1e-6) / BANDWIDTH;
                    println!("{case}: {us:.2} µs, {:.0}%", share * 100.0);
                }
            }
        }
    }
}
