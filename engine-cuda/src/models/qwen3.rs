//! Qwen3 dense (`Qwen3ForCausalLM`): Llama-shaped decoder with per-head RMSNorm on queries and
//! keys before the rotary embedding, and (in small checkpoints) an LM head tied to the embeddings.

use candle_core::Result;
use serde::Deserialize;

use crate::layers::RopeStyle;
use crate::models::decoder::{Decoder, DecoderConfig, DecoderOptions, load_mlp};
use crate::models::{CausalLm, ModelConfig};
use crate::weights::{GgufFile, Weights};

/// The fields of a Hugging Face `config.json` this architecture uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    pub intermediate_size: usize,
}

impl ModelConfig for Config {
    /// Hyper-parameters from GGUF metadata (`qwen3.*`).
    fn from_gguf(g: &GgufFile) -> Result<Self> {
        Ok(Self {
            decoder: DecoderConfig::from_gguf(g, "qwen3")?,
            intermediate_size: g.meta_usize("qwen3.feed_forward_length")?,
        })
    }

    fn decoder_mut(&mut self) -> &mut DecoderConfig {
        &mut self.decoder
    }

    fn build(&self, vb: &Weights) -> Result<Box<dyn CausalLm>> {
        let opts = DecoderOptions {
            qk_norm: true,
            rope_style: RopeStyle::Half,
            rope_freq_factors: None,
        };
        let (h, i) = (self.decoder.hidden_size, self.intermediate_size);
        let model = Decoder::load(&self.decoder, &opts, vb, |_, p| load_mlp(vb, p, h, i))?;
        Ok(Box::new(model))
    }
}
