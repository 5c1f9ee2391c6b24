//! `helexa-node bench` and `helexa-node synth`: throughput of an engine on a model, measured
//! through the engine ABI exactly as serving calls it, next to the hardware's ceilings.
//!
//! Figures (every one after warm-up runs, over repeats, median and best):
//! - **load**: wall time of `load_model` (files → device), against file bytes ÷ read bandwidth;
//! - **prefill N**: a fresh N-token prompt generating one token (no prefix reuse: each prompt
//!   starts with a token different from the previous one, and the summary must report 0 reused
//!   tokens), N ÷ wall time, against FLOP rate ÷ FLOPs per token;
//! - **decode @C**: a fresh prompt of C tokens (1 for "empty"), then T more tokens; T ÷ the time
//!   from the first token to the last (prefill excluded), against memory bandwidth ÷ bytes read
//!   per token (every weight once, one embedding row, the KV cache at the mean context).
//!
//! Sampling is greedy (or, with `--temperature`, seeded sampling on the host) and the stop list
//! is empty, so generation never ends early; the summary's token counts are checked. The formulas are in [`formulas`] and `docs/bench-harness.md`.

mod formulas;
mod model;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use helexa_engine_abi::{Flow, json};
use helexa_model_synth::values::SplitMix64;
use helexa_model_synth::{Format, Shape};
use serde::Serialize;

use self::formulas::Ceilings;
use self::model::ModelDescription;

/// `helexa-node bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Engine shared library (e.g. target/release/libhelexa_engine_cuda.so).
    #[arg(long)]
    engine: PathBuf,
    /// Model to measure: a Hugging Face directory (config.json + *.safetensors), a directory with
    /// one .gguf file, or a .gguf file. Repeat for several.
    #[arg(long, required_unless_present = "synth")]
    model: Vec<PathBuf>,
    /// Label of the model in the table and JSON (default: the file or directory name; with
    /// several models or --synth, a prefix).
    #[arg(long)]
    label: Option<String>,
    /// Synthesize this preset (qwen3-8b, tiny) in --workdir, reusing complete files, and measure
    /// each of --formats.
    #[arg(long, conflicts_with = "model")]
    synth: Option<String>,
    /// Formats to synthesize and measure with --synth.
    #[arg(long, value_delimiter = ',', default_value = "bf16,q8_0,q4_k_m")]
    formats: Vec<Format>,
    /// Shorten the preset to this many layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Seed of the synthesized weights and of the prompts' token ids.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory of synthesized models (one sub-directory per preset and format).
    #[arg(long, default_value = "bench-models")]
    workdir: PathBuf,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Prompt lengths of the prefill figures.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    prefill: Vec<u32>,
    /// Contexts (prompt tokens before decoding; 0 = a one-token prompt) of the decode figures.
    #[arg(long, value_delimiter = ',', default_value = "0,4096")]
    decode_context: Vec<u32>,
    /// Tokens timed per decode figure (from the first generated token to the last).
    #[arg(long, default_value_t = 128)]
    decode_tokens: u32,
    /// Untimed runs before each figure.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Timed runs per figure.
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Compute dtype to request (bf16, f16, f32; default: the engine's).
    #[arg(long)]
    dtype: Option<String>,
    /// Device index to load on (default: the engine's choice).
    #[arg(long)]
    device: Option<u32>,
    /// Prefill chunk size (default: the engine's).
    #[arg(long)]
    prefill_chunk: Option<u32>,
    /// Decode with this sampling temperature (default 0: greedy, the pick made on the device);
    /// above 0 every token's logits go to the host sampler, seeded, so runs repeat.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-p of the sampled decode (with --temperature).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Decode ceiling: memory read bandwidth in bytes/s (H200 measured HBM read).
    #[arg(long, default_value_t = 4.40e12)]
    mem_bandwidth: f64,
    /// Prefill ceiling: dense matmul rate in FLOP/s (H200 bf16 dense).
    #[arg(long, default_value_t = 790e12)]
    flops: f64,
    /// Load ceiling: file read bandwidth in bytes/s.
    #[arg(long, default_value_t = 54.7e9)]
    load_bandwidth: f64,
}

/// `helexa-node synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Architecture preset: qwen3-8b or tiny.
    #[arg(long)]
    preset: String,
    /// Shorten the preset to this many layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Formats to write (bf16, q8_0, q4_k_m), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "bf16,q8_0,q4_k_m")]
    formats: Vec<Format>,
    /// Seed of the weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory; each format goes to `<out>/<preset>-<format>/`.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `helexa-node synth`.
