//! The stack under test: finds (or builds) `helexa`, `helexa-node` and the CPU engine, starts
//! a node pre-warming `fixtures/tiny-qwen3` and a gateway in front of it on free ports, waits
//! until the gateway sees the model loaded, and kills both processes on drop.
//!
//! Tests share one running stack while they overlap ([`Stack::shared`] hands out an `Arc`; the
//! last holder's drop stops it), which keeps the whole suite to a few start-ups.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The model id the stack serves (and the node pre-warms).
pub const MODEL: &str = "tiny-qwen3";
/// How long a start-up may take before the test fails with both processes' logs.
const READY_TIMEOUT: Duration = Duration::from_secs(45);
/// Start-up attempts: a free port found by binding :0 can be taken again before the child binds it.
const ATTEMPTS: usize = 3;

/// The workspace root (this package lives in `<root>/tests/e2e`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// `fixtures/tiny-qwen3`, absolute (the node resolves relative sources against its cwd).
pub fn model_dir() -> PathBuf {
    workspace_root().join("fixtures/tiny-qwen3")
}

/// `fixtures/tiny-qwen3/reference.json`, parsed once.
pub fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = model_dir().join("reference.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).expect("reference.json is JSON")
    })
}

/// One prompt of reference.json (`chat`, `think`, `tools`, `long`).
pub fn prompt(name: &str) -> &'static Value {
    &reference()["prompts"][name]
}

/// The built artefacts the stack runs.
#[derive(Debug, Clone)]
struct Artefacts {
    gateway: PathBuf,
    node: PathBuf,
    engine: PathBuf,
}

/// The `debug` profile directory of the target dir this test binary was built into
/// (`<target>/debug/deps/all-<hash>` → `<target>/debug`), else `CARGO_TARGET_DIR`, else
/// `<workspace>/target`.
fn profile_dir() -> PathBuf {
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        (deps.file_name()? == "deps").then(|| deps.parent().map(Path::to_path_buf))?
    });
    from_exe.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace_root().join("target"), PathBuf::from)
            .join("debug")
    })
}

fn find_artefacts(profile: &Path) -> Result<Artefacts, String> {
    let gateway = profile.join("helexa");
    let node = profile.join("helexa-node");
    let engine = [
        profile.join("libhelexa_engine_cuda.so"),
        profile.join("deps/libhelexa_engine_cuda.so"),
    ]
    .into_iter()
    .find(|p| p.is_file());
    let missing: Vec<String> = [&gateway, &node]
        .into_iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .chain(
            engine
                .is_none()
                .then(|| format!("{}/[deps/]libhelexa_engine_cuda.so", profile.display())),
        )
        .collect();
    match engine {
        Some(engine) if missing.is_empty() => Ok(Artefacts {
            gateway,
            node,
            engine,
        }),
        _ => Err(missing.join(", ")),
    }
}

/// The newest modification time of the Rust sources (and manifests) the artefacts are built
/// from. `cargo test -p helexa-e2e` builds the products' libraries but not their binaries, so an
/// artefact older than its sources would test stale code. (Comparing against sources rather than
/// asking cargo every time avoids a rebuild ping-pong: `cargo build -p helexa …` and
/// `cargo test -p helexa-e2e` resolve dependency features differently.)
fn newest_source() -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    walk(&path, newest);
                }
            } else if path
                .extension()
                .is_some_and(|e| e == "rs" || e == "toml" || e == "wit" || e == "jinja")
            {
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                *newest = (*newest).max(modified);
            }
        }
    }
    let root = workspace_root();
    let mut newest = None;
    for dir in ["host", "node", "engine-cuda", "policies", "wit"] {
        walk(&root.join(dir), &mut newest);
    }
    let lock = std::fs::metadata(root.join("Cargo.lock")).and_then(|m| m.modified());
    newest = newest.max(lock.ok());
    newest
}

fn is_stale(artefacts: &Artefacts) -> bool {
    let Some(newest) = newest_source() else {
        return false;
    };
    [&artefacts.gateway, &artefacts.node, &artefacts.engine]
        .into_iter()
        .any(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .map_or(true, |built| built < newest)
        })
}

