//! `helexa-model-synth`: writes seeded random models with the exact tensor shapes, names and
//! metadata of a real architecture, so the engine can be benchmarked at full size without
//! downloading a checkpoint.
//!
//! A model is a [`Shape`] (a preset such as `qwen3-8b`, optionally with fewer layers), a seed and
//! a [`Format`]: a Hugging Face directory with bf16 safetensors, or a GGUF file quantized to Q8_0 or
//! llama.cpp's Q4_K_M mix by candle's quantizers. The values come from [`values`]: a pure function
//! of (seed, tensor name, row), so the three formats are the same model and the output does not
//! depend on the number of threads.
//!
//! Writing is parallel and streaming: the file layout (every tensor's offset) is computed from the
//! shapes first, then worker threads each generate, convert or quantize a block of rows and write
//! it at its offset. Memory stays at a few MiB per thread whatever the model size.
//!
//! ```no_run
//! use helexa_model_synth::{Format, Shape, synthesize};
//!
//! # fn main() -> Result<(), helexa_model_synth::SynthError> {
//! let shape = Shape::preset("qwen3-8b")?.with_layers(2)?;
//! let out = synthesize(&shape, 42, Format::Q4KM, "/tmp/synth/qwen3-8b-2l-q4_k_m".as_ref())?;
//! println!("{} bytes in {:?}", out.bytes, out.files);
//! # Ok(()) }
//! ```

pub mod format;
pub mod shape;
pub mod values;
mod write;

use std::path::{Path, PathBuf};

pub use format::Format;
use serde::{Deserialize, Serialize};
pub use shape::{PRESETS, Shape, TensorSpec};

/// Everything that can go wrong while synthesizing.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {name:?} (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("unknown format {0:?} (known: bf16, q8_0, q4_k_m)")]
    UnknownFormat(String),
    #[error("invalid shape: {0}")]
    BadShape(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("quantizing {tensor}: {source}")]
    Quantize {
        tensor: String,
        source: candle_core::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl SynthError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
        move |source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Name of the manifest written last into every output directory; its presence (with the same
/// shape, seed and format) means the model is complete and can be reused.
pub const MANIFEST: &str = "synth.json";

/// What [`synthesize`] wrote (also the content of the [`MANIFEST`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Synthesized {
    pub shape: Shape,
    pub seed: u64,
    /// [`Format::as_str`].
    pub format: String,
    /// Model files, relative to the output directory.
    pub files: Vec<PathBuf>,
    /// Total bytes of the model files (not counting the JSON configs).
    pub bytes: u64,
    /// True when an existing, complete output was found and nothing was written.
    #[serde(skip)]
    pub reused: bool,
    /// Seconds spent writing (0 when reused).
    #[serde(skip)]
    pub seconds: f64,
}

/// Writes the model `(shape, seed, format)` into the directory `dir` (created if missing), unless a
/// complete one is already there. Uses every available core.
pub fn synthesize(
    shape: &Shape,
    seed: u64,
    format: Format,
    dir: &Path,
) -> Result<Synthesized, SynthError> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    synthesize_with(shape, seed, format, dir, threads)
}

/// [`synthesize`] with an explicit number of worker threads.
pub fn synthesize_with(
    shape: &Shape,
    seed: u64,
    format: Format,
    dir: &Path,
    threads: usize,
) -> Result<Synthesized, SynthError> {
    validate(shape, format)?;
    let manifest_path = dir.join(MANIFEST);
    if let Some(done) = read_manifest(&manifest_path)
        && done.shape == *shape
        && done.seed == seed
        && done.format == format.as_str()
        && done.files.iter().all(|f| dir.join(f).is_file())
    {
        return Ok(Synthesized {
            reused: true,
            ..done
        });
    }
    std::fs::create_dir_all(dir).map_err(SynthError::io(dir))?;
    // A stale manifest must not vouch for half-written files if this run is interrupted.
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).map_err(SynthError::io(&manifest_path))?;
    }
    let start = std::time::Instant::now();
    let (files, bytes) = if format.is_gguf() {
        write::gguf(shape, seed, format, dir, threads)?
    } else {
        write_json(&dir.join("config.json"), &shape.config_json())?;
        write_json(
            &dir.join("generation_config.json"),
            &shape.generation_config_json(),
        )?;
        write::safetensors(shape, seed, dir, threads, write::SHARD_BYTES)?
    };
    let out = Synthesized {
        shape: shape.clone(),
        seed,
        format: format.as_str().to_owned(),
        files,
        bytes,
        reused: false,
        seconds: start.elapsed().as_secs_f64(),
    };
    write_json(
        &manifest_path,
        &serde_json::to_value(&out).map_err(|source| SynthError::Json {
            path: manifest_path.clone(),
            source,
        })?,
    )?;
    Ok(out)
}

/// Checks that every matrix width suits the format's blocks (k-quants need multiples of 256).
fn validate(shape: &Shape, format: Format) -> Result<(), SynthError> {
    if shape.num_key_value_heads == 0
        || !shape
            .num_attention_heads
            .is_multiple_of(shape.num_key_value_heads)
    {
        return Err(SynthError::BadShape(format!(
            "{} attention heads are not a multiple of {} KV heads",
            shape.num_attention_heads, shape.num_key_value_heads
        )));
    }
    for t in shape.tensors() {
        let (_, cols) = t.rows_cols();
        if let Some(d) = format.gguf_dtype(&t, shape)
            && !cols.is_multiple_of(d.block_size())
        {
            return Err(SynthError::BadShape(format!(
                "{} has {cols} columns, not a multiple of {d:?}'s block of {}",
                t.gguf_name,
                d.block_size()
            )));
        }
    }
    Ok(())
}

fn read_manifest(path: &Path) -> Option<Synthesized> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| SynthError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(SynthError::io(path))
}
