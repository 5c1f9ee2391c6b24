//! The supported architectures (one file each under `models/`) behind one trait, and the loader
//! that turns checkpoint files into a model.

pub mod decoder;
pub mod llama;
pub mod qwen3;
pub mod qwen3_moe;

use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Tensor};
use serde::de::DeserializeOwned;

use crate::fused::DevicePosition;
use crate::layers::tensor_bytes;
use crate::models::decoder::DecoderConfig;
use crate::weights::{GgufFile, Weights};
use crate::{EngineError, ErrorKind, describe};

/// A decoder-only language model that owns its KV cache.
pub trait CausalLm: Send {
    /// Runs `tokens` at positions `cache_len()..cache_len()+tokens.len()`, appending them to the
    /// KV cache. Returns f32 logits of shape `(tokens.len(), vocab)` when `all_rows`, else
    /// `(1, vocab)` for the last position.
    fn forward(&mut self, tokens: &[u32], all_rows: bool) -> Result<Tensor>;
    /// Runs `tokens` as [`Self::forward`] does but stops before the logits: a prefill chunk
    /// whose logits nobody reads (the vocabulary projection is a 1.2 GB read for an 8B model).
    fn extend(&mut self, tokens: &[u32]) -> Result<()>;
    /// Keeps only the first `len` cached positions.
    fn truncate(&mut self, len: usize);
    /// Expects the cache to reach `positions` positions soon (see [`crate::layers::KvCache::plan`]).
    fn plan(&mut self, positions: usize);
    /// Number of cached positions.
    fn cache_len(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Positions the model can address (the allocated context length).
    fn max_positions(&self) -> usize;
    fn weight_bytes(&self) -> usize;
    fn cache_bytes(&self) -> usize;
    /// One decode step whose token (`ids`, one `u32` on the device) and position (`at`) are
    /// read on the device: [`Self::forward`] of that token otherwise, returning `(1, vocab)`
    /// f32 logits. What a CUDA graph captures (`HELEXA_ENGINE_GRAPH`): a replay re-runs the
    /// kernels with the arguments of the capture, so nothing that moves may be an argument.
    /// Models whose step needs the host in between refuse.
    fn forward_at(&mut self, ids: &Tensor, at: &DevicePosition) -> Result<Tensor> {
        let _ = (ids, at);
        candle_core::bail!("this model has no device-position decode step")
    }
    /// Makes the KV caches hold `positions` positions without growing (and so moving) again.
    fn reserve_positions(&mut self, positions: usize) -> Result<()> {
        let _ = positions;
        candle_core::bail!("this model has no device-position decode step")
    }
    /// Counts `n` more cached positions: a replayed step wrote them on the device without the
    /// host code that counts them.
    fn advance(&mut self, n: usize) {
        let _ = n;
    }
}

/// What the loader needs from an architecture: its config (from `config.json` through
/// `Deserialize`, or from GGUF metadata) and the model it describes.
pub trait ModelConfig: DeserializeOwned {
    /// The config from GGUF metadata (`<general.architecture>.*` keys and tensor shapes).
    fn from_gguf(g: &GgufFile) -> Result<Self>;
    /// The hyper-parameters of the shared decoder, where the loader caps the context length.
    fn decoder_mut(&mut self) -> &mut DecoderConfig;
    /// Builds the model from the checkpoint's tensors.
    fn build(&self, vb: &Weights) -> Result<Box<dyn CausalLm>>;
}

/// Token embedding lookup. A GGUF table stays in its block quantization and rows are
/// dequantized as they are looked up (an 8B model's table is 2.5 GB in f32 and 1.2 GB in bf16,
/// 0.66 GB in Q8_0), through candle's row gather on either device (checked on the GPU by
/// `gpu_tests` below).
pub struct Embedding {
    table: Table,
}

enum Table {
    Dense(Tensor),
    // Boxed: a `QTensor` is several times the size of a `Tensor` handle.
    Quantized { table: Box<QTensor>, dtype: DType },
}

impl Embedding {
    pub fn load(vb: &Weights, name: &str, vocab: usize, hidden: usize) -> Result<Self> {
        if let Some(table) = vb.quantized_table(name, &[vocab, hidden])? {
            return Ok(Self {
                table: Table::Quantized {
                    table: Box::new(table),
                    dtype: vb.dtype,
                },
            });
        }
        Ok(Self {
            table: Table::Dense(vb.get_shaped(name, &[vocab, hidden])?),
        })
    }

