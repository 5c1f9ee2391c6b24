//! Prometheus metrics of the node, all named `helexa_node_*`.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The node's metrics, registered in one registry served at `GET /metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status code.
    pub requests: IntCounterVec,
    /// HTTP request duration by route.
    pub request_seconds: HistogramVec,
    /// Prompt tokens processed, by model.
    pub prompt_tokens: IntCounterVec,
    /// Prompt tokens served from the engine's prefix cache, by model.
    pub cached_prompt_tokens: IntCounterVec,
    /// Generated tokens, by model.
    pub generated_tokens: IntCounterVec,
    /// Time to first token, by model.
    pub first_token_seconds: HistogramVec,
    /// Generations running now, by model.
    pub in_flight: IntGaugeVec,
    /// Requests waiting for admission, by model.
    pub queued: IntGaugeVec,
    /// Requests refused by admission, by model and reason (`queue_full`, `queue_timeout`).
    pub rejected: IntCounterVec,
    /// Model loads by outcome (`ok`, `error`).
    pub loads: IntCounterVec,
    /// Models marked failed by an engine device fault, by model.
    pub device_faults: IntCounterVec,
    /// Reload attempts after a device fault, by model and outcome (`recovered`, `failed`,
    /// `gave_up` once the attempts are spent).
    pub recoveries: IntCounterVec,
}

impl Metrics {
    /// Create and register everything.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        Ok(Self {
            requests: counter(
                "helexa_node_requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
            )?,
            request_seconds: histogram(
                "helexa_node_request_duration_seconds",
                "HTTP request duration (to the end of the response head)",
                &["route"],
            )?,
            prompt_tokens: counter(
                "helexa_node_prompt_tokens_total",
                "Prompt tokens processed",
                &["model"],
            )?,
            cached_prompt_tokens: counter(
                "helexa_node_cached_prompt_tokens_total",
                "Prompt tokens reused from the prefix cache",
                &["model"],
            )?,
            generated_tokens: counter(
                "helexa_node_generated_tokens_total",
                "Generated tokens",
                &["model"],
            )?,
            first_token_seconds: histogram(
                "helexa_node_time_to_first_token_seconds",
                "Time from admission to the first generated token",
                &["model"],
            )?,
            in_flight: gauge("helexa_node_in_flight", "Generations running", &["model"])?,
            queued: gauge(
                "helexa_node_queue_depth",
                "Requests waiting for admission",
                &["model"],
            )?,
            rejected: counter(
                "helexa_node_rejected_total",
                "Requests refused by admission",
                &["model", "reason"],
            )?,
            loads: counter(
                "helexa_node_model_loads_total",
                "Model loads by outcome",
                &["outcome"],
            )?,
            device_faults: counter(
                "helexa_node_device_faults_total",
                "Models marked failed by an engine device fault",
                &["model"],
            )?,
            recoveries: counter(
                "helexa_node_model_recoveries_total",
                "Reload attempts after a device fault, by outcome",
                &["model", "outcome"],
            )?,
            registry,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
