//! Where a model's weights come from: Hugging Face safetensors (dense, any float dtype) or a GGUF
//! file (llama.cpp's tensor names and block quantizations). Model code asks for tensors by their
//! Hugging Face checkpoint names; the GGUF side maps them to llama.cpp's names.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Result, Tensor};

use crate::layers::{Linear, Projections, RmsNorm, fusion_enabled, is_block_quantized};

/// A GGUF file opened for loading: its parsed header plus a reader for tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: RefCell<BufReader<File>>,
    /// The staging buffers of [`GgufFile::staged`], made on first use (boxed: a GGUF source
    /// should not make every `Weights` as large as the loader).
    #[cfg(feature = "cuda")]
    staged: RefCell<Option<Box<crate::staged_load::Loader>>>,
}

/// Where in a GGUF file the data of one or more block-quantized tensors of one type and width
/// lies: stacked, they are a `(rows, cols)` tensor.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct StackedRanges {
    pub dtype: candle_core::quantized::GgmlDType,
    /// `(offset in the file, bytes)` of each tensor, in order.
    pub parts: Vec<(u64, usize)>,
    pub rows: usize,
    pub cols: usize,
}

impl GgufFile {
    /// Parses the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| {
            candle_core::Error::msg(format!("{}: {}", path.display(), crate::describe(&e)))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: RefCell::new(reader),
            #[cfg(feature = "cuda")]
            staged: RefCell::new(None),
        })
    }

    /// `general.architecture`, e.g. `llama`, `qwen3`, `qwen3moe`.
    pub fn architecture(&self) -> Result<String> {
        Ok(self.meta("general.architecture")?.to_string()?.clone())
    }

    /// A metadata value, with the key named in the error.
    pub fn meta(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| candle_core::Error::msg(format!("GGUF metadata key `{key}` missing")))
    }

    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        let n = v.to_u64().or_else(|_| v.to_u32().map(u64::from))?;
        usize::try_from(n).map_err(candle_core::Error::wrap)
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        let v = self.meta(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64())
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor in its stored (possibly quantized) form.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let mut reader = self.reader.borrow_mut();
        self.content.tensor(&mut *reader, name, device)
    }

    /// The file ranges of the tensors `names` stacked by rows, or `None` unless they are all
    /// 2-D, of one type and one width, and of a block type candle uploads as raw bytes.
    #[cfg(feature = "cuda")]
    pub fn stacked_ranges(&self, names: &[&str]) -> Option<StackedRanges> {
        let infos: Vec<_> = names
            .iter()
            .map(|n| self.content.tensor_infos.get(*n))
            .collect::<Option<_>>()?;
        let first = infos.first()?;
        let (dtype, cols) = (first.ggml_dtype, *first.shape.dims().get(1)?);
        let mut stacked = StackedRanges {
            dtype,
            parts: Vec::with_capacity(infos.len()),
            rows: 0,
            cols,
        };
        for info in infos {
            let &[rows, c] = info.shape.dims() else {
                return None;
            };
            if info.ggml_dtype != dtype || c != cols || !stageable(dtype) {
                return None;
            }
            let bytes = rows * cols / dtype.block_size() * dtype.type_size();
            stacked
                .parts
                .push((self.content.tensor_data_offset + info.offset, bytes));
            stacked.rows += rows;
        }
        Some(stacked)
    }

    /// The block-quantized tensors `names` stacked by rows into one tensor on `device`, read
    /// straight from the file through page-locked staging buffers ([`crate::staged_load`])
    /// unless `HELEXA_ENGINE_STAGED_GGUF=0`; `None` where that path does not apply (not a CUDA
    /// device, the switch off, not [`GgufFile::stacked_ranges`], no page-locked memory): the
    /// caller reads them through candle.
    #[cfg(feature = "cuda")]
    pub fn staged(&self, names: &[&str], device: &Device) -> Result<Option<QTensor>> {
        if !crate::staged_load::gguf_enabled() {
            return Ok(None);
        }
        self.staged_with(names, device)
    }

    /// [`GgufFile::staged`] whatever the switch says.
    #[cfg(feature = "cuda")]
    pub(crate) fn staged_with(&self, names: &[&str], device: &Device) -> Result<Option<QTensor>> {
        if !device.is_cuda() {
            return Ok(None);
        }
        let Some(ranges) = self.stacked_ranges(names) else {
            return Ok(None);
        };
        let mut loader = self.staged.borrow_mut();
        if !loader
            .as_ref()
            .is_some_and(|l| l.device().same_device(device))
        {
            match crate::staged_load::Loader::new(device, crate::staged_load::STAGE_BYTES) {
                Ok(made) => *loader = Some(Box::new(made)),
                Err(e) => {
                    // Page-locked memory is a speed-up, not a requirement: candle's reader then.
                    eprintln!(
                        "helexa-engine-cuda: no staging buffers ({}), GGUF read through candle",
                        crate::describe(&e)
                    );
                    return Ok(None);
                }
            }
        }
        let loader = loader.as_mut().expect("made above");
        // The reader's buffer is discarded by its next seek (candle seeks before every read),
        // so reading the file underneath it is safe.
        let mut reader = self.reader.borrow_mut();
        loader
            .quantized(
                reader.get_mut(),
                &ranges.parts,
                ranges.dtype,
                &[ranges.rows, ranges.cols],
            )
            .map(Some)
    }

    /// The dimensions of a tensor, candle order (outermost first).
    pub fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
    }
}