    /// `(1, len, hidden)` embeddings of `tokens`.
    pub fn forward(&self, tokens: &[u32]) -> Result<Tensor> {
        match &self.table {
            Table::Dense(table) => {
                let ids = Tensor::from_slice(tokens, tokens.len(), table.device())?;
                table.index_select(&ids, 0)?.unsqueeze(0)
            }
            Table::Quantized { table, dtype } => {
                let ids = Tensor::from_slice(tokens, tokens.len(), &table.device())?;
                table.embedding(&ids)?.to_dtype(*dtype)?.unsqueeze(0)
            }
        }
    }

    /// `(1, len, hidden)` embeddings of ids already on the table's device (`len` `u32`s),
    /// copying nothing from the host on the way (a decode step captured into a CUDA graph).
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.table {
            #[cfg(feature = "cuda")]
            Table::Dense(table) if table.device().is_cuda() => {
                crate::fused::gather_rows(table, ids)?.unsqueeze(0)
            }
            Table::Dense(table) => table.index_select(ids, 0)?.unsqueeze(0),
            // candle's quantized row gather reads the ids on the device as they are.
            Table::Quantized { table, dtype } => {
                table.embedding(ids)?.to_dtype(*dtype)?.unsqueeze(0)
            }
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match &self.table {
            Table::Dense(table) => tensor_bytes(table),
            Table::Quantized { table, .. } => table.storage_size_in_bytes(),
        }
    }
}

/// The architectures this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen3,
    Llama,
    Qwen3Moe,
}

impl Architecture {
    /// Accepts the transformers class name (`config.json` `architectures[0]`) or the GGUF
    /// `general.architecture` value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "Qwen3ForCausalLM" | "qwen3" => Some(Self::Qwen3),
            "LlamaForCausalLM" | "llama" => Some(Self::Llama),
            "Qwen3MoeForCausalLM" | "qwen3moe" | "qwen3_moe" => Some(Self::Qwen3Moe),
            _ => None,
        }
    }

    fn gguf_name(self) -> &'static str {
        match self {
            Self::Qwen3 => "qwen3",
            Self::Llama => "llama",
            Self::Qwen3Moe => "qwen3moe",
        }
    }
}

/// What to load; built by the engine from a `LoadSpec`.
pub struct LoadRequest<'a> {
    pub architecture: &'a str,
    pub config: Option<&'a Path>,
    pub safetensors: &'a [PathBuf],
    pub gguf: Option<&'a Path>,
    pub dtype: DType,
    pub device: &'a Device,
    pub context_length: Option<usize>,
}

/// A freshly loaded model and what the caller reports about it.
pub struct Loaded {
    pub model: Box<dyn CausalLm>,
    /// `"none"` for dense checkpoints, else the GGUF file type (`"q4_k_m"`, …).
    pub quant: String,
}

fn bad(message: String) -> EngineError {
    EngineError::new(ErrorKind::BadInput, message)
}

fn must_exist(path: &Path, what: &str) -> std::result::Result<(), EngineError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(EngineError::new(
            ErrorKind::NotFound,
            format!("{what} not found: {}", path.display()),
        ))
    }
}

/// llama.cpp's `general.file_type` values (`enum llama_ftype`).
fn gguf_file_type(code: u32) -> String {
    match code {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        7 => "q8_0",
        8 => "q5_0",
        9 => "q5_1",
        10 => "q2_k",
        11 => "q3_k_s",
        12 => "q3_k_m",
        13 => "q3_k_l",
        14 => "q4_k_s",
        15 => "q4_k_m",
        16 => "q5_k_s",
        17 => "q5_k_m",
        18 => "q6_k",
        32 => "bf16",
        _ => return format!("gguf_ftype_{code}"),
    }
    .to_owned()
}

