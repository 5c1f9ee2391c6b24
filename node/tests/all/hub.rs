//! Hub downloads (`source::resolve_with` on a repo id) against an in-test stand-in of the
//! Hugging Face hub that serves `fixtures/tiny-qwen3` as `helexa-test/tiny-qwen3`.
//!
//! The stand-in answers the requests hf-hub 0.4.3 makes, as huggingface.co answers them:
//! - `GET /api/models/{repo}/revision/main`: JSON with `sha` and `siblings[].rfilename`;
//! - `GET /{repo}/resolve/main/{file}`, first with `Range: bytes=0-0` for metadata (it needs
//!   `x-repo-commit`, `etag` or `x-linked-etag`, and `content-range: bytes 0-0/{size}`), then
//!   with one `Range` per chunk (hf-hub asks for one byte past the end of the last chunk, which
//!   real servers clamp);
//! - LFS files (safetensors, GGUF) answer that with a 302 to a CDN host (`localhost` rather than
//!   `127.0.0.1`, so hf-hub's relative-only redirect client stops there and reads
//!   `x-linked-etag` from the 302, then asks the CDN for the size, as with the real hub).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use helexa_node::source::{HubOptions, SourceError, resolve_with};

use crate::fixtures;

const REPO: &str = "helexa-test/tiny-qwen3";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Repo files, as (name in the repo, path under `fixtures/tiny-qwen3`).
const FILES: [&str; 11] = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "gguf/tiny-qwen3-BF16.gguf",
    "gguf/tiny-qwen3-Q4_K_M.gguf",
    "gguf/tiny-qwen3-Q6_K.gguf",
    "gguf/tiny-qwen3-Q8_0.gguf",
    "model.safetensors",
    "reference.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// Files a plain (safetensors) resolve needs.
const PLAIN: [&str; 6] = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// One request the stand-in saw.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
}

struct Blob {
    bytes: Vec<u8>,
    etag: String,
    lfs: bool,
}

struct Hub {
    /// Repo file name → content.
    files: BTreeMap<String, Arc<Blob>>,
    /// etag → content, for the CDN.
    cdn: BTreeMap<String, Arc<Blob>>,
    port: u16,
    seen: Mutex<Vec<Seen>>,
}

/// A running stand-in hub.
struct StandIn {
    hub: Arc<Hub>,
    endpoint: String,
}

