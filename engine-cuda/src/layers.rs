//! Building blocks shared by the architectures in `models/`: linear layers over dense or quantized
//! weights, RMSNorm, rotary embeddings (incl. Llama 3 scaling), a truncatable KV cache and
//! grouped-query attention over it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use serde::Deserialize;

/// A linear layer `y = x Wᵀ (+ b)`. The weight is a candle [`QMatMul`]: dense weights (from
/// safetensors, or F32/F16/BF16 GGUF tensors) use its `Tensor` variant, quantized GGUF blocks its
/// `QTensor` variant (which, like llama.cpp, quantizes the activations for the dot products). One
/// type for both lets the same model code run every checkpoint format.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps a weight of shape `(out, in)` and an optional bias of shape `(out,)`.
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Applies the layer to `x` of shape `(…, in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // One token: a GEMV kernel streams the weight at close to the memory bandwidth.
            QMatMul::Tensor(w) if crate::fused::gemv_applies(x, w) => crate::fused::gemv(x, w)?,
            QMatMul::QTensor(w) if crate::fused::quant_gemv_applies(x, w) => {
                crate::fused::quant_gemv(x, w)?
            }
            // A decode step captured into a CUDA graph takes only the kernels above: candle's
            // quantized products keep a scratch buffer shared by every model on the device,
            // which may move under a captured graph, and its dense ones go to cuBLAS, untried
            // in a capture. The capture is refused and the step runs plainly.
            _ if crate::fused::capturing() => candle_core::bail!(
                "a {:?} product of {:?} is not served by the engine's own GEMV kernels",
                self.weight_dtype(),
                x.dims()
            ),
            // Many tokens on a GPU, when switched on: the weight dequantized once, then one
            // dense product (cuBLAS), instead of candle's integer MMQ kernel.
            QMatMul::QTensor(w) if dequantized_product_applies(x) => dequantized_product(x, w)?,
            // A 3-D activation times a 2-D weight: flatten so the CPU gemm sees one large matrix
            // product instead of a broadcast batch.
            QMatMul::Tensor(w) if x.rank() == 3 => {
                let (b, l, i) = x.dims3()?;
                let y = x.reshape((b * l, i))?.matmul(&w.t()?)?;
                y.reshape((b, l, ()))?
            }
            other => other.forward(x)?,
        };
        match &self.bias {
            // (A broadcast add copies its layout from the host: not in a capture.)
            Some(_) if crate::fused::capturing() => {
                candle_core::bail!("a product with a bias is not capturable")
            }
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Whether [`Linear::forward_pending`] runs as one kernel: a product served by the
    /// engine's GEMV kernels (no bias) over an input they can form.
    fn serves_pending(&self, p: &PendingNorm<'_>) -> bool {
        match &self.weight {
            _ if self.bias.is_some() => false,
            QMatMul::QTensor(w) => crate::fused::quant_gemv_norm_applies(p, w),
            QMatMul::Tensor(w) => crate::fused::gemv_norm_applies(p, w),
            QMatMul::TensorF16(_) => false,
        }
    }

    /// The layer over `norm(residual + delta)` formed in the product's own launch, and the new
    /// residual when `write_sum`. Only when [`Linear::serves_pending`] holds.
    fn forward_pending(
        &self,
        p: &PendingNorm<'_>,
        write_sum: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match &self.weight {
            QMatMul::QTensor(w) => crate::fused::quant_gemv_norm(p, w, write_sum),
            QMatMul::Tensor(w) => crate::fused::gemv_norm(p, w, false, write_sum),
            QMatMul::TensorF16(_) => candle_core::bail!("no product forms its input here"),
        }
    }

    /// `silu(gate) · up` of a stacked `[gate; up]` weight over `input` in the product's own
    /// launch (and the new residual when the input was pending), when a kernel serves it;
    /// `None` otherwise.
    fn forward_swiglu(&self, input: &LayerInput<'_>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        // The residual stands in for the pending input: same shape, dtype and device.
        let probe = match input {
            LayerInput::Ready(x) => *x,
            LayerInput::Pending(p) => p.residual,
        };
        // The kernel over a ready input (`None`) or, forming it in its prologue, a pending one.
        type Gated<'k> =
            Box<dyn Fn(&Tensor, Option<&PendingNorm<'_>>) -> Result<(Tensor, Option<Tensor>)> + 'k>;
        let kernel: Gated<'_> = match &self.weight {
            QMatMul::Tensor(w) if crate::fused::gemv_swiglu_applies(probe, w) => {
                Box::new(move |x, p| match p {
                    Some(p) => crate::fused::gemv_norm(p, w, true, true),
                    None => Ok((crate::fused::gemv_swiglu(x, w)?, None)),
                })
            }
            QMatMul::QTensor(w) if crate::fused::quant_gemv_swiglu_applies(probe, w) => {
                Box::new(move |x, p| crate::fused::quant_gemv_swiglu(x, p, w))
            }
            _ => return Ok(None),
        };
        match input {
            LayerInput::Pending(p) if self.serves_pending(p) => {
                kernel(p.residual, Some(p)).map(Some)
            }
            _ => {
                let (x, residual) = input.materialize()?;
                let (y, _) = kernel(&x, None)?;
                Ok(Some((y, residual)))
            }
        }
    }

    /// The weight's storage type, for messages.
    fn weight_dtype(&self) -> String {
        match &self.weight {
            QMatMul::QTensor(q) => format!("{:?}", q.dtype()),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => format!("{:?}", t.dtype()),
        }
    }

    /// Rows of the weight (`out`).
    pub fn out_features(&self) -> usize {
        match &self.weight {
            QMatMul::QTensor(q) => q.shape().dims()[0],
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
        }
    }

    /// Size of the weight (and bias) in bytes, for memory accounting.
    pub fn size_in_bytes(&self) -> usize {
        let w = match &self.weight {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => tensor_bytes(t),
        };
        w + self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

/// Tokens from which a block-quantized product dequantizes its weight ([`dequantized_product`])
/// unless `HELEXA_ENGINE_DEQUANT_TOKENS` says otherwise. Measured on the H200 (Qwen3-8B
/// shapes, docs/benchmarks.md): over 2048 tokens the dense product is twice as fast as candle's
/// MMQ kernel (Q8_0 10.2k → 19.5k tok/s, Q4_K_M 9.0k → 19.5k), over 512 it is 9% slower for
/// Q8_0 and 6% faster for Q4_K_M; a line through those puts Q8_0's break-even near 600 tokens.
pub const DEQUANT_TOKENS: usize = 1024;

/// Whether a block-quantized product over `x` takes the dequantize-then-cuBLAS path: `x` is
/// `(1, tokens, in)` in bf16/f16 on a CUDA device with at least `HELEXA_ENGINE_DEQUANT_TOKENS`
/// tokens (default [`DEQUANT_TOKENS`]; 0: never). The weight's dense copy (2 bytes a weight, for
/// the length of one product) is the price; with enough tokens per product it buys the tensor
/// cores' bf16 rate over the integer MMQ kernel.
fn dequantized_product_applies(x: &Tensor) -> bool {
    static MIN_TOKENS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let min_tokens = *MIN_TOKENS.get_or_init(|| {
        std::env::var("HELEXA_ENGINE_DEQUANT_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEQUANT_TOKENS)
    });
    min_tokens > 0
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.dims3().is_ok_and(|(b, l, _)| b * l >= min_tokens)
}

/// `x · wᵀ` for `x` `(b, l, in)` through a dense copy of `w` in `x`'s dtype.
fn dequantized_product(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    let dense = w.dequantize_f16(x.device())?.to_dtype(x.dtype())?;
    let (b, l, i) = x.dims3()?;
    let y = x.reshape((b * l, i))?.matmul(&dense.t()?)?;
    y.reshape((b, l, ()))
}

/// Whether projections of the same input are stacked into one matrix product
/// (`HELEXA_ENGINE_FUSE=0` turns it off, to measure its effect or rule it out).
pub fn fusion_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::fused::switch(&ON, "HELEXA_ENGINE_FUSE")
}

/// Whether GGUF stores `dtype` in quantization blocks (rather than as plain floats).
pub fn is_block_quantized(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Projections of one input (attention's q/k/v, the MLP's gate/up). At batch 1 each matrix
/// product is a bandwidth-bound GEMV plus a kernel launch or two of fixed cost, so stacking
/// the weights into one product saves the launches and lets one larger GEMV run closer to the
/// memory bandwidth. Weights stack when they are all dense, or all quantized with the same
/// block type. llama.cpp's Q4_K_M mixes Q4_K and Q6_K (half the layers' `v_proj` is Q6_K):
/// there the consecutive parts that share a block type stack ([`Projections::Runs`]).
#[derive(Debug, Clone)]
pub enum Projections {
    /// One product over the stacked weights; its output is split at these widths. `views`
    /// (dense weights only) are the parts as row ranges of the stacked weight, sharing its
    /// memory: with many tokens (prefill) separate products over them beat one product whose
    /// split outputs are strided (measured on an H200: 16% slower prefill at 512 tokens).
    Fused {
        linear: Linear,
        widths: Vec<usize>,
        views: Vec<Linear>,
    },
    Separate(Vec<Linear>),
    /// Consecutive groups of the parts, in order, each `Fused` or a `Separate` single: q and k
    /// stacked beside a v of another block type is two products instead of three.
    Runs(Vec<Projections>),
}

impl Projections {
    /// Stacks `parts` (each `(out_i, in)`) when possible and enabled.
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        if !fusion_enabled() || parts.len() < 2 || parts.iter().any(|p| p.bias.is_some()) {
            return Ok(Self::Separate(parts));
        }
        let widths: Vec<usize> = parts.iter().map(Linear::out_features).collect();
        let mut views = Vec::new();
        let weight = match parts.first().map(|p| &p.weight) {
            Some(QMatMul::Tensor(_)) => {
                let dense: Option<Vec<&Tensor>> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        QMatMul::Tensor(w) => Some(w),
                        _ => None,
                    })
                    .collect();
                let Some(ws) = dense else {
                    return Ok(Self::Separate(parts));
                };
                let stacked = Tensor::cat(&ws, 0)?;
                let mut start = 0;
                for &w in &widths {
                    let view = stacked.narrow(0, start, w)?;
                    views.push(Linear::new(QMatMul::Tensor(view), None));
                    start += w;
                }
                QMatMul::Tensor(stacked)
            }
            Some(QMatMul::QTensor(first)) => {
                let device = first.device();
                let quantized: Option<Vec<(&QTensor, usize)>> = parts
                    .iter()
                    .zip(&widths)
                    .map(|(p, &w)| match &p.weight {
                        QMatMul::QTensor(q) => Some((q.as_ref(), w)),
                        _ => None,
                    })
                    .collect();
                let stacked = match quantized {
                    Some(q) => Self::stack_quantized(&q, &device)?,
                    None => None,
                };
                return Ok(stacked.unwrap_or(Self::Separate(parts)));
            }
            _ => return Ok(Self::Separate(parts)),
        };
        Ok(Self::Fused {
            linear: Linear::new(weight, None),
            widths,
            views,
        })
    }

    /// `parts` (each a quantized `(out_i, in)` weight and its `out_i`) stacked into one product
    /// on `device`, when enabled and they share one block type; `None` otherwise.
    pub fn stack_quantized(parts: &[(&QTensor, usize)], device: &Device) -> Result<Option<Self>> {
        let Some((first, _)) = parts.first() else {
            return Ok(None);
        };
        let (dtype, inp) = (first.dtype(), first.shape().dims()[1]);
        let stackable = fusion_enabled()
            && parts.len() >= 2
            && is_block_quantized(dtype)
            && parts
                .iter()
                .all(|(q, _)| q.dtype() == dtype && q.shape().dims()[1] == inp);
        if !stackable {
            return Ok(None);
        }
        // Blocks never straddle rows, so stacking rows is stacking bytes.
        let mut bytes = Vec::new();
        for (q, _) in parts {
            bytes.extend_from_slice(&q.data()?);
        }
        let widths: Vec<usize> = parts.iter().map(|&(_, w)| w).collect();
        let rows = widths.iter().sum();
        let stacked = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &bytes,
            vec![rows, inp],
            device,
        )?;
        Ok(Some(Self::fused_quantized(stacked, widths)))
    }

    /// Projections already stacked into one block-quantized weight of `Σ widths` rows (by
    /// [`Projections::stack_quantized`], or read stacked from a GGUF file).
    pub fn fused_quantized(stacked: QTensor, widths: Vec<usize>) -> Self {
        Self::Fused {
            linear: Linear::new(QMatMul::QTensor(std::sync::Arc::new(stacked)), None),
            widths,
            views: Vec::new(),
        }
    }

    /// Each projection of `x` (`(…, in)` → `(…, out_i)`), in the order given to `new`. Fused
    /// outputs are views: at one token they are contiguous, so later reshapes copy nothing; over
    /// several tokens their rows are strided, which the fused kernels read as they are, while
    /// the composed ops would copy them, so off the fused path each dense part is its own
    /// product there.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let tokens = x.elem_count() / x.dim(D::Minus1)?.max(1);
        self.forward_with(tokens > 1 && !crate::fused::applies(x), &mut |l| {
            l.forward(x)
        })
    }

    /// Each projection of the layer input `input`, and the new residual when the input was
    /// pending. At one token, when every product here can form the input itself, it is never
    /// materialised: each product's kernel adds and normalises in its prologue, and the first
    /// stores the residual. Otherwise it is formed first ([`LayerInput::materialize`]).
    pub fn forward_input(&self, input: &LayerInput<'_>) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let LayerInput::Pending(p) = input else {
            let (x, _) = input.materialize()?;
            return Ok((self.forward(&x)?, None));
        };
        if !self.all_products(&|l| l.serves_pending(p)) {
            let (x, residual) = input.materialize()?;
            return Ok((self.forward(&x)?, residual));
        }
        let mut residual = None;
        let outputs = self.forward_with(false, &mut |l| {
            let (y, sum) = l.forward_pending(p, residual.is_none())?;
            residual = residual.take().or(sum);
            Ok(y)
        })?;
        Ok((outputs, residual))
    }

    /// `silu(gate) · up` in the gate/up product's own launch (and the new residual when the
    /// input was pending), when this is one stacked product of two equal halves and a kernel
    /// serves it (on unless `HELEXA_ENGINE_GATE_IN_PRODUCT=0`); `None` otherwise.
    pub fn forward_swiglu(
        &self,
        input: &LayerInput<'_>,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        match self {
            Self::Fused { linear, widths, .. }
                if widths.len() == 2
                    && widths[0] == widths[1]
                    && crate::fused::gate_in_product_enabled() =>
            {
                linear.forward_swiglu(input)
            }
            _ => Ok(None),
        }
    }

    /// Whether `f` holds for every product this runs (checked per decode step: no allocation).
    fn all_products(&self, f: &dyn Fn(&Linear) -> bool) -> bool {
        match self {
            Self::Separate(parts) => parts.iter().all(f),
            Self::Runs(runs) => runs.iter().all(|r| r.all_products(f)),
            Self::Fused { linear, .. } => f(linear),
        }
    }

    /// The projections, each product computed by `product`; `by_views`: dense stacked
    /// weights as separate products over their views (several tokens off the fused path).
    fn forward_with(
        &self,
        by_views: bool,
        product: &mut dyn FnMut(&Linear) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(&mut *product).collect(),
            Self::Runs(runs) => {
                let mut out = Vec::new();
                for run in runs {
                    out.extend(run.forward_with(by_views, product)?);
                }
                Ok(out)
            }
            Self::Fused { views, .. } if by_views && !views.is_empty() => {
                views.iter().map(&mut *product).collect()
            }
            Self::Fused { linear, widths, .. } => {
                let y = product(linear)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(D::Minus1, start, w);
                        start += w;
                        part
                    })
                    .collect()
            }
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Separate(parts) => parts.iter().map(Linear::size_in_bytes).sum(),
            Self::Runs(runs) => runs.iter().map(Self::size_in_bytes).sum(),
            Self::Fused { linear, .. } => linear.size_in_bytes(),
        }
    }
}

/// Bytes held by a dense tensor.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Root-mean-square normalisation over the last dimension, `x / rms(x) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "eps is a small f64 from config"
        )]
        let eps = eps as f32;
        Self { weight, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The fused kernel needs a contiguous last dimension.
        let x = x.contiguous()?;
        candle_nn::ops::rms_norm(&x, &self.weight, self.eps)
    }

    pub fn size_in_bytes(&self) -> usize {
        tensor_bytes(&self.weight)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }
}

