//! helexa's gateway (`helexa`): OpenAI- and Anthropic-compatible APIs in front of a
//! fleet of `helexa-node`s.
//!
//! A request's way: [`api`] (auth, body, envelope) → [`service`] (passthrough or
//! translation through the translator policy) → [`routing`] (router policy over the
//! [`fleet`] view and the [`catalogue`]; evictor and node load when cold) → [`proxy`]
//! (stream the node's answer back). [`metrics`] are served on their own listener.
//!
//! ```no_run
//! # async fn run(config: helexa::config::Config, policies: std::sync::Arc<dyn helexa::policy::Policies>) -> anyhow::Result<()> {
//! use std::sync::Arc;
//! let metrics = helexa::metrics::Metrics::new()?;
//! let catalogue = Arc::new(helexa::catalogue::CatalogueStore::open(
//!     config.models.clone(),
//!     config.nodes.iter().map(|n| n.name.clone()).collect(),
//! )?);
//! let gateway = helexa::gateway::Gateway::new(&config, catalogue, policies, metrics)?;
//! gateway.start_polling(config.poll_interval).await;
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! axum::serve(listener, helexa::api::app(gateway)).await?;
//! # Ok(()) }
//! ```

// A request must never panic the gateway: no unwrap/expect outside tests (STYLE.md §1).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod api;
pub mod catalogue;
pub mod cli;
pub mod config;
pub mod error;
pub mod fleet;
pub mod fleet_admin;
pub mod gateway;
pub mod metrics;
pub mod plugin_store;
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod service;
