//! Fixture access and comparison helpers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use helexa_engine_abi::Flow;
use helexa_engine_abi::json::{
    GenerateParams, GenerateSummary, InitOptions, LoadSpec, ModelFiles, Sampling,
};
use helexa_engine_cuda::Engine;
use serde::Deserialize;

/// The prompts of every `reference.json`.
pub const PROMPTS: [&str; 4] = ["chat", "think", "tools", "long"];
/// `<|im_end|>` and `<|endoftext|>` (generation_config.json `eos_token_id`).
pub const STOP_IDS: [u32; 2] = [2, 0];

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

pub fn model_dir(model: &str) -> PathBuf {
    fixtures().join(model)
}

/// One prompt of `reference.json` (transformers) or of `reference-llamacpp.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptRef {
    #[serde(default)]
    pub token_ids: Vec<u32>,
    pub logits_file: String,
    pub logits_shape: [usize; 2],
    pub greedy_token_ids: Vec<u32>,
    pub greedy_top1_minus_top2: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub architecture: String,
    pub prompts: BTreeMap<String, PromptRef>,
}

#[derive(Debug, Deserialize)]
pub struct LlamaCppFile {
    pub prompts: BTreeMap<String, PromptRef>,
}

#[derive(Debug, Deserialize)]
pub struct LlamaCppReference {
    pub files: BTreeMap<String, LlamaCppFile>,
}

pub fn reference(model: &str) -> Reference {
    let p = model_dir(model).join("reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn llamacpp_reference(model: &str) -> LlamaCppReference {
    let p = model_dir(model).join("gguf/reference-llamacpp.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Reads a raw little-endian f32 logits file into rows of `shape[1]`.
pub fn read_logits(path: &Path, shape: [usize; 2]) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        bytes.len(),
        shape[0] * shape[1] * 4,
        "{} size",
        path.display()
    );
    let flat: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    flat.chunks(shape[1]).map(<[f32]>::to_vec).collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(a: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in a.iter().enumerate() {
        if x > a[best] {
            best = i;
        }
    }
    best
}

pub fn engine() -> Engine {
    Engine::new(&InitOptions::default()).expect("cpu engine")
}

pub fn safetensors_spec(model: &str, architecture: &str) -> LoadSpec {
    let dir = model_dir(model);
    LoadSpec {
        id: model.to_owned(),
        architecture: architecture.to_owned(),
        files: ModelFiles {
            config: Some(dir.join("config.json")),
            safetensors: vec![dir.join("model.safetensors")],
            gguf: None,
        },
        dtype: None,
        devices: None,
        context_length: None,
        prefill_chunk: None,
    }
}

pub fn gguf_spec(model: &str, architecture: &str, file: &str) -> LoadSpec {
    LoadSpec {
        id: file.to_owned(),
        architecture: architecture.to_owned(),
        files: ModelFiles {
            config: None,
            safetensors: Vec::new(),
            gguf: Some(model_dir(model).join("gguf").join(file)),
        },
        dtype: None,
        devices: None,
        context_length: None,
        prefill_chunk: None,
    }
}

pub fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        stop_ids: STOP_IDS.to_vec(),
        sampling: Sampling::default(),
    }
}

/// Runs `generate`, collecting the streamed tokens.
pub fn run(
    engine: &Engine,
    model: u64,
    params: &GenerateParams,
    prompt: &[u32],
) -> (Vec<u32>, GenerateSummary) {
    let mut out = Vec::new();
    let summary = engine
        .generate(model, params, prompt, &mut |t| {
            out.push(t);
            Flow::Continue
        })
        .expect("generate");
    (out, summary)
}

/// Index of the first greedy step whose recorded top-1/top-2 margin is below `threshold`: up to
/// there, any correct implementation must pick the same tokens.
pub fn decisive_steps(margins: &[f32], threshold: f32) -> usize {
    margins
        .iter()
        .position(|&m| m < threshold)
        .unwrap_or(margins.len())
}

/// Asserts that `got` follows `expected` for its decisive steps; returns how many were compared.
pub fn assert_greedy(
    label: &str,
    got: &[u32],
    expected: &[u32],
    margins: &[f32],
    threshold: f32,
) -> usize {
    let n = decisive_steps(margins, threshold).min(expected.len());
    assert!(
        got.len() >= n,
        "{label}: generated {} tokens, need {n}: {got:?}",
        got.len()
    );
    assert_eq!(
        &got[..n],
        &expected[..n],
        "{label}: greedy continuation differs within the first {n} decisive steps"
    );
    n
}