/// A layer's input still to be formed: `norm(residual + delta)`, where `residual + delta` is
/// also the new residual stream. On the GPU at one token the product that takes it forms it in
/// its own launch ([`Projections::forward_input`]).
#[derive(Clone, Copy)]
pub struct PendingNorm<'a> {
    pub residual: &'a Tensor,
    pub delta: &'a Tensor,
    pub norm: &'a RmsNorm,
}

/// The input of a layer's attention or feed-forward block.
#[derive(Clone, Copy)]
pub enum LayerInput<'a> {
    /// Already normalised (the first layer's, from the embeddings).
    Ready(&'a Tensor),
    Pending(PendingNorm<'a>),
}

impl LayerInput<'_> {
    /// The input as a tensor, and the new residual when it was pending (the residual add and
    /// the norm in one launch on the GPU, [`crate::fused::add_rms_norm`]).
    pub fn materialize(&self) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Self::Ready(x) => Ok(((*x).clone(), None)),
            Self::Pending(p) => {
                let (sum, normed) = crate::fused::add_rms_norm(p.residual, p.delta, p.norm)?;
                Ok((normed, Some(sum)))
            }
        }
    }

    /// The input's shape (that of the residual when pending).
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Ready(x) => x.dims(),
            Self::Pending(p) => p.residual.dims(),
        }
    }
}

