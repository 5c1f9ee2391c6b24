//! Model sources: turn a `source` string (local directory, local `.gguf` file, or Hugging Face
//! repo id) into local files the engine can load, with preflight checks that name what is wrong.
//!
//! Local sources never touch the network. A hub id is looked up in the Hugging Face cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`, or the node's
//! `cache_dir`) and only downloaded (from `HF_ENDPOINT`, with a progress bar on a terminal and
//! `tracing` progress lines per file) when absent. [`HubOptions`] carries the endpoint, cache and
//! timeouts explicitly so tests can point a resolve at a stand-in hub without touching the
//! process environment.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// The source itself is malformed: neither a path nor a repo id, a file that is not a
    /// `.gguf`, an unreadable or corrupt GGUF. A client error.
    #[error("{0}; {SOURCE_HINT}")]
    InvalidSource(String),
    /// The hub or the network failed (download, offline cache miss).
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

/// Where hub ids are cached and downloaded from.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Hub base URL, e.g. `https://huggingface.co` (no trailing slash needed).
    pub endpoint: String,
    /// Hub cache directory (the one holding `models--org--name/`).
    pub cache_dir: PathBuf,
    /// Bearer token; `None` uses the token file next to the cache (`huggingface-cli login`).
    pub token: Option<String>,
    /// Never download: a hub id must already be cached (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Longest wait for the repo listing, and longest stretch without a downloaded byte before a
    /// file download is abandoned. hf-hub's HTTP client has no timeouts of its own, so without
    /// this an endpoint that accepts connections but never answers would hang a load forever.
    pub timeout: Duration,
    /// Bytes per ranged request; files larger than this are fetched in several ranges.
    pub chunk_size: usize,
    /// Ranged requests in flight at once per file.
    pub parallel: usize,
    /// Draw an indicatif progress bar (it stays hidden when stderr is not a terminal).
    pub progress_bar: bool,
    /// Where downloaded bytes are counted for `/models` (the node's load progress).
    pub progress: Option<Arc<LoadCounter>>,
}

/// Bytes downloaded by one load, shared with the node's model listing.
#[derive(Debug, Default)]
pub struct LoadCounter {
    /// Bytes received so far.
    pub done: AtomicU64,
    /// Sizes of the files whose download has started.
    pub total: AtomicU64,
    /// At least one file had to be downloaded.
    pub downloading: std::sync::atomic::AtomicBool,
    /// The files are all here; the engine is reading the weights.
    pub loading_weights: std::sync::atomic::AtomicBool,
}

impl LoadCounter {
    /// The API form.
    pub fn snapshot(&self) -> helexa_node_api::LoadProgress {
        let phase = if self.loading_weights.load(Ordering::Relaxed) {
            "loading_weights"
        } else if self.downloading.load(Ordering::Relaxed) {
            "downloading"
        } else {
            "resolving"
        };
        helexa_node_api::LoadProgress {
            phase: phase.to_owned(),
            done_bytes: self.done.load(Ordering::Relaxed),
            total_bytes: self.total.load(Ordering::Relaxed),
        }
    }
}

impl HubOptions {
    /// The public hub's defaults for `endpoint`, with the cache at `cache_dir`; no environment
    /// is read.
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: endpoint.into(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            timeout: Duration::from_secs(30),
            chunk_size: 10_000_000,
            parallel: 4,
            progress_bar: true,
            progress: None,
        }
    }

    /// From the environment, as `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_TOKEN`,
    /// `HF_HUB_OFFLINE`, and the cache from [`hub_cache_dir`] unless `cache_dir` overrides it.
    pub fn from_env(cache_dir: Option<&Path>) -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        let cache = cache_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(hub_cache_dir);
        let mut options = Self::new(endpoint, cache);
        options.token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        options.offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| ["1", "true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()));
        options
    }

    fn endpoint(&self) -> &str {
        self.endpoint.trim_end_matches('/')
    }
}

/// What a valid `source` looks like; appended to [`SourceError::InvalidSource`] messages.
pub const SOURCE_HINT: &str = "a source is a local model directory (config.json, tokenizer.json, \
    *.safetensors or *.gguf), a path to a .gguf file, or a Hugging Face repo id `org/name`";

/// Run synchronous file work (directory scans, GGUF metadata reads) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        SourceError::Unavailable(format!("resolving the model files did not finish: {e}"))
    })?
}

/// Resolve a source. `cache_dir` overrides the Hugging Face cache location for downloads; the
/// rest of the hub settings come from the environment ([`HubOptions::from_env`]).
pub async fn resolve(
    source: &str,
    quant: Option<&str>,
    cache_dir: Option<&Path>,
) -> Result<ResolvedModel, SourceError> {
    resolve_with(source, quant, &HubOptions::from_env(cache_dir)).await
}

