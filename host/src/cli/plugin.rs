//! `helexa plugin …`: manage the plugin store a gateway watches, and talk to a running
//! gateway's admin API (`--gateway`, `--admin-key`) for `list` counters and `reload`.
//!
//! Store commands (`install`, `list`, `remove`, `use`) work on the directory alone, with
//! no gateway running; a running gateway picks their changes up through its watcher.
//! `new` (the scaffold lives in [`super::scaffold`]), `build` and `test` need neither a
//! store nor a gateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use helexa_policy_runtime::{
    Catalogue, CatalogueEntry, Decision, FailPolicy, Fleet, Node, PluginOptions, PolicyKind,
    PolicyRuntime, PolicySet, RequestInfo, RuntimeConfig, SseEvent, Surface, TranslateError,
};
use serde::Deserialize;

use crate::config::PluginsConfig;
use crate::plugin_store::{InstallRequest, PluginStore, name_from_source};

/// Largest component `install` downloads or reads (a policy is KiB to a few MiB).
const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// `helexa plugin` arguments.
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// Plugin store directory (default `$XDG_DATA_HOME/helexa/plugins` or
    /// `~/.local/share/helexa/plugins`; the gateway's `[plugins] dir`).
    #[arg(long, global = true, env = "HELEXA_PLUGIN_DIR")]
    pub store: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: PluginCommand,
}

/// A policy world, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum World {
    /// `helexa:policy/routing`.
    Router,
    /// `helexa:policy/eviction`.
    Evictor,
    /// `helexa:policy/translation`.
    Translator,
}

impl From<World> for PolicyKind {
    fn from(world: World) -> Self {
        match world {
            World::Router => PolicyKind::Router,
            World::Evictor => PolicyKind::Evictor,
            World::Translator => PolicyKind::Translator,
        }
    }
}

/// `helexa plugin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Scaffold a standalone plugin crate (WIT and glue included).
    New {
        /// The world it implements.
        #[arg(value_enum)]
        world: World,
        /// Crate name (also its directory name).
        name: String,
        /// Where to create it (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Validate (world, WIT version), precompile and add a component to the store.
    Install {
        /// A `.wasm` file or an http(s) URL.
        source: String,
        /// Refuse unless the component's sha256 is this (hex).
        #[arg(long)]
        sha256: Option<String>,
        /// Name in the store (default: the file name's stem).
        #[arg(long)]
        name: Option<String>,
        /// Version label (default: `0.0.0+sha.` and 12 hex digits of its hash).
        #[arg(long = "plugin-version")]
        plugin_version: Option<String>,
    },
    /// Installed plugins: world, version, live or not, calls and errors (from the gateway).
    List,
    /// Delete an installed plugin (its world falls back to the configured policy).
    Remove {
        /// Plugin name.
        name: String,
    },
    /// Make an installed plugin the live one of its world.
    Use {
        /// Plugin name (`default` returns the world to the configured policy).
        name: String,
        /// The world it serves.
        #[arg(long = "as", value_enum)]
        world: World,
    },
    /// Ask the running gateway to reload its policies now (admin API).
    Reload,
    /// `cargo build --target wasm32-wasip2 --release` a plugin crate and validate the component.
    Build {
        /// The crate directory (default: the current directory).
        dir: Option<PathBuf>,
    },
    /// Run an installed plugin (or a `.wasm` file) against recorded cases, without a gateway.
    Test {
        /// Plugin name, or a path to a `.wasm` file.
        name: String,
        /// Directory of case files (`*.json`, the format of `policies/*/tests/cases`).
        #[arg(long)]
        cases: PathBuf,
    },
}

