//! What one quantized decode product costs inside a replayed CUDA graph, for each launch shape
//! the kernel allows (chunks in flight per warp, resident blocks per SM): the measurement that
//! chooses a launch per product instead of one for all (three and four stages lost when given
//! to every product, eighth session, yet the down product runs at 63% of the bandwidth).
//!
//! An ignored GPU test, run by `scripts/device/gpu-check.sh gemv-sweep`: for each quantized
//! product of the synthesized Qwen3-8B models' decode step ([`PRODUCTS`]: Q8_0 and Q4_K_M, with
//! the RMSNorm formed in the product and the SwiGLU gate folded in where the step does), it
//! captures a graph of back-to-back launches, replays it, and prints µs per launch and the
//! share of 4.4 TB/s, with the blocks per SM as launched (shared memory may hold fewer than
//! asked for). The weights rotate over copies that together exceed the L2 cache, so each launch
//! reads its bytes from memory as a decode step does. Every launch shape must give the
//! default's bits (the arithmetic does not depend on it): the one assertion, which makes it a
//! test as well. A ready x quantized in steps (`HELEXA_ENGINE_QUANT_X_AT_ONCE=0`) is timed
//! too where it differs.
//!
//! A second ignored test, [`dense_gemv_launch_sweep`], times the BF16 model's dense products
//! the same way: the plain kernel, its rows shared, and the staged kernel.

use candle_core::cuda_backend::WrapErr;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaStream, sys};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use super::cuda::{self, NormInput, QuantGemv};
use super::{
    QUANT_GEMV_BLOCKS_PER_SM, QUANT_GEMV_SHARED_MAX, QUANT_GEMV_WARPS, quant_gemv_format,
    quant_gemv_max_blocks, quant_gemv_shared_bytes, quant_gemv_stages, quant_row_bytes,
    weight_prefetch,
};
use crate::test_support::{cuda_context, rel_diff, same_bits};

/// Bytes the rotated weight copies span at least: twice the H200's 50 MB L2 and more.
const ROTATION_BYTES: usize = 256 << 20;
/// Launches per captured graph, and replays timed.
const LAUNCHES: usize = 64;
const REPLAYS: usize = 10;
/// The bandwidth the ratios are taken against (the ceiling).
const BANDWIDTH: f64 = 4.4e12;

/// One product of a decode step: its weight's block type, output rows, input columns, and how
/// its input arrives.
struct Product {
    name: &'static str,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    norm: bool,
    swiglu: bool,
}

impl Product {
    /// Rows of the weight as stored: a stacked gate/up weight has twice the product's.
    fn weight_rows(&self) -> usize {
        if self.swiglu {
            2 * self.rows
        } else {
            self.rows
        }
    }

    /// Bytes of the weight as stored.
    fn weight_bytes(&self) -> usize {
        self.weight_rows() * quant_row_bytes(self.dtype, self.cols)
    }
}

/// A random bf16 activation row `(1, 1, n)`.
fn random_row(n: usize, dev: &Device) -> Tensor {
    Tensor::randn(0f32, 1f32, (1, 1, n), dev)
        .and_then(|t| t.to_dtype(DType::BF16))
        .expect("row")
}

const fn product(
    name: &'static str,
    dtype: GgmlDType,
    (rows, cols): (usize, usize),
    norm: bool,
    swiglu: bool,
) -> Product {
    Product {
        name,
        dtype,
        rows,
        cols,
        norm,
        swiglu,
    }
}

/// The quantized products of the synthesized Qwen3-8B models' decode step (`helexa-node synth`,
/// `model-synth/src/format.rs`): Q8_0 throughout; Q4_K_M with q/k stacked in Q4_K, v and down
/// in Q6_K in the layers llama.cpp gives more bits (Q4_K in the others), Q6_K for the output.
const PRODUCTS: [Product; 12] = {
    use GgmlDType::{Q4K, Q6K, Q8_0};
    [
        product("q/k/v", Q8_0, (6144, 4096), true, false),
        product("o", Q8_0, (4096, 4096), false, false),
        product("gate/up", Q8_0, (12288, 4096), true, true),
        product("down", Q8_0, (4096, 12288), false, false),
        product("output", Q8_0, (151_936, 4096), false, false),
        product("q/k", Q4K, (5120, 4096), true, false),
        product("v", Q6K, (1024, 4096), true, false),
        product("o", Q4K, (4096, 4096), false, false),
        product("gate/up", Q4K, (12288, 4096), true, true),
        product("down", Q6K, (4096, 12288), false, false),
        product("down", Q4K, (4096, 12288), false, false),
        product("output", Q6K, (151_936, 4096), false, false),
    ]
};