/// Resolve a source with explicit hub settings.
pub async fn resolve_with(
    source: &str,
    quant: Option<&str>,
    hub: &HubOptions,
) -> Result<ResolvedModel, SourceError> {
    let path = expand_home(source);
    let owned_quant = quant.map(str::to_owned);
    let local = {
        let quant = owned_quant.clone();
        blocking(move || {
            if path.is_file() {
                return resolve_gguf_file(&path).map(Some);
            }
            if path.is_dir() {
                return resolve_dir(&path, quant.as_deref()).map(Some);
            }
            Ok(None)
        })
        .await?
    };
    if let Some(resolved) = local {
        return Ok(resolved);
    }
    if looks_like_path(source) {
        return Err(SourceError::MissingFiles {
            location: source.to_owned(),
            missing: "the path does not exist".into(),
        });
    }
    if !is_repo_id(source) {
        return Err(SourceError::InvalidSource(format!(
            "source {source:?} is neither an existing path nor a Hugging Face repo id (org/name)"
        )));
    }
    let cached = {
        let (cache_dir, source, quant) = (
            hub.cache_dir.clone(),
            source.to_owned(),
            owned_quant.clone(),
        );
        blocking(move || {
            Ok(cached_snapshot(&cache_dir, &source).map(|s| resolve_dir(&s, quant.as_deref())))
        })
        .await?
    };
    let cache_error = match cached {
        Some(Ok(resolved)) => return Ok(resolved),
        Some(Err(e)) => Some(e),
        None => None,
    };
    if hub.offline {
        return Err(match cache_error {
            Some(e) => e,
            None => SourceError::Unavailable(format!(
                "{source} is not in the hub cache {} and downloads are off (HF_HUB_OFFLINE)",
                hub.cache_dir.display()
            )),
        });
    }
    let snapshot = download(source, quant, hub).await?;
    blocking(move || resolve_dir(&snapshot, owned_quant.as_deref())).await
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
///
/// hf-hub's `download` always re-fetches, so files already in the snapshot of the commit the
/// hub reports are skipped (a quant requested after the safetensors fetches only its GGUF).
async fn download(
    repo: &str,
    quant: Option<&str>,
    hub: &HubOptions,
) -> Result<PathBuf, SourceError> {
    let endpoint = hub.endpoint();
    let failed = |what: &str, e: &dyn std::error::Error| {
        SourceError::Unavailable(format!(
            "cannot download {repo} from {endpoint}: {what}: {}",
            error_chain(e)
        ))
    };
    let mut builder =
        hf_hub::api::tokio::ApiBuilder::from_cache(hf_hub::Cache::new(hub.cache_dir.clone()))
            .with_endpoint(endpoint.to_owned())
            .with_progress(false)
            .with_chunk_size(Some(hub.chunk_size.max(1)))
            .with_max_files(hub.parallel.max(1));
    if hub.token.is_some() {
        builder = builder.with_token(hub.token.clone());
    }
    let api = builder.build().map_err(|e| failed("client setup", &e))?;
    let remote = api.model(repo.to_owned());
    let listing = async {
        let response = remote
            .info_request()
            .send()
            .await
            .map_err(|e| failed("cannot reach the hub", &e))?;
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403 | 404) {
            return Err(SourceError::Unavailable(format!(
                "{repo} not found at {endpoint} (HTTP {status}); a private or gated repo needs \
                 HF_TOKEN"
            )));
        }
        response
            .error_for_status()
            .map_err(|e| failed("repo listing", &e))?
            .json::<hf_hub::api::RepoInfo>()
            .await
            .map_err(|e| failed("bad repo listing", &e))
    };
    let info = tokio::time::timeout(hub.timeout, listing)
        .await
        .map_err(|_| {
            SourceError::Unavailable(format!(
                "cannot download {repo} from {endpoint}: no answer within {:?}",
                hub.timeout
            ))
        })??;
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
    let repo_dir = hub
        .cache_dir
        .join(format!("models--{}", repo.replace('/', "--")));
    let listed_snapshot = repo_dir.join("snapshots").join(&info.sha);
    let mut snapshot = None;
    for name in wanted {
        if listed_snapshot.join(&name).is_file() {
            tracing::debug!(repo, file = %name, "already cached");
            continue;
        }
        let progress = DownloadProgress::new(repo, &name, hub.progress_bar, hub.progress.clone());
        let path = download_file(&remote, &name, progress, hub.timeout)
            .await
            .map_err(|e| match e {
                FileError::Api(e) => failed(&format!("file {name}"), &e),
                FileError::Stalled => SourceError::Unavailable(format!(
                    "cannot download {repo} from {endpoint}: file {name}: no data for {:?}",
                    hub.timeout
                )),
            })?;
        // The snapshot dir is the file's path minus its (possibly nested) repo-relative name.
        let depth = name.split('/').count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    if let Some(snapshot) = snapshot {
        return Ok(snapshot);
    }
    // Everything was cached already, but the snapshot did not resolve under `refs/main` before
    // (an older ref): point the ref at the listed commit so the next resolve finds it offline.
    std::fs::create_dir_all(repo_dir.join("refs"))
        .and_then(|()| std::fs::write(repo_dir.join("refs/main"), &info.sha))
        .map_err(|e| failed("cannot write the cache ref", &e))?;
    Ok(listed_snapshot)
}

enum FileError {
    Api(hf_hub::api::tokio::ApiError),
    Stalled,
}

/// One file through hf-hub, abandoned when no byte arrives for `stall` (hf-hub's client has no
/// timeouts; a half-open connection would otherwise hang the load forever).
async fn download_file(
    remote: &hf_hub::api::tokio::ApiRepo,
    name: &str,
    progress: DownloadProgress,
    stall: Duration,
) -> Result<PathBuf, FileError> {
    let counter = progress.0.clone();
    let work = remote.download_with_progress(name, progress);
    tokio::pin!(work);
    let mut seen = 0;
    loop {
        tokio::select! {
            result = &mut work => return result.map_err(FileError::Api),
            () = tokio::time::sleep(stall) => {
                let now = counter.done.load(Ordering::Relaxed);
                if now == seen {
                    counter.bar.abandon();
                    return Err(FileError::Stalled);
                }
                seen = now;
            }
        }
    }
}

/// `error: cause: cause`, since reqwest's own message omits why a request failed.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Download progress of one file: an indicatif bar for terminals, and `tracing` lines (start,
/// every tenth, done) for daemons whose stderr is a log.
#[derive(Clone)]
struct DownloadProgress(Arc<ProgressState>);

struct ProgressState {
    repo: String,
    file: String,
    total: AtomicU64,
    done: AtomicU64,
    /// Tenths already logged.
    logged: AtomicU64,
    bar: indicatif::ProgressBar,
    /// The load's counter, across files.
    load: Option<Arc<LoadCounter>>,
}

impl DownloadProgress {
    fn new(repo: &str, file: &str, bar: bool, load: Option<Arc<LoadCounter>>) -> Self {
        let bar = if bar {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        Self(Arc::new(ProgressState {
            repo: repo.to_owned(),
            file: file.to_owned(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            bar,
            load,
        }))
    }
}

impl hf_hub::api::tokio::Progress for DownloadProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        let s = &self.0;
        s.total.store(size as u64, Ordering::Relaxed);
        if let Some(load) = &s.load {
            load.total.fetch_add(size as u64, Ordering::Relaxed);
            load.downloading.store(true, Ordering::Relaxed);
        }
        tracing::info!(repo = %s.repo, file = %s.file, bytes = size, "downloading");
        let mut bar = s.bar.clone();
        hf_hub::api::tokio::Progress::init(&mut bar, size, filename).await;
    }

    async fn update(&mut self, size: usize) {
        let s = &self.0;
        let done = s.done.fetch_add(size as u64, Ordering::Relaxed) + size as u64;
        if let Some(load) = &s.load {
            load.done.fetch_add(size as u64, Ordering::Relaxed);
        }
        s.bar.inc(size as u64);
        let total = s.total.load(Ordering::Relaxed).max(1);
        let tenth = (done * 10 / total).min(10);
        if tenth < 10 && s.logged.fetch_max(tenth, Ordering::Relaxed) < tenth {
            tracing::info!(repo = %s.repo, file = %s.file, done, total, "download progress");
        }
    }

    async fn finish(&mut self) {
        let s = &self.0;
        s.bar.finish_and_clear();
        tracing::info!(
            repo = %s.repo,
            file = %s.file,
            bytes = s.done.load(Ordering::Relaxed),
            "downloaded"
        );
    }
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
        return Err(SourceError::InvalidSource(format!(
            "{} is a file but not a .gguf file",
            path.display()
        )));
    }
    let mut file = std::fs::File::open(path)
        .map_err(|e| SourceError::InvalidSource(format!("cannot open {}: {e}", path.display())))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
        SourceError::InvalidSource(format!(
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