impl StandIn {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut files = BTreeMap::new();
        let mut cdn = BTreeMap::new();
        for name in FILES {
            let bytes = std::fs::read(fixtures().join("tiny-qwen3").join(name))
                .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
            let lfs = name.ends_with(".safetensors") || name.ends_with(".gguf");
            let blob = Arc::new(Blob {
                etag: fnv_hex(&bytes),
                bytes,
                lfs,
            });
            cdn.insert(blob.etag.clone(), blob.clone());
            files.insert(name.to_owned(), blob);
        }
        let hub = Arc::new(Hub {
            files,
            cdn,
            port,
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(serve).with_state(hub.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            hub,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.hub.seen.lock().expect("lock").clone()
    }

    /// Repo files whose content was sent (a ranged request other than the `bytes=0-0` probe),
    /// whether directly or through the CDN.
    fn bodies_sent(&self) -> Vec<String> {
        let by_etag: BTreeMap<&str, &str> = self
            .hub
            .files
            .iter()
            .map(|(name, blob)| (blob.etag.as_str(), name.as_str()))
            .collect();
        let mut names: Vec<String> = self
            .seen()
            .iter()
            .filter(|s| s.range.as_deref() != Some("bytes=0-0"))
            .filter_map(|s| {
                if let Some(etag) = s.path.strip_prefix("/cdn/") {
                    return by_etag.get(etag).map(|n| (*n).to_owned());
                }
                let name = s.path.strip_prefix(&format!("/{REPO}/resolve/main/"))?;
                // An LFS file's resolve URL only redirects; its bytes come from the CDN.
                (!self.hub.files.get(name)?.lfs).then(|| name.to_owned())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn options(&self, cache: &Path) -> HubOptions {
        let mut options = HubOptions::new(&self.endpoint, cache);
        options.progress_bar = false;
        options.timeout = Duration::from_secs(10);
        options
    }
}

/// A stand-in content hash for etags (the real hub uses git sha1 / LFS sha256).
fn fnv_hex(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{hash:016x}{:016x}", bytes.len())
}

async fn serve(State(hub): State<Arc<Hub>>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_owned();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    hub.seen.lock().expect("lock").push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    if path == format!("/api/models/{REPO}/revision/main") {
        let siblings: Vec<serde_json::Value> = hub
            .files
            .keys()
            .map(|name| serde_json::json!({ "rfilename": name }))
            .collect();
        let body = serde_json::json!({ "id": REPO, "sha": COMMIT, "siblings": siblings });
        return axum::Json(body).into_response();
    }
    if let Some(etag) = path.strip_prefix("/cdn/") {
        return match hub.cdn.get(etag) {
            Some(blob) => ranged(&blob.bytes, range.as_deref(), HeaderMap::new()),
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    let Some(name) = path.strip_prefix(&format!("/{REPO}/resolve/main/")) else {
        return (
            StatusCode::NOT_FOUND,
            [("x-error-code", "RepoNotFound")],
            "Repository not found",
        )
            .into_response();
    };
    let Some(blob) = hub.files.get(name) else {
        return (
            StatusCode::NOT_FOUND,
            [("x-error-code", "EntryNotFound")],
            "Entry not found",
        )
            .into_response();
    };
    let mut extra = HeaderMap::new();
    extra.insert("x-repo-commit", COMMIT.parse().expect("header"));
    let quoted = format!("\"{}\"", blob.etag).parse().expect("header");
    if blob.lfs {
        extra.insert("x-linked-etag", quoted);
        extra.insert(
            "x-linked-size",
            blob.bytes.len().to_string().parse().expect("header"),
        );
        let cdn = format!("http://localhost:{}/cdn/{}", hub.port, blob.etag);
        extra.insert(header::LOCATION, cdn.parse().expect("header"));
        return (StatusCode::FOUND, extra).into_response();
    }
    extra.insert(header::ETAG, quoted);
    ranged(&blob.bytes, range.as_deref(), extra)
}

/// `bytes`, or the slice a single `Range: bytes=a-b` asks for (206, end clamped as HTTP says).
fn ranged(bytes: &[u8], range: Option<&str>, mut headers: HeaderMap) -> Response {
    let len = bytes.len();
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return (StatusCode::OK, headers, bytes.to_vec()).into_response();
    };
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.parse().unwrap_or(usize::MAX);
    let end: usize = end.parse().unwrap_or(len.saturating_sub(1));
    if start >= len || end < start {
        let unsatisfiable = format!("bytes */{len}").parse().expect("header");
        headers.insert(header::CONTENT_RANGE, unsatisfiable);
        return (StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response();
    }
    let end = end.min(len - 1);
    let content_range = format!("bytes {start}-{end}/{len}")
        .parse()
        .expect("header");
    headers.insert(header::CONTENT_RANGE, content_range);
    let body = Body::from(bytes[start..=end].to_vec());
    (StatusCode::PARTIAL_CONTENT, headers, body).into_response()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("tiny-qwen3").join(name)).expect("fixture")
}

/// A `tracing` subscriber that writes into a buffer, for the progress lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

// The stand-in and the download share one current-thread runtime, so the thread-local
// `tracing` subscriber sees hf-hub's spawned chunk tasks as well.
#[tokio::test]
async fn downloads_then_hits_the_cache() {
    let hub = StandIn::start().await;
    let temp = tempfile::tempdir().expect("tempdir");
    let cache = temp.path().join("hub");
    let mut options = hub.options(&cache);
    // Several ranged requests per large file, some in parallel: exercises Range handling and
    // hf-hub's reassembly (its last range runs one past the end).
    options.chunk_size = 1 << 20;
    options.parallel = 3;
    // The byte counter the node shows in `/models` while a load downloads.
    let counter = std::sync::Arc::new(helexa_node::source::LoadCounter::default());
    options.progress = Some(counter.clone());

    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let model = resolve_with(REPO, None, &options).await.expect("download");
    drop(guard);

    assert_eq!(hub.bodies_sent(), PLAIN);
    let progress = counter.snapshot();
    assert_eq!(progress.phase, "downloading");
    assert!(progress.total_bytes > 0, "{progress:?}");
    // hf-hub may count a ranged download's last range one byte long.
    assert!(progress.done_bytes >= progress.total_bytes, "{progress:?}");
    assert!(
        model.meta_dir.starts_with(&cache),
        "{} is not in the cache",
        model.meta_dir.display()
    );
    assert!(model.meta_dir.ends_with(format!("snapshots/{COMMIT}")));
    for name in PLAIN {
        let got = std::fs::read(model.meta_dir.join(name)).expect("downloaded file");
        assert!(got == fixture(name), "{name} differs from the fixture");
    }
    assert!(!model.meta_dir.join("reference.json").exists());
    assert!(!model.meta_dir.join("gguf").exists());
    // The same answer as resolving the fixture directory itself, bar the paths.
    assert_eq!(model.architecture, "Qwen3ForCausalLM");
    assert_eq!(
        model.files.safetensors,
        vec![model.meta_dir.join("model.safetensors")]
    );
    assert_eq!(model.tokenizer, model.meta_dir.join("tokenizer.json"));
    assert_eq!(
        model.weight_bytes,
        fixture("model.safetensors").len() as u64
    );
    let local = resolve_with(
        fixtures().join("tiny-qwen3").to_str().expect("utf-8"),
        None,
        &options,
    )
    .await
    .expect("local fixture");
    assert_eq!(model.eos_ids, local.eos_ids);
    assert_eq!(model.generation_defaults, local.generation_defaults);
    assert_eq!(model.quant, local.quant);

    // Six ranges of at most 1 MiB for the 5.5 MiB safetensors file.
    let safetensors_ranges = hub
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .filter(|s| s.range.as_deref() != Some("bytes=0-0"))
        .filter(|s| s.path.ends_with(&hub.hub.files["model.safetensors"].etag))
        .count();
    assert_eq!(safetensors_ranges, 6);

    // Progress: a start and a done line per file with its size, and intermediate lines.
    let text = log.text();
    let size = fixture("model.safetensors").len();
    assert!(
        text.contains(&format!(
            "downloading repo={REPO} file=model.safetensors bytes={size}"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "downloaded repo={REPO} file=model.safetensors bytes={size}"
        )),
        "{text}"
    );
    assert!(
        text.contains("download progress repo=helexa-test/tiny-qwen3 file=model.safetensors"),
        "{text}"
    );
    for name in PLAIN {
        assert!(text.contains(&format!("downloaded repo={REPO} file={name} ")));
    }

    // Second resolve: from the cache, without a single request.
    let before = hub.seen().len();
    let again = resolve_with(REPO, None, &options).await.expect("cached");
    assert_eq!(again, model);
    assert_eq!(
        hub.seen().len(),
        before,
        "the cached resolve went to the hub"
    );

    // Offline mode accepts the cached copy too.
    let mut offline = options.clone();
    offline.offline = true;
    assert_eq!(
        resolve_with(REPO, None, &offline).await.expect("offline"),
        model
    );
}

#[tokio::test]
async fn quant_picks_its_gguf_and_reuses_cached_files() {
    let hub = StandIn::start().await;
    let temp = tempfile::tempdir().expect("tempdir");
    let cache = temp.path().join("hub");
    let options = hub.options(&cache);

    let model = resolve_with(REPO, Some("q8_0"), &options)
        .await
        .expect("Q8_0");
    let mut expected: Vec<&str> = PLAIN
        .iter()
        .copied()
        .filter(|n| *n != "model.safetensors")
        .collect();
    expected.insert(3, "gguf/tiny-qwen3-Q8_0.gguf");
    assert_eq!(hub.bodies_sent(), expected);
    let gguf = model.files.gguf.clone().expect("a gguf");
    assert!(gguf.ends_with(format!("snapshots/{COMMIT}/gguf/tiny-qwen3-Q8_0.gguf")));
    assert!(std::fs::read(&gguf).expect("gguf") == fixture("gguf/tiny-qwen3-Q8_0.gguf"));
    assert_eq!(model.quant, "Q8_0");
    assert_eq!(model.architecture, "qwen3");
    assert!(model.files.safetensors.is_empty());
    assert_eq!(
        model.tokenizer.canonicalize().expect("tokenizer"),
        cache
            .join(format!(
                "models--helexa-test--tiny-qwen3/snapshots/{COMMIT}/tokenizer.json"
            ))
            .canonicalize()
            .expect("cached tokenizer")
    );

    // Cached now: no request at all.
    let before = hub.seen().len();
    resolve_with(REPO, Some("Q8_0"), &options)
        .await
        .expect("cached Q8_0");
    assert_eq!(hub.seen().len(), before);

    // Another quant: only its GGUF travels; the metadata files are already in the snapshot.
    let model = resolve_with(REPO, Some("Q4_K_M"), &options)
        .await
        .expect("Q4_K_M");
    assert_eq!(model.quant, "Q4_K_M");
    let mut expected_now = expected.clone();
    expected_now.push("gguf/tiny-qwen3-Q4_K_M.gguf");
    expected_now.sort();
    assert_eq!(hub.bodies_sent(), expected_now);
    let metadata_probes = hub
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("/config.json"))
        .count();
    assert_eq!(metadata_probes, 2, "config.json fetched again");
}

#[tokio::test]
async fn missing_quant_lists_the_available_ones() {
    let hub = StandIn::start().await;
    let temp = tempfile::tempdir().expect("tempdir");
    let options = hub.options(&temp.path().join("hub"));
    match resolve_with(REPO, Some("Q2_K"), &options).await {
        Err(SourceError::QuantNotFound {
            requested,
            location,
            available,
        }) => {
            assert_eq!(requested, "Q2_K");
            assert_eq!(location, REPO);
            assert_eq!(available, ["BF16", "Q4_K_M", "Q6_K", "Q8_0"]);
        }
        other => panic!("expected QuantNotFound, got {other:?}"),
    }
    let paths: Vec<String> = hub.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, [format!("/api/models/{REPO}/revision/main")]);
}

#[tokio::test]
async fn unknown_repo_is_a_clear_error() {
    let hub = StandIn::start().await;
    let temp = tempfile::tempdir().expect("tempdir");
    let options = hub.options(&temp.path().join("hub"));
    let error = resolve_with("helexa-test/nope", None, &options)
        .await
        .expect_err("no such repo");
    let SourceError::Unavailable(message) = error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert!(message.contains("helexa-test/nope"), "{message}");
    assert!(message.contains(&hub.endpoint), "{message}");
    assert!(message.contains("404"), "{message}");
}

/// An endpoint where nothing listens: connection refused, reported at once.
#[tokio::test]
async fn unreachable_endpoint_fails_fast() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let temp = tempfile::tempdir().expect("tempdir");
    let options = HubOptions::new(&endpoint, temp.path().join("hub"));
    let started = Instant::now();
    let error = resolve_with(REPO, None, &options)
        .await
        .expect_err("nothing listens");
    assert!(started.elapsed() < Duration::from_secs(5));
    let SourceError::Unavailable(message) = error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains(REPO), "{message}");
    assert!(message.to_lowercase().contains("connect"), "{message}");
}

/// An endpoint that accepts connections and never answers: abandoned after the timeout.
#[tokio::test]
async fn silent_endpoint_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let temp = tempfile::tempdir().expect("tempdir");
    let mut options = HubOptions::new(&endpoint, temp.path().join("hub"));
    options.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let error = resolve_with(REPO, None, &options)
        .await
        .expect_err("no answer");
    assert!(started.elapsed() < Duration::from_secs(5));
    let SourceError::Unavailable(message) = error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains(REPO), "{message}");
    assert!(message.contains("no answer within 500ms"), "{message}");
}

/// Offline with an empty cache: an error naming the cache, and no request.
#[tokio::test]
async fn offline_without_cache_does_not_download() {
    let hub = StandIn::start().await;
    let temp = tempfile::tempdir().expect("tempdir");
    let cache: PathBuf = temp.path().join("hub");
    let mut options = hub.options(&cache);
    options.offline = true;
    let error = resolve_with(REPO, None, &options)
        .await
        .expect_err("offline");
    let SourceError::Unavailable(message) = error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
    assert!(message.contains(&cache.display().to_string()), "{message}");
    assert!(hub.seen().is_empty());
}
