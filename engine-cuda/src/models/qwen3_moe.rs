//! Qwen3-MoE (`Qwen3MoeForCausalLM`): the Qwen3 decoder whose MLP is replaced (in sparse layers) by
//! a router choosing the top-k of N SwiGLU experts per token, weights optionally renormalised
//! over the chosen k (`norm_topk_prob`).

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::layers::{LayerInput, Linear, Mlp, RopeStyle, softmax_f32};
use crate::models::decoder::{Decoder, DecoderConfig, DecoderOptions, FeedForward, load_mlp};
use crate::models::{CausalLm, ModelConfig};
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
    #[serde(flatten)]
    pub decoder: DecoderConfig,
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
}

impl Config {
    fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// The router and experts `<prefix>.{gate, experts.*}` of a sparse layer.
    fn load_moe(&self, vb: &Weights, prefix: &str) -> Result<SparseMoe> {
        let (h, mi, n) = (
            self.decoder.hidden_size,
            self.moe_intermediate_size,
            self.num_experts,
        );
        let gate_ups = vb.expert_projections(prefix, &["gate_proj", "up_proj"], n, mi, h)?;
        let downs = vb.experts(prefix, "down_proj", n, h, mi)?;
        let experts = gate_ups
            .into_iter()
            .zip(downs)
            .map(|(gate_up, down_proj)| Mlp { gate_up, down_proj })
            .collect();
        Ok(SparseMoe {
            gate: vb.linear(&format!("{prefix}.gate"), n, h)?,
            experts,
            top_k: self.num_experts_per_tok,
            norm_topk_prob: self.norm_topk_prob,
        })
    }
}

impl ModelConfig for Config {
    /// Hyper-parameters from GGUF metadata (`qwen3moe.*`). llama.cpp always renormalises the
    /// top-k weights for this architecture unless `expert_weights_norm` says otherwise.
    fn from_gguf(g: &GgufFile) -> Result<Self> {
        let k = |s: &str| format!("qwen3moe.{s}");
        Ok(Self {
            decoder: DecoderConfig::from_gguf(g, "qwen3moe")?,
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
        })
    }

    fn decoder_mut(&mut self) -> &mut DecoderConfig {
        &mut self.decoder
    }

    fn build(&self, vb: &Weights) -> Result<Box<dyn CausalLm>> {
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
            candle_core::bail!(
                "num_experts_per_tok {} out of range for {} experts",
                self.num_experts_per_tok,
                self.num_experts
            );
        }
        let opts = DecoderOptions {
            qk_norm: true,
            rope_style: RopeStyle::Half,
            rope_freq_factors: None,
        };
        let (h, i) = (self.decoder.hidden_size, self.intermediate_size);
        let model = Decoder::load(&self.decoder, &opts, vb, |layer, p| {
            Ok(if self.is_sparse(layer) {
                Ffn::Sparse(self.load_moe(vb, p)?)
            } else {
                Ffn::Dense(load_mlp(vb, p, h, i)?)
            })
        })?;
        Ok(Box::new(model))
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

/// A layer's feed-forward block: dense in `mlp_only_layers` (and off the sparse step), else
/// routed.
enum Ffn {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward for Ffn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(x),
            Ffn::Sparse(m) => m.forward(x),
        }
    }

    fn forward_input(&self, input: &LayerInput<'_>) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Ffn::Dense(m) => m.forward_input(input),
            Ffn::Sparse(_) => {
                let (x, residual) = input.materialize()?;
                Ok((self.forward(&x)?, residual))
            }
        }
    }

    fn size_in_bytes(&self) -> usize {
        match self {
            Ffn::Dense(m) => m.size_in_bytes(),
            Ffn::Sparse(m) => m.size_in_bytes(),
        }
    }

    /// The router's choice of experts is read back to the host.
    fn device_only(&self) -> bool {
        matches!(self, Ffn::Dense(_))
    }
}
