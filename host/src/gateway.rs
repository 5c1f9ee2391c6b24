//! The gateway's shared state: catalogue, fleet, policies, metrics, the proxy clients and
//! the API keys. Handlers get it as [`AppState`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::catalogue::CatalogueStore;
use crate::config::{ApiKey, Config, ProxyConfig};
use crate::error::GatewayError;
use crate::fleet::FleetState;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::proxy::Proxy;
use crate::routing::SharedLoad;

/// What every handler holds.
pub type AppState = Arc<Gateway>;

/// The gateway.
pub struct Gateway {
    pub(crate) catalogue: Arc<CatalogueStore>,
    pub(crate) fleet: Arc<FleetState>,
    pub(crate) policies: Arc<dyn Policies>,
    pub(crate) metrics: Metrics,
    pub(crate) proxy: Proxy,
    pub(crate) proxy_config: ProxyConfig,
    keys: Vec<ApiKey>,
    /// Loads in progress, keyed by (node, model): concurrent requests wait on one load.
    pub(crate) loads: Mutex<HashMap<(String, String), SharedLoad>>,
    started: Instant,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("nodes", &self.fleet.nodes().len())
            .finish()
    }
}

/// Why the gateway could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// An HTTP client could not be built (TLS backend, resolver).
    #[error("building the HTTP client failed: {0}")]
    Client(#[from] reqwest::Error),
}

impl Gateway {
    /// Assemble the gateway. Does not poll yet: call [`Gateway::start_polling`].
    pub fn new(
        config: &Config,
        catalogue: Arc<CatalogueStore>,
        policies: Arc<dyn Policies>,
        metrics: Metrics,
    ) -> Result<AppState, InitError> {
        // Polls must finish well within one interval, but a node under load may be slow
        // to answer `/health`; never less than a second.
        let poll_timeout = config.poll_interval.max(Duration::from_secs(1));
        let fleet = Arc::new(FleetState::new(
            config.nodes.clone(),
            Arc::clone(&catalogue),
            metrics.clone(),
            poll_timeout,
        )?);
        metrics
            .catalogue_models
            .set(catalogue.current().specs.len() as f64);
        Ok(Arc::new(Gateway {
            catalogue,
            fleet,
            policies,
            metrics,
            proxy: Proxy::new(&config.proxy)?,
            proxy_config: config.proxy.clone(),
            keys: config.auth.keys.clone(),
            loads: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }))
    }

    /// Poll every node once now, then keep polling each every `interval` in the background.
    pub async fn start_polling(&self, interval: Duration) -> Vec<tokio::task::JoinHandle<()>> {
        self.fleet.poll_all().await;
        self.fleet.spawn_pollers(interval)
    }

    /// The fleet.
    pub fn fleet(&self) -> &Arc<FleetState> {
        &self.fleet
    }

    /// The catalogue (reload it with [`CatalogueStore::reload`]).
    pub fn catalogue(&self) -> &Arc<CatalogueStore> {
        &self.catalogue
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether API keys are required.
    pub fn auth_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Check `Authorization: Bearer K` or `x-api-key: K`; the key's name is the caller.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let api_key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let Some(presented) = bearer.or(api_key) else {
            return Err(GatewayError::Unauthorized(
                "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
                    .to_owned(),
            ));
        };
        // Compare against every key without an early exit, so timing does not reveal
        // which key (or how much of one) matched.
        let mut found = None;
        for key in &self.keys {
            if constant_time_eq(key.secret.as_bytes(), presented.as_bytes()) {
                found = Some(key.name.clone());
            }
        }
        found
            .map(Some)
            .ok_or_else(|| GatewayError::Unauthorized("invalid API key".to_owned()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