/// The rotary-embedding parameters of a Hugging Face config, in either spelling: transformers ≥ 5
/// writes `rope_parameters { rope_theta, rope_type, … }`, older configs `rope_theta` at the top
/// level plus an optional `rope_scaling` object.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// How a rotary embedding is scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1's frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors as stored by llama.cpp in the GGUF tensor `rope_freqs.weight`.
    FreqFactors(Vec<f32>),
}

impl RopeScaling {
    /// Interprets the config's rope parameters; unknown scaling types are refused rather than
    /// silently computed as plain RoPE.
    pub fn from_hf(
        top_theta: Option<f64>,
        scaling: Option<&RopeParameters>,
        parameters: Option<&RopeParameters>,
    ) -> std::result::Result<(f64, RopeScaling), String> {
        let p = parameters.or(scaling);
        let theta = p
            .and_then(|p| p.rope_theta)
            .or(top_theta)
            .unwrap_or(10_000.0);
        let kind = p.and_then(|p| p.rope_type.as_deref()).unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "llama3" => {
                let p = p.ok_or("llama3 rope scaling without parameters")?;
                #[allow(clippy::cast_possible_truncation, reason = "config factors are small")]
                RopeScaling::Llama3 {
                    factor: p.factor.ok_or("llama3 rope scaling needs `factor`")? as f32,
                    low_freq_factor: p.low_freq_factor.unwrap_or(1.0) as f32,
                    high_freq_factor: p.high_freq_factor.unwrap_or(4.0) as f32,
                    original_max_position_embeddings: p
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                }
            }
            other => return Err(format!("unsupported rope_type {other:?}")),
        };
        Ok((theta, scaling))
    }
}

