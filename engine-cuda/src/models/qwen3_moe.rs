//! Qwen3-MoE (`Qwen3MoeForCausalLM`): the Qwen3 decoder whose MLP is replaced (in sparse layers) by
//! a router choosing the top-k of N SwiGLU experts per token, weights optionally renormalised
//! over the chosen k (`norm_topk_prob`).

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use crate::layers::{
    Attention, KvCache, Linear, Mlp, RmsNorm, Rope, RopeParameters, RopeScaling, RopeStyle,
    causal_mask, last_rows, softmax_f32,
};
use crate::models::{CausalLm, Embedding};
use crate::weights::{GgufFile, Weights};

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// The fields of a Hugging Face `config.json` this architecture uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP in `mlp_only_layers`.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
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

    fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// Hyper-parameters from GGUF metadata (`qwen3moe.*`). llama.cpp always renormalises the
    /// top-k weights for this architecture unless `expert_weights_norm` says otherwise.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let a = "qwen3moe";
        let k = |s: &str| format!("{a}.{s}");
        Ok(Self {
            vocab_size: g.tensor_dims("token_embd.weight").map_or(0, |d| d[0]),
            hidden_size: g.meta_usize(&k("embedding_length"))?,
            intermediate_size: g.meta_usize(&k("feed_forward_length")).unwrap_or(0),
            moe_intermediate_size: g.meta_usize(&k("expert_feed_forward_length"))?,
            num_experts: g.meta_usize(&k("expert_count"))?,
            num_experts_per_tok: g.meta_usize(&k("expert_used_count"))?,
            norm_topk_prob: g
                .meta(&k("expert_weights_norm"))
                .and_then(|v| v.to_bool())
                .unwrap_or(true),
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
            num_hidden_layers: g.meta_usize(&k("block_count"))?,
            num_attention_heads: g.meta_usize(&k("attention.head_count"))?,
            num_key_value_heads: g.meta_usize(&k("attention.head_count_kv"))?,
            head_dim: g.meta_usize(&k("attention.key_length")).ok(),
            rms_norm_eps: g.meta_f64(&k("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: g.meta_usize(&k("context_length"))?,
            tie_word_embeddings: !g.has_tensor("output.weight"),
            rope_theta: Some(g.meta_f64(&k("rope.freq_base"))?),
            rope_scaling: None,
            rope_parameters: None,
        })
    }
}

/// Router plus experts.
struct SparseMoe {
    gate: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let xs = x.reshape((b * len, h))?;
        let probs: Vec<Vec<f32>> = softmax_f32(&self.gate.forward(&xs)?)?.to_vec2()?;
        // Per expert: the rows routed to it and their weights.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (t, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            // Highest probability first; ties keep the lower expert index (as torch.topk does
            // in practice on CPU).
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k.min(order.len())];
            let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                let w = if self.norm_topk_prob {
                    p[e] / sum
                } else {
                    p[e]
                };
                rows[e].push(u32::try_from(t).map_err(candle_core::Error::wrap)?);
                weights[e].push(w);
            }
        }
        let mut out = xs.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let n = rows[e].len();
            let idx = Tensor::from_slice(&rows[e], n, xs.device())?;
            let w = Tensor::from_slice(&weights[e], (n, 1), xs.device())?.to_dtype(xs.dtype())?;
            let y = expert
                .forward(&xs.index_select(&idx, 0)?)?
                .broadcast_mul(&w)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        out.reshape((b, len, h))
    }

    fn size_in_bytes(&self) -> usize {
        self.gate.size_in_bytes() + self.experts.iter().map(Mlp::size_in_bytes).sum::<usize>()
    }
}

enum Ffn {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl Ffn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(x),
            Ffn::Sparse(m) => m.forward(x),
        }
    }

    fn size_in_bytes(&self) -> usize {
        match self {
            Ffn::Dense(m) => m.size_in_bytes(),
            Ffn::Sparse(m) => m.size_in_bytes(),
        }
    }
}

struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    ffn: Ffn,
}

/// A Qwen3-MoE model with its KV cache.
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
        if cfg.num_experts_per_tok == 0 || cfg.num_experts_per_tok > cfg.num_experts {
            candle_core::bail!(
                "num_experts_per_tok {} out of range for {} experts",
                cfg.num_experts_per_tok,
                cfg.num_experts
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
            let ffn = if cfg.is_sparse(i) {
                let mi = cfg.moe_intermediate_size;
                let n = cfg.num_experts;
                let gates = vb.experts(&format!("{p}.mlp"), "gate_proj", n, mi, h)?;
                let ups = vb.experts(&format!("{p}.mlp"), "up_proj", n, mi, h)?;
                let downs = vb.experts(&format!("{p}.mlp"), "down_proj", n, h, mi)?;
                let experts = gates
                    .into_iter()
                    .zip(ups)
                    .zip(downs)
                    .map(|((gate_proj, up_proj), down_proj)| Mlp {
                        gate_proj,
                        up_proj,
                        down_proj,
                    })
                    .collect();
                Ffn::Sparse(SparseMoe {
                    gate: vb.linear(&format!("{p}.mlp.gate"), n, h)?,
                    experts,
                    top_k: cfg.num_experts_per_tok,
                    norm_topk_prob: cfg.norm_topk_prob,
                })
            } else {
                Ffn::Dense(Mlp {
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
                })
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
                ffn,
            });
        }
        let norm = vb.rms_norm("model.norm.weight", h, cfg.rms_norm_eps)?;
        let lm_head = if !cfg.tie_word_embeddings || vb.contains("lm_head.weight") {
            vb.linear("lm_head", cfg.vocab_size, h)?
        } else {
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
                        + l.ffn.size_in_bytes()
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
            x = (l.ffn.forward(&l.post_norm.forward(&x)?)? + r)?;
        }
        let x = self.norm.forward(&last_rows(&x, all_rows)?)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
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
