//! Llama (`LlamaForCausalLM`, Llama 2/3): pre-norm decoder with grouped-query attention, SwiGLU
//! MLP, optional Llama 3 rope scaling and, usually, an untied LM head.
//!
//! What is Llama-specific is how GGUF files differ from the Hugging Face checkpoint: llama.cpp's
//! converter permutes the Q/K rows into the interleaved rotary layout and stores Llama 3 scaling
//! as per-frequency divisors, so both are read from the file and handed to the shared decoder.

use candle_core::{DType, Device, Result};
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
    /// GGUF only: llama.cpp's converter stores Llama 3 scaling as per-frequency divisors
    /// (`rope_freqs.weight`) instead of the config parameters.
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// GGUF only: the converter permuted Q/K rows for llama.cpp's interleaved rotary layout.
    #[serde(skip)]
    pub interleaved_rope: bool,
}

impl ModelConfig for Config {
    /// Hyper-parameters from GGUF metadata (`llama.*`).
    fn from_gguf(g: &GgufFile) -> Result<Self> {
        let rope_freq_factors = if g.has_tensor("rope_freqs.weight") {
            let t = g.qtensor("rope_freqs.weight", &Device::Cpu)?;
            Some(
                t.dequantize(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        Ok(Self {
            decoder: DecoderConfig::from_gguf(g, "llama")?,
            intermediate_size: g.meta_usize("llama.feed_forward_length")?,
            rope_freq_factors,
            interleaved_rope: true,
        })
    }

    fn decoder_mut(&mut self) -> &mut DecoderConfig {
        &mut self.decoder
    }

    fn build(&self, vb: &Weights) -> Result<Box<dyn CausalLm>> {
        let opts = DecoderOptions {
            qk_norm: false,
            rope_style: if self.interleaved_rope {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Half
            },
            rope_freq_factors: self.rope_freq_factors.as_deref(),
        };
        let (h, i) = (self.decoder.hidden_size, self.intermediate_size);
        let model = Decoder::load(&self.decoder, &opts, vb, |_, p| load_mlp(vb, p, h, i))?;
        Ok(Box::new(model))
    }
}
