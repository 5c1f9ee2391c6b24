//! `helexa up`: the whole stack on this machine in one command. It runs the gateway
//! in-process ([`super::serve::run`] on a generated config) and one `helexa-node` child
//! with the CPU/CUDA engine library found next to `helexa`, serving either the given
//! `--model` or the embedded demo model.
//!
//! The demo model is `fixtures/tiny-qwen3`: a 5.8 MB bf16 Qwen3-architecture model
//! trained on Rust-book prose and synthetic chats. It chats, thinks (`<think>`) and calls
//! tools, but knows little: it shows the plumbing, not quality. Its files are compiled
//! into the binary and extracted once to `$XDG_CACHE_HOME/helexa/models/tiny-qwen3`
//! (checked by hash), so `helexa up` works from any directory.
//!
//! The node runs in its own process group so that a terminal Ctrl-C reaches `up` only;
//! `up` then stops the gateway (graceful) and sends the node SIGTERM and waits for it (it
//! drains). A node that dies on its own takes `up` down with an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use sha2::{Digest, Sha256};

use super::serve::{self, ServeArgs};

/// The embedded demo model's id (and cache folder name).
pub const DEMO_MODEL_ID: &str = "tiny-qwen3";

/// Aliases every `up` model gets, so clients with hard-wired model names work unchanged
/// (Claude Code asks for `claude-*-opus-*`, `claude-sonnet-*`, …; OpenAI tools for `gpt-*`).
pub const DEFAULT_ALIASES: &[&str] = &["claude-*", "gpt-*", "o1*", "o3*", "o4*"];

/// The demo model's files, compiled in (config, weights, tokenizer, template).
const DEMO_FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../../fixtures/tiny-qwen3/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../../fixtures/tiny-qwen3/generation_config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../fixtures/tiny-qwen3/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../fixtures/tiny-qwen3/tokenizer_config.json"),
    ),
    (
        "chat_template.jinja",
        include_bytes!("../../../fixtures/tiny-qwen3/chat_template.jinja"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../fixtures/tiny-qwen3/model.safetensors"),
    ),
];

/// `helexa up` arguments.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Gateway API listen address.
    #[arg(long, env = "HELEXA_LISTEN", default_value = "127.0.0.1:31313")]
    pub listen: SocketAddr,
    /// Gateway metrics listen address (default: a free port).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The node's listen address (default: a free port on 127.0.0.1).
    #[arg(long)]
    pub node_listen: Option<SocketAddr>,
    /// A model directory (safetensors + tokenizer) or a `.gguf` file to serve instead of
    /// the embedded tiny-qwen3 demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The id to serve `--model` under (default: its file or folder name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Extra model alias (repeatable; `*` globs allowed). `claude-*`, `gpt-*`, `o1*`,
    /// `o3*`, `o4*` are always added.
    #[arg(long = "alias")]
    pub aliases: Vec<String>,
    /// Engine library (default: `libhelexa_engine_cuda.so` next to `helexa`).
    #[arg(long, env = "HELEXA_ENGINE")]
    pub engine: Option<PathBuf>,
    /// The `helexa-node` binary (default: next to `helexa`, then `$PATH`).
    #[arg(long, env = "HELEXA_NODE_BIN")]
    pub node_bin: Option<PathBuf>,
    /// Require this API key (`Authorization: Bearer` or `x-api-key`); default: no auth,
    /// which is why the default listen address is loopback only.
    #[arg(long, env = "HELEXA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Give up if the model is not ready after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout_secs: u64,
}