/// Which dimensions a rotary embedding rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension `i` with `i + d/2` (Hugging Face's `rotate_half`, llama.cpp's NEOX mode).
    Half,
    /// Dimension `2i` with `2i + 1`. llama.cpp's converter permutes the Q/K rows of Llama
    /// checkpoints into this layout, so Llama GGUF files need it.
    Interleaved,
}

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    /// Builds the tables. Arithmetic is in f32 in the order transformers uses (inverse frequency
    /// from `theta ** (2i/d)`, angle = position × inverse frequency) so long prompts match the
    /// reference closely.
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        style: RopeStyle,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "rope maths is f32 in the reference"
        )]
        let base = theta as f32;
        let half = head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                #[allow(clippy::cast_precision_loss, reason = "small integers")]
                let e = (2 * i) as f32 / head_dim as f32;
                1.0 / base.powf(e)
            })
            .collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::FreqFactors(f) => {
                if f.len() != half {
                    candle_core::bail!("rope_freqs has {} entries, expected {half}", f.len());
                }
                for (x, f) in inv_freq.iter_mut().zip(f) {
                    *x /= f;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                #[allow(clippy::cast_precision_loss, reason = "context lengths are small")]
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for x in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *x;
                    if wavelen > low_wavelen {
                        *x /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *x = (1.0 - smooth) * *x / factor + smooth * *x;
                    }
                }
            }
        }
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            #[allow(clippy::cast_precision_loss, reason = "positions < 2^24")]
            let p = p as f32;
            for f in &inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
            style,
        })
    }

    /// The tables converted once to the activations' dtype (computed in f32 as above), so
    /// [`Rope::apply`] slices them instead of converting a slice per call: that was two cast
    /// kernels per rotation, 144 launches per decoded token on a 36-layer model.
    pub fn in_dtype(self, dtype: DType) -> Result<Self> {
        Ok(Self {
            cos: self.cos.to_dtype(dtype)?,
            sin: self.sin.to_dtype(dtype)?,
            style: self.style,
        })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The cos and sin tables, `(positions, head_dim / 2)` each.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// Rotates `x` of shape `(batch, heads, len, head_dim)` for positions `offset..offset+len`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let len = x.dim(2)?;
        let dt = x.dtype();
        // No-ops when the tables are already in `dt` (see `in_dtype`).
        let cos = self.cos.narrow(0, offset, len)?.to_dtype(dt)?;
        let sin = self.sin.narrow(0, offset, len)?.to_dtype(dt)?;
        let x = x.contiguous()?;
        match self.style {
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, &cos, &sin),
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin),
        }
    }
}