pub fn synth(args: &SynthArgs) -> anyhow::Result<()> {
    let shape = shape(&args.preset, args.layers)?;
    for &format in &args.formats {
        let dir = synth_one(&shape, args.seed, format, &args.out)?;
        println!("{}", dir.display());
    }
    Ok(())
}

fn shape(preset: &str, layers: Option<usize>) -> anyhow::Result<Shape> {
    let shape = Shape::preset(preset)?;
    Ok(match layers {
        Some(n) => shape.with_layers(n)?,
        None => shape,
    })
}

/// Synthesizes (or reuses) one format; returns its directory.
fn synth_one(shape: &Shape, seed: u64, format: Format, root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join(format!("{}-{}", shape.name(), format.as_str()));
    let out = helexa_model_synth::synthesize(shape, seed, format, &dir)
        .with_context(|| format!("synthesizing {}", dir.display()))?;
    if out.reused {
        eprintln!("reusing {} ({} bytes)", dir.display(), out.bytes);
    } else {
        eprintln!(
            "synthesized {} ({} params, {} bytes) in {:.1} s",
            dir.display(),
            shape.parameters(),
            out.bytes,
            out.seconds
        );
    }
    Ok(dir)
}

/// Runs `helexa-node bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    ensure!(args.decode_tokens > 0, "--decode-tokens must be at least 1");
    ensure!(
        args.prefill.iter().all(|&n| n > 0),
        "--prefill lengths must be at least 1"
    );
    let mut targets: Vec<(String, PathBuf)> = Vec::new();
    if let Some(preset) = &args.synth {
        let shape = shape(preset, args.layers)?;
        for &format in &args.formats {
            let dir = synth_one(&shape, args.seed, format, &args.workdir)?;
            let name = format!("{}-{}", shape.name(), format.as_str());
            let label = match &args.label {
                Some(l) => format!("{l}/{name}"),
                None => name,
            };
            targets.push((label, dir));
        }
    } else {
        for path in &args.model {
            let label = match (&args.label, args.model.len()) {
                (Some(l), 1) => l.clone(),
                (Some(l), _) => format!("{l}/{}", file_label(path)),
                (None, _) => file_label(path),
            };
            targets.push((label, path.clone()));
        }
    }

    let engine = crate::open_engine(&args.engine)?;
    let info = engine.info().context("asking the engine for its info")?;
    println!(
        "engine: {} {} (backend {}), {}",
        info.name,
        info.version,
        info.backend,
        args.engine.display()
    );
    for d in &info.devices {
        println!(
            "  device {}: {}{} ({} MiB total, {} MiB free)",
            d.index,
            d.name,
            d.compute_capability
                .as_deref()
                .map(|c| format!(", compute {c}"))
                .unwrap_or_default(),
            d.vram_total_mb,
            d.vram_free_mb
        );
    }
    let ceilings = Ceilings {
        mem_bandwidth: args.mem_bandwidth,
        flops: args.flops,
        load_bandwidth: args.load_bandwidth,
    };
    println!(
        "ceilings: decode {:.3e} B/s, prefill {:.3e} FLOP/s, load {:.3e} B/s; {} warm-up + {} timed runs per figure",
        ceilings.mem_bandwidth, ceilings.flops, ceilings.load_bandwidth, args.warmup, args.repeats
    );

    let mut reports = Vec::new();
    for (label, path) in &targets {
        let report = bench_model(&engine, args, &ceilings, label, path)
            .with_context(|| format!("benchmarking {}", path.display()))?;
        print_report(&report);
        reports.push(report);
    }
    if let Some(out) = &args.json {
        let doc = JsonReport {
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            engine: info,
            engine_path: args.engine.clone(),
            ceilings,
            warmup: args.warmup,
            repeats: args.repeats,
            decode_sampling: sampling(args),
            models: reports,
        };
        let text = serde_json::to_string_pretty(&doc).context("encoding the JSON report")?;
        std::fs::write(out, text + "\n").with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn file_label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The whole `--json` document.
#[derive(Debug, Serialize)]
struct JsonReport {
    unix_time: u64,
    engine: json::EngineInfo,
    engine_path: PathBuf,
    ceilings: Ceilings,
    warmup: u32,
    repeats: u32,
    /// How the decode figures picked tokens (greedy: temperature 0).
    decode_sampling: json::Sampling,
    models: Vec<ModelReport>,
}

/// Every figure of one model.
#[derive(Debug, Serialize)]
struct ModelReport {
    label: String,
    path: PathBuf,
    architecture: String,
    /// As the engine reports it (`none` for safetensors).
    quant: String,
    dtype: String,
    device: Vec<u32>,
    parameters: u64,
    file_bytes: u64,
    vram_mb: u64,
    context_length: u32,
    load: LoadFigure,
    prefill: Vec<Figure>,
    decode: Vec<Figure>,
}

#[derive(Debug, Serialize)]
struct LoadFigure {
    seconds: f64,
    ceiling_seconds: f64,
    /// ceiling ÷ measured (1 = at the ceiling).
    ratio: f64,
}

/// A throughput figure.
#[derive(Debug, Serialize)]
struct Figure {
    /// Prompt tokens (prefill) or context before decoding (decode).
    context: u32,
    /// Tokens counted: the prompt (prefill) or the timed generated tokens (decode).
    tokens: u32,
    median_tok_s: f64,
    best_tok_s: f64,
    /// Seconds of every timed run.
    runs_s: Vec<f64>,
    ceiling_tok_s: f64,
    /// median ÷ ceiling.
    ratio: f64,
    /// The ceiling's input: FLOPs per token (prefill) or bytes read per token (decode).
    per_token: f64,
    /// Decode: the greedy tokens of the first timed run. Prompts are seeded, so two runs of the
    /// bench (e.g. an optimisation on and off) can be compared token by token.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    greedy_tokens: Vec<u32>,
    /// Decode: the prompt of that run, so the tokens can be replayed teacher-forced (e.g. for
    /// the logit margin where two runs' tokens part: `scripts/device/parting_margins.py`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    greedy_prompt: Vec<u32>,
    /// Decode: milliseconds per step the engine's host code spent queuing the step's device
    /// work, and the step's whole time, over the timed runs (when the engine reports them).
    /// Queuing close to the whole step means the host's launch path sets the rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    host_queue_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_ms: Option<f64>,
}

/// Loads one model, measures every figure, unloads it.
fn bench_model(
    engine: &crate::EngineHandle,
    args: &BenchArgs,
    ceilings: &Ceilings,
    label: &str,
    path: &Path,
) -> anyhow::Result<ModelReport> {
    let desc = ModelDescription::read(path)?;
    let longest_prompt = args
        .prefill
        .iter()
        .copied()
        .chain(
            args.decode_context
                .iter()
                .map(|&c| c.max(1) + args.decode_tokens + 1),
        )
        .max()
        .unwrap_or(1);
    let spec = json::LoadSpec {
        id: label.to_owned(),
        architecture: desc.architecture.clone(),
        files: desc.files.clone(),
        dtype: args.dtype.clone(),
        devices: args.device.map(|d| vec![d]),
        // A little room beyond the longest run, not the model's full context: the KV cache of a
        // 40k context would only cost memory.
        context_length: Some(longest_prompt + 16),
        prefill_chunk: args.prefill_chunk,
    };
    eprintln!("loading {label} from {}", path.display());
    let start = Instant::now();
    let loaded = engine
        .load_model(&spec)
        .with_context(|| format!("loading {}", path.display()))?;
    let load_s = start.elapsed().as_secs_f64();
    let result = measure(engine, args, ceilings, &desc, &loaded, load_s, label, path);
    if let Err(error) = engine.unload_model(loaded.handle) {
        tracing::warn!(%error, "unloading the model failed");
    }
    result
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site, all context of one run"
)]
fn measure(
    engine: &crate::EngineHandle,
    args: &BenchArgs,
    ceilings: &Ceilings,
    desc: &ModelDescription,
    loaded: &json::LoadedModel,
    load_s: f64,
    label: &str,
    path: &Path,
) -> anyhow::Result<ModelReport> {
    let dtype_bytes = formulas::dtype_bytes(&loaded.dtype)
        .with_context(|| format!("engine reported an unknown dtype {:?}", loaded.dtype))?;
    let mut prompts = Prompts {
        rng: SplitMix64::new(args.seed),
        vocab: u64::from(loaded.vocab_size.max(2)),
        last_first: None,
    };
    let load_ceiling = desc.file_bytes as f64 / ceilings.load_bandwidth;

    let mut prefill = Vec::new();
    for &n in &args.prefill {
        eprintln!("  prefill {n}");
        let mut runs = Vec::new();
        for i in 0..args.warmup + args.repeats {
            let s = prefill_once(engine, loaded.handle, &prompts.fresh(n))?;
            if i >= args.warmup {
                runs.push(s);
            }
        }
        let per_token = formulas::prefill_flops_per_token(desc, n);
        prefill.push(Figure::new(
            n,
            n,
            runs,
            ceilings.flops / per_token,
            per_token,
        ));
    }

    let mut decode = Vec::new();
    for &c in &args.decode_context {
        eprintln!("  decode @{c}");
        let mut runs = Vec::new();
        let mut greedy_tokens = Vec::new();
        let mut greedy_prompt = Vec::new();
        let mut timings = Vec::new();
        for i in 0..args.warmup + args.repeats {
            let prompt = prompts.fresh(c.max(1));
            let (s, tokens, timing) = decode_once(
                engine,
                loaded.handle,
                &prompt,
                args.decode_tokens,
                &sampling(args),
            )?;
            if i >= args.warmup {
                runs.push(s);
                timings.extend(timing);
                if greedy_tokens.is_empty() {
                    greedy_tokens = tokens;
                    greedy_prompt = prompt;
                }
            }
        }
        let per_token =
            formulas::decode_bytes_per_token(desc, dtype_bytes, c.max(1), args.decode_tokens);
        let (host_queue_ms, step_ms) = per_step_ms(&timings).unzip();
        decode.push(Figure {
            greedy_tokens,
            greedy_prompt,
            host_queue_ms,
            step_ms,
            ..Figure::new(
                c,
                args.decode_tokens,
                runs,
                ceilings.mem_bandwidth / per_token,
                per_token,
            )
        });
    }

    Ok(ModelReport {
        label: label.to_owned(),
        path: path.to_path_buf(),
        architecture: desc.architecture.clone(),
        quant: loaded.quant.clone(),
        dtype: loaded.dtype.clone(),
        device: loaded.devices.clone(),
        parameters: desc.parameters(),
        file_bytes: desc.file_bytes,
        vram_mb: loaded.vram_mb,
        context_length: loaded.context_length,
        load: LoadFigure {
            seconds: load_s,
            ceiling_seconds: load_ceiling,
            ratio: load_ceiling / load_s,
        },
        prefill,
        decode,
    })
}

