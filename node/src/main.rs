//! `helexa-node` binary: read the configuration, open the engine, pre-warm models, serve the
//! HTTP API until SIGTERM/Ctrl-C, then drain (stop accepting, finish in-flight work, exit).
//!
//! Serving is the default (`helexa-node [OPTIONS]` or `helexa-node serve [OPTIONS]`); `bench`
//! measures an engine on one model through the same ABI ([`bench`]), and `synth` writes seeded
//! models of real architectures' shapes for it (`helexa-model-synth`).

mod bench;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use clap::{Parser, Subcommand};
use helexa_node::config::RawConfig;
use helexa_node::engine::EngineHandle;
use helexa_node::state::AppState;
use helexa_node_api::LoadRequest;

/// The per-host helexa daemon.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, the node serves.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve(ServeArgs),
    /// Measure load time, prefill and decode throughput of an engine on a model.
    Bench(Box<bench::BenchArgs>),
    /// Write a seeded random model with a real architecture's shapes.
    Synth(bench::SynthArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "HELEXA_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the file and HELEXA_NODE_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Engine shared library (overrides the file and HELEXA_NODE_ENGINE).
    #[arg(long)]
    engine: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => serve_blocking(cli.serve),
        Some(Command::Serve(args)) => serve_blocking(args),
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::Synth(args)) => bench::synth(&args),
    }
}

fn serve_blocking(args: ServeArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut raw = match &args.config {
        Some(path) => RawConfig::read(path).context("reading the configuration")?,
        None => RawConfig::default(),
    };
    raw.apply_env(|name| std::env::var(name).ok())
        .context("reading HELEXA_NODE_* environment variables")?;
    if let Some(listen) = args.listen {
        raw.listen = Some(listen);
    }
    if let Some(engine) = args.engine {
        raw.engine = Some(engine);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from));
    let config = raw
        .validate(exe_dir.as_deref())
        .context("validating the configuration")?;

    let engine = open_engine(&config.engine)?;
    let info = engine.info().context("asking the engine for its info")?;
    tracing::info!(backend = %info.backend, name = %info.name, version = %info.version, path = %config.engine.display(), "engine loaded");

    let state = AppState::new(Arc::new(engine), config.admission, config.cache_dir.clone())
        .context("registering metrics")?;
    for model in config.models.clone() {
        let state = state.clone();
        tokio::spawn(async move {
            let id = model.id.clone();
            let request = LoadRequest {
                id: model.id,
                source: model.source,
                quant: model.quant,
                dtype: model.dtype,
                devices: model.devices,
                context_length: model.context_length,
            };
            if let Err(error) = state.load(request).await {
                tracing::error!(model = %id, error = %error.envelope.error.message, "pre-warm failed");
            }
        });
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, "helexa-node serving");
    // Token streams are many small writes: without TCP_NODELAY, Nagle's algorithm and the
    // peer's delayed ACKs hold chunks back for up to ~40 ms each.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
    });
    let drain_state = state.clone();
    axum::serve(listener, helexa_node::app(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("draining: refusing new work, finishing in-flight requests");
            drain_state.start_draining();
        })
        .await
        .context("serving HTTP")?;
    tracing::info!("drained; exiting");
    Ok(())
}

/// The one place where the node decides to trust an engine library.
#[allow(
    unsafe_code,
    reason = "loading the engine library is the node's single unsafe decision (STYLE.md §10)"
)]
pub(crate) fn open_engine(path: &std::path::Path) -> anyhow::Result<EngineHandle> {
    // SAFETY: the operator configured this path as a helexa engine; `open` checks the ABI
    // version, the interface size and every function pointer before calling into it.
    unsafe { EngineHandle::open(path) }
        .with_context(|| format!("loading the engine library {}", path.display()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C drains");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