/// `p`'s quantized GEMV launch at `stages` chunks in flight, at most `blocks_per_sm` resident
/// blocks of `warps` warps.
fn launch_for(p: &Product, stages: usize, blocks_per_sm: usize, warps: usize) -> QuantGemv {
    QuantGemv {
        format: quant_gemv_format(p.dtype).expect("a format the kernel reads"),
        row_bytes: quant_row_bytes(p.dtype, p.cols),
        shared_bytes: quant_gemv_shared_bytes(p.dtype, p.cols, stages, warps),
        warps,
        stages,
        swiglu: p.swiglu,
        blocks_per_sm,
        split_rows: false,
        x_at_once: true,
        prefetch: weight_prefetch(),
    }
}

/// Every launch shape of `p` the kernels have, once per grid as launched: (warps, stages,
/// resident blocks per SM). Shared memory may hold fewer blocks than asked for, and then larger
/// asks launch the same grid again.
fn launch_shapes(p: &Product, ctx: &CudaContext) -> Vec<(usize, usize, usize)> {
    let mut shapes = Vec::new();
    for (warps, stages) in [8, 16].into_iter().flat_map(|w| [2, 3, 4].map(|s| (w, s))) {
        if quant_gemv_shared_bytes(p.dtype, p.cols, stages, warps) > QUANT_GEMV_SHARED_MAX {
            continue;
        }
        for blocks in 1..=quant_gemv_max_blocks(warps) {
            let launch = launch_for(p, stages, blocks, warps);
            let resident = cuda::quant_gemv_blocks_per_sm(ctx, &launch).expect("blocks");
            if !shapes.contains(&(warps, stages, resident)) {
                shapes.push((warps, stages, resident));
            }
        }
    }
    shapes
}

/// A launch shape as the sweeps print it (` warps 16` for the wide build).
fn shape_name(warps: usize, stages: usize, blocks: usize) -> String {
    let wide = if warps == QUANT_GEMV_WARPS {
        String::new()
    } else {
        format!(" warps {warps}")
    };
    format!("stages {stages} blocks/SM {blocks}{wide}")
}

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

/// The µs per launch of `run` over the rotated weights, replayed from a graph.
fn time_launches<W>(
    dev: &Device,
    weights: &[W],
    run: &dyn Fn(&W) -> Result<Tensor>,
) -> Result<f64> {
    // Each driver call names its step in an error: the layer sweep reports a failing shape
    // and goes on, and the step is what tells a refused launch from a broken capture.
    let at = |step: &'static str| move |e: candle_core::Error| e.context(step);
    let stream = dev.as_cuda_device()?.cuda_stream();
    stream.synchronize().w().map_err(at("before the capture"))?;
    // An error a drop recorded since the last call (it cannot return one) would otherwise
    // surface at this capture's end as if this launch shape had failed.
    stream
        .context()
        .check_err()
        .w()
        .map_err(at("an error left from before this capture"))?;
    // As the decode step's capture: the outputs kept outside the graph (so launches overlap,
    // `HELEXA_ENGINE_GRAPH_KEEP`), or else freed inside it (a graph whose allocations outlive
    // it cannot be launched again until they are freed). One side stream for the thread's
    // captures, made before any (the driver refuses to create one during a capture), as the
    // step graph holds one for its life.
    let side = super::graph_keep_enabled()
        .then(|| side_stream(&stream))
        .transpose()?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .w()
        .map_err(at("beginning the capture"))?;
    let scope = super::capture_scope();
    let keeping = side
        .as_ref()
        .map(|side| super::start_keeping(super::KeptBuffers::new(side.clone())));
    let queued: Result<()> =
        (0..LAUNCHES).try_for_each(|i| run(&weights[i % weights.len()]).map(drop));
    let kept = keeping.and_then(super::Keeping::finish);
    drop(scope);
    // As the decode step's capture does: an error recorded during the capture is taken before
    // ending it (cudarc's `end_capture` would return it and leave the stream capturing).
    let pending = stream.context().check_err().w();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
    queued.map_err(at("queuing the launches"))?;
    pending.map_err(at("an error recorded during the capture"))?;
    let graph = graph
        .map_err(at("ending the capture"))?
        .ok_or_else(|| candle_core::Error::msg("the capture produced no graph"))?;
    if let Some(side) = &side {
        side.synchronize()
            .w()
            .map_err(at("the kept buffers' allocation"))?;
    }
    // Warm-up: the first replay uploads the graph.
    graph.launch().w().map_err(at("the first replay"))?;
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(timing).w()?;
    for _ in 0..REPLAYS {
        graph.launch().w().map_err(at("a timed replay"))?;
    }
    let end = stream.record_event(timing).w()?;
    let ms = start.elapsed_ms(&end).w().map_err(at("reading the time"))?;
    // The kept buffers go once no replay may still run, after the graph, as the step graph
    // lets them go.
    stream.synchronize().w().map_err(at("the replays"))?;
    // An error recorded while releasing (a drop cannot return one) cannot change this timing,
    // since the replays are done: it is printed with its step and taken here, so that the next
    // capture does not fail on it. (With the device opened with cudarc's event tracking on,
    // every release of the kept buffers failed so, and the next shape with it: thirteenth
    // session. The sweeps now open it as the engine does.)
    let released = |step: &str| {
        if let Err(e) = stream.context().check_err() {
            println!("  (releasing {step}: {e:?})");
        }
    };
    drop(graph);
    released("the graph");
    drop(kept);
    released("the kept buffers");
    Ok(f64::from(ms) * 1e3 / (REPLAYS * LAUNCHES) as f64)
}

