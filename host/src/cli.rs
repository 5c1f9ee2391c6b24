//! The `helexa` command line. `main.rs` only calls [`run`]; each subcommand lives in
//! its own module under `cli/` (only `serve` exists;
//! `up`, `status` and `plugin …` are planned, not implemented).

pub mod serve;

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
    }
}
