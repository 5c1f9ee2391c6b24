//! The two file writers (safetensors shards, GGUF) and the parallel row-block pipeline they share.
//!
//! Both formats put a header describing every tensor's byte range before the data, and every
//! range follows from the shapes alone; so the header is written first and worker threads then
//! fill the data in any order, each writing its block of rows at its own offset.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::bf16;

use crate::SynthError;
use crate::format::{Format, ggml_type_id, row_bytes};
use crate::shape::{Shape, TensorSpec};
use crate::values::fill_row;

/// Shard size limit of the safetensors output (transformers' default `max_shard_size`, "5GB").
pub const SHARD_BYTES: u64 = 5_000_000_000;

/// GGUF's default data alignment (`general.alignment` is not written).
const GGUF_ALIGNMENT: u64 = 32;

/// Elements per unit of work: big enough to amortise the per-block overhead, small enough to
/// balance the load across threads and keep memory per thread at a few MiB.
const BLOCK_ELEMENTS: usize = 1 << 20;

/// How one tensor's rows are encoded.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    Bf16,
    Ggml(GgmlDType),
}

impl Encoding {
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            Encoding::Bf16 => cols * 2,
            Encoding::Ggml(d) => row_bytes(d, cols),
        }
    }
}

/// One tensor's place in the output.
struct Placed {
    spec: TensorSpec,
    encoding: Encoding,
    /// Index into the list of output files.
    file: usize,
    /// Absolute byte offset of the tensor's first row in that file.
    offset: u64,
}

/// Writes the safetensors shards (`model.safetensors`, or `model-0000i-of-0000n.safetensors` with
/// `model.safetensors.index.json` when the model exceeds `shard_bytes`).
pub fn safetensors(
    shape: &Shape,
    seed: u64,
    dir: &Path,
    threads: usize,
    shard_bytes: u64,
) -> Result<(Vec<PathBuf>, u64), SynthError> {
    // Group tensors into shards in checkpoint order.
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut in_shard = 0u64;
    for t in shape.tensors() {
        let size = t.elements() as u64 * 2;
        if in_shard > 0 && in_shard + size > shard_bytes {
            shards.push(Vec::new());
            in_shard = 0;
        }
        in_shard += size;
        shards.last_mut().expect("one shard at least").push(t);
    }
    let n = shards.len();
    let names: Vec<PathBuf> = (0..n)
        .map(|i| {
            if n == 1 {
                PathBuf::from("model.safetensors")
            } else {
                PathBuf::from(format!("model-{:05}-of-{n:05}.safetensors", i + 1))
            }
        })
        .collect();

    let mut placed = Vec::new();
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let path = dir.join(&names[i]);
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".to_owned(),
            serde_json::json!({ "format": "pt" }),
        );
        let mut data = 0u64;
        for t in &shard {
            let size = t.elements() as u64 * 2;
            header.insert(
                t.hf_name.clone(),
                serde_json::json!({ "dtype": "BF16", "shape": t.dims, "data_offsets": [data, data + size] }),
            );
            weight_map.insert(
                t.hf_name.clone(),
                names[i].to_string_lossy().into_owned().into(),
            );
            data += size;
        }
        let mut header =
            serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|source| {
                SynthError::Json {
                    path: path.clone(),
                    source,
                }
            })?;
        // The data must start 8-byte aligned; the format pads the header with spaces.
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = 8 + header.len() as u64;
        let mut f = File::create(&path).map_err(SynthError::io(&path))?;
        f.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| f.write_all(&header))
            .and_then(|()| f.set_len(data_start + data))
            .map_err(SynthError::io(&path))?;
        let mut offset = data_start;
        for t in shard {
            let size = t.elements() as u64 * 2;
            placed.push(Placed {
                spec: t,
                encoding: Encoding::Bf16,
                file: i,
                offset,
            });
            offset += size;
        }
        total += data_start + data;
        files.push((path, f));
    }
    fill(seed, &placed, &files, threads)?;
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": placed.iter().map(|p| p.spec.elements() as u64 * 2).sum::<u64>() },
            "weight_map": weight_map,
        });
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|source| SynthError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text).map_err(SynthError::io(&path))?;
    }
    Ok((names, total))
}

