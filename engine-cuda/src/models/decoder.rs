//! The decoder all supported architectures share: token embedding, a stack of pre-norm blocks
//! (RMSNorm → attention → residual, RMSNorm → feed-forward → residual), a final RMSNorm and the LM
//! head, with the KV cache inside the attention layers.
//!
//! The architectures differ only in what they plug in: the feed-forward block (a [`FeedForward`]:
//! dense SwiGLU, or a mixture of experts), whether attention normalises queries and keys per head,
//! and the rotary variant ([`DecoderOptions`]). Everything else, loading included, lives here once.

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use crate::fused::{self, DevicePosition};
use crate::layers::{
    Attention, KvCache, LayerInput, Linear, Mlp, PendingNorm, RmsNorm, Rope, RopeParameters,
    RopeScaling, RopeStyle, causal_mask, last_rows,
};
use crate::models::{CausalLm, Embedding};
use crate::weights::{GgufFile, Weights};

/// The hyper-parameters every architecture has, under their Hugging Face `config.json` names.
/// Each architecture's `Config` flattens this in and adds its own fields.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    pub rope_parameters: Option<RopeParameters>,
}

impl DecoderConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The shared hyper-parameters from GGUF metadata under `<arch>.*` (llama.cpp's
    /// `general.architecture` value). GGUF has no rope-scaling config: llama.cpp bakes scaling
    /// into `rope_freqs.weight`, which the architecture passes as
    /// [`DecoderOptions::rope_freq_factors`].
    pub fn from_gguf(g: &GgufFile, arch: &str) -> Result<Self> {
        let k = |s: &str| format!("{arch}.{s}");
        Ok(Self {
            vocab_size: g.tensor_dims("token_embd.weight").map_or(0, |d| d[0]),
            hidden_size: g.meta_usize(&k("embedding_length"))?,
            num_hidden_layers: g.meta_usize(&k("block_count"))?,
            num_attention_heads: g.meta_usize(&k("attention.head_count"))?,
            num_key_value_heads: g.meta_usize(&k("attention.head_count_kv"))?,
            head_dim: g.meta_usize(&k("attention.key_length")).ok(),
            rms_norm_eps: g.meta_f64(&k("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: g.meta_usize(&k("context_length"))?,
            // llama.cpp's converter drops `output.weight` when the head is tied.
            tie_word_embeddings: !g.has_tensor("output.weight"),
            rope_theta: Some(g.meta_f64(&k("rope.freq_base"))?),
            rope_scaling: None,
            rope_parameters: None,
        })
    }

    /// Rotary tables for this config: the scaling from the Hugging Face parameters, unless
    /// `freq_factors` (llama.cpp's precomputed divisors) replace it.
    fn rope(
        &self,
        style: RopeStyle,
        freq_factors: Option<&[f32]>,
        device: &candle_core::Device,
    ) -> Result<Rope> {
        // Parsed even when overridden, so an unsupported `rope_type` is always refused.
        let (theta, mut scaling) = RopeScaling::from_hf(
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
        )
        .map_err(candle_core::Error::msg)?;
        if let Some(f) = freq_factors {
            scaling = RopeScaling::FreqFactors(f.to_vec());
        }
        Rope::new(
            self.head_dim(),
            theta,
            &scaling,
            style,
            self.max_position_embeddings,
            device,
        )
    }
}

/// What an architecture chooses about attention and rotary embeddings.
#[derive(Debug, Clone, Copy)]
pub struct DecoderOptions<'a> {
    /// Per-head RMSNorm on queries and keys before the rotary embedding
    /// (`self_attn.{q,k}_norm`, Qwen3).
    pub qk_norm: bool,
    pub rope_style: RopeStyle,
    /// Replaces the config's rope scaling (llama.cpp stores Llama 3 scaling this way).
    pub rope_freq_factors: Option<&'a [f32]>,
}

/// The position-wise block after attention in each layer.
pub trait FeedForward: Send {
    /// `x`: `(1, len, hidden)` → same shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// [`FeedForward::forward`] over a layer input that may still be pending; returns the new
    /// residual too when it was. By default the input is formed first; a block whose first
    /// products can form it themselves overrides this.
    fn forward_input(&self, input: &LayerInput<'_>) -> Result<(Tensor, Option<Tensor>)> {
        let (x, residual) = input.materialize()?;
        Ok((self.forward(&x)?, residual))
    }
    fn size_in_bytes(&self) -> usize;
    /// Whether `forward` runs on the device alone (no host round trip, e.g. a router's choice
    /// read back), so that a decode step can be captured into a CUDA graph.
    fn device_only(&self) -> bool {
        true
    }
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Mlp::forward(self, x)
    }

    fn forward_input(&self, input: &LayerInput<'_>) -> Result<(Tensor, Option<Tensor>)> {
        Mlp::forward_input(self, input)
    }

    fn size_in_bytes(&self) -> usize {
        Mlp::size_in_bytes(self)
    }
}

