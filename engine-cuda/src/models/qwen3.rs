//! Qwen3 dense (`Qwen3ForCausalLM`): Llama-shaped decoder with per-head RMSNorm on queries and
//! keys before the rotary embedding, and (in small checkpoints) an LM head tied to the embeddings.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::layers::{
    Attention, KvCache, Linear, Mlp, RmsNorm, Rope, RopeParameters, RopeScaling, RopeStyle,
    causal_mask, last_rows,
};
use crate::models::{CausalLm, Embedding};
use crate::weights::{GgufFile, Weights};

/// The fields of a Hugging Face `config.json` this architecture uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
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

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Hyper-parameters from GGUF metadata (`qwen3.*`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let a = "qwen3";
        let heads = g.meta_usize(&format!("{a}.attention.head_count"))?;
        let hidden = g.meta_usize(&format!("{a}.embedding_length"))?;
        Ok(Self {
            vocab_size: g.tensor_dims("token_embd.weight").map_or(0, |d| d[0]),
            hidden_size: hidden,
            intermediate_size: g.meta_usize(&format!("{a}.feed_forward_length"))?,
            num_hidden_layers: g.meta_usize(&format!("{a}.block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: g.meta_usize(&format!("{a}.attention.head_count_kv"))?,
            head_dim: g.meta_usize(&format!("{a}.attention.key_length")).ok(),
            rms_norm_eps: g.meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: g.meta_usize(&format!("{a}.context_length"))?,
            tie_word_embeddings: !g.has_tensor("output.weight"),
            rope_theta: Some(g.meta_f64(&format!("{a}.rope.freq_base"))?),
            rope_scaling: None,
            rope_parameters: None,
        })
    }
}

struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// A Qwen3 model with its KV cache.
pub struct Model {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    vocab_size: usize,
    weight_bytes: usize,
}

impl Model {
    pub fn new(cfg: &Config, vb: &Weights) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}"
            );
        }
        let (theta, scaling) = RopeScaling::from_hf(
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
            cfg.rope_parameters.as_ref(),
        )
        .map_err(candle_core::Error::msg)?;
        let rope = Rope::new(
            hd,
            theta,
            &scaling,
            RopeStyle::Half,
            cfg.max_position_embeddings,
            &vb.device,
        )?;
        let embed = Embedding::load(vb, "model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention {
                q_proj: vb.linear(&format!("{p}.self_attn.q_proj"), nh * hd, h)?,
                k_proj: vb.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h)?,
                v_proj: vb.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h)?,
                o_proj: vb.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd)?,
                q_norm: Some(vb.rms_norm(
                    &format!("{p}.self_attn.q_norm.weight"),
                    hd,
                    cfg.rms_norm_eps,
                )?),
                k_norm: Some(vb.rms_norm(
                    &format!("{p}.self_attn.k_norm.weight"),
                    hd,
                    cfg.rms_norm_eps,
                )?),
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                cache: KvCache::default(),
            };
            layers.push(Layer {
                input_norm: vb.rms_norm(
                    &format!("{p}.input_layernorm.weight"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                attn,
                post_norm: vb.rms_norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                mlp: Mlp {
                    gate_proj: vb.linear(
                        &format!("{p}.mlp.gate_proj"),
                        cfg.intermediate_size,
                        h,
                    )?,
                    up_proj: vb.linear(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h)?,
                    down_proj: vb.linear(
                        &format!("{p}.mlp.down_proj"),
                        h,
                        cfg.intermediate_size,
                    )?,
                },
            });
        }
        let norm = vb.rms_norm("model.norm.weight", h, cfg.rms_norm_eps)?;
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
            + layers
                .iter()
                .map(|l| {
                    l.input_norm.size_in_bytes()
                        + l.attn.size_in_bytes()
                        + l.post_norm.size_in_bytes()
                        + l.mlp.size_in_bytes()
                })
                .sum::<usize>();
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
}

impl CausalLm for Model {
    fn forward(&mut self, tokens: &[u32], all_rows: bool) -> Result<Tensor> {
        let offset = self.cache_len();
        let mut x = self.embed.forward(tokens)?;
        let mask = if tokens.len() > 1 {
            Some(causal_mask(tokens.len(), offset, x.dtype(), x.device())?)
        } else {
            None
        };
        for l in &mut self.layers {
            let r = x.clone();
            x = (l
                .attn
                .forward(&l.input_norm.forward(&x)?, &self.rope, mask.as_ref())?
                + r)?;
            let r = x.clone();
            x = (l.mlp.forward(&l.post_norm.forward(&x)?)? + r)?;
        }
        let x = self.norm.forward(&last_rows(&x, all_rows)?)?;
        self.lm_head.forward(&x)?.to_dtype(candle_core::DType::F32)
    }

    fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.attn.cache.truncate(len);
        }
    }

    fn cache_len(&self) -> usize {
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