/// Writes `<name>-<FORMAT>.gguf` (GGUF version 3) with the `qwen3.*` metadata llama.cpp writes.
pub fn gguf(
    shape: &Shape,
    seed: u64,
    format: Format,
    dir: &Path,
    threads: usize,
) -> Result<(Vec<PathBuf>, u64), SynthError> {
    let name = PathBuf::from(format!("{}-{}.gguf", shape.name(), format.file_label()));
    let path = dir.join(&name);
    let tensors: Vec<(TensorSpec, GgmlDType)> = shape
        .tensors()
        .into_iter()
        .map(|t| {
            let d = format.gguf_dtype(&t, shape).expect("a GGUF format");
            (t, d)
        })
        .collect();

    let mut h = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    let meta = metadata(shape, format);
    h.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in &meta {
        put_str(&mut h, key);
        value.put(&mut h);
    }
    let mut rel = 0u64;
    let mut rel_offsets = Vec::with_capacity(tensors.len());
    for (t, d) in &tensors {
        put_str(&mut h, &t.gguf_name);
        h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for dim in t.dims.iter().rev() {
            h.extend_from_slice(&(*dim as u64).to_le_bytes());
        }
        h.extend_from_slice(&ggml_type_id(*d).to_le_bytes());
        h.extend_from_slice(&rel.to_le_bytes());
        rel_offsets.push(rel);
        let (rows, cols) = t.rows_cols();
        rel = (rel + (rows * row_bytes(*d, cols)) as u64).next_multiple_of(GGUF_ALIGNMENT);
    }
    let data_start = (h.len() as u64).next_multiple_of(GGUF_ALIGNMENT);
    h.resize(data_start as usize, 0);
    let total = data_start + rel;
    let mut f = File::create(&path).map_err(SynthError::io(&path))?;
    f.write_all(&h)
        .and_then(|()| f.set_len(total))
        .map_err(SynthError::io(&path))?;
    let placed: Vec<Placed> = tensors
        .into_iter()
        .zip(rel_offsets)
        .map(|((spec, d), rel)| Placed {
            spec,
            encoding: Encoding::Ggml(d),
            file: 0,
            offset: data_start + rel,
        })
        .collect();
    fill(seed, &placed, &[(path, f)], threads)?;
    Ok((vec![name], total))
}

/// GGUF metadata, as llama.cpp's converter writes it for Qwen3 (`general.*`, `qwen3.*`).
///
/// No `tokenizer.ggml.*` keys: the engine works on token ids and never reads them, and a
/// made-up vocabulary would only pretend to be a tokenizer.
fn metadata(shape: &Shape, format: Format) -> Vec<(&'static str, Meta)> {
    let u = |v: usize| Meta::U32(u32::try_from(v).unwrap_or(u32::MAX));
    vec![
        ("general.architecture", Meta::Str("qwen3".to_owned())),
        ("general.type", Meta::Str("model".to_owned())),
        (
            "general.name",
            Meta::Str(format!("helexa synthetic {}", shape.name())),
        ),
        ("general.quantization_version", Meta::U32(2)),
        (
            "general.file_type",
            Meta::U32(format.gguf_file_type().unwrap_or(0)),
        ),
        ("qwen3.block_count", u(shape.num_hidden_layers)),
        ("qwen3.context_length", u(shape.max_position_embeddings)),
        ("qwen3.embedding_length", u(shape.hidden_size)),
        ("qwen3.feed_forward_length", u(shape.intermediate_size)),
        ("qwen3.attention.head_count", u(shape.num_attention_heads)),
        (
            "qwen3.attention.head_count_kv",
            u(shape.num_key_value_heads),
        ),
        ("qwen3.rope.freq_base", Meta::F32(shape.rope_theta as f32)),
        (
            "qwen3.attention.layer_norm_rms_epsilon",
            Meta::F32(shape.rms_norm_eps as f32),
        ),
        ("qwen3.attention.key_length", u(shape.head_dim)),
        ("qwen3.attention.value_length", u(shape.head_dim)),
    ]
}

/// The GGUF metadata value types used here (`enum gguf_type`).
enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
}