/// The dense SwiGLU MLP `<prefix>.{gate,up,down}_proj` of width `intermediate`.
pub fn load_mlp(vb: &Weights, prefix: &str, hidden: usize, intermediate: usize) -> Result<Mlp> {
    Ok(Mlp {
        gate_up: vb.projections(
            &[
                (&format!("{prefix}.gate_proj"), intermediate),
                (&format!("{prefix}.up_proj"), intermediate),
            ],
            hidden,
        )?,
        down_proj: vb.linear(&format!("{prefix}.down_proj"), hidden, intermediate)?,
    })
}

struct Layer<F> {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    ffn: F,
}

impl<F: FeedForward> Layer<F> {
    fn size_in_bytes(&self) -> usize {
        self.input_norm.size_in_bytes()
            + self.attn.size_in_bytes()
            + self.post_norm.size_in_bytes()
            + self.ffn.size_in_bytes()
    }
}

/// A decoder-only model with its KV cache; `F` is the architecture's feed-forward block.
pub struct Decoder<F> {
    embed: Embedding,
    layers: Vec<Layer<F>>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    vocab_size: usize,
    weight_bytes: usize,
}

impl<F: FeedForward> Decoder<F> {
    /// Loads the shared parts from the checkpoint's (Hugging Face-named) tensors and asks
    /// `load_ffn(layer, prefix)` for each layer's feed-forward block, where `prefix` is
    /// `model.layers.<layer>.mlp`.
    pub fn load(
        cfg: &DecoderConfig,
        opts: &DecoderOptions<'_>,
        vb: &Weights,
        mut load_ffn: impl FnMut(usize, &str) -> Result<F>,
    ) -> Result<Self> {
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim(), cfg.rms_norm_eps);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}"
            );
        }
        let rope = cfg
            .rope(opts.rope_style, opts.rope_freq_factors, &vb.device)?
            .in_dtype(vb.dtype)?;
        let embed = Embedding::load(vb, "model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qk_norm = |which: &str| -> Result<Option<RmsNorm>> {
                opts.qk_norm
                    .then(|| vb.rms_norm(&format!("{p}.self_attn.{which}_norm.weight"), hd, eps))
                    .transpose()
            };
            let attn = Attention {
                qkv: vb.projections(
                    &[
                        (&format!("{p}.self_attn.q_proj"), nh * hd),
                        (&format!("{p}.self_attn.k_proj"), nkv * hd),
                        (&format!("{p}.self_attn.v_proj"), nkv * hd),
                    ],
                    h,
                )?,
                o_proj: vb.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd)?,
                q_norm: qk_norm("q")?,
                k_norm: qk_norm("k")?,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                cache: KvCache::default(),
            };
            layers.push(Layer {
                input_norm: vb.rms_norm(&format!("{p}.input_layernorm.weight"), h, eps)?,
                attn,
                post_norm: vb.rms_norm(&format!("{p}.post_attention_layernorm.weight"), h, eps)?,
                ffn: load_ffn(i, &format!("{p}.mlp"))?,
            });
        }
        let norm = vb.rms_norm("model.norm.weight", h, eps)?;
        let lm_head = if !cfg.tie_word_embeddings || vb.contains("lm_head.weight") {
            vb.linear("lm_head", cfg.vocab_size, h)?
        } else {
            // Tied: the embedding matrix doubles as the output projection (in GGUF, the quantized
            // `token_embd` is used for the product, as llama.cpp does).
            vb.linear("model.embed_tokens", cfg.vocab_size, h)?
        };
        let weight_bytes = embed.size_in_bytes()
            + norm.size_in_bytes()
            + lm_head.size_in_bytes()
            + layers.iter().map(Layer::size_in_bytes).sum::<usize>();
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            rope,
            vocab_size: cfg.vocab_size,
            weight_bytes,
        })
    }

    /// The final-normed hidden states of `tokens`, appended to the KV cache.
    fn hidden(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let x = self.embed.forward(tokens)?;
        self.hidden_of(x, None)
    }

    /// The final-normed hidden states of the embedded tokens `x` `(1, len, hidden)`, appended
    /// to the KV cache; `at` as for [`Attention::forward`].
    fn hidden_of(&mut self, mut x: Tensor, at: Option<&DevicePosition>) -> Result<Tensor> {
        let offset = self.cache_len();
        let len = x.dim(1)?;
        // A single query sees every cached key, so it needs no mask; on a GPU the softmax
        // kernel masks by position.
        let mask = if len > 1 && !fused::applies(&x) {
            Some(causal_mask(len, offset, x.dtype(), x.device())?)
        } else {
            None
        };
        // Each residual add goes with the norm that follows it (the post-attention norm, the
        // next layer's input norm, the final norm): one launch, or none where the next block's
        // first products form their input themselves (`LayerInput::Pending`).
        let Some(first) = self.layers.first() else {
            return self.norm.forward(&x);
        };
        let h = first.input_norm.forward(&x)?;
        // The previous block's output, still to be added to `x` and normed.
        let mut delta: Option<Tensor> = None;
        for l in &mut self.layers {
            let input = match &delta {
                None => LayerInput::Ready(&h),
                Some(d) => LayerInput::Pending(PendingNorm {
                    residual: &x,
                    delta: d,
                    norm: &l.input_norm,
                }),
            };
            let (attn, residual) = l.attn.forward(&input, &self.rope, mask.as_ref(), at)?;
            if let Some(r) = residual {
                x = r;
            }
            let (ffn, residual) = l.ffn.forward_input(&LayerInput::Pending(PendingNorm {
                residual: &x,
                delta: &attn,
                norm: &l.post_norm,
            }))?;
            x = residual.ok_or_else(|| {
                candle_core::Error::msg("a pending feed-forward input returns the residual")
            })?;
            delta = Some(ffn);
        }
        match delta {
            Some(d) => fused::add_rms_norm(&x, &d, &self.norm).map(|(_, h)| h),
            None => Ok(h),
        }
    }
}