/// Run the stack until Ctrl-C / SIGTERM or until the node dies.
pub async fn run(args: UpArgs, admin_key: Option<&str>) -> anyhow::Result<()> {
    let started = Instant::now();
    // The gateway's own rules, checked before anything starts.
    if args.api_key.as_ref().is_some_and(|k| k.len() < 8) {
        bail!("--api-key / HELEXA_API_KEY must be at least 8 characters");
    }
    if admin_key.is_some_and(|k| k.len() < 16) {
        bail!("--admin-key / HELEXA_ADMIN_KEY must be at least 16 characters");
    }
    let exe_dir = std::env::current_exe()
        .context("locating the helexa executable")?
        .parent()
        .map(Path::to_path_buf)
        .context("the helexa executable has no parent folder")?;
    let node_bin = match &args.node_bin {
        Some(path) => path.clone(),
        None => find_node_bin(&exe_dir)?,
    };
    let engine = match &args.engine {
        Some(path) => path.clone(),
        None => exe_dir.join("libhelexa_engine_cuda.so"),
    };
    if !engine.is_file() {
        bail!(
            "no engine library at {}: build it with `cargo build --release -p helexa-engine-cuda` (or run ./scripts/up.sh), or pass --engine PATH",
            engine.display()
        );
    }

    let (model_id, source, demo) = match &args.model {
        Some(path) => {
            let path = std::path::absolute(path)
                .with_context(|| format!("resolving --model {}", path.display()))?;
            if !path.exists() {
                bail!("--model {}: no such file or folder", path.display());
            }
            let id = match &args.model_id {
                Some(id) => id.clone(),
                None => path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .filter(|s| !s.is_empty())
                    .context("--model has no file name; pass --model-id")?,
            };
            (id, path, false)
        }
        None => {
            let dir = extract_demo_model().context("extracting the embedded demo model")?;
            (
                args.model_id
                    .clone()
                    .unwrap_or_else(|| DEMO_MODEL_ID.to_owned()),
                dir,
                true,
            )
        }
    };

    let node_listen = match args.node_listen {
        Some(addr) => addr,
        None => free_local_addr().context("finding a free port for the node")?,
    };
    let metrics_listen = match args.metrics_listen {
        Some(addr) => addr,
        None => free_local_addr().context("finding a free port for the metrics")?,
    };

    // The generated configs live in a private temporary folder, removed on exit (they may
    // hold the API key).
    let run_dir = tempfile::Builder::new()
        .prefix("helexa-up.")
        .tempdir()
        .context("creating a temporary folder for the generated configuration")?;
    let mut aliases: Vec<String> = DEFAULT_ALIASES.iter().map(|a| (*a).to_owned()).collect();
    aliases.extend(args.aliases.iter().cloned());
    let files = GeneratedConfig {
        listen: args.listen,
        metrics_listen,
        node_listen,
        engine: &engine,
        model_id: &model_id,
        source: &source,
        aliases: &aliases,
        context_length: context_length_of(&source),
        api_key: args.api_key.as_deref(),
        admin_key,
    };
    files.write(run_dir.path())?;

    let mut node = spawn_node(&node_bin, &engine, node_listen, run_dir.path())?;
    let node_pid = node.id();

    let gateway = serve::run(ServeArgs {
        config: run_dir.path().join("gateway.toml"),
        listen: Some(args.listen),
        metrics_listen: Some(metrics_listen),
    });
    let base = format!("http://{}", args.listen);
    let ready = async {
        wait_ready(
            &base,
            &model_id,
            args.api_key.as_deref(),
            Duration::from_secs(args.ready_timeout_secs),
        )
        .await?;
        print_banner(&base, &model_id, demo, args.api_key.is_some(), started);
        // Keep this branch pending: only the gateway or the node ends `up`.
        std::future::pending::<anyhow::Result<()>>().await
    };

    let outcome = tokio::select! {
        result = gateway => result.context("the gateway stopped with an error"),
        status = node.wait() => {
            let status = status.context("waiting for helexa-node")?;
            Err(anyhow::anyhow!(
                "helexa-node exited unexpectedly ({status}); its log is above. Check --engine and --model, or run `helexa-node --config {}` by hand",
                run_dir.path().join("node.toml").display()
            ))
        }
        result = ready => result,
    };
    stop_node(&mut node, node_pid).await;
    outcome
}

/// `helexa-node` next to `helexa`, else on `$PATH` (left to the OS to find).
fn find_node_bin(exe_dir: &Path) -> anyhow::Result<PathBuf> {
    let beside = exe_dir.join("helexa-node");
    if beside.is_file() {
        return Ok(beside);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join("helexa-node").is_file()))
        .unwrap_or(false);
    if on_path {
        return Ok(PathBuf::from("helexa-node"));
    }
    bail!(
        "helexa-node not found next to {} nor on PATH: build it with `cargo build --release -p helexa-node` (or run ./scripts/up.sh), or pass --node-bin PATH",
        exe_dir.display()
    )
}

/// An address on 127.0.0.1 whose port was free a moment ago (the OS picks it; the small
/// race until the user binds it is acceptable for a local dev stack).
fn free_local_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The cache folder models are extracted to: `$XDG_CACHE_HOME/helexa/models`, else
/// `~/.cache/helexa/models`, else the temporary folder.
fn models_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("helexa")
        .join("models")
}

