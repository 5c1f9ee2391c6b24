//! Building blocks shared by the architectures in `models/`: linear layers over dense or quantized
//! weights, RMSNorm, rotary embeddings (incl. Llama 3 scaling), a truncatable KV cache and
//! grouped-query attention over it.

use candle_core::quantized::QMatMul;
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
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
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

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` of shape `(batch, heads, len, head_dim)` for positions `offset..offset+len`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let len = x.dim(2)?;
        let dt = x.dtype();
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
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// Appends `k`/`v` of shape `(1, kv_heads, n, head_dim)` and returns the whole cached
    /// sequence (contiguous).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let need = self.len + n;
        let capacity = self.buffers.as_ref().map_or(0, |(b, _)| b.dims()[2]);
        if need > capacity {
            // Grow geometrically so decoding costs amortised O(1) copies per token.
            let new_cap = need.max(capacity * 2).max(256).next_multiple_of(256);
            let (_, h, _, d) = k.dims4()?;
            let nk = Tensor::zeros((1, h, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((1, h, new_cap, d), v.dtype(), v.device())?;
            if let Some((ok, ov)) = &self.buffers
                && self.len > 0
            {
                nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buffers = Some((nk, nv));
        }
        let Some((bk, bv)) = &self.buffers else {
            candle_core::bail!("kv cache buffers missing after allocation");
        };
        bk.slice_set(&k.contiguous()?, 2, self.len)?;
        bv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((
            bk.narrow(2, 0, need)?.contiguous()?,
            bv.narrow(2, 0, need)?.contiguous()?,
        ))
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
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub cache: KvCache,
}

impl Attention {
    /// `x`: `(1, len, hidden)`; positions start at the cache length. `mask`: from
    /// [`causal_mask`], `None` for a single query.
    pub fn forward(&mut self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        if b != 1 {
            candle_core::bail!("attention supports one sequence, got batch {b}");
        }
        let offset = self.cache.len();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((1, len, h, hd))?;
        let k = self.k_proj.forward(x)?.reshape((1, len, kvh, hd))?;
        let v = self.v_proj.forward(x)?.reshape((1, len, kvh, hd))?;
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
        let total = k.dim(2)?;

        // Query heads h = kv·groups + g share KV head `kv`: fold the group into the query
        // length instead of repeating K/V in memory.
        let groups = h / kvh;
        let q = q.reshape((kvh, groups * len, hd))?;
        let k = k.reshape((kvh, total, hd))?;
        let v = v.reshape((kvh, total, hd))?;
        #[allow(clippy::cast_precision_loss, reason = "head_dim is small")]
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att
                .reshape((kvh, groups, len, total))?
                .broadcast_add(mask)?
                .reshape((kvh, groups * len, total))?;
        }
        // candle's CPU softmax sums in the tensor's own dtype: over a few thousand bf16 scores
        // that loses enough to flip confident greedy steps on long prompts (transformers
        // computes this softmax in f32). The CUDA kernel already accumulates in f32, so the
        // two extra casts (two launches per layer per token) are paid on the CPU only.
        let att = if att.device().is_cpu() && att.dtype() != DType::F32 {
            candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?.to_dtype(att.dtype())?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let out = att.matmul(&v)?; // (kvh, groups·len, hd)
        let out = out
            .reshape((1, h, len, hd))?
            .transpose(1, 2)?
            .reshape((1, len, h * hd))?;
        self.o_proj.forward(&out)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.q_proj.size_in_bytes()
            + self.k_proj.size_in_bytes()
            + self.v_proj.size_in_bytes()
            + self.o_proj.size_in_bytes()
            + self.q_norm.as_ref().map_or(0, RmsNorm::size_in_bytes)
            + self.k_norm.as_ref().map_or(0, RmsNorm::size_in_bytes)
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate_proj.size_in_bytes()
            + self.up_proj.size_in_bytes()
            + self.down_proj.size_in_bytes()
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
