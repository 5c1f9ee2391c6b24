//! The `helexa` command line. `main.rs` only calls [`run`]; each subcommand lives in
//! its own module under `cli/`: `serve`, `up` (gateway + local node in one command),
//! `plugin …`, and the fleet commands `status`, `models`, `load`, `unload` (`fleet`).

pub mod fleet;
pub mod plugin;
pub mod scaffold;
pub mod serve;
pub mod up;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// helexa: a self-hosted LLM gateway in front of your own GPUs.
#[derive(Debug, Parser)]
#[command(name = "helexa", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,helexa=debug`).
    #[arg(long, global = true, env = "HELEXA_LOG", default_value = "info")]
    pub log: String,
    /// A running gateway, for the commands that talk to one (`status`, `plugin list`, …).
    #[arg(
        long,
        global = true,
        env = "HELEXA_GATEWAY",
        default_value = "http://127.0.0.1:31313"
    )]
    pub gateway: String,
    /// Key for the gateway's admin routes (sent as `Authorization: Bearer`).
    #[arg(long, global = true, env = "HELEXA_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Manage policy plugins (install, use, reload, build, test).
    Plugin(plugin::PluginArgs),
    /// Start the gateway and a local node serving a model (the embedded demo by default).
    Up(up::UpArgs),
    /// Show the fleet: nodes, devices, loaded models, queues, policies.
    Status(fleet::JsonFlag),
    /// List the catalogue's models and where each is loaded.
    Models(fleet::JsonFlag),
    /// Load a catalogue model on a node (through the gateway's admin API).
    Load(fleet::LoadArgs),
    /// Unload a model from the nodes that hold it (through the gateway's admin API).
    Unload(fleet::UnloadArgs),
}

/// Parse the command line and run it.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .with_context(|| format!("--log / HELEXA_LOG: bad filter \"{}\"", cli.log))?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(args)),
        Command::Plugin(args) => {
            runtime.block_on(plugin::run(args, &cli.gateway, cli.admin_key.as_deref()))
        }
        Command::Up(args) => runtime.block_on(up::run(args, cli.admin_key.as_deref())),
        Command::Status(args) => runtime.block_on(fleet::status(&cli.gateway, args)),
        Command::Models(args) => runtime.block_on(fleet::models(&cli.gateway, args)),
        Command::Load(args) => {
            runtime.block_on(fleet::load(&cli.gateway, cli.admin_key.as_deref(), args))
        }
        Command::Unload(args) => {
            runtime.block_on(fleet::unload(&cli.gateway, cli.admin_key.as_deref(), args))
        }
    }
}