/// The artefacts, building them (once per test process) when missing or possibly stale.
fn artefacts() -> &'static Artefacts {
    static ARTEFACTS: OnceLock<Artefacts> = OnceLock::new();
    // OnceLock blocks concurrent callers until the first finishes, so parallel tests never run
    // two builds; across processes, cargo's own build-directory lock serialises them.
    ARTEFACTS.get_or_init(|| {
        let profile = profile_dir();
        let found = find_artefacts(&profile);
        let stale = found.as_ref().map_or(true, is_stale);
        if !stale && let Ok(found) = found {
            return found;
        }
        match &found {
            Err(missing) => eprintln!("e2e: not built yet: {missing}; building"),
            Ok(_) => eprintln!("e2e: sources are newer than the binaries; rebuilding"),
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(&cargo);
        // Variables cargo set for this test (CARGO_PKG_NAME=helexa-e2e, CARGO_MANIFEST_DIR, …)
        // must not reach the nested build: build scripts that watch them would rerun, and the
        // next `cargo test` would rebuild them back.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
                || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*name)
            {
                build.env_remove(&*name);
            }
        }
        let status = build
            .args([
                "build",
                "-p",
                "helexa",
                "-p",
                "helexa-node",
                "-p",
                "helexa-engine-cuda",
            ])
            .current_dir(workspace_root())
            .status()
            .unwrap_or_else(|e| panic!("running {cargo:?} build: {e}"));
        assert!(
            status.success(),
            "`cargo build -p helexa -p helexa-node -p helexa-engine-cuda` failed ({status})"
        );
        find_artefacts(&profile).unwrap_or_else(|missing| {
            panic!(
                "still missing after cargo build: {missing} (is the target dir {}?)",
                profile.display()
            )
        })
    })
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// A running gateway + node pair; dropping it kills both.
#[derive(Debug)]
pub struct Stack {
    /// `http://127.0.0.1:<port>` of the gateway API.
    pub gateway: String,
    /// `http://127.0.0.1:<port>` of the node API.
    pub node: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Stack {
    /// The running stack, started if no test holds one.
    pub async fn shared() -> Arc<Stack> {
        static SHARED: tokio::sync::Mutex<Weak<Stack>> = tokio::sync::Mutex::const_new(Weak::new());
        let mut shared = SHARED.lock().await;
        if let Some(stack) = shared.upgrade() {
            return stack;
        }
        let stack = Arc::new(Stack::start().await);
        *shared = Arc::downgrade(&stack);
        stack
    }

    /// Start a fresh stack (retrying on port races) and wait until the model is loaded.
    pub async fn start() -> Stack {
        let artefacts = tokio::task::spawn_blocking(artefacts)
            .await
            .expect("the build task panicked");
        let mut last_failure = String::new();
        for attempt in 1..=ATTEMPTS {
            let mut stack = Stack::spawn(artefacts);
            match stack.wait_ready().await {
                Ok(()) => return stack,
                Err(failure) => {
                    let raced = stack.exited_early()
                        && stack
                            .logs()
                            .to_lowercase()
                            .contains("address already in use");
                    last_failure = format!("{failure}\n{}", stack.logs());
                    drop(stack);
                    if !raced {
                        break;
                    }
                    eprintln!("e2e: port race on attempt {attempt}; retrying");
                }
            }
        }
        panic!("the helexa stack did not come up: {last_failure}");
    }

    fn spawn(artefacts: &Artefacts) -> Stack {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (node_port, api_port, metrics_port) = (free_port(), free_port(), free_port());
        let model = model_dir();
        let write = |name: &str, text: String| {
            std::fs::write(dir.path().join(name), text).expect("writing a config file");
        };
        // TOML basic strings: paths are escaped through their Debug form (quotes, backslashes).
        write(
            "node.toml",
            format!(
                "listen = \"127.0.0.1:{node_port}\"\nengine = {:?}\n\n[[models]]\nid = \"{MODEL}\"\nsource = {:?}\n",
                artefacts.engine.display().to_string(),
                model.display().to_string(),
            ),
        );
        write(
            "models.toml",
            format!(
                "[[models]]\nid = \"{MODEL}\"\nsource = {:?}\nvram_mb = 64\naliases = [\"claude-sonnet-4-5\"]\ncapabilities = [\"chat\", \"tools\", \"reasoning\"]\ncontext_length = 4096\n",
                model.display().to_string(),
            ),
        );
        write(
            "gateway.toml",
            format!(
                "listen = \"127.0.0.1:{api_port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nmodels = \"models.toml\"\npoll_interval_ms = 100\n\n[[nodes]]\nname = \"local\"\nendpoint = \"http://127.0.0.1:{node_port}\"\n",
            ),
        );
        let spawn = |program: &Path, args: &[&str], log: &str| {
            let log = File::create(dir.path().join(log)).expect("creating a log file");
            Command::new(program)
                .args(args)
                .current_dir(dir.path())
                .env("RUST_LOG", "info")
                // The gateway and node read HELEXA_* / HELEXA_NODE_* overrides; a developer's
                // shell must not redirect the test stack.
                .env_remove("HELEXA_LISTEN")
                .env_remove("HELEXA_METRICS_LISTEN")
                .env_remove("HELEXA_CONFIG")
                .env_remove("HELEXA_NODE_LISTEN")
                .env_remove("HELEXA_NODE_ENGINE")
                .env_remove("HELEXA_NODE_CONFIG")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("cloning a log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()))
        };
        let node_config = dir.path().join("node.toml");
        let gateway_config = dir.path().join("gateway.toml");
        let node = spawn(
            &artefacts.node,
            &["--config", node_config.to_str().expect("UTF-8 temp path")],
            "node.log",
        );
        let gateway = spawn(
            &artefacts.gateway,
            &[
                "serve",
                "--config",
                gateway_config.to_str().expect("UTF-8 temp path"),
            ],
            "gateway.log",
        );
        Stack {
            gateway: format!("http://127.0.0.1:{api_port}"),
            node: format!("http://127.0.0.1:{node_port}"),
            children: vec![node, gateway],
            dir,
        }
    }

    /// Poll the gateway's `/v1/models` until `tiny-qwen3` is `loaded` (the gateway has polled
    /// the node and seen the model ready).
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = reqwest::Client::new();
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < READY_TIMEOUT {
            if self.exited_early() {
                return Err("a process exited during start-up".into());
            }
            match client
                .get(format!("{}/v1/models", self.gateway))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(response) => {
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    let loaded = body["data"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|m| m["id"] == MODEL && m["loaded"] == true);
                    if loaded {
                        return Ok(());
                    }
                    last = body.to_string();
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "{MODEL} not loaded after {READY_TIMEOUT:?} (last /v1/models: {last})"
        ))
    }

    fn exited_early(&mut self) -> bool {
        self.children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Both processes' output so far, for failure messages.
    pub fn logs(&self) -> String {
        ["node.log", "gateway.log"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
                format!("----- {name} -----\n{text}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One server-sent event: its `event:` name (if any) and its `data:` payload.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
}

/// Split a complete SSE body into events (blank-line separated; `data:` lines joined with `\n`;
/// comments and other fields ignored), as the SSE spec's parser does.
pub fn parse_sse(body: &str) -> Vec<Event> {
    let body = body.replace("\r\n", "\n");
    body.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = Some(value.to_owned()),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            (!data.is_empty()).then(|| Event {
                event,
                data: data.join("\n"),
            })
        })
        .collect()
}

/// POST JSON to `url`, returning the status and the body as text; the logs of `stack` are
/// attached when the request itself fails.
pub async fn post(stack: &Stack, url: &str, body: &Value) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}\n{}", stack.logs()));
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("reading the answer of {url}: {e}\n{}", stack.logs()));
    (status, text)
}

