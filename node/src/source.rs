//! Model sources: turn a `source` string (local directory, local `.gguf` file, or Hugging Face
//! repo id) into local files the engine can load, with preflight checks that name what is wrong.
//!
//! Local sources never touch the network. A hub id is looked up in the Hugging Face cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`, or the node's
//! `cache_dir`) and only downloaded (from `HF_ENDPOINT`, with a progress bar) when absent.

use std::path::{Path, PathBuf};

use helexa_engine_abi::json::ModelFiles;
use serde_json::Value as Json;

/// Why a source cannot be used; each maps to an `error_code` of the node API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Required files are absent.
    #[error("missing files in {location}: {missing}")]
    MissingFiles {
        /// Where we looked.
        location: String,
        /// What is missing, comma-separated.
        missing: String,
    },
    /// The requested GGUF quantisation does not exist.
    #[error("quantisation {requested:?} not found in {location}; available: {available:?}")]
    QuantNotFound {
        /// Asked for.
        requested: String,
        /// Where we looked.
        location: String,
        /// What exists.
        available: Vec<String>,
    },
    /// No architecture can be determined.
    #[error("unknown architecture: {0}")]
    UnknownArchitecture(String),
    /// The source is not a path and not a repo id, or download failed.
    #[error("{0}")]
    Unavailable(String),
}

/// A model resolved to local files.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    /// Architecture name (`Qwen3ForCausalLM` from config.json, or `qwen3` from GGUF metadata).
    pub architecture: String,
    /// Weight files for the engine.
    pub files: ModelFiles,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Directory holding tokenizer_config.json / chat_template.jinja / generation_config.json.
    pub meta_dir: PathBuf,
    /// Weight format as named by the source (`bf16`, `Q4_K_M`).
    pub quant: String,
    /// EOS ids from `generation_config.json` (or the GGUF metadata).
    pub eos_ids: Vec<u32>,
    /// Sampling defaults from `generation_config.json`.
    pub generation_defaults: GenerationDefaults,
    /// Total size of the weight files, bytes (for the memory preflight).
    pub weight_bytes: u64,
}

/// Sampling defaults a model ships with (used when a request leaves them unset).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_k`.
    pub top_k: Option<u32>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
}

/// Resolve a source. `cache_dir` overrides the Hugging Face cache location for downloads.
pub async fn resolve(
    source: &str,
    quant: Option<&str>,
    cache_dir: Option<&Path>,
) -> Result<ResolvedModel, SourceError> {
    let path = expand_home(source);
    if path.is_file() {
        return resolve_gguf_file(&path);
    }
    if path.is_dir() {
        return resolve_dir(&path, quant);
    }
    if looks_like_path(source) {
        return Err(SourceError::MissingFiles {
            location: source.to_owned(),
            missing: "the path does not exist".into(),
        });
    }
    if !is_repo_id(source) {
        return Err(SourceError::Unavailable(format!(
            "source {source:?} is neither an existing path nor a Hugging Face repo id (org/name)"
        )));
    }
    let hub = cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(hub_cache_dir);
    if let Some(snapshot) = cached_snapshot(&hub, source)
        && let Ok(resolved) = resolve_dir(&snapshot, quant)
    {
        return Ok(resolved);
    }
    let snapshot = download(source, quant, &hub).await?;
    resolve_dir(&snapshot, quant)
}

fn expand_home(source: &str) -> PathBuf {
    match (source.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(source),
    }
}

fn looks_like_path(source: &str) -> bool {
    source.starts_with('/')
        || source.starts_with('.')
        || source.starts_with('~')
        || source.ends_with(".gguf")
        || source.matches('/').count() > 1
}