thread_local! {
    static SIDE: std::cell::RefCell<Option<Arc<CudaStream>>> = const { std::cell::RefCell::new(None) };
}

/// This thread's side stream for kept buffers, made on first use.
fn side_stream(stream: &Arc<CudaStream>) -> Result<Arc<CudaStream>> {
    SIDE.with_borrow_mut(|side| match side {
        Some(s) => Ok(s.clone()),
        None => {
            let s = stream.context().new_stream().w()?;
            *side = Some(s.clone());
            Ok(s)
        }
    })
}

/// Prints one timed case: µs per launch and the share of [`BANDWIDTH`] its weight's bytes take.
fn report(case: &str, us: f64, weight_bytes: usize) {
    let share = weight_bytes as f64 / (us * 1e-6) / BANDWIDTH;
    println!("{case}: {us:.2} µs, {:.0}%", share * 100.0);
}

#[test]
#[ignore = "a measurement aid run by scripts/device/gpu-check.sh gemv-sweep"]
fn quant_gemv_launch_sweep() {
    let dev = crate::open_cuda(0).expect("a CUDA device");
    let randn = |n: usize| random_row(n, &dev);
    let ctx = cuda_context(&dev);
    println!("format product rows×cols stages blocks/SM: µs per launch, share of 4.4 TB/s");
    for p in &PRODUCTS {
        let format = quant_gemv_format(p.dtype).expect("a format the kernel reads");
        let (w_rows, weight_bytes) = (p.weight_rows(), p.weight_bytes());
        let copies = ROTATION_BYTES.div_ceil(weight_bytes).max(2);
        let weights = rotated_weights(p.dtype, w_rows, p.cols, copies, &dev);
        let (x, delta) = (randn(p.cols), randn(p.cols));
        let norm_weight = randn(p.cols).flatten_all().expect("norm weight");
        let norm = p.norm.then_some(NormInput {
            delta: &delta,
            weight: &norm_weight,
            eps: 1e-6,
            write_sum: false,
        });
        let launch_at = |stages, blocks_per_sm, warps| launch_for(p, stages, blocks_per_sm, warps);
        let launch_with = |stages, blocks| launch_at(stages, blocks, QUANT_GEMV_WARPS);
        let product = |launch: &QuantGemv, w: &QTensor| {
            cuda::quant_gemv_with(&x, w, launch, norm.as_ref()).map(|(y, _)| y)
        };
        let want = product(&launch_with(2, QUANT_GEMV_BLOCKS_PER_SM), &weights[0])
            .expect("default launch");
        let name = format!("{format} {} {}×{}", p.name, p.rows, p.cols);
        for (warps, stages, blocks) in launch_shapes(p, &ctx) {
            let launch = launch_at(stages, blocks, warps);
            let case = format!("{name} {}", shape_name(warps, stages, blocks));
            let got = product(&launch, &weights[0]).expect("launch");
            // A norm formed by 16 warps sums its squares in another order.
            if p.norm && warps != QUANT_GEMV_WARPS {
                let e = rel_diff(&got, &want);
                assert!(e < 1e-2, "{case}: {e} from the default launch");
            } else {
                assert!(
                    same_bits(&got, &want),
                    "{case}: not the default launch's bits"
                );
            }
            let us = time_launches(&dev, &weights, &|w| product(&launch, w)).expect("timed");
            report(&case, us, weight_bytes);
        }
        // A ready x quantized in steps, two at a time (HELEXA_ENGINE_QUANT_X_AT_ONCE=0), where
        // that is more than one round trip: the same bits.
        if !p.norm && p.cols > 2 * 2048 {
            let stepped = QuantGemv {
                x_at_once: false,
                ..launch_with(2, QUANT_GEMV_BLOCKS_PER_SM)
            };
            let got = product(&stepped, &weights[0]).expect("stepped launch");
            assert!(same_bits(&got, &want), "{name}: x in steps");
            let us = time_launches(&dev, &weights, &|w| product(&stepped, w)).expect("timed");
            report(&format!("{name} stages 2 x in steps"), us, weight_bytes);
        }
        // The weights requested only after the wait (HELEXA_ENGINE_GEMV_EARLY_CHUNKS=0), at the
        // default shape: the same bits. (Asked of L2 after the wait, …_L2_AFTER_WAIT, every
        // size lost in a whole step: twelfth session.)
        let late = QuantGemv {
            prefetch: cuda::WeightPrefetch {
                early_chunks: Some(0),
                l2_chunks: 0,
            },
            ..launch_with(2, QUANT_GEMV_BLOCKS_PER_SM)
        };
        let got = product(&late, &weights[0]).expect("late launch");
        assert!(same_bits(&got, &want), "{name}: weights after the wait");
        let us = time_launches(&dev, &weights, &|w| product(&late, w)).expect("timed");
        report(
            &format!("{name} stages 2 weights after the wait"),
            us,
            weight_bytes,
        );
        // Rows shared by two warps (HELEXA_ENGINE_QUANT_GEMV_SPLIT) where the launcher would
        // share them: the same sums in another order, so within a bf16 step, not the same bits.
        let split = QuantGemv {
            split_rows: true,
            ..launch_with(2, QUANT_GEMV_BLOCKS_PER_SM)
        };
        let resident = cuda::quant_gemv_blocks_per_sm(&ctx, &split).expect("blocks");
        let sms = cuda::sm_count(&ctx).expect("SMs");
        if cuda::uses_split_kernel(&split, p.rows, p.cols, true, resident * sms * split.warps) {
            let got = product(&split, &weights[0]).expect("split launch");
            let e = rel_diff(&got, &want);
            assert!(e < 1e-2, "{name} split: {e}");
            let us = time_launches(&dev, &weights, &|w| product(&split, w)).expect("timed");
            report(
                &format!("{name} stages 2 blocks/SM {resident} rows split"),
                us,
                weight_bytes,
            );
        }
    }
}