/// The hash over the embedded files' names and contents; it names what is on disk.
fn demo_hash() -> String {
    let mut hasher = Sha256::new();
    for (name, bytes) in DEMO_FILES {
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hex::encode(hasher.finalize())
}

/// Write the demo model to the cache unless the same version is already there; returns
/// its folder.
fn extract_demo_model() -> anyhow::Result<PathBuf> {
    extract_demo_model_to(&models_cache().join(DEMO_MODEL_ID))
}

fn extract_demo_model_to(dir: &Path) -> anyhow::Result<PathBuf> {
    let hash = demo_hash();
    let marker = dir.join(".helexa-sha256");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == hash)
        && DEMO_FILES.iter().all(|(name, bytes)| {
            std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
        })
    {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The marker goes last and each file is renamed into place, so an interrupted
    // extraction is redone rather than served half-written.
    let _ = std::fs::remove_file(&marker);
    for (name, bytes) in DEMO_FILES {
        let target = dir.join(name);
        let partial = dir.join(format!(".{name}.partial"));
        std::fs::write(&partial, bytes)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &target)
            .with_context(|| format!("moving {} into place", target.display()))?;
    }
    std::fs::write(&marker, &hash).with_context(|| format!("writing {}", marker.display()))?;
    Ok(dir.to_path_buf())
}

/// The context length a model directory's `config.json` declares
/// (`max_position_embeddings`), so clients that size their context from `/props` or
/// `/v1/models` see it; `None` for GGUF files and unreadable configs (the node knows).
fn context_length_of(source: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(source.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config["max_position_embeddings"]
        .as_u64()
        .filter(|&n| n > 0 && n <= u64::from(u32::MAX))
}

/// The gateway, catalogue and node configuration `up` generates.
struct GeneratedConfig<'a> {
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    node_listen: SocketAddr,
    engine: &'a Path,
    model_id: &'a str,
    source: &'a Path,
    aliases: &'a [String],
    context_length: Option<u64>,
    api_key: Option<&'a str>,
    admin_key: Option<&'a str>,
}