fn is_repo_id(source: &str) -> bool {
    let mut parts = source.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The Hugging Face hub cache directory, as `huggingface_hub` computes it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return dir.into();
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// `models--org--name/snapshots/<rev>/` for the revision `refs/main` names, else any snapshot.
pub fn cached_snapshot(hub: &Path, repo: &str) -> Option<PathBuf> {
    let repo_dir = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// Download what a model needs into the hub cache; returns the snapshot directory.
async fn download(repo: &str, quant: Option<&str>, hub: &Path) -> Result<PathBuf, SourceError> {
    let unavailable = |e: hf_hub::api::tokio::ApiError| {
        SourceError::Unavailable(format!("cannot download {repo}: {e}"))
    };
    let api = hf_hub::api::tokio::ApiBuilder::from_env()
        .with_cache_dir(hub.to_path_buf())
        .with_progress(true)
        .build()
        .map_err(unavailable)?;
    let remote = api.model(repo.to_owned());
    let info = remote.info().await.map_err(unavailable)?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted = files_to_download(&names, quant).map_err(|e| match e {
        SourceError::QuantNotFound {
            requested,
            available,
            ..
        } => SourceError::QuantNotFound {
            requested,
            location: repo.to_owned(),
            available,
        },
        other => other,
    })?;
    let mut snapshot = None;
    for name in wanted {
        tracing::info!(repo, file = %name, "downloading");
        let path = remote.download(&name).await.map_err(unavailable)?;
        // The snapshot dir is the file's path minus its (possibly nested) repo-relative name.
        let depth = name.split('/').count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| SourceError::Unavailable(format!("{repo} has no files")))
}

/// Which repo files a model needs: metadata, plus either the safetensors shards or one GGUF.
fn files_to_download(names: &[String], quant: Option<&str>) -> Result<Vec<String>, SourceError> {
    const META: [&str; 5] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ];
    let mut wanted: Vec<String> = names
        .iter()
        .filter(|n| META.contains(&n.as_str()))
        .cloned()
        .collect();
    let ggufs: Vec<&String> = names.iter().filter(|n| n.ends_with(".gguf")).collect();
    match quant {
        Some(q) if !ggufs.is_empty() || !names.iter().any(|n| n.ends_with(".safetensors")) => {
            let available: Vec<String> = ggufs.iter().filter_map(|n| quant_of(n)).collect();
            let chosen = ggufs
                .iter()
                .find(|n| quant_of(n).is_some_and(|a| a.eq_ignore_ascii_case(q)))
                .ok_or_else(|| SourceError::QuantNotFound {
                    requested: q.to_owned(),
                    location: String::new(),
                    available,
                })?;
            wanted.push((*chosen).clone());
        }
        _ => wanted.extend(
            names
                .iter()
                .filter(|n| n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json"))
                .cloned(),
        ),
    }
    Ok(wanted)
}

/// `tiny-qwen3-Q4_K_M.gguf` → `Q4_K_M` (the last `-`/`.`-separated part before `.gguf`).
fn quant_of(name: &str) -> Option<String> {
    let file = name.rsplit('/').next()?.strip_suffix(".gguf")?;
    let tail = file.rsplit(['-', '.']).next()?;
    (!tail.is_empty() && tail != file).then(|| tail.to_owned())
}

/// A Hugging Face style directory: safetensors + config, or GGUF files when a quant is asked
/// (also in a `gguf/` subfolder, as the fixtures keep them).
fn resolve_dir(dir: &Path, quant: Option<&str>) -> Result<ResolvedModel, SourceError> {
    let list = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let entries = list(dir);
    let has_ext = |p: &PathBuf, ext: &str| p.to_string_lossy().ends_with(ext);
    if let Some(q) = quant {
        let mut ggufs: Vec<PathBuf> = entries
            .iter()
            .filter(|p| has_ext(p, ".gguf"))
            .cloned()
            .collect();
        ggufs.extend(
            list(&dir.join("gguf"))
                .into_iter()
                .filter(|p| has_ext(p, ".gguf")),
        );
        let safetensors = entries.iter().any(|p| has_ext(p, ".safetensors"));
        let matches_plain =
            ["bf16", "f16", "f32", "none"].contains(&q.to_ascii_lowercase().as_str());
        if !ggufs.is_empty() || !safetensors || !matches_plain {
            let chosen = ggufs.iter().find(|p| {
                quant_of(&p.to_string_lossy()).is_some_and(|a| a.eq_ignore_ascii_case(q))
            });
            let Some(chosen) = chosen else {
                return Err(SourceError::QuantNotFound {
                    requested: q.to_owned(),
                    location: dir.display().to_string(),
                    available: ggufs
                        .iter()
                        .filter_map(|p| quant_of(&p.to_string_lossy()))
                        .collect(),
                });
            };
            return resolve_gguf_file(chosen);
        }
    }
    let config = dir.join("config.json");
    let tokenizer = dir.join("tokenizer.json");
    let safetensors: Vec<PathBuf> = entries
        .iter()
        .filter(|p| has_ext(p, ".safetensors"))
        .cloned()
        .collect();
    let mut missing: Vec<String> = Vec::new();
    if !config.is_file() {
        missing.push("config.json".into());
    }
    if !tokenizer.is_file() {
        missing.push("tokenizer.json".into());
    }
    if safetensors.is_empty() {
        missing.push("*.safetensors".into());
    }
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index)
        && let Ok(Json::Object(map)) = serde_json::from_str::<Json>(&text)
        && let Some(Json::Object(weights)) = map.get("weight_map")
    {
        for shard in weights.values().filter_map(Json::as_str) {
            if !dir.join(shard).is_file() && !missing.iter().any(|m| m == shard) {
                missing.push(shard.to_owned());
            }
        }
    }
    if !missing.is_empty() {
        return Err(SourceError::MissingFiles {
            location: dir.display().to_string(),
            missing: missing.join(", "),
        });
    }
    let config_json: Json = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| SourceError::MissingFiles {
            location: dir.display().to_string(),
            missing: "a readable config.json (it is not valid JSON)".into(),
        })?;
    let architecture = config_json
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .ok_or_else(|| {
            SourceError::UnknownArchitecture(format!(
                "{} has no `architectures` entry",
                config.display()
            ))
        })?
        .to_owned();
    let quant = config_json
        .get("torch_dtype")
        .or_else(|| config_json.get("dtype"))
        .and_then(Json::as_str)
        .map(|d| match d {
            "bfloat16" => "bf16".to_owned(),
            "float16" => "f16".to_owned(),
            "float32" => "f32".to_owned(),
            other => other.to_owned(),
        })
        .unwrap_or_else(|| "unknown".into());
    let (eos_ids, generation_defaults) = read_generation_config(dir, &config_json);
    let weight_bytes = safetensors
        .iter()
        .filter_map(|p| p.metadata().ok())
        .map(|m| m.len())
        .sum();
    Ok(ResolvedModel {
        architecture,
        files: ModelFiles {
            config: Some(config),
            safetensors,
            gguf: None,
        },
        tokenizer,
        meta_dir: dir.to_path_buf(),
        quant,
        eos_ids,
        generation_defaults,
        weight_bytes,
    })
}