/// Q8_0's layer in the step's order, its products launched one after another as a decode
/// step launches them (q/k/v forming its norm, o, gate/up forming its norm with the SwiGLU
/// gate folded in, down), replayed from a graph as the step is (so with its launches
/// overlapping unless `HELEXA_ENGINE_GRAPH_KEEP=0`), with one product's launch shape varied at
/// a time and the others at the default: what a shape costs where its product follows another
/// and is followed, which the sweep above (one product launched again and again) does not see.
/// With overlap, the table the sweep above chose made the step slower (twelfth session). The
/// attention between q/k/v and o is left out. Prints µs per layer.
#[test]
#[ignore = "a measurement aid run by scripts/device/gpu-check.sh layer-sweep"]
fn quant_layer_launch_sweep() {
    let dev = crate::open_cuda(0).expect("a CUDA device");
    let randn = |n: usize| random_row(n, &dev);
    let ctx = cuda_context(&dev);
    let layer = &PRODUCTS[..4];
    let layer_bytes: usize = layer.iter().map(Product::weight_bytes).sum();
    let copies = ROTATION_BYTES.div_ceil(layer_bytes).max(2);
    let weights: Vec<Vec<QTensor>> = layer
        .iter()
        .map(|p| rotated_weights(p.dtype, p.weight_rows(), p.cols, copies, &dev))
        .collect();
    // Each product's x, and with a norm its delta and norm weight.
    let inputs: Vec<[Tensor; 3]> = layer
        .iter()
        .map(|p| {
            let w = randn(p.cols).flatten_all().expect("norm weight");
            [randn(p.cols), randn(p.cols), w]
        })
        .collect();
    let run_layer = |launches: &[QuantGemv], copy: &usize| -> Result<Tensor> {
        let mut last = None;
        for (k, p) in layer.iter().enumerate() {
            let [x, delta, weight] = &inputs[k];
            let norm = p.norm.then_some(NormInput {
                delta,
                weight,
                eps: 1e-6,
                write_sum: false,
            });
            let w = &weights[k][copy % copies];
            last = Some(cuda::quant_gemv_with(x, w, &launches[k], norm.as_ref())?.0);
        }
        last.ok_or_else(|| candle_core::Error::msg("an empty layer"))
    };
    let order: Vec<usize> = (0..copies).collect();
    let defaults = || -> Vec<QuantGemv> {
        layer
            .iter()
            .map(|p| {
                let stages = quant_gemv_stages(p.dtype, p.cols);
                launch_for(p, stages, QUANT_GEMV_BLOCKS_PER_SM, QUANT_GEMV_WARPS)
            })
            .collect()
    };
    let us = time_launches(&dev, &order, &|c| run_layer(&defaults(), c)).expect("timed");
    println!("q8_0 layer, every product at the default shape: {us:.2} µs");
    for (k, p) in layer.iter().enumerate() {
        for (warps, stages, blocks) in launch_shapes(p, &ctx) {
            let mut launches = defaults();
            launches[k] = launch_for(p, stages, blocks, warps);
            // A shape that fails is reported, and the sweep goes on to the next.
            let timed = time_launches(&dev, &order, &|c| run_layer(&launches, c));
            let shape = shape_name(warps, stages, blocks);
            match timed {
                Ok(us) => println!("q8_0 layer, {} at {shape}: {us:.2} µs", p.name),
                Err(e) => println!("q8_0 layer, {} at {shape}: failed: {e}", p.name),
            }
        }
    }
}