/// A TOML string literal (quoted and escaped).
fn lit(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl GeneratedConfig<'_> {
    fn node_toml(&self) -> String {
        format!(
            "listen = {}\nengine = {}\n\n[[models]]\nid = {}\nsource = {}\n",
            lit(&self.node_listen.to_string()),
            lit(&self.engine.to_string_lossy()),
            lit(self.model_id),
            lit(&self.source.to_string_lossy()),
        )
    }

    fn models_toml(&self) -> String {
        let aliases: Vec<String> = self.aliases.iter().map(|a| lit(a)).collect();
        // vram_mb only feeds placement; the node reports what the model really uses.
        let mut text = format!(
            "[[models]]\nid = {}\nsource = {}\nvram_mb = 64\naliases = [{}]\ncapabilities = [\"chat\", \"tools\", \"reasoning\"]\n",
            lit(self.model_id),
            lit(&self.source.to_string_lossy()),
            aliases.join(", "),
        );
        if let Some(n) = self.context_length {
            text += &format!("context_length = {n}\n");
        }
        text
    }

    fn gateway_toml(&self) -> String {
        let mut text = format!(
            "listen = {}\nmetrics_listen = {}\nmodels = \"models.toml\"\npoll_interval_ms = 500\n\n[[nodes]]\nname = \"local\"\nendpoint = {}\n",
            lit(&self.listen.to_string()),
            lit(&self.metrics_listen.to_string()),
            lit(&format!("http://{}", self.node_listen)),
        );
        if let Some(key) = self.api_key {
            text += &format!("\n[[auth.keys]]\nname = \"up\"\nkey = {}\n", lit(key));
        }
        if let Some(key) = self.admin_key {
            text += &format!("\n[admin]\nkey = {}\n", lit(key));
        }
        text
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        for (name, text) in [
            ("node.toml", self.node_toml()),
            ("models.toml", self.models_toml()),
            ("gateway.toml", self.gateway_toml()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

fn spawn_node(
    node_bin: &Path,
    engine: &Path,
    listen: SocketAddr,
    run_dir: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new(node_bin);
    command
        .arg("--config")
        .arg(run_dir.join("node.toml"))
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--engine")
        .arg(engine)
        // Its own process group: a terminal Ctrl-C goes to `up`, which stops the node in
        // order (gateway first, then SIGTERM and a drain) instead of both racing.
        .process_group(0)
        .kill_on_drop(true);
    // The node's info logs would bury the banner; warnings and errors still show.
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
    command
        .spawn()
        .with_context(|| format!("starting {}", node_bin.display()))
}

/// SIGTERM the node and wait for it to drain; SIGKILL after 10 s.
async fn stop_node(node: &mut tokio::process::Child, pid: Option<u32>) {
    if let Ok(Some(_)) = node.try_wait() {
        return;
    }
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(Duration::from_secs(10), node.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!("helexa-node did not stop within 10 s of SIGTERM; killing it");
            let _ = node.kill().await;
        }
    }
}

/// Poll `GET /v1/models` until `model` is loaded on a node.
async fn wait_ready(
    base: &str,
    model: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        let mut request = client.get(format!("{base}/v1/models"));
        if let Some(key) = api_key {
            request = request.bearer_auth(key);
        }
        if let Ok(response) = request.send().await
            && let Ok(body) = response.json::<serde_json::Value>().await
        {
            let loaded = body["data"].as_array().is_some_and(|models| {
                models
                    .iter()
                    .any(|m| m["id"] == model && m["loaded"] == true)
            });
            if loaded {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "model \"{model}\" was not ready after {} s; see the node's log above (raise --ready-timeout-secs for big models)",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_banner(base: &str, model: &str, demo: bool, auth: bool, started: Instant) {
    let key = if auth { "$HELEXA_API_KEY" } else { "anything" };
    let what = if demo {
        "the embedded demo model: a 5.8 MB Qwen3-architecture model trained on Rust-book prose and synthetic chats; it chats, thinks and calls tools, but knows little. Use --model PATH for a real one."
    } else {
        "from --model"
    };
    let auth_header = if auth {
        " -H \"authorization: Bearer $HELEXA_API_KEY\""
    } else {
        ""
    };
    println!(
        "\nhelexa is up in {:.1} s, serving \"{model}\" ({what})\n\
         \n  OpenAI clients:    OPENAI_BASE_URL={base}/v1  OPENAI_API_KEY={key}\
         \n  Anthropic clients: ANTHROPIC_BASE_URL={base}  ANTHROPIC_API_KEY={key}\
         \n  Any model name matching claude-*, gpt-*, o1*, o3*, o4* is served by \"{model}\".\
         \n\n  curl {base}/v1/chat/completions -H 'content-type: application/json'{auth_header} \\\
         \n    -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is ownership in Rust?\"}}],\"max_tokens\":64}}'\
         \n\n  `helexa status` shows the fleet. Ctrl-C stops everything.\n",
        started.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_is_idempotent_and_repairs_a_damaged_copy() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m");
        extract_demo_model_to(&target).unwrap();
        let weights = target.join("model.safetensors");
        assert_eq!(
            std::fs::read(&weights).unwrap().len(),
            DEMO_FILES[5].1.len()
        );
        // A truncated file is rewritten even though the marker matches.
        std::fs::write(&weights, b"short").unwrap();
        extract_demo_model_to(&target).unwrap();
        assert_eq!(std::fs::read(&weights).unwrap(), DEMO_FILES[5].1);
    }

    #[test]
    fn generated_configs_parse_and_escape() {
        let aliases = vec!["claude-*".to_owned(), "my \"model\"".to_owned()];
        let generated = GeneratedConfig {
            listen: "127.0.0.1:1".parse().unwrap(),
            metrics_listen: "127.0.0.1:2".parse().unwrap(),
            node_listen: "127.0.0.1:3".parse().unwrap(),
            engine: Path::new("/x/lib.so"),
            model_id: "m",
            source: Path::new("/models/m"),
            aliases: &aliases,
            context_length: Some(4096),
            api_key: Some("k\"ey-12345"),
            admin_key: Some("admin-key-0123456789"),
        };
        let config = crate::config::Config::from_toml(
            &generated.gateway_toml(),
            "gateway.toml",
            Path::new("/run"),
            &Default::default(),
            &|_| None,
        )
        .unwrap();
        assert_eq!(config.auth.keys[0].secret, "k\"ey-12345");
        assert_eq!(config.admin.key.as_deref(), Some("admin-key-0123456789"));
        assert_eq!(config.nodes[0].endpoint, "http://127.0.0.1:3");
        let specs = crate::catalogue::parse(&generated.models_toml(), "models.toml", &[]).unwrap();
        assert_eq!(specs[0].aliases, aliases);
        assert_eq!(specs[0].context_length, 4096);
        let node: toml::Table = toml::from_str(&generated.node_toml()).unwrap();
        assert_eq!(node["models"][0]["source"].as_str(), Some("/models/m"));
    }
}