/// Validates the request and builds the model. Errors name the offending file or tensor.
pub fn load(req: &LoadRequest<'_>) -> std::result::Result<Loaded, EngineError> {
    let arch = Architecture::parse(req.architecture).ok_or_else(|| {
        EngineError::new(
            ErrorKind::Unsupported,
            format!(
                "unsupported architecture {:?} (supported: Qwen3ForCausalLM, LlamaForCausalLM, Qwen3MoeForCausalLM)",
                req.architecture
            ),
        )
    })?;
    let built = if let Some(path) = req.gguf {
        must_exist(path, "gguf file")?;
        let g =
            GgufFile::open(path).map_err(|e| bad(format!("cannot read gguf: {}", describe(&e))))?;
        let file_arch = g
            .architecture()
            .map_err(|e| bad(format!("{}: {}", path.display(), describe(&e))))?;
        if file_arch != arch.gguf_name() {
            return Err(bad(format!(
                "{} is a {file_arch:?} gguf, but the architecture {:?} was requested",
                path.display(),
                req.architecture
            )));
        }
        let quant = g
            .meta("general.file_type")
            .and_then(gguf_file::value_u32)
            .map_or_else(|_| "unknown".to_owned(), gguf_file_type);
        let model = match arch {
            Architecture::Qwen3 => from_gguf::<qwen3::Config>(g, req),
            Architecture::Llama => from_gguf::<llama::Config>(g, req),
            Architecture::Qwen3Moe => from_gguf::<qwen3_moe::Config>(g, req),
        }
        .map_err(|e| bad(format!("{}: {}", path.display(), describe(&e))))?;
        Loaded { model, quant }
    } else {
        let config = req
            .config
            .ok_or_else(|| bad("safetensors models need files.config (config.json)".to_owned()))?;
        must_exist(config, "config file")?;
        if req.safetensors.is_empty() {
            return Err(bad(
                "no model files: give files.safetensors or files.gguf".to_owned()
            ));
        }
        for f in req.safetensors {
            must_exist(f, "safetensors file")?;
        }
        let text = std::fs::read_to_string(config)
            .map_err(|e| bad(format!("{}: {e}", config.display())))?;
        let vb = Weights::from_safetensors(req.safetensors, req.dtype, req.device)
            .map_err(|e| bad(describe(&e)))?;
        let model = match arch {
            Architecture::Qwen3 => from_json::<qwen3::Config>(&text, config, &vb, req),
            Architecture::Llama => from_json::<llama::Config>(&text, config, &vb, req),
            Architecture::Qwen3Moe => from_json::<qwen3_moe::Config>(&text, config, &vb, req),
        }?;
        Loaded {
            model,
            quant: "none".to_owned(),
        }
    };
    Ok(built)
}

/// Builds a `C` model from a GGUF file (config from its metadata, tensors from the file).
fn from_gguf<C: ModelConfig>(g: GgufFile, req: &LoadRequest<'_>) -> Result<Box<dyn CausalLm>> {
    let mut cfg = C::from_gguf(&g)?;
    cap_context(req, cfg.decoder_mut());
    cfg.build(&Weights::from_gguf(g, req.dtype, req.device))
}

/// Builds a `C` model from `config.json` (`text`, read from `path`) and safetensors weights.
fn from_json<C: ModelConfig>(
    text: &str,
    path: &Path,
    vb: &Weights,
    req: &LoadRequest<'_>,
) -> std::result::Result<Box<dyn CausalLm>, EngineError> {
    let mut cfg: C =
        serde_json::from_str(text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    cap_context(req, cfg.decoder_mut());
    cfg.build(vb)
        .map_err(|e| bad(format!("{}: {}", path.display(), describe(&e))))
}

/// Allocates the request's context length, capped at what the model was trained for.
fn cap_context(req: &LoadRequest<'_>, cfg: &mut DecoderConfig) {
    let model_max = cfg.max_position_embeddings;
    cfg.max_position_embeddings = req
        .context_length
        .map_or(model_max, |c| c.min(model_max))
        .max(1);
}

/// Small helpers over candle's GGUF metadata values.
mod gguf_file {
    use candle_core::quantized::gguf_file::Value;

    pub fn value_u32(v: &Value) -> candle_core::Result<u32> {
        v.to_u32()
            .or_else(|_| v.to_i32().map(|x| x.unsigned_abs()))
            .or_else(|_| v.to_u64().map(|x| u32::try_from(x).unwrap_or(u32::MAX)))
    }
}

/// candle's CUDA row gather for block-quantized tables, which GGUF models' embeddings take on
/// the GPU (needs the `cuda` feature and a device; `scripts/device/gpu-check.sh check`).
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn quantized_embedding_rows_match_the_dequantized_table() {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let table = Tensor::randn(0f32, 1f32, (1000, 512), &dev).expect("table");
        let ids = Tensor::new(&[0u32, 999, 17, 17, 512], &dev).expect("ids");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&table, dtype).expect("quantize");
            let got = q
                .embedding(&ids)
                .and_then(|t| t.to_dtype(DType::F32))
                .expect("embedding");
            let want = q
                .dequantize(&dev)
                .and_then(|t| t.index_select(&ids, 0))
                .expect("dequantized rows");
            assert_eq!(got.dims(), [5, 512], "{dtype:?}");
            // The same arithmetic (scale times value) in both: equal up to a fused multiply-add.
            let diff = (&got - &want)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert!(diff <= 1e-5, "{dtype:?}: rows differ by {diff}");
        }
    }
}