/// A per-layer key/value cache that grows in place and can be cut back to any prefix, which is
/// what prefix reuse between requests needs.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Buffers of shape `(1, kv_heads, capacity, head_dim)`; `None` until the first append.
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
    /// Positions the next growth makes room for at least ([`KvCache::plan`]).
    planned: usize,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Expects `positions` cached positions soon (a prompt about to be prefilled in chunks):
    /// the next growth makes room for them at once, instead of growing, and copying the cache,
    /// at every other chunk.
    pub fn plan(&mut self, positions: usize) {
        self.planned = positions;
    }

    /// Forgets everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes currently reserved by the buffers.
    pub fn size_in_bytes(&self) -> usize {
        self.buffers
            .as_ref()
            .map_or(0, |(k, v)| tensor_bytes(k) + tensor_bytes(v))
    }

    /// Makes room for `n` more positions of `kv_heads × head_dim` and returns the buffers,
    /// `(1, kv_heads, capacity, head_dim)` each.
    pub fn reserve(
        &mut self,
        n: usize,
        (kv_heads, head_dim): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<(&Tensor, &Tensor)> {
        let need = self.len + n;
        let capacity = self.buffers.as_ref().map_or(0, |(b, _)| b.dims()[2]);
        if need > capacity {
            // Grow geometrically so decoding costs amortised O(1) copies per token.
            let new_cap = need
                .max(self.planned)
                .max(capacity * 2)
                .max(256)
                .next_multiple_of(256);
            let shape = (1, kv_heads, new_cap, head_dim);
            let nk = Tensor::zeros(shape, dtype, device)?;
            let nv = Tensor::zeros(shape, dtype, device)?;
            if let Some((ok, ov)) = &self.buffers
                && self.len > 0
            {
                nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buffers = Some((nk, nv));
        }
        match &self.buffers {
            Some((k, v)) => Ok((k, v)),
            None => candle_core::bail!("kv cache buffers missing after allocation"),
        }
    }

    /// Counts `n` rows written into the buffers after the cached ones as cached.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// The cached sequence as views into the buffers (rows contiguous, heads `capacity` rows
    /// apart). Views, not copies: the matmuls accept the batch stride, and copying them out
    /// (`contiguous()`) cost a strided copy of the whole cache per layer per token, a quarter
    /// of decode time at 4096 tokens of context.
    pub fn views(&self) -> Result<(Tensor, Tensor)> {
        match &self.buffers {
            Some((k, v)) => Ok((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)),
            None => candle_core::bail!("kv cache is empty"),
        }
    }

    /// Appends `k`/`v` of shape `(1, kv_heads, n, head_dim)` and returns the whole cached
    /// sequence ([`KvCache::views`]).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, kv_heads, n, head_dim) = k.dims4()?;
        let at = self.len;
        let (bk, bv) = self.reserve(n, (kv_heads, head_dim), k.dtype(), k.device())?;
        bk.slice_set(&k.contiguous()?, 2, at)?;
        bv.slice_set(&v.contiguous()?, 2, at)?;
        self.commit(n);
        self.views()
    }
}