/// `eos_token_id` (an int or a list) and sampling defaults from `generation_config.json`,
/// falling back to `config.json`'s `eos_token_id`.
fn read_generation_config(dir: &Path, config: &Json) -> (Vec<u32>, GenerationDefaults) {
    let generation: Json = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Json::Null);
    let ids = |v: Option<&Json>| -> Vec<u32> {
        match v {
            Some(Json::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Json::Array(a)) => a
                .iter()
                .filter_map(|n| n.as_u64())
                .map(|n| n as u32)
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut eos = ids(generation.get("eos_token_id"));
    if eos.is_empty() {
        eos = ids(config.get("eos_token_id"));
    }
    let float = |k: &str| generation.get(k).and_then(Json::as_f64).map(|f| f as f32);
    // `do_sample: false` means the model's authors want greedy decoding by default.
    let greedy = generation.get("do_sample") == Some(&Json::Bool(false));
    let defaults = GenerationDefaults {
        temperature: if greedy {
            Some(0.0)
        } else {
            float("temperature")
        },
        top_k: generation
            .get("top_k")
            .and_then(Json::as_u64)
            .map(|k| k as u32),
        top_p: float("top_p"),
        min_p: float("min_p"),
        repetition_penalty: float("repetition_penalty"),
    };
    (eos, defaults)
}

/// A single `.gguf` file: architecture and eos from its metadata; tokenizer from a sibling
/// `tokenizer.json` or the parent directory's (the usual layout of a model with a `gguf/` folder).
fn resolve_gguf_file(path: &Path) -> Result<ResolvedModel, SourceError> {
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(SourceError::Unavailable(format!(
            "{} is a file but not a .gguf file",
            path.display()
        )));
    }
    let mut file = std::fs::File::open(path)
        .map_err(|e| SourceError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
        SourceError::Unavailable(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })?;
    let architecture = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| {
            SourceError::UnknownArchitecture(format!(
                "{} has no general.architecture metadata",
                path.display()
            ))
        })?;
    let parent = path.parent().unwrap_or(Path::new("."));
    let candidates = [parent.to_path_buf(), parent.join("..")];
    let meta_dir = candidates
        .iter()
        .find(|d| d.join("tokenizer.json").is_file())
        .cloned()
        .ok_or_else(|| SourceError::MissingFiles {
            location: path.display().to_string(),
            missing: format!(
                "tokenizer.json (looked in {} and its parent)",
                parent.display()
            ),
        })?;
    let meta_dir = meta_dir.canonicalize().unwrap_or(meta_dir);
    let mut eos_ids: Vec<u32> = content
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok())
        .into_iter()
        .collect();
    let config_json: Json = std::fs::read_to_string(meta_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Json::Null);
    let (generation_eos, generation_defaults) = read_generation_config(&meta_dir, &config_json);
    for id in generation_eos {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    let quant = quant_of(&path.to_string_lossy()).unwrap_or_else(|| "gguf".into());
    Ok(ResolvedModel {
        architecture,
        files: ModelFiles {
            config: None,
            safetensors: Vec::new(),
            gguf: Some(path.to_path_buf()),
        },
        tokenizer: meta_dir.join("tokenizer.json"),
        meta_dir,
        quant,
        eos_ids,
        generation_defaults,
        weight_bytes: path.metadata().map(|m| m.len()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_names() {
        assert_eq!(
            quant_of("tiny-qwen3-Q4_K_M.gguf").as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(quant_of("dir/model.Q8_0.gguf").as_deref(), Some("Q8_0"));
        assert_eq!(quant_of("model.gguf"), None);
    }

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("Qwen/Qwen3-8B"));
        assert!(!is_repo_id("Qwen"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("a b/c"));
    }

    #[test]
    fn download_selection() {
        let names: Vec<String> = [
            "config.json",
            "tokenizer.json",
            "README.md",
            "m-Q4_K_M.gguf",
            "m-Q8_0.gguf",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            files_to_download(&names, Some("q8_0")).expect("exists"),
            vec!["config.json", "tokenizer.json", "m-Q8_0.gguf"]
        );
        match files_to_download(&names, Some("Q2_K")) {
            Err(SourceError::QuantNotFound { available, .. }) => {
                assert_eq!(available, vec!["Q4_K_M", "Q8_0"])
            }
            other => panic!("expected QuantNotFound, got {other:?}"),
        }
    }

    #[test]
    fn hub_cache_layout() {
        let hub = tempfile::tempdir().expect("tempdir");
        let repo = hub.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs/main"), "abc123\n").expect("write");
        assert_eq!(
            cached_snapshot(hub.path(), "org/name"),
            Some(repo.join("snapshots/abc123"))
        );
        assert_eq!(cached_snapshot(hub.path(), "org/other"), None);
    }
}