/// Run `helexa plugin …`.
pub async fn run(args: PluginArgs, gateway: &str, admin_key: Option<&str>) -> anyhow::Result<()> {
    let dir = args
        .store
        .unwrap_or_else(|| PluginsConfig::default_dir(&|name| std::env::var(name).ok()));
    let store = PluginStore::new(dir);
    let admin = Admin {
        base: gateway.trim_end_matches('/').to_owned(),
        key: admin_key.map(str::to_owned),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?,
    };
    match args.command {
        PluginCommand::New { world, name, dir } => {
            let kind = PolicyKind::from(world);
            let created = super::scaffold::scaffold(kind.as_str(), &name, &dir)?;
            println!(
                "created {} ({kind}); build it with `helexa plugin build {}`",
                created.display(),
                created.display()
            );
            Ok(())
        }
        PluginCommand::Install {
            source,
            sha256,
            name,
            plugin_version,
        } => install(&store, &source, sha256, name, plugin_version).await,
        PluginCommand::List => list(&store, &admin).await,
        PluginCommand::Remove { name } => {
            let manifest = store.remove(&name)?;
            println!(
                "removed {} ({} v{}) from {}",
                manifest.name,
                manifest.world,
                manifest.version,
                store.dir().display()
            );
            Ok(())
        }
        PluginCommand::Use { name, world } => {
            let kind = PolicyKind::from(world);
            let name = (name != "default").then_some(name);
            store.set_active(kind, name.as_deref())?;
            match name {
                Some(name) => println!(
                    "{name} is now the {kind} (a watching gateway reloads by itself; else `helexa plugin reload`)"
                ),
                None => println!("the {kind} is back to the configured policy"),
            }
            Ok(())
        }
        PluginCommand::Reload => {
            let report = admin.post("/admin/plugins/reload").await?;
            println!(
                "{}",
                report["message"].as_str().unwrap_or("reloaded").trim()
            );
            Ok(())
        }
        PluginCommand::Build { dir } => build(&dir.unwrap_or_else(|| PathBuf::from("."))),
        PluginCommand::Test { name, cases } => test(&store, &name, &cases),
    }
}

/// A runtime for validating and running plugins locally, compiling into the same cache
/// the gateway uses by default (so an install precompiles for it).
fn local_runtime() -> anyhow::Result<PolicyRuntime> {
    PolicyRuntime::new(
        RuntimeConfig {
            cache_dir: crate::policy::default_cache_dir(),
            ..RuntimeConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .context("starting the policy runtime")
}

async fn install(
    store: &PluginStore,
    source: &str,
    sha256: Option<String>,
    name: Option<String>,
    version: Option<String>,
) -> anyhow::Result<()> {
    let is_url = source.starts_with("http://") || source.starts_with("https://");
    let (bytes, recorded_source) = if is_url {
        (download(source).await?, source.to_owned())
    } else {
        let path = Path::new(source);
        let meta = std::fs::metadata(path).with_context(|| format!("reading {source}"))?;
        if meta.len() > MAX_COMPONENT_BYTES as u64 {
            bail!(
                "{source} is {} MiB; a policy component is at most {} MiB",
                meta.len() >> 20,
                MAX_COMPONENT_BYTES >> 20
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {source}"))?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        (bytes, absolute.display().to_string())
    };
    let name = name.unwrap_or_else(|| name_from_source(source));
    let request = InstallRequest {
        name,
        version,
        source: recorded_source,
        sha256,
    };
    let store_for_task = store.clone();
    let manifest = tokio::task::spawn_blocking(move || {
        let runtime = local_runtime()?;
        store_for_task
            .install(&runtime, &bytes, &request)
            .map_err(anyhow::Error::from)
    })
    .await
    .context("install task")??;
    println!(
        "installed {} v{}: {} (helexa:policy@{}), sha256 {}, in {}",
        manifest.name,
        manifest.version,
        manifest.world,
        manifest.wit_version,
        manifest.sha256,
        store.dir().display()
    );
    println!(
        "make it live with: helexa plugin use {} --as {}",
        manifest.name, manifest.world
    );
    Ok(())
}

async fn download(url: &str) -> anyhow::Result<Vec<u8>> {
    use futures::StreamExt;
    let response = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .build()?
        .get(url)
        .send()
        .await
        .with_context(|| format!("downloading {url}"))?;
    if !response.status().is_success() {
        bail!("downloading {url}: HTTP {}", response.status());
    }
    let mut bytes = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        bytes.extend_from_slice(&chunk.with_context(|| format!("downloading {url}"))?);
        if bytes.len() > MAX_COMPONENT_BYTES {
            bail!(
                "{url} is larger than {} MiB; not a policy component",
                MAX_COMPONENT_BYTES >> 20
            );
        }
    }
    Ok(bytes)
}

async fn list(store: &PluginStore, admin: &Admin) -> anyhow::Result<()> {
    let manifests = store.list()?;
    let active = store.active()?;
    // Counters come from a running gateway when one answers; the table works without.
    let live = match admin.get("/admin/plugins").await {
        Ok(body) => Some(body),
        Err(e) => {
            eprintln!("(calls and errors unavailable: {e})");
            None
        }
    };
    let counters: BTreeMap<String, (String, String)> = live
        .as_ref()
        .and_then(|b| b["plugins"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["manifest"]["name"].as_str()?.to_owned();
            let show = |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |n| n.to_string());
            Some((name, (show(&p["calls"]), show(&p["errors"]))))
        })
        .collect();
    println!(
        "{:<24} {:<10} {:<20} {:<6} {:>10} {:>8}",
        "NAME", "WORLD", "VERSION", "ACTIVE", "CALLS", "ERRORS"
    );
    for m in &manifests {
        let (calls, errors) = counters
            .get(&m.name)
            .cloned()
            .unwrap_or_else(|| ("-".to_owned(), "-".to_owned()));
        let is_active = active.get(m.world) == Some(m.name.as_str());
        println!(
            "{:<24} {:<10} {:<20} {:<6} {:>10} {:>8}",
            m.name,
            m.world.as_str(),
            m.version,
            if is_active { "yes" } else { "no" },
            calls,
            errors
        );
    }
    if manifests.is_empty() {
        println!("(no plugins installed in {})", store.dir().display());
    }
    if let Some(worlds) = live.as_ref().and_then(|b| b["reload"]["worlds"].as_array()) {
        for w in worlds {
            if let Some(error) = w["last_error"].as_str() {
                println!(
                    "! {}: last reload failed, still running {} v{}: {error}",
                    w["world"].as_str().unwrap_or("?"),
                    w["plugin"].as_str().unwrap_or("?"),
                    w["version"].as_str().unwrap_or("?")
                );
            }
        }
    }
    Ok(())
}

/// A client of the gateway's admin API.
struct Admin {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Admin {
    async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.post(format!("{}{path}", self.base)))
            .await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let request = match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("no gateway answered at {} (--gateway)", self.base))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .with_context(|| format!("{}: the answer is not JSON", self.base))?;
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]["message"]
            .as_str()
            .or_else(|| body["message"].as_str())
            .unwrap_or("no message");
        bail!("the gateway answered {status}: {message}")
    }
}