impl Figure {
    fn new(context: u32, tokens: u32, runs: Vec<f64>, ceiling: f64, per_token: f64) -> Self {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let median_s = if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
        };
        let median_tok_s = f64::from(tokens) / median_s;
        Figure {
            context,
            tokens,
            median_tok_s,
            best_tok_s: f64::from(tokens) / sorted[0],
            runs_s: runs,
            ceiling_tok_s: ceiling,
            ratio: median_tok_s / ceiling,
            per_token,
            greedy_tokens: Vec::new(),
            greedy_prompt: Vec::new(),
            host_queue_ms: None,
            step_ms: None,
        }
    }
}

/// Seeded prompts that never share a first token with the previous prompt, so the engine's
/// prefix cache cannot reuse anything.
struct Prompts {
    rng: SplitMix64,
    vocab: u64,
    last_first: Option<u32>,
}

impl Prompts {
    fn fresh(&mut self, len: u32) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..len)
            .map(|_| u32::try_from(self.rng.below(self.vocab)).unwrap_or(0))
            .collect();
        if let Some(first) = ids.first_mut() {
            if Some(*first) == self.last_first {
                *first = u32::try_from((u64::from(*first) + 1) % self.vocab).unwrap_or(0);
            }
            self.last_first = Some(*first);
        }
        ids
    }
}

