//! What the bench needs to know about a model before loading it: which files the engine gets, the
//! architecture's dimensions and every tensor's shape and stored size (for the ceilings). Read from
//! the files' headers only (`config.json` + safetensors headers, or the GGUF header), so the same
//! code describes a synthesized model and a real checkpoint.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::quantized::{GgmlDType, gguf_file};
use helexa_engine_abi::json::ModelFiles;

/// Dimensions the ceilings need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims {
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
}

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A float type: the engine holds it in its compute dtype.
    Float,
    /// A block-quantized GGUF type the engine multiplies as stored: its bytes.
    Quantized(u64),
}

/// One tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub stored: Stored,
}

impl Tensor {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The token embedding table (Hugging Face or llama.cpp name).
    pub fn is_embedding(&self) -> bool {
        matches!(
            self.name.as_str(),
            "model.embed_tokens.weight" | "token_embd.weight"
        )
    }

    /// The LM head.
    pub fn is_head(&self) -> bool {
        matches!(self.name.as_str(), "lm_head.weight" | "output.weight")
    }
}

/// A model as the bench sees it.
#[derive(Debug, Clone)]
pub struct ModelDescription {
    /// `config.json` `architectures[0]` or GGUF `general.architecture`.
    pub architecture: String,
    pub files: ModelFiles,
    /// Bytes of the weight files (what loading reads).
    pub file_bytes: u64,
    pub dims: Dims,
    pub tensors: Vec<Tensor>,
}

impl ModelDescription {
    /// Reads a Hugging Face directory, a directory holding one `.gguf` file, or a `.gguf` file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        if path.is_file() {
            return Self::read_gguf(path);
        }
        if !path.is_dir() {
            bail!("{} is neither a model directory nor a file", path.display());
        }
        let mut safetensors = Vec::new();
        let mut ggufs = Vec::new();
        for entry in
            std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?
        {
            let p = entry
                .with_context(|| format!("listing {}", path.display()))?
                .path();
            match p.extension().and_then(|e| e.to_str()) {
                Some("safetensors") => safetensors.push(p),
                Some("gguf") => ggufs.push(p),
                _ => {}
            }
        }
        safetensors.sort();
        let config = path.join("config.json");
        match (safetensors.is_empty(), ggufs.as_slice()) {
            (false, _) if config.is_file() => Self::read_safetensors(&config, safetensors),
            (true, [one]) => Self::read_gguf(one),
            (true, []) => bail!(
                "{} has neither config.json with *.safetensors nor a .gguf file",
                path.display()
            ),
            (true, _) => bail!(
                "{} has several .gguf files; name one of them",
                path.display()
            ),
            (false, _) => bail!("{} has safetensors but no config.json", path.display()),
        }
    }

    fn read_safetensors(config: &Path, files: Vec<PathBuf>) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", config.display()))?;
        let num = |key: &str| {
            cfg.get(key)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("{}: `{key}` missing", config.display()))
        };
        let architecture = cfg
            .pointer("/architectures/0")
            .and_then(serde_json::Value::as_str)
            .with_context(|| format!("{}: `architectures` missing", config.display()))?
            .to_owned();
        let (hidden, heads) = (num("hidden_size")?, num("num_attention_heads")?);
        let dims = Dims {
            hidden,
            layers: num("num_hidden_layers")?,
            heads,
            kv_heads: num("num_key_value_heads").unwrap_or(heads),
            head_dim: num("head_dim").unwrap_or(hidden / heads.max(1)),
            vocab: num("vocab_size")?,
        };
        let mut tensors = Vec::new();
        let mut file_bytes = 0;
        for f in &files {
            file_bytes += std::fs::metadata(f)
                .with_context(|| format!("reading {}", f.display()))?
                .len();
            tensors.extend(safetensors_header(f)?);
        }
        Ok(Self {
            architecture,
            files: ModelFiles {
                config: Some(config.to_path_buf()),
                safetensors: files,
                gguf: None,
            },
            file_bytes,
            dims,
            tensors,
        })
    }

    fn read_gguf(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_bytes = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let content = gguf_file::Content::read(&mut BufReader::new(file))
            .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        let meta = |key: &str| {
            content
                .metadata
                .get(key)
                .with_context(|| format!("{}: GGUF metadata `{key}` missing", path.display()))
        };
        let architecture = meta("general.architecture")?
            .to_string()
            .map_err(|e| anyhow::anyhow!("general.architecture: {e}"))?
            .clone();
        let num = |key: &str| -> anyhow::Result<u64> {
            let v = meta(&format!("{architecture}.{key}"))?;
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .map_err(|e| anyhow::anyhow!("{architecture}.{key}: {e}"))
        };
        let (hidden, heads) = (num("embedding_length")?, num("attention.head_count")?);
        let mut tensors: Vec<Tensor> = content
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let dims: Vec<u64> = info.shape.dims().iter().map(|&d| d as u64).collect();
                let elements: u64 = dims.iter().product();
                let stored = match info.ggml_dtype {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Stored::Float,
                    d => Stored::Quantized(elements / d.block_size() as u64 * d.type_size() as u64),
                };
                Tensor {
                    name: name.clone(),
                    dims,
                    stored,
                }
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let vocab = tensors
            .iter()
            .find(|t| t.is_embedding())
            .and_then(|t| t.dims.first().copied())
            .with_context(|| format!("{}: no token_embd.weight", path.display()))?;
        let dims = Dims {
            hidden,
            layers: num("block_count")?,
            heads,
            kv_heads: num("attention.head_count_kv").unwrap_or(heads),
            head_dim: num("attention.key_length").unwrap_or(hidden / heads.max(1)),
            vocab,
        };
        Ok(Self {
            architecture,
            files: ModelFiles {
                config: None,
                safetensors: Vec::new(),
                gguf: Some(path.to_path_buf()),
            },
            file_bytes,
            dims,
            tensors,
        })
    }

    /// Number of parameters (elements of every tensor).
    pub fn parameters(&self) -> u64 {
        self.tensors.iter().map(Tensor::elements).sum()
    }
}

/// The tensors listed in a safetensors file's JSON header.
fn safetensors_header(path: &Path) -> anyhow::Result<Vec<Tensor>> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("reading {}", path.display()))?;
    let len = u64::from_le_bytes(len);
    // The format caps the header at 100 MB; a larger value means this is not safetensors.
    if len > 100_000_000 {
        bail!("{}: safetensors header of {len} bytes", path.display());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("reading {}", path.display()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{}: invalid safetensors header", path.display()))?;
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dims = info
            .get("shape")
            .and_then(serde_json::Value::as_array)
            .with_context(|| format!("{}: tensor {name} has no shape", path.display()))?
            .iter()
            .map(|d| d.as_u64().context("non-integer dimension"))
            .collect::<anyhow::Result<Vec<u64>>>()?;
        out.push(Tensor {
            name,
            dims,
            stored: Stored::Float,
        });
    }
    Ok(out)
}
