//! Output formats and, for GGUF, which tensor gets which block type (llama.cpp's rules).

use candle_core::quantized::GgmlDType;

use crate::SynthError;
use crate::shape::{Role, Shape, TensorSpec};

/// A checkpoint format the synthesizer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Hugging Face directory: `config.json`, `generation_config.json`, bf16 safetensors.
    Bf16,
    /// GGUF, every matrix Q8_0 (llama.cpp `LLAMA_FTYPE_MOSTLY_Q8_0`).
    Q8_0,
    /// GGUF, llama.cpp's Q4_K_M mix (`LLAMA_FTYPE_MOSTLY_Q4_K_M`).
    Q4KM,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Bf16, Format::Q8_0, Format::Q4KM];

    /// Lower-case name as used on the command line (`bf16`, `q8_0`, `q4_k_m`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Bf16 => "bf16",
            Format::Q8_0 => "q8_0",
            Format::Q4KM => "q4_k_m",
        }
    }

    /// llama.cpp's file-name spelling (`BF16`, `Q8_0`, `Q4_K_M`).
    pub fn file_label(self) -> &'static str {
        match self {
            Format::Bf16 => "BF16",
            Format::Q8_0 => "Q8_0",
            Format::Q4KM => "Q4_K_M",
        }
    }

    /// `general.file_type` (llama.cpp's `enum llama_ftype`); `None` for safetensors.
    pub fn gguf_file_type(self) -> Option<u32> {
        match self {
            Format::Bf16 => None,
            Format::Q8_0 => Some(7),
            Format::Q4KM => Some(15),
        }
    }

    pub fn is_gguf(self) -> bool {
        self.gguf_file_type().is_some()
    }

    /// The GGUF block type of `t` in a model of shape `shape` (`None` for safetensors).
    ///
    /// Q4_K_M follows `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp`: Q6_K for
    /// `output.weight`, and for `attn_v` / `ffn_down` in the layers `use_more_bits` picks; Q4_K for
    /// every other matrix (the token embeddings included, since the head is untied). Norms stay
    /// f32 in every GGUF type, as llama.cpp keeps 1-D tensors.
    pub fn gguf_dtype(self, t: &TensorSpec, shape: &Shape) -> Option<GgmlDType> {
        let q = match self {
            Format::Bf16 => return None,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q4KM => {
                let n = shape.num_hidden_layers;
                match (t.role, t.layer) {
                    (Role::Output, _) => GgmlDType::Q6K,
                    (Role::AttnV | Role::FfnDown, Some(i)) if use_more_bits(i, n) => GgmlDType::Q6K,
                    _ => GgmlDType::Q4K,
                }
            }
        };
        Some(if t.role == Role::Norm {
            GgmlDType::F32
        } else {
            q
        })
    }
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`: the first and last eighth of the layers, and
/// every third layer in between.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl std::str::FromStr for Format {
    type Err = SynthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" => Ok(Format::Bf16),
            "q8_0" => Ok(Format::Q8_0),
            "q4_k_m" => Ok(Format::Q4KM),
            _ => Err(SynthError::UnknownFormat(s.to_owned())),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// GGUF's numeric id of a block type (`enum ggml_type`); candle keeps its own mapping private.
pub fn ggml_type_id(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Bytes one row of `cols` elements takes in block type `d`.
pub fn row_bytes(d: GgmlDType, cols: usize) -> usize {
    cols / d.block_size() * d.type_size()
}

#[cfg(test)]
mod tests {
    use super::use_more_bits;

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // 36 layers (Qwen3-8B): n/8 = 4, 7n/8 = 31.
        let picked: Vec<usize> = (0..36).filter(|&i| use_more_bits(i, 36)).collect();
        assert_eq!(
            picked,
            [
                0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35
            ]
        );
        // 4 layers: the llama.cpp-quantized tiny fixture has Q6_K in blocks 2 and 3.
        let picked: Vec<usize> = (0..4).filter(|&i| use_more_bits(i, 4)).collect();
        assert_eq!(picked, [2, 3]);
    }
}