/// No stop ids: generation only ends at `max_tokens`.
fn params(max_tokens: u32, sampling: &json::Sampling) -> json::GenerateParams {
    json::GenerateParams {
        max_tokens,
        stop_ids: Vec::new(),
        sampling: sampling.clone(),
    }
}

/// The decode runs' sampling: greedy, or `--temperature` / `--top-p` with a fixed seed.
fn sampling(args: &BenchArgs) -> json::Sampling {
    if args.temperature <= 0.0 {
        return json::Sampling::default();
    }
    json::Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: Some(42),
        ..json::Sampling::default()
    }
}

/// One prefill: seconds from the call to its return (prompt + the first sampled token).
fn prefill_once(engine: &crate::EngineHandle, model: u64, prompt: &[u32]) -> anyhow::Result<f64> {
    let start = Instant::now();
    let summary = engine
        .generate(
            model,
            &params(1, &json::Sampling::default()),
            prompt,
            |_| Flow::Continue,
        )
        .context("prefill run")?;
    let seconds = start.elapsed().as_secs_f64();
    check_summary(&summary, prompt.len(), 1)?;
    Ok(seconds)
}

/// Milliseconds per decode step spent queuing, and in all, over the runs' engine timings.
fn per_step_ms(timings: &[json::DecodeTiming]) -> Option<(f64, f64)> {
    let steps: u64 = timings.iter().map(|t| u64::from(t.steps)).sum();
    let sum = |f: fn(&json::DecodeTiming) -> u64| timings.iter().map(f).sum::<u64>() as f64;
    (steps > 0).then(|| {
        let per = |us: f64| us / 1e3 / steps as f64;
        (per(sum(|t| t.queued_us)), per(sum(|t| t.total_us)))
    })
}