fn build(dir: &Path) -> anyhow::Result<()> {
    let output =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(dir)
            .args([
                "build",
                "--target",
                "wasm32-wasip2",
                "--release",
                "--message-format=json-render-diagnostics",
            ])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running cargo in {}", dir.display()))?;
    if !output.status.success() {
        bail!(
            "cargo build failed in {} ({})",
            dir.display(),
            output.status
        );
    }
    // The component is the cdylib artifact cargo reports, wherever the target dir is.
    let mut wasm = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
            && let Some(files) = message["filenames"].as_array()
        {
            wasm = files
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"))
                .map(PathBuf::from)
                .or(wasm);
        }
    }
    let Some(wasm) = wasm else {
        bail!(
            "cargo built no .wasm in {}: is the crate a `cdylib` (crate-type = [\"cdylib\"])?",
            dir.display()
        );
    };
    let bytes = std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let name = name_from_source(&wasm.display().to_string());
    let info = local_runtime()?
        .inspect(&name, &bytes, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{}: {} (helexa:policy@{}), {} bytes ({:.1} KiB)",
        wasm.display(),
        info.kind,
        info.wit_version,
        bytes.len(),
        bytes.len() as f64 / 1024.0
    );
    Ok(())
}

/// A router case (`policies/router/tests/cases/*.json`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterCase {
    name: String,
    #[serde(default, rename = "description")]
    _description: String,
    #[serde(default)]
    settings: Option<serde_json::Value>,
    request: RequestInfo,
    catalogue: Vec<CatalogueEntry>,
    fleet: Fleet,
    expected: Option<Decision>,
}

/// An evictor case (`policies/evictor/tests/cases/*.json`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvictorCase {
    name: String,
    #[serde(default, rename = "description")]
    _description: String,
    #[serde(default)]
    settings: Option<serde_json::Value>,
    on: Node,
    need_mb: u64,
    incoming: CatalogueEntry,
    expected: Option<Vec<String>>,
}