/// Additive causal mask for `len` queries at positions `offset..offset+len` over `offset+len`
/// keys: query `i` may see keys `0..=offset+i`.
pub fn causal_mask(len: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = offset + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, total), device)?.to_dtype(dtype)
}

/// Multi-head self-attention with grouped KV heads, optional per-head q/k RMSNorm (Qwen3), rotary
/// embeddings and a KV cache.
#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v projections, in that order.
    pub qkv: Projections,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub cache: KvCache,
}

impl Attention {
    /// Makes the cache hold `positions` positions without growing again (a step captured into
    /// a CUDA graph must find the buffers where they were at capture).
    pub fn reserve_positions(
        &mut self,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let more = positions.saturating_sub(self.cache.len());
        self.cache
            .reserve(more, (self.num_kv_heads, self.head_dim), dtype, device)
            .map(drop)
    }

    /// `input`: `(1, len, hidden)`; positions start at the cache length. `mask`: from
    /// [`causal_mask`], needed for several queries unless the fused kernels serve them (then, as
    /// for a single query, `None`). Returns the output and, for a pending input, the new
    /// residual stream.
    ///
    /// `at`: a decode step captured into a CUDA graph, whose position the kernels read on the
    /// device ([`crate::fused::DevicePosition`]); only the fused one-token path serves it.
    pub fn forward(
        &mut self,
        input: &LayerInput<'_>,
        rope: &Rope,
        mask: Option<&Tensor>,
        at: Option<&crate::fused::DevicePosition>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let &[b, len, _] = input.dims() else {
            candle_core::bail!(
                "attention takes (batch, len, hidden), got {:?}",
                input.dims()
            );
        };
        if b != 1 {
            candle_core::bail!("attention supports one sequence, got batch {b}");
        }
        let (qkv, residual) = self.qkv.forward_input(input)?;
        let [q, k, v]: [Tensor; 3] = qkv
            .try_into()
            .map_err(|_| candle_core::Error::msg("attention needs q, k and v projections"))?;
        Ok((self.attend(q, k, v, len, rope, mask, at)?, residual))
    }