/// One decode: seconds from the first generated token to the `tokens`-th token after it, the
/// generated tokens, and the engine's timing of the steps (if it reports one).
fn decode_once(
    engine: &crate::EngineHandle,
    model: u64,
    prompt: &[u32],
    tokens: u32,
    sampling: &json::Sampling,
) -> anyhow::Result<(f64, Vec<u32>, Option<json::DecodeTiming>)> {
    let mut stamps = Vec::with_capacity(tokens as usize + 1);
    let mut ids = Vec::with_capacity(tokens as usize + 1);
    let summary = engine
        .generate(model, &params(tokens + 1, sampling), prompt, |id| {
            stamps.push(Instant::now());
            ids.push(id);
            Flow::Continue
        })
        .context("decode run")?;
    check_summary(&summary, prompt.len(), tokens + 1)?;
    match (stamps.first(), stamps.last()) {
        (Some(first), Some(last)) if stamps.len() == tokens as usize + 1 => Ok((
            last.duration_since(*first).as_secs_f64(),
            ids,
            summary.decode_timing,
        )),
        _ => bail!(
            "engine delivered {} tokens, expected {}",
            stamps.len(),
            tokens + 1
        ),
    }
}

/// The run must have computed the whole prompt and every requested token.
fn check_summary(
    summary: &json::GenerateSummary,
    prompt: usize,
    generated: u32,
) -> anyhow::Result<()> {
    ensure!(
        summary.reused_prompt_tokens == 0,
        "the engine reused {} cached prompt tokens; the figure would not measure a fresh prefill",
        summary.reused_prompt_tokens
    );
    ensure!(
        summary.prompt_tokens as usize == prompt,
        "engine counted {} prompt tokens, sent {prompt}",
        summary.prompt_tokens
    );
    ensure!(
        summary.generated_tokens == generated && summary.finish == json::Finish::Length,
        "engine generated {} tokens ({:?}), expected {generated} ending at the length limit",
        summary.generated_tokens,
        summary.finish
    );
    Ok(())
}

fn print_report(r: &ModelReport) {
    println!();
    println!(
        "model {} ({}; {}, quant {}, dtype {}, device {:?}; {:.3e} params, {:.3e} bytes on file, {} MiB loaded)",
        r.label,
        r.path.display(),
        r.architecture,
        r.quant,
        r.dtype,
        r.device,
        r.parameters as f64,
        r.file_bytes as f64,
        r.vram_mb
    );
    println!(
        "{:<26} {:>14} {:>14} {:>14} {:>7}  ceiling input",
        "figure", "median", "best", "ceiling", "ratio"
    );
    println!(
        "{:<26} {:>12.3} s {:>14} {:>12.3} s {:>6.1}%  {:.3e} B ÷ {:.3e} B/s",
        "load",
        r.load.seconds,
        "",
        r.load.ceiling_seconds,
        100.0 * r.load.ratio,
        r.file_bytes as f64,
        r.file_bytes as f64 / r.load.ceiling_seconds
    );
    for f in &r.prefill {
        println!(
            "{:<26} {:>10.1} t/s {:>10.1} t/s {:>10.1} t/s {:>6.1}%  {:.3e} FLOP/token",
            format!("prefill {} (tok/s)", f.context),
            f.median_tok_s,
            f.best_tok_s,
            f.ceiling_tok_s,
            100.0 * f.ratio,
            f.per_token
        );
    }
    for f in &r.decode {
        println!(
            "{:<26} {:>10.1} t/s {:>10.1} t/s {:>10.1} t/s {:>6.1}%  {:.3e} B/token",
            format!("decode {} @{} (tok/s)", f.tokens, f.context),
            f.median_tok_s,
            f.best_tok_s,
            f.ceiling_tok_s,
            100.0 * f.ratio,
            f.per_token
        );
        if let (Some(queued), Some(step)) = (f.host_queue_ms, f.step_ms) {
            println!(
                "  host queuing {queued:.2} of {step:.2} ms per step ({:.0}%)",
                100.0 * queued / step
            );
        }
    }
}