/// The dense (BF16) products of the synthesized Qwen3-8B's decode step: (name, rows, cols,
/// norm formed in the product, SwiGLU gate folded in).
const DENSE_PRODUCTS: [(&str, usize, usize, bool, bool); 5] = [
    ("q/k/v", 6144, 4096, true, false),
    ("o", 4096, 4096, false, false),
    ("gate/up", 12288, 4096, true, true),
    ("down", 4096, 12288, false, false),
    ("output", 151_936, 4096, false, false),
];

/// The dense GEMV's launch choices per BF16 product, timed as the quantized sweep times its
/// own: the plain kernel (`fused.cu`'s gemv), its rows shared by two warps
/// (`HELEXA_ENGINE_GEMV_SPLIT`, printed where the launcher shares them), and the staged kernel
/// (`HELEXA_ENGINE_GEMV_STAGED`). The staged kernel must give the plain kernel's bits, shared
/// rows stay within a bf16 step.
#[test]
#[ignore = "a measurement aid run by scripts/device/gpu-check.sh gemv-sweep"]
fn dense_gemv_launch_sweep() {
    use cuda::{DenseGemv, StagedDense};
    let dev = crate::open_cuda(0).expect("a CUDA device");
    let randn = |shape: &[usize]| {
        Tensor::randn(0f32, 1f32, shape, &dev)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("tensor")
    };
    println!("bf16 product rows×cols kernel: µs per launch, share of 4.4 TB/s");
    for (name, rows, cols, norm, swiglu) in DENSE_PRODUCTS {
        let w_rows = if swiglu { 2 * rows } else { rows };
        let weight_bytes = w_rows * cols * 2;
        let copies = ROTATION_BYTES.div_ceil(weight_bytes).max(2);
        let weights: Vec<Tensor> = (0..copies).map(|_| randn(&[w_rows, cols])).collect();
        let (x, delta) = (randn(&[1, 1, cols]), randn(&[1, 1, cols]));
        let norm_weight = randn(&[cols]);
        let norm = norm.then_some(NormInput {
            delta: &delta,
            weight: &norm_weight,
            eps: 1e-6,
            write_sum: false,
        });
        let product =
            |launch: DenseGemv, w: &Tensor| cuda::gemv_as(&x, w, swiglu, norm.as_ref(), launch);
        let plain = DenseGemv {
            share_rows: false,
            staged: StagedDense::Off,
        };
        let want = product(plain, &weights[0]).expect("plain launch").0;
        let shared = DenseGemv {
            share_rows: true,
            ..plain
        };
        let staged = DenseGemv {
            staged: StagedDense::All,
            ..plain
        };
        for (kernel, launch) in [("plain", plain), ("rows split", shared), ("staged", staged)] {
            let (got, _, split) = product(launch, &weights[0]).expect("launch");
            if launch.share_rows && !split {
                continue; // the launcher would not share these rows: the plain launch
            }
            let case = format!("bf16 {name} {rows}×{cols} {kernel}");
            if launch.staged == StagedDense::All {
                assert!(
                    same_bits(&got, &want),
                    "{case}: not the plain kernel's bits"
                );
            } else {
                let e = rel_diff(&got, &want);
                assert!(e < 1e-2, "{case}: {e} from the plain kernel");
            }
            let us = time_launches(&dev, &weights, &|w| product(launch, w).map(|(y, ..)| y))
                .expect("timed");
            report(&case, us, weight_bytes);
        }
    }
}