impl Meta {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U32(v) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                put_str(out, s);
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Generates every tensor's data with `threads` workers, each taking the next block of rows,
/// encoding it and writing it at its offset. The first error stops all workers.
fn fill(
    seed: u64,
    placed: &[Placed],
    files: &[(PathBuf, File)],
    threads: usize,
) -> Result<(), SynthError> {
    // Units: (tensor, first row, end row).
    let mut units = Vec::new();
    for (i, p) in placed.iter().enumerate() {
        let (rows, cols) = p.spec.rows_cols();
        let step = (BLOCK_ELEMENTS / cols).max(1);
        units.extend(
            (0..rows)
                .step_by(step)
                .map(|r| (i, r, (r + step).min(rows))),
        );
    }
    // Largest tensors first would balance better, but blocks are small enough that order only
    // matters for write locality, which checkpoint order keeps.
    let files: Vec<(&Path, Mutex<&File>)> = files
        .iter()
        .map(|(p, f)| (p.as_path(), Mutex::new(f)))
        .collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<SynthError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut values = Vec::new();
                while !failed.load(Ordering::Relaxed) {
                    let u = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, r0, r1)) = units.get(u) else {
                        break;
                    };
                    if let Err(e) = write_block(seed, &placed[i], r0, r1, &files, &mut values) {
                        failed.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Generates rows `r0..r1` of one tensor, encodes them and writes them in place.
fn write_block(
    seed: u64,
    p: &Placed,
    r0: usize,
    r1: usize,
    files: &[(&Path, Mutex<&File>)],
    values: &mut Vec<f32>,
) -> Result<(), SynthError> {
    let (_, cols) = p.spec.rows_cols();
    values.clear();
    values.resize((r1 - r0) * cols, 0.0);
    for (k, row) in values.chunks_mut(cols).enumerate() {
        fill_row(seed, &p.spec, r0 + k, row);
    }
    let bytes: Vec<u8> = match p.encoding {
        Encoding::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Encoding::Ggml(GgmlDType::F32) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Encoding::Ggml(d) => {
            // Blocks never straddle rows, so quantizing a block of rows gives exactly the bytes
            // of those rows in the quantized whole.
            let quantize = || {
                let t = Tensor::from_slice(values.as_slice(), (r1 - r0, cols), &Device::Cpu)?;
                QTensor::quantize(&t, d)?
                    .data()
                    .map(std::borrow::Cow::into_owned)
            };
            quantize().map_err(|source| SynthError::Quantize {
                tensor: p.spec.gguf_name.clone(),
                source,
            })?
        }
    };
    debug_assert_eq!(bytes.len(), (r1 - r0) * p.encoding.row_bytes(cols));
    let (path, file) = &files[p.file];
    let offset = p.offset + (r0 * p.encoding.row_bytes(cols)) as u64;
    let mut f = file
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(&bytes))
        .map_err(SynthError::io(path))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::safetensors;
    use crate::shape::Shape;
    use crate::values::tensor_values;

    #[test]
    fn large_models_are_sharded_with_an_index() {
        let shape = Shape::preset("tiny").unwrap().with_layers(2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Shards of at most 1 MiB: the 1 MiB embedding table alone, then the layers, then the head.
        let (files, bytes) = safetensors(&shape, 3, dir.path(), 2, 1 << 20).unwrap();
        assert!(files.len() > 2, "{files:?}");
        assert_eq!(
            files[0].to_str(),
            Some(format!("model-00001-of-{:05}.safetensors", files.len()).as_str())
        );
        let on_disk: u64 = files
            .iter()
            .map(|f| std::fs::metadata(dir.path().join(f)).unwrap().len())
            .sum();
        assert_eq!(on_disk, bytes);
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let mut seen = 0;
        for f in &files {
            let tensors = candle_core::safetensors::load(dir.path().join(f), &Device::Cpu).unwrap();
            for (name, t) in tensors {
                seen += 1;
                assert_eq!(index["weight_map"][&name], f.to_str().unwrap());
                let spec = shape
                    .tensors()
                    .into_iter()
                    .find(|s| s.hf_name == name)
                    .unwrap();
                let got: Vec<f32> = t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got, tensor_values(3, &spec), "{name}");
            }
        }
        assert_eq!(seen, shape.tensors().len());
    }
}