/// POST JSON and parse a 200 JSON answer.
pub async fn post_json(stack: &Stack, url: &str, body: &Value) -> Value {
    let (status, text) = post(stack, url, body).await;
    assert_eq!(status, 200, "POST {url} → {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {url}: not JSON ({e}): {text}"))
}

/// POST JSON and parse a 200 `text/event-stream` answer.
pub async fn post_sse(stack: &Stack, url: &str, body: &Value) -> Vec<Event> {
    let (status, text) = post(stack, url, body).await;
    assert_eq!(status, 200, "POST {url} → {status}: {text}");
    parse_sse(&text)
}

/// The reference's `tools` answer: the name and the parsed arguments of the one
/// `<tool_call>{json}</tool_call>` block of its greedy continuation.
pub fn expected_tool_call() -> (String, Value) {
    let text = prompt("tools")["greedy_text"]
        .as_str()
        .expect("tools.greedy_text");
    let inner = text
        .split_once("<tool_call>")
        .and_then(|(_, rest)| rest.split_once("</tool_call>"))
        .map(|(inner, _)| inner)
        .expect("the reference's tools answer holds a <tool_call> block");
    let call: Value = serde_json::from_str(inner.trim()).expect("the tool call is JSON");
    (
        call["name"].as_str().expect("name").to_owned(),
        call["arguments"].clone(),
    )
}

/// Parse an OpenAI `arguments` string (JSON text) into a value.
pub fn parse_arguments(arguments: &Value) -> Value {
    let text = arguments
        .as_str()
        .unwrap_or_else(|| panic!("arguments is not a string: {arguments}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {text}"))
}