    /// Attention of the `len` new positions' projections over the cache, then the output
    /// projection.
    #[allow(clippy::too_many_arguments, reason = "the parts of one forward step")]
    fn attend(
        &mut self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        len: usize,
        rope: &Rope,
        mask: Option<&Tensor>,
        at: Option<&crate::fused::DevicePosition>,
    ) -> Result<Tensor> {
        let offset = self.cache.len();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let groups = h / kvh;
        #[allow(clippy::cast_precision_loss, reason = "head_dim is small")]
        let scale = 1.0 / (hd as f64).sqrt();
        if at.is_some()
            && !(len == 1
                && crate::fused::applies(&q)
                && crate::fused::decode_attention_supported(hd, groups))
        {
            candle_core::bail!("a step with a device position needs the fused one-token path");
        }
        let (q, k, v) = if crate::fused::applies(&q) {
            // One kernel normalises and rotates q and k and writes k and v into the cache.
            let (k_cache, v_cache) = self.cache.reserve(len, (kvh, hd), q.dtype(), q.device())?;
            let inputs = crate::fused::QkvInputs {
                q: &q,
                k: &k,
                v: &v,
                q_norm: self.q_norm.as_ref(),
                k_norm: self.k_norm.as_ref(),
                rope,
                k_cache,
                v_cache,
                offset,
                heads: h,
                kv_heads: kvh,
                head_dim: hd,
                at,
            };
            let decoding = len == 1 && crate::fused::decode_attention_supported(hd, groups);
            if decoding && crate::fused::rope_in_attention_enabled() {
                // …or the attention kernel does, one launch fewer.
                #[allow(clippy::cast_possible_truncation, reason = "scale is ~0.1")]
                let out = crate::fused::decode_attention_roped(&inputs, scale as f32)?;
                self.cache.commit(1);
                return self.o_proj.forward(&out);
            }
            let q = crate::fused::qk_norm_rope_cache(&inputs)?;
            if decoding {
                #[allow(clippy::cast_possible_truncation, reason = "scale is ~0.1")]
                let out = crate::fused::decode_attention(
                    &q,
                    k_cache,
                    v_cache,
                    offset + 1,
                    scale as f32,
                    at,
                )?;
                self.cache.commit(1);
                return self.o_proj.forward(&out);
            }
            if crate::fused::flash_prefill_applies(hd, q.dtype()) {
                // The chunk's rows are in the caches: attention without materialised scores.
                #[allow(clippy::cast_possible_truncation, reason = "scale is ~0.1")]
                let out = crate::fused::flash_prefill(&q, k_cache, v_cache, offset, scale as f32)?;
                self.cache.commit(len);
                return self.o_proj.forward(&out);
            }
            self.cache.commit(len);
            let (k, v) = self.cache.views()?;
            (q, k, v)
        } else {
            let q = q.reshape((1, len, h, hd))?;
            let k = k.reshape((1, len, kvh, hd))?;
            let v = v.reshape((1, len, kvh, hd))?;
            let q = match &self.q_norm {
                Some(n) => n.forward(&q)?,
                None => q,
            };
            let k = match &self.k_norm {
                Some(n) => n.forward(&k)?,
                None => k,
            };
            let q = rope.apply(&q.transpose(1, 2)?, offset)?;
            let k = rope.apply(&k.transpose(1, 2)?, offset)?;
            let v = v.transpose(1, 2)?.contiguous()?;
            let (k, v) = self.cache.append(&k, &v)?;
            (q, k, v)
        };
        let total = k.dim(2)?;

        // Query heads h = kv·groups + g share KV head `kv`: fold the group into the query
        // length instead of repeating K/V in memory.
        let q = q.reshape((kvh, groups * len, hd))?;
        // `squeeze`, not `reshape`: it keeps the cache views' strides (a reshape would copy).
        let k = k.squeeze(0)?;
        let v = v.squeeze(0)?;
        let scores = q.matmul(&k.t()?)?;
        let att = if crate::fused::applies(&scores) && scores.is_contiguous() {
            // One kernel scales, masks by position and normalises.
            #[allow(clippy::cast_possible_truncation, reason = "scale is ~0.1")]
            crate::fused::causal_softmax(&scores, len, offset, scale as f32)?
        } else {
            let mut att = (scores * scale)?;
            if len > 1 && mask.is_none() {
                candle_core::bail!("attention over {len} queries needs the causal mask");
            }
            if let Some(mask) = mask {
                att = att
                    .reshape((kvh, groups, len, total))?
                    .broadcast_add(mask)?
                    .reshape((kvh, groups * len, total))?;
            }
            // candle's CPU softmax sums in the tensor's own dtype: over a few thousand bf16
            // scores that loses enough to flip confident greedy steps on long prompts
            // (transformers computes this softmax in f32). The CUDA kernel already
            // accumulates in f32, so the two extra casts are paid on the CPU only.
            if att.device().is_cpu() && att.dtype() != DType::F32 {
                candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?
                    .to_dtype(att.dtype())?
            } else {
                candle_nn::ops::softmax_last_dim(&att)?
            }
        };
        // (kvh, groups·len, hd) is (heads, len, hd): row block kv·groups + g is head kv·groups + g.
        let out = att.matmul(&v)?.reshape((h, len, hd))?;
        self.o_proj.forward(&crate::fused::heads_to_rows(&out)?)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.qkv.size_in_bytes()
            + self.o_proj.size_in_bytes()
            + self.q_norm.as_ref().map_or(0, RmsNorm::size_in_bytes)
            + self.k_norm.as_ref().map_or(0, RmsNorm::size_in_bytes)
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate and up projections, in that order.
    pub gate_up: Projections,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_input(&LayerInput::Ready(x)).map(|(y, _)| y)
    }

    /// As [`Mlp::forward`] over a layer input that may still be pending; returns the new
    /// residual too when it was.
    pub fn forward_input(&self, input: &LayerInput<'_>) -> Result<(Tensor, Option<Tensor>)> {
        if let Some((gated, residual)) = self.gate_up.forward_swiglu(input)? {
            return Ok((self.down_proj.forward(&gated)?, residual));
        }
        let (gate_up, residual) = self.gate_up.forward_input(input)?;
        let [gate, up]: [Tensor; 2] = gate_up
            .try_into()
            .map_err(|_| candle_core::Error::msg("the MLP needs gate and up projections"))?;
        let y = self
            .down_proj
            .forward(&crate::fused::silu_mul(&gate, &up)?)?;
        Ok((y, residual))
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate_up.size_in_bytes() + self.down_proj.size_in_bytes()
    }
}

/// The rows of the final hidden state `(1, len, hidden)` to project to logits: every position
/// (`all_rows`), else only the last; returned as `(rows, hidden)`.
pub fn last_rows(hidden: &Tensor, all_rows: bool) -> Result<Tensor> {
    let (_, len, _) = hidden.dims3()?;
    let h = hidden.squeeze(0)?;
    if all_rows {
        Ok(h)
    } else {
        h.narrow(0, len - 1, 1)
    }
}

