//! `helexa serve`: load the configuration, the catalogue and the policies, poll the
//! fleet, and serve the API and the metrics on their listeners until Ctrl-C / SIGTERM.
//! SIGHUP reloads the model catalogue and the policy plugins (re-reading the config's
//! `[policies]` and `[plugins]`); the plugin store is also watched, and
//! `POST /admin/plugins/reload` reloads on demand.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use clap::Args;

use crate::catalogue::CatalogueStore;
use crate::config::{Config, Overrides};
use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// `helexa serve` arguments. Each flag can also come from its `HELEXA_*` variable; a
/// flag wins over the variable, which wins over the file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Gateway configuration file (TOML).
    #[arg(long, env = "HELEXA_CONFIG", default_value = "helexa.toml")]
    pub config: PathBuf,
    /// API listen address (default 127.0.0.1:31313).
    #[arg(long, env = "HELEXA_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Metrics listen address (default 127.0.0.1:31314).
    #[arg(long, env = "HELEXA_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Run the gateway until a shutdown signal.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
    };
    let config = Config::load(&args.config, &overrides, &|name| std::env::var(name).ok())
        .with_context(|| format!("loading the configuration {}", args.config.display()))?;
    if config.auth.keys.is_empty() {
        tracing::warn!(
            "AUTHENTICATION IS OFF: no [auth] keys configured, anyone who can reach {} can use every model",
            config.listen
        );
    }
    let metrics = Metrics::new().context("registering metrics")?;
    let catalogue = Arc::new(
        CatalogueStore::open(
            config.models.clone(),
            config.nodes.iter().map(|n| n.name.clone()).collect(),
        )
        .context("loading the model catalogue")?,
    );
    tracing::info!(models = catalogue.current().specs.len(), "catalogue loaded");

    let (policies, plugins) = {
        let (policies_config, plugins_config) = (config.policies.clone(), config.plugins.clone());
        let (registry, path) = (
            metrics.registry.clone(),
            std::path::absolute(&args.config).ok(),
        );
        // Compiling components takes up to ~100 ms each: off the async threads.
        tokio::task::spawn_blocking(move || {
            crate::policy::PluginManager::start(policies_config, plugins_config, path, &registry)
        })
        .await
        .context("policy loading task")?
        .context("loading the policies")?
    };
    // The plugin store is watched for `helexa plugin install/use/remove` (hot reload).
    let _watcher = if config.plugins.watch {
        Some(
            plugins
                .spawn_watcher(config.plugins.debounce)
                .with_context(|| {
                    format!("watching the plugin store {}", config.plugins.dir.display())
                })?,
        )
    } else {
        None
    };
    let gateway = Gateway::new(
        &config,
        Arc::clone(&catalogue),
        Arc::new(policies),
        metrics.clone(),
    )
    .context("assembling the gateway")?;
    let _pollers = gateway.start_polling(config.poll_interval).await;

    let api = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the API listener {}", config.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics listener {}", config.metrics_listen))?;
    tracing::info!(api = %config.listen, metrics = %config.metrics_listen, nodes = config.nodes.len(), "helexa gateway listening");

    spawn_reload_on_sighup(
        Arc::clone(&catalogue),
        metrics.clone(),
        Arc::clone(&plugins),
    );
    let metrics_server =
        axum::serve(metrics_listener, metrics.router()).with_graceful_shutdown(shutdown());
    // Streams are many small writes: without TCP_NODELAY, Nagle's algorithm and delayed
    // ACKs hold chunks back for up to 40 ms.
    let api = api.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let app = crate::api::app(gateway.clone())
        .merge(crate::admin::router(plugins, config.admin.key.clone()))
        .merge(crate::fleet_admin::router(
            gateway,
            config.admin.key.clone(),
        ));
    let api_server = axum::serve(api, app).with_graceful_shutdown(shutdown());
    let (api_result, metrics_result) = tokio::join!(api_server, metrics_server);
    api_result.context("API server")?;
    metrics_result.context("metrics server")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

fn spawn_reload_on_sighup(
    catalogue: Arc<CatalogueStore>,
    metrics: Metrics,
    plugins: Arc<crate::policy::PluginManager>,
) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match catalogue.reload() {
                Ok(version) => {
                    metrics
                        .catalogue_models
                        .set(catalogue.current().specs.len() as f64);
                    tracing::info!(version, "catalogue reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catalogue reload failed; keeping the previous one")
                }
            }
            // The plugins too, re-reading the config (settings and limits may have changed).
            let plugins = Arc::clone(&plugins);
            let _ = tokio::task::spawn_blocking(move || plugins.reload("sighup", true)).await;
        }
    });
    #[cfg(not(unix))]
    let _ = (catalogue, metrics, plugins);
}