enum Source {
    Safetensors(HashMap<String, Tensor>),
    Gguf(GgufFile),
}

/// Weight lookup for model construction, converting dense tensors to the compute dtype.
pub struct Weights {
    source: Source,
    pub device: Device,
    pub dtype: DType,
}

impl Weights {
    /// Loads every tensor of the given safetensors files (read, not memory-mapped) straight onto
    /// `device`, one file at a time: each tensor is copied from the file's bytes to the device
    /// once, with no CPU tensor in between (that detour made a 16 GB bf16 load take 27 s on an
    /// H200 host instead of a few), and converted to the compute dtype as it arrives, so memory
    /// peaks at one shard in the file's dtype.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut map = HashMap::new();
        let mut shards = ShardReader::new(device)?;
        for f in files {
            let tensors = shards.read(f, device).map_err(|e| {
                candle_core::Error::msg(format!("{}: {}", f.display(), crate::describe(&e)))
            })?;
            for (name, tensor) in tensors {
                map.insert(name, tensor.to_dtype(dtype)?);
            }
        }
        Ok(Self {
            source: Source::Safetensors(map),
            device: device.clone(),
            dtype,
        })
    }

    pub fn from_gguf(file: GgufFile, dtype: DType, device: &Device) -> Self {
        Self {
            source: Source::Gguf(file),
            device: device.clone(),
            dtype,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf(_))
    }

    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            Source::Gguf(g) => Some(g),
            Source::Safetensors(_) => None,
        }
    }

    /// Whether a tensor with this checkpoint name exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors(m) => m.contains_key(name),
            Source::Gguf(g) => gguf_name(name).is_some_and(|n| g.has_tensor(&n)),
        }
    }

    /// A dense tensor in the compute dtype on the compute device.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        match &self.source {
            Source::Safetensors(m) => m
                .get(name)
                .ok_or_else(|| missing(name))?
                .to_device(&self.device)?
                .to_dtype(self.dtype),
            Source::Gguf(g) => {
                let n = gguf_name(name).ok_or_else(|| missing(name))?;
                if !g.has_tensor(&n) {
                    return Err(missing(&format!("{n} (for {name})")));
                }
                g.qtensor(&n, &self.device)?
                    .dequantize(&self.device)?
                    .to_dtype(self.dtype)
            }
        }
    }

    /// A dense tensor, checked against an expected shape.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() != shape {
            candle_core::bail!("tensor {name} has shape {:?}, expected {shape:?}", t.dims());
        }
        Ok(t)
    }

    /// A GGUF table `name` of shape `shape` kept in its block quantization (on the device);
    /// `None` for safetensors and for GGUF float types.
    pub fn quantized_table(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        let Source::Gguf(g) = &self.source else {
            return Ok(None);
        };
        let stored = gguf_name(name).and_then(|n| g.content.tensor_infos.get(&n));
        if stored.is_some_and(|info| !is_block_quantized(info.ggml_dtype)) {
            return Ok(None);
        }
        Ok(Some(self.gguf_tensor(g, name, shape, &self.device)?))
    }

    pub fn rms_norm(&self, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.get_shaped(name, &[size])?, eps))
    }

    /// A linear layer `<prefix>.weight` of shape `(out, in)` (and `<prefix>.bias` if present).
    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        let weight = match &self.source {
            Source::Safetensors(_) => {
                QMatMul::Tensor(self.get_shaped(&format!("{prefix}.weight"), &[out, inp])?)
            }
            Source::Gguf(g) => self.qmatmul(self.gguf_tensor(
                g,
                &format!("{prefix}.weight"),
                &[out, inp],
                &self.device,
            )?)?,
        };
        Ok(Linear::new(weight, self.bias(prefix, out)?))
    }

    /// Projections of one input (`(prefix, out)` each, all `(out, inp)`: q/k/v, gate/up),
    /// stacked into one product where [`Projections::new`] would stack them. GGUF blocks are
    /// read to the host and stacked there, then uploaded once: uploading each part and reading
    /// it back to stack it moved the bytes over the bus three times (most of a model's weights
    /// are in these projections).
    pub fn projections(&self, parts: &[(&str, usize)], inp: usize) -> Result<Projections> {
        let has_bias = parts
            .iter()
            .any(|&(p, _)| self.contains(&format!("{p}.bias")));
        let g = match &self.source {
            // Biases keep the parts separate.
            Source::Gguf(g) if !has_bias => g,
            _ => {
                let linears = parts.iter().map(|&(p, out)| self.linear(p, out, inp));
                return Projections::new(linears.collect::<Result<_>>()?);
            }
        };
        #[cfg(feature = "cuda")]
        if let Some(stacked) = self.staged_projections(g, parts, inp)? {
            return Ok(stacked);
        }
        let host: Vec<(QTensor, usize)> = parts
            .iter()
            .map(|&(p, out)| {
                let weight = format!("{p}.weight");
                Ok((
                    self.gguf_tensor(g, &weight, &[out, inp], &Device::Cpu)?,
                    out,
                ))
            })
            .collect::<Result<_>>()?;
        self.upload_projections(host)
    }

    /// The projections `projs` (e.g. `["gate_proj", "up_proj"]`, each `(out, inp)`) of each of
    /// the `n` experts `<prefix>.experts.{e}`, stacked per expert as [`Weights::projections`]
    /// does; GGUF's stacked expert tensors are split and restacked on the host.
    pub fn expert_projections(
        &self,
        prefix: &str,
        projs: &[&str],
        n: usize,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Projections>> {
        let Source::Gguf(g) = &self.source else {
            return (0..n)
                .map(|e| {
                    let names: Vec<String> = projs
                        .iter()
                        .map(|proj| format!("{prefix}.experts.{e}.{proj}"))
                        .collect();
                    let parts: Vec<(&str, usize)> =
                        names.iter().map(|name| (name.as_str(), out)).collect();
                    self.projections(&parts, inp)
                })
                .collect();
        };
        let mut per_proj: Vec<std::vec::IntoIter<QTensor>> = projs
            .iter()
            .map(|proj| {
                let parts = self.gguf_experts(g, (prefix, proj), (n, out, inp), &Device::Cpu)?;
                Ok(parts.into_iter())
            })
            .collect::<Result<_>>()?;
        (0..n)
            .map(|_| {
                // Expert e's part of each projection, in order.
                let host = per_proj
                    .iter_mut()
                    .map(|parts| parts.next().map(|q| (q, out)))
                    .collect::<Option<_>>()
                    .ok_or_else(|| candle_core::Error::msg("expert split ran short"))?;
                self.upload_projections(host)
            })
            .collect()
    }

    /// Host-side parts `(weight, out)` of one input's projections as [`Projections`] on the
    /// device: one upload of the stacked blocks when they all stack; else runs of consecutive
    /// parts of one block type, each stacked; else each part on its own.
    fn upload_projections(&self, host: Vec<(QTensor, usize)>) -> Result<Projections> {
        let refs: Vec<(&QTensor, usize)> = host.iter().map(|(q, out)| (q, *out)).collect();
        if let Some(stacked) = Projections::stack_quantized(&refs, &self.device)? {
            return Ok(stacked);
        }
        let runs: Vec<&[(&QTensor, usize)]> = refs
            .chunk_by(|(a, _), (b, _)| a.dtype() == b.dtype())
            .collect();
        let stacks =
            |run: &&[(&QTensor, usize)]| run.len() >= 2 && is_block_quantized(run[0].0.dtype());
        if fusion_enabled() && runs.iter().any(stacks) {
            let runs = runs
                .into_iter()
                .map(
                    |run| match Projections::stack_quantized(run, &self.device)? {
                        Some(stacked) => Ok(stacked),
                        None => Ok(Projections::Separate(
                            run.iter()
                                .map(|(q, _)| self.upload_linear(q))
                                .collect::<Result<_>>()?,
                        )),
                    },
                )
                .collect::<Result<_>>()?;
            return Ok(Projections::Runs(runs));
        }
        let linears = refs
            .iter()
            .map(|(q, _)| self.upload_linear(q))
            .collect::<Result<_>>()?;
        Projections::new(linears)
    }

    /// The projections `parts` stacked into one product straight from the file
    /// ([`GgufFile::staged`]) when they would be stacked at all (fusion on, two or more, one
    /// block type and width), else `None`.
    #[cfg(feature = "cuda")]
    fn staged_projections(
        &self,
        g: &GgufFile,
        parts: &[(&str, usize)],
        inp: usize,
    ) -> Result<Option<Projections>> {
        if !crate::staged_load::gguf_enabled() || !fusion_enabled() || parts.len() < 2 {
            return Ok(None); // the switch first: off, the load is as it was
        }
        let names: Vec<String> = parts
            .iter()
            .map(|&(p, _)| gguf_name(&format!("{p}.weight")).ok_or_else(|| missing(p)))
            .collect::<Result<_>>()?;
        for (n, &(_, out)) in names.iter().zip(parts) {
            if g.tensor_dims(n).as_deref() != Some(&[out, inp][..]) {
                return Ok(None); // missing or misshapen: the host path says which
            }
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // The switch was read above: straight to the staged read.
        let Some(stacked) = g.staged_with(&names, &self.device)? else {
            return Ok(None);
        };
        let widths = parts.iter().map(|&(_, out)| out).collect();
        Ok(Some(Projections::fused_quantized(stacked, widths)))
    }

    /// A host-side GGUF weight as a linear layer on the device, uploaded as stored (float types
    /// too: `qmatmul` then widens them on the device, which moves half the bytes of widening on
    /// the host).
    fn upload_linear(&self, q: &QTensor) -> Result<Linear> {
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            q.dtype(),
            &q.data()?,
            q.shape().dims().to_vec(),
            &self.device,
        )?;
        Ok(Linear::new(self.qmatmul(q)?, None))
    }

    /// `<prefix>.bias` of shape `(out,)`, if the checkpoint has one.
    fn bias(&self, prefix: &str, out: usize) -> Result<Option<Tensor>> {
        let name = format!("{prefix}.bias");
        if self.contains(&name) {
            Ok(Some(self.get_shaped(&name, &[out])?))
        } else {
            Ok(None)
        }
    }

    /// The GGUF tensor for the checkpoint name `name`, checked to have `shape`, read onto
    /// `device`.
    fn gguf_tensor(
        &self,
        g: &GgufFile,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<QTensor> {
        let n = gguf_name(name).ok_or_else(|| missing(name))?;
        if !g.has_tensor(&n) {
            return Err(missing(&format!("{n} (for {name})")));
        }
        #[cfg(feature = "cuda")]
        let staged = g.staged(&[&n], device)?;
        #[cfg(not(feature = "cuda"))]
        let staged = None;
        let q = match staged {
            Some(q) => q,
            None => g.qtensor(&n, device)?,
        };
        if q.shape().dims() != shape {
            candle_core::bail!("tensor {n} has shape {:?}, expected {shape:?}", q.shape());
        }
        Ok(q)
    }

    /// GGUF's stacked experts `blk.N.ffn_<proj>_exps` for `<prefix>.experts.<proj>` split into
    /// the `n` experts' `(out, inp)` weights on `device` (quantization blocks never straddle
    /// rows, so each expert is a contiguous byte range).
    fn gguf_experts(
        &self,
        g: &GgufFile,
        (prefix, proj): (&str, &str),
        (n, out, inp): (usize, usize, usize),
        device: &Device,
    ) -> Result<Vec<QTensor>> {
        let name = format!("{prefix}.experts.{proj}.weight");
        let q = self.gguf_tensor(g, &name, &[n, out, inp], &Device::Cpu)?;
        let data = q.data()?;
        let per = data.len() / n;
        (0..n)
            .map(|e| {
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    q.dtype(),
                    &data[e * per..(e + 1) * per],
                    vec![out, inp],
                    device,
                )
            })
            .collect()
    }

    /// The expert projections `<prefix>.experts.{e}.<proj>` of a mixture-of-experts block. GGUF
    /// stores them stacked as one 3-D tensor (`blk.N.ffn_<proj>_exps`), which is split per expert
    /// (quantization blocks never straddle rows, so each expert is a contiguous byte range).
    pub fn experts(
        &self,
        prefix: &str,
        proj: &str,
        n: usize,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Linear>> {
        match &self.source {
            Source::Safetensors(_) => (0..n)
                .map(|e| self.linear(&format!("{prefix}.experts.{e}.{proj}"), out, inp))
                .collect(),
            Source::Gguf(g) => self
                .gguf_experts(g, (prefix, proj), (n, out, inp), &self.device)?
                .into_iter()
                .map(|q| Ok(Linear::new(self.qmatmul(q)?, None)))
                .collect(),
        }
    }

    /// Wraps a GGUF tensor for matrix products: float types become dense tensors in the compute
    /// dtype, block-quantized types stay quantized.
    fn qmatmul(&self, q: QTensor) -> Result<QMatMul> {
        if is_block_quantized(q.dtype()) {
            QMatMul::from_qtensor(q)
        } else {
            Ok(QMatMul::Tensor(
                q.dequantize(&self.device)?.to_dtype(self.dtype)?,
            ))
        }
    }

    /// The quantization of the weights, for reporting: `"none"` for safetensors, else the GGUF
    /// dtype of the first attention projection (e.g. `Q4K`).
    pub fn quant_label(&self) -> String {
        match &self.source {
            Source::Safetensors(_) => "none".to_owned(),
            Source::Gguf(g) => g
                .content
                .tensor_infos
                .get("blk.0.attn_q.weight")
                .map_or_else(|| "unknown".to_owned(), |i| format!("{:?}", i.ggml_dtype)),
        }
    }
}

/// Whether GGUF tensors of `dtype` go to the device as their raw bytes in candle's reader
/// (`qtensor_from_ggml`'s block types), so the staged load can copy those bytes itself.
#[cfg(feature = "cuda")]
fn stageable(dtype: candle_core::quantized::GgmlDType) -> bool {
    use candle_core::quantized::GgmlDType as G;
    matches!(
        dtype,
        G::Q4_0
            | G::Q4_1
            | G::Q5_0
            | G::Q5_1
            | G::Q8_0
            | G::Q2K
            | G::Q3K
            | G::Q4K
            | G::Q5K
            | G::Q6K
    )
}

/// Where safetensors shards come from: on a GPU (unless `HELEXA_ENGINE_STAGED_LOAD=0`), read
/// through page-locked staging buffers (`staged_load`), else candle's loader.
struct ShardReader {
    #[cfg(feature = "cuda")]
    staged: Option<crate::staged_load::Loader>,
}

impl ShardReader {
    fn new(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let staged = (device.is_cuda() && crate::staged_load::enabled())
                .then(|| crate::staged_load::Loader::new(device, crate::staged_load::STAGE_BYTES))
                .transpose()?;
            Ok(Self { staged })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    /// One shard's tensors on `device`, in the file's dtypes (a shard the staged loader does
    /// not take, with integer tensors say, goes through candle's).
    fn read(&mut self, path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(loader) = self.staged.as_mut()
            && let Some(tensors) = loader.shard(path)?
        {
            return Ok(tensors);
        }
        candle_core::safetensors::load(path, device)
    }
}

fn missing(name: &str) -> candle_core::Error {
    candle_core::Error::msg(format!("weight `{name}` not found"))
}

/// Maps a Hugging Face checkpoint tensor name to llama.cpp's GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?; // suffix: weight | bias
    let mapped = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        "mlp.experts.gate_proj" => "ffn_gate_exps",
        "mlp.experts.up_proj" => "ffn_up_exps",
        "mlp.experts.down_proj" => "ffn_down_exps",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use candle_core::quantized::QTensor;

    use super::{GgufFile, Weights, gguf_name};
    use crate::layers::Projections;

    /// The host-stacked GGUF projections compute what the parts do one by one, in each block
    /// type of the fixtures (BF16 is dense and stacks as before).
    #[test]
    fn gguf_projections_stack_on_the_host_and_match_the_parts() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/tiny-qwen3/gguf");
        for ty in ["Q8_0", "Q4_K_M", "Q6_K", "BF16"] {
            let file = GgufFile::open(format!("{dir}/tiny-qwen3-{ty}.gguf").as_ref()).expect(ty);
            let vb = Weights::from_gguf(file, DType::F32, &Device::Cpu);
            let p = "model.layers.0.self_attn";
            let names = [
                (format!("{p}.q_proj"), 256),
                (format!("{p}.k_proj"), 128),
                (format!("{p}.v_proj"), 128),
            ];
            let parts: Vec<(&str, usize)> = names.iter().map(|(n, o)| (n.as_str(), *o)).collect();
            let stacked = vb.projections(&parts, 256).expect("projections");
            assert!(
                matches!(stacked, Projections::Fused { .. }),
                "{ty}: not stacked"
            );
            for len in [1, 3] {
                let x = Tensor::randn(0f32, 1.0, (1, len, 256), &Device::Cpu).expect("x");
                let got = stacked.forward(&x).expect("stacked");
                for ((name, out), got) in names.iter().zip(&got) {
                    let want = vb
                        .linear(name, *out, 256)
                        .and_then(|l| l.forward(&x))
                        .expect("part");
                    let diff = (got - &want)
                        .and_then(|d| d.abs())
                        .and_then(|d| d.max_all())
                        .and_then(|d| d.to_scalar::<f32>())
                        .expect("diff");
                    // Quantized parts take the same kernel either way; a dense stacked matmul
                    // may sum in another order.
                    let tolerance = if ty == "BF16" { 1e-5 } else { 0.0 };
                    assert!(diff <= tolerance, "{ty} {name} len {len}: {diff}");
                }
            }
        }
    }

    /// Q4_K_M-style mixed parts (q, k in Q4_K, v in Q6_K): q and k stack, v stays apart, and
    /// the outputs are the parts' own.
    #[test]
    fn mixed_block_types_stack_in_runs() {
        use candle_core::quantized::GgmlDType;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/tiny-qwen3/gguf");
        let file = GgufFile::open(format!("{dir}/tiny-qwen3-Q8_0.gguf").as_ref()).expect("gguf");
        let vb = Weights::from_gguf(file, DType::F32, &Device::Cpu);
        let part = |rows: usize, dtype: GgmlDType| {
            let w = Tensor::randn(0f32, 1.0, (rows, 256), &Device::Cpu).expect("w");
            (QTensor::quantize(&w, dtype).expect("quantize"), rows)
        };
        let host = vec![
            part(64, GgmlDType::Q4K),
            part(32, GgmlDType::Q4K),
            part(32, GgmlDType::Q6K),
        ];
        let singles: Vec<_> = host
            .iter()
            .map(|(q, _)| vb.upload_linear(q).expect("part"))
            .collect();
        let projections = vb.upload_projections(host).expect("projections");
        let Projections::Runs(runs) = &projections else {
            panic!("expected runs, got {projections:?}");
        };
        assert!(matches!(
            runs.as_slice(),
            [Projections::Fused { .. }, Projections::Separate(v)] if v.len() == 1
        ));
        let x = Tensor::randn(0f32, 1.0, (1, 1, 256), &Device::Cpu).expect("x");
        let got = projections.forward(&x).expect("forward");
        assert_eq!(got.len(), 3);
        for (got, single) in got.iter().zip(&singles) {
            let want = single.forward(&x).expect("single");
            let diff = (got - &want)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(diff, 0.0);
        }
    }

    /// On the CPU a GGUF embedding table stays quantized, and its rows are the dequantized
    /// table's rows.
    #[test]
    fn quantized_embedding_rows_match_the_dequantized_table() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/tiny-qwen3/gguf");
        for ty in ["Q8_0", "Q4_K_M", "BF16"] {
            let file = GgufFile::open(format!("{dir}/tiny-qwen3-{ty}.gguf").as_ref()).expect(ty);
            let vb = Weights::from_gguf(file, DType::F32, &Device::Cpu);
            let name = "model.embed_tokens.weight";
            let embed = crate::models::Embedding::load(&vb, name, 2048, 256).expect("embedding");
            let dense = vb.get_shaped(name, &[2048, 256]).expect("dense");
            assert_eq!(
                embed.size_in_bytes() < 2048 * 256 * 4,
                ty != "BF16",
                "{ty}: quantized table kept"
            );
            let tokens = [0u32, 7, 2047, 7];
            let ids = Tensor::from_slice(&tokens, 4, &Device::Cpu).expect("ids");
            let want = dense.index_select(&ids, 0).expect("rows");
            let got = embed
                .forward(&tokens)
                .expect("forward")
                .squeeze(0)
                .expect("rows");
            let diff = (got - want)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(diff, 0.0, "{ty}");
        }
    }

    #[test]
    fn maps_checkpoint_names_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(),
            Some("blk.3.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.experts.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down_exps.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            gguf_name("model.layers.1.mlp.gate.weight").as_deref(),
            Some("blk.1.ffn_gate_inp.weight")
        );
        assert_eq!(gguf_name("model.rotary.inv_freq"), None);
    }
}