/// Softmax over the last dimension computed in f32 (router probabilities).
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, D::Minus1)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
                #[allow(clippy::cast_precision_loss, reason = "test data")]
                let unit = (x >> 40) as f32 / (1u64 << 24) as f32;
                unit - 0.5
            })
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("tensor")
    }

    fn quantized(w: &Tensor, dtype: GgmlDType) -> Linear {
        let q = QTensor::quantize(w, dtype).expect("quantize");
        Linear::new(QMatMul::QTensor(std::sync::Arc::new(q)), None)
    }

    /// The dequantize-then-dense product computes what the quantized one does (which also
    /// rounds x to 8 bits, hence the tolerance).
    #[test]
    fn dequantized_product_matches_the_quantized_one() {
        check_dequantized_product(&Device::Cpu, DType::F32);
    }

    /// [`dequantized_product`] against candle's quantized product on `dev` for activations
    /// of `act`, for each block type the engine's GGUF files use most.
    pub(super) fn check_dequantized_product(dev: &Device, act: DType) {
        let x = random(16, 256, 7)
            .reshape((1, 16, 256))
            .and_then(|x| x.to_device(dev))
            .and_then(|x| x.to_dtype(act))
            .expect("x");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = random(64, 256, 9).to_device(dev).expect("w");
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let got = dequantized_product(&x, &q).expect("dense");
            let want = QMatMul::QTensor(std::sync::Arc::new(q))
                .forward(&x)
                .expect("quantized");
            assert_eq!(got.dims(), [1, 16, 64]);
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
            let (got, want) = (f32s(&got), f32s(&want));
            let scale = want
                .abs()
                .and_then(|t| t.max_all())
                .and_then(|t| t.to_scalar::<f32>());
            let diff = (&got - &want)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert!(
                diff <= 0.02 * scale.expect("scale"),
                "{dtype:?} {act:?}: {diff}"
            );
        }
    }

    /// A planned prompt is allocated once: its chunks append without growing (and copying)
    /// the cache, and what they wrote reads back in order.
    #[test]
    fn planned_cache_grows_once() {
        let mut cache = KvCache::default();
        cache.plan(1500);
        let mut rows = Vec::new();
        for chunk in 0..3 {
            let k = random(2 * 500, 4, chunk)
                .reshape((1, 2, 500, 4))
                .expect("k");
            let (all_k, _) = cache.append(&k, &k).expect("append");
            assert_eq!(all_k.dims(), [1, 2, 500 * (chunk as usize + 1), 4]);
            // Capacity (rounded up to 256 positions) covers the whole plan from the first chunk.
            assert_eq!(cache.size_in_bytes(), 2 * 2 * 1536 * 4 * 4, "chunk {chunk}");
            rows.push(k);
        }
        let (all_k, _) = cache.views().expect("views");
        let want = Tensor::cat(&rows, 2).expect("cat");
        let diff = (all_k - want)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0);
    }

    /// Fused and separate projections agree, for dense and block-quantized weights, and a
    /// mix of block types stays separate.
    #[test]
    fn stacked_projections_match_separate_ones() {
        let ws = [
            random(512, 256, 1),
            random(256, 256, 2),
            random(256, 256, 3),
        ];
        let cases: [(&str, Vec<Linear>, bool); 3] = [
            (
                "dense",
                ws.iter()
                    .map(|w| Linear::new(QMatMul::Tensor(w.clone()), None))
                    .collect(),
                true,
            ),
            (
                "q8_0",
                ws.iter().map(|w| quantized(w, GgmlDType::Q8_0)).collect(),
                true,
            ),
            (
                "q4_k + q6_k",
                vec![
                    quantized(&ws[0], GgmlDType::Q4K),
                    quantized(&ws[1], GgmlDType::Q4K),
                    quantized(&ws[2], GgmlDType::Q6K),
                ],
                false,
            ),
        ];
        for (name, parts, fuses) in cases {
            // One token takes the stacked product, three the views (dense) or it too.
            let xs = [1, 3].map(|n| random(n, 256, 7).reshape((1, n, 256)).expect("x"));
            let separate: Vec<Vec<Tensor>> = xs
                .iter()
                .map(|x| parts.iter().map(|p| p.forward(x).expect("fwd")).collect())
                .collect();
            let projections = Projections::new(parts).expect("projections");
            assert_eq!(
                matches!(projections, Projections::Fused { .. }),
                fuses,
                "{name}"
            );
            for (x, separate) in xs.iter().zip(&separate) {
                let outputs = projections.forward(x).expect("forward");
                assert_eq!(outputs.len(), 3, "{name}");
                for (a, b) in separate.iter().zip(&outputs) {
                    assert_eq!(a.dims(), b.dims(), "{name}");
                    let diff = (a - b)
                        .and_then(|d| d.abs())
                        .and_then(|d| d.max_all())
                        .and_then(|d| d.to_scalar::<f32>())
                        .expect("diff");
                    assert!(diff < 1e-4, "{name}: max difference {diff}");
                }
            }
        }
    }
}

/// The dequantize-then-cuBLAS product on the GPU (needs the `cuda` feature and a device;
/// `scripts/device/gpu-check.sh check`).
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use candle_core::{DType, Device};

    #[test]
    fn dequantized_product_matches_the_quantized_one() {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        super::tests::check_dequantized_product(&dev, DType::BF16);
    }
}
