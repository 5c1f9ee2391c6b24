//! Prometheus metrics of the gateway (`helexa_*`), served on their own listener so a
//! scrape never competes with API traffic and the API port can stay private.
//!
//! Label values are bounded: `model` is the catalogue id (or `unknown`), never the raw
//! string a client sent, so a client cannot blow up the series count.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

/// All gateway metrics, registered in one registry (which the policy runtime also uses).
#[derive(Clone)]
pub struct Metrics {
    /// The registry served at `/metrics`.
    pub registry: Registry,
    /// `helexa_requests_total{surface,model,status}`.
    pub requests: IntCounterVec,
    /// `helexa_errors_total{surface,kind}`.
    pub errors: IntCounterVec,
    /// `helexa_ttft_seconds{surface}`: request start to first byte of the node's body.
    pub ttft: HistogramVec,
    /// `helexa_inter_token_seconds`: gap between streamed chunks.
    pub inter_token: Histogram,
    /// `helexa_tokens_total{kind}` (`prompt`, `completion`).
    pub tokens: IntCounterVec,
    /// `helexa_cold_starts_total`.
    pub cold_starts: IntCounter,
    /// `helexa_evictions_total`.
    pub evictions: IntCounter,
    /// `helexa_node_health{node}`: 1 healthy, 0.5 degraded, 0 unreachable.
    pub node_health: GaugeVec,
    /// `helexa_device_vram_total_mb{node,device}`.
    pub vram_total: GaugeVec,
    /// `helexa_device_vram_free_mb{node,device}`.
    pub vram_free: GaugeVec,
    /// `helexa_catalogue_models`.
    pub catalogue_models: Gauge,
}

impl Metrics {
    /// Create and register everything in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let itl_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5.0,
        ];
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "helexa_requests_total",
                    "Client requests by surface, model and status",
                ),
                &["surface", "model", "status"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("helexa_errors_total", "Errors by surface and kind"),
                &["surface", "kind"],
            )?,
            ttft: HistogramVec::new(
                HistogramOpts::new(
                    "helexa_ttft_seconds",
                    "Time to the first byte of a node's body",
                )
                .buckets(latency_buckets),
                &["surface"],
            )?,
            inter_token: Histogram::with_opts(
                HistogramOpts::new("helexa_inter_token_seconds", "Gap between streamed chunks")
                    .buckets(itl_buckets),
            )?,
            tokens: IntCounterVec::new(
                Opts::new("helexa_tokens_total", "Tokens by kind (prompt, completion)"),
                &["kind"],
            )?,
            cold_starts: IntCounter::new(
                "helexa_cold_starts_total",
                "Model loads the gateway triggered to serve a request",
            )?,
            evictions: IntCounter::new(
                "helexa_evictions_total",
                "Models the gateway unloaded to make room",
            )?,
            node_health: GaugeVec::new(
                Opts::new(
                    "helexa_node_health",
                    "1 healthy, 0.5 degraded, 0 unreachable",
                ),
                &["node"],
            )?,
            vram_total: GaugeVec::new(
                Opts::new("helexa_device_vram_total_mb", "Device memory, MiB"),
                &["node", "device"],
            )?,
            vram_free: GaugeVec::new(
                Opts::new("helexa_device_vram_free_mb", "Free device memory, MiB"),
                &["node", "device"],
            )?,
            catalogue_models: Gauge::new("helexa_catalogue_models", "Models in the catalogue")?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.errors.clone()))?;
        m.registry.register(Box::new(m.ttft.clone()))?;
        m.registry.register(Box::new(m.inter_token.clone()))?;
        m.registry.register(Box::new(m.tokens.clone()))?;
        m.registry.register(Box::new(m.cold_starts.clone()))?;
        m.registry.register(Box::new(m.evictions.clone()))?;
        m.registry.register(Box::new(m.node_health.clone()))?;
        m.registry.register(Box::new(m.vram_total.clone()))?;
        m.registry.register(Box::new(m.vram_free.clone()))?;
        m.registry.register(Box::new(m.catalogue_models.clone()))?;
        Ok(m)
    }

    /// The metrics text (Prometheus exposition format).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }

    /// The metrics listener's router: `GET /metrics`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/metrics", get(serve_metrics))
            .with_state(self)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

async fn serve_metrics(State(metrics): State<Metrics>) -> Response {
    match metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        )
            .into_response(),
    }
}