impl<F: FeedForward> CausalLm for Decoder<F> {
    fn forward(&mut self, tokens: &[u32], all_rows: bool) -> Result<Tensor> {
        let h = self.hidden(tokens)?;
        self.lm_head
            .forward(&last_rows(&h, all_rows)?)?
            .to_dtype(DType::F32)
    }

    fn extend(&mut self, tokens: &[u32]) -> Result<()> {
        self.hidden(tokens).map(drop)
    }

    fn forward_at(&mut self, ids: &Tensor, at: &DevicePosition) -> Result<Tensor> {
        if !self.layers.iter().all(|l| l.ffn.device_only()) {
            candle_core::bail!("this model's decode step reads back to the host");
        }
        let x = self.embed.forward_ids(ids)?;
        let h = self.hidden_of(x, Some(at))?;
        self.lm_head.forward(&h.squeeze(0)?)?.to_dtype(DType::F32)
    }

    fn reserve_positions(&mut self, positions: usize) -> Result<()> {
        let (cos, _) = self.rope.tables();
        let (dtype, device) = (cos.dtype(), cos.device().clone());
        for l in &mut self.layers {
            l.attn.reserve_positions(positions, dtype, &device)?;
        }
        Ok(())
    }

    fn advance(&mut self, n: usize) {
        for l in &mut self.layers {
            l.attn.cache.commit(n);
        }
    }

    fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.attn.cache.truncate(len);
        }
    }

    fn plan(&mut self, positions: usize) {
        for l in &mut self.layers {
            l.attn.cache.plan(positions);
        }
    }

    fn cache_len(&self) -> usize {
        // Every layer caches the same positions.
        self.layers.first().map_or(0, |l| l.attn.cache.len())
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn cache_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.attn.cache.size_in_bytes())
            .sum()
    }
}