/// A translator case (`policies/translator/tests/cases/*.json`): one call of the translation
/// interface with JSON bodies, and the expected answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TranslatorCase {
    name: String,
    #[serde(default, rename = "description")]
    _description: String,
    #[serde(default)]
    settings: Option<serde_json::Value>,
    call: TranslatorCall,
    /// The translated body; for a stream, the events (`data` parsed when it is JSON); for a
    /// refused or failed call, `{"error": "<message>"}`.
    expected: Option<serde_json::Value>,
}

/// Which function of `helexa:policy/translation` a case calls.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
enum TranslatorCall {
    /// `request-to-chat`: a client body of surface `from`.
    RequestToChat {
        from: Surface,
        body: serde_json::Value,
    },
    /// `response-from-chat`: a complete chat completion for a client of surface `to`.
    ResponseFromChat {
        to: Surface,
        request: serde_json::Value,
        body: serde_json::Value,
    },
    /// A `response-stream`: each chunk pushed in order, then `finish`.
    ResponseStream {
        to: Surface,
        request: serde_json::Value,
        chunks: Vec<serde_json::Value>,
    },
}

impl TranslatorCall {
    /// The answer as JSON (see [`TranslatorCase::expected`]).
    fn answer(&self, set: &PolicySet) -> serde_json::Value {
        let result = match self {
            Self::RequestToChat { from, body } => set
                .request_to_chat(*from, &body.to_string())
                .map(json_or_text),
            Self::ResponseFromChat { to, request, body } => set
                .response_from_chat(*to, &request.to_string(), &body.to_string())
                .map(json_or_text),
            Self::ResponseStream {
                to,
                request,
                chunks,
            } => Self::stream(set, *to, request, chunks).map(|events| {
                events
                    .into_iter()
                    .map(|e| serde_json::json!({ "event": e.event, "data": json_or_text(e.data) }))
                    .collect()
            }),
        };
        result.unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// Every event of a stream fed `chunks` and then finished.
    fn stream(
        set: &PolicySet,
        to: Surface,
        request: &serde_json::Value,
        chunks: &[serde_json::Value],
    ) -> Result<Vec<SseEvent>, TranslateError> {
        let mut stream = set.response_stream(to, &request.to_string(), "resp_case")?;
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(stream.push(&chunk.to_string())?);
        }
        events.extend(stream.finish()?);
        Ok(events)
    }
}

