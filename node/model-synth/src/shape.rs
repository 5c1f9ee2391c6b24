//! Architecture shapes (Qwen3 dense presets) and the list of tensors a checkpoint of that shape
//! holds, under both naming schemes (Hugging Face safetensors and llama.cpp GGUF).

use serde::{Deserialize, Serialize};

use crate::SynthError;

/// The hyper-parameters of a Qwen3 dense decoder (`Qwen3ForCausalLM`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Preset the shape came from (for names and reports).
    pub preset: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// Qwen3-8B has an untied LM head (`lm_head.weight` separate from the embeddings).
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

/// The names accepted by [`Shape::preset`].
pub const PRESETS: &[&str] = &["qwen3-8b", "tiny"];

impl Shape {
    /// A named preset: `qwen3-8b` (the exact shape of Qwen/Qwen3-8B's `config.json`) or `tiny`
    /// (same architecture, small dimensions, every matrix width a multiple of 256 so that the
    /// k-quants apply to every tensor as they do at full size).
    pub fn preset(name: &str) -> Result<Self, SynthError> {
        match name {
            "qwen3-8b" => Ok(Self {
                preset: name.to_owned(),
                hidden_size: 4096,
                num_hidden_layers: 36,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                head_dim: 128,
                intermediate_size: 12288,
                vocab_size: 151_936,
                max_position_embeddings: 40960,
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: false,
                bos_token_id: 151_643,
                eos_token_id: 151_645,
            }),
            "tiny" => Ok(Self {
                preset: name.to_owned(),
                hidden_size: 256,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 64,
                intermediate_size: 512,
                vocab_size: 2048,
                max_position_embeddings: 40960,
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: false,
                bos_token_id: 0,
                eos_token_id: 2,
            }),
            other => Err(SynthError::UnknownPreset {
                name: other.to_owned(),
                known: PRESETS.join(", "),
            }),
        }
    }

    /// The same shape with `layers` decoder layers (to shorten a preset for quick runs).
    pub fn with_layers(mut self, layers: usize) -> Result<Self, SynthError> {
        if layers == 0 {
            return Err(SynthError::BadShape(
                "the number of layers must be at least 1".to_owned(),
            ));
        }
        self.num_hidden_layers = layers;
        Ok(self)
    }

    /// A file-name-friendly name: the preset, plus the layer count when it was changed.
    pub fn name(&self) -> String {
        match Self::preset(&self.preset) {
            Ok(p) if p.num_hidden_layers == self.num_hidden_layers => self.preset.clone(),
            _ => format!("{}-{}l", self.preset, self.num_hidden_layers),
        }
    }

    /// Every tensor of the checkpoint, in llama.cpp's order (embeddings, layers, final norm, head).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (h, hd, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let mut out = vec![TensorSpec::matrix(
            "model.embed_tokens.weight",
            "token_embd.weight",
            Role::Embedding,
            self.vocab_size,
            h,
        )];
        for l in 0..self.num_hidden_layers {
            let hf = |s: &str| format!("model.layers.{l}.{s}.weight");
            let gg = |s: &str| format!("blk.{l}.{s}.weight");
            let m = |hf_name: &str, gg_name: &str, role, rows, cols| TensorSpec {
                hf_name: hf(hf_name),
                gguf_name: gg(gg_name),
                role,
                dims: vec![rows, cols],
                layer: Some(l),
            };
            let n = |hf_name: &str, gg_name: &str, len| TensorSpec {
                hf_name: hf(hf_name),
                gguf_name: gg(gg_name),
                role: Role::Norm,
                dims: vec![len],
                layer: Some(l),
            };
            out.extend([
                n("input_layernorm", "attn_norm", h),
                m("self_attn.q_proj", "attn_q", Role::Linear, q, h),
                m("self_attn.k_proj", "attn_k", Role::Linear, kv, h),
                m("self_attn.v_proj", "attn_v", Role::AttnV, kv, h),
                m("self_attn.o_proj", "attn_output", Role::Linear, h, q),
                n("self_attn.q_norm", "attn_q_norm", hd),
                n("self_attn.k_norm", "attn_k_norm", hd),
                n("post_attention_layernorm", "ffn_norm", h),
                m("mlp.gate_proj", "ffn_gate", Role::Linear, i, h),
                m("mlp.up_proj", "ffn_up", Role::Linear, i, h),
                m("mlp.down_proj", "ffn_down", Role::FfnDown, h, i),
            ]);
        }
        out.push(TensorSpec {
            hf_name: "model.norm.weight".to_owned(),
            gguf_name: "output_norm.weight".to_owned(),
            role: Role::Norm,
            dims: vec![h],
            layer: None,
        });
        if !self.tie_word_embeddings {
            out.push(TensorSpec::matrix(
                "lm_head.weight",
                "output.weight",
                Role::Output,
                self.vocab_size,
                h,
            ));
        }
        out
    }

    /// Number of parameters (every tensor's element count).
    pub fn parameters(&self) -> u64 {
        self.tensors().iter().map(|t| t.elements() as u64).sum()
    }

    /// The Hugging Face `config.json` of this shape.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "model_type": "qwen3",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "sliding_window": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab_size,
        })
    }

    /// The Hugging Face `generation_config.json` (Qwen3's defaults).
    pub fn generation_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bos_token_id": self.bos_token_id,
            "do_sample": true,
            "eos_token_id": [self.eos_token_id, self.bos_token_id],
            "pad_token_id": self.bos_token_id,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
        })
    }
}

/// What a tensor is, as far as choosing its quantization goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// RMSNorm weights (1-D, kept in f32 in GGUF, initialised to 1).
    Norm,
    /// `token_embd.weight`.
    Embedding,
    /// `output.weight` (the LM head).
    Output,
    /// `attn_v` (more bits in some layers of Q4_K_M).
    AttnV,
    /// `ffn_down` (more bits in some layers of Q4_K_M).
    FfnDown,
    /// Every other projection.
    Linear,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub hf_name: String,
    /// llama.cpp name (`blk.0.attn_q.weight`).
    pub gguf_name: String,
    pub role: Role,
    /// Dimensions, outermost first (`[out, in]` for a projection).
    pub dims: Vec<usize>,
    /// Decoder layer, for per-layer quantization rules.
    pub layer: Option<usize>,
}

impl TensorSpec {
    fn matrix(hf: &str, gguf: &str, role: Role, rows: usize, cols: usize) -> Self {
        Self {
            hf_name: hf.to_owned(),
            gguf_name: gguf.to_owned(),
            role,
            dims: vec![rows, cols],
            layer: None,
        }
    }

    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Rows and columns (a 1-D tensor is one row).
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.dims.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => (1, self.elements()),
        }
    }
}
