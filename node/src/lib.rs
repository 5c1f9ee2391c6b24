//! `helexa-node`: the per-host daemon of helexa (DESIGN.md §3–4).
//!
//! It `dlopen`s an inference engine through the C ABI (`helexa-engine-abi`, [`engine`]) and keeps
//! everything backend-independent on this side: chat templates ([`template`]), tokenization and
//! detokenized streaming ([`detok`]), tool-call / reasoning / stop-string extraction
//! ([`output`]), model sources and downloads ([`source`]), admission ([`state::Gate`]) and the
//! HTTP API ([`api`], built by [`app`]).
//!
//! ```no_run
//! # async fn run(backend: std::sync::Arc<dyn helexa_node::backend::Backend>) -> anyhow::Result<()> {
//! let state = helexa_node::state::AppState::new(backend, Default::default(), None)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:13131").await?;
//! axum::serve(listener, helexa_node::app(state)).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod backend;
pub mod config;
pub mod detok;
pub mod engine;
pub mod error;
mod error_http;
#[cfg(feature = "test-support")]
pub mod fake;
pub mod metrics;
pub mod openai;
pub mod output;
pub mod source;
pub mod state;
pub mod template;

pub use error::Error;

/// The node's HTTP application.
pub fn app(state: state::AppState) -> axum::Router {
    api::router(state)
}