/// `text` parsed as JSON, or as a JSON string when it is not JSON.
fn json_or_text(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

/// Repeats of each case for the timing (after the first, cold call).
const TIMED_REPEATS: u32 = 200;

fn test(store: &PluginStore, name: &str, cases: &Path) -> anyhow::Result<()> {
    let (label, version, bytes) = if name.ends_with(".wasm") {
        let bytes = std::fs::read(name).with_context(|| format!("reading {name}"))?;
        (name_from_source(name), "local".to_owned(), bytes)
    } else {
        let manifest = store.get(name)?;
        let bytes = store.read_wasm(&manifest)?;
        (manifest.name, manifest.version, bytes)
    };
    run_cases(&local_runtime()?, &label, &version, &bytes, cases)
}

/// Runs the plugin `bytes` against every `*.json` case in `cases`, printing each answer and
/// its timing; an error when a case's answer differs from its `expected`.
fn run_cases(
    runtime: &PolicyRuntime,
    label: &str,
    version: &str,
    bytes: &[u8],
    cases: &Path,
) -> anyhow::Result<()> {
    let info = runtime
        .inspect(label, bytes, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(cases)
        .with_context(|| format!("reading {}", cases.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.json cases in {}", cases.display());
    }
    // A failure must show as a failure, not as the default's answer: fail policy reject.
    let options = PluginOptions {
        on_failure: FailPolicy::Reject,
        ..PluginOptions::default()
    };
    let mut loaded: BTreeMap<String, PolicySet> = BTreeMap::new();
    let mut set_for = |settings: &Option<serde_json::Value>| -> anyhow::Result<_> {
        let settings = settings
            .as_ref()
            .map_or_else(|| "{}".to_owned(), ToString::to_string);
        if let Some(set) = loaded.get(&settings) {
            return Ok(set.clone());
        }
        let plugin = runtime
            .load_plugin_with(info.kind, label, version, bytes, &settings, &options)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let set = runtime
            .default_set()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with(plugin);
        loaded.insert(settings, set.clone());
        Ok(set)
    };
    let (mut passed, mut failed) = (0, 0);
    for (index, file) in files.iter().enumerate() {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let shown = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let (case_name, answer, expected, cold, warm) = match info.kind {
            PolicyKind::Router => {
                let case: RouterCase = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a router case", file.display()))?;
                let set = set_for(&case.settings)?;
                // Router instances keep the catalogue and fleet resident and refresh
                // them when the version changes: every case gets its own versions.
                let version = index as u64 + 1;
                let catalogue = Arc::new(Catalogue {
                    version,
                    entries: case.catalogue,
                });
                let fleet = Arc::new(Fleet {
                    version,
                    ..case.fleet
                });
                let (answer, cold, warm) = timed(|| set.route(&case.request, &catalogue, &fleet));
                (
                    case.name,
                    serde_json::to_value(&answer)?,
                    case.expected.map(serde_json::to_value).transpose()?,
                    cold,
                    warm,
                )
            }
            PolicyKind::Evictor => {
                let case: EvictorCase = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not an evictor case", file.display()))?;
                let set = set_for(&case.settings)?;
                let (answer, cold, warm) =
                    timed(|| set.choose_victims(&case.on, case.need_mb, &case.incoming));
                (
                    case.name,
                    serde_json::to_value(&answer)?,
                    case.expected.map(serde_json::to_value).transpose()?,
                    cold,
                    warm,
                )
            }
            PolicyKind::Translator => {
                let case: TranslatorCase = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a translator case", file.display()))?;
                let set = set_for(&case.settings)?;
                let (answer, cold, warm) = timed(|| case.call.answer(&set));
                (case.name, answer, case.expected, cold, warm)
            }
        };
        let verdict = match &expected {
            Some(e) if *e == answer => {
                passed += 1;
                "ok"
            }
            Some(_) => {
                failed += 1;
                "FAIL"
            }
            None => "-",
        };
        println!(
            "{verdict:<4} {shown}: {case_name}\n     decision {answer}\n     first call {:.1} µs, then {:.2} µs/call (mean of {TIMED_REPEATS})",
            cold.as_secs_f64() * 1e6,
            warm.as_secs_f64() * 1e6,
        );
        if verdict == "FAIL" {
            println!("     expected {}", expected.unwrap_or_default());
        }
    }
    println!(
        "{} v{} ({}): {passed} passed, {failed} failed, {} without expectation",
        label,
        version,
        info.kind,
        files.len() - passed - failed
    );
    if failed > 0 {
        bail!("{failed} case(s) failed");
    }
    Ok(())
}

/// The answer, the first call's time, and the mean of [`TIMED_REPEATS`] more calls.
fn timed<R>(mut call: impl FnMut() -> R) -> (R, Duration, Duration) {
    let start = Instant::now();
    let answer = call();
    let cold = start.elapsed();
    let start = Instant::now();
    for _ in 0..TIMED_REPEATS {
        std::hint::black_box(call());
    }
    (answer, cold, start.elapsed() / TIMED_REPEATS)
}

#[cfg(test)]
mod tests {
    use helexa_policy_runtime::embedded;

    use super::*;

    fn runtime() -> PolicyRuntime {
        PolicyRuntime::new(RuntimeConfig::default(), &prometheus::Registry::new())
            .expect("policy runtime")
    }

    fn cases(kind: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies")
            .join(kind)
            .join("tests/cases")
    }

    #[test]
    fn the_default_policies_pass_their_recorded_cases() {
        let rt = runtime();
        for (kind, bytes) in [
            ("router", embedded::ROUTER),
            ("evictor", embedded::EVICTOR),
            ("translator", embedded::TRANSLATOR),
        ] {
            run_cases(&rt, kind, "embedded", bytes, &cases(kind))
                .unwrap_or_else(|e| panic!("{kind}: {e:#}"));
        }
    }

    #[test]
    fn a_translator_answer_unlike_its_expectation_fails_the_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let case = std::fs::read_to_string(cases("translator").join("01-anthropic-request.json"))
            .expect("case");
        let mut case: serde_json::Value = serde_json::from_str(&case).expect("json");
        case["expected"]["max_tokens"] = 65.into();
        std::fs::write(dir.path().join("case.json"), case.to_string()).expect("write");
        let err = run_cases(&runtime(), "t", "x", embedded::TRANSLATOR, dir.path())
            .expect_err("a wrong expectation must fail");
        assert!(err.to_string().contains("1 case(s) failed"), "{err}");
    }
}
