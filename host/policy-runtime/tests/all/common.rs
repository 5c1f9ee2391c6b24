//! Fleet/catalogue builders and metric readers shared by the tests.

use std::sync::Arc;

use helexa_policy_runtime::*;

pub fn runtime() -> (PolicyRuntime, prometheus::Registry) {
    // Policy warnings show up in a failing test's output.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let registry = prometheus::Registry::new();
    let runtime = PolicyRuntime::new(RuntimeConfig::default(), &registry).expect("runtime");
    (runtime, registry)
}

pub fn request(model: &str) -> RequestInfo {
    RequestInfo {
        model: model.into(),
        surface: Surface::OpenaiChat,
        prompt_tokens_estimate: 100,
        max_output_tokens: Some(256),
        stream: false,
        caller: None,
        headers: vec![],
    }
}

pub fn entry(id: &str, aliases: &[&str], vram_mb: u64) -> CatalogueEntry {
    CatalogueEntry {
        id: id.into(),
        aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
        vram_mb,
        min_devices: 1,
        min_device_vram_mb: 0,
        pinned_on: vec![],
        residency_priority: None,
        context_length: 8192,
    }
}

pub fn catalogue(version: u64) -> Arc<Catalogue> {
    Arc::new(Catalogue {
        version,
        entries: vec![
            entry("qwen3-8b", &["claude-sonnet-4-5"], 20_000),
            entry("llama3-70b", &[], 140_000),
        ],
    })
}

pub fn resident(id: &str, state: ModelState, in_flight: u32) -> ResidentModel {
    ResidentModel {
        id: id.into(),
        state,
        vram_mb: 20_000,
        devices: vec![0],
        idle_ms: 1000,
        in_flight,
        queue_depth: 0,
        residency_priority: 100,
    }
}

pub fn node(name: &str, models: Vec<ResidentModel>) -> Node {
    let used: u64 = models.iter().map(|m| m.vram_mb).sum();
    Node {
        name: name.into(),
        health: Health::Healthy,
        labels: vec!["gpu=h200".into()],
        devices: vec![Device {
            index: 0,
            vram_total_mb: 141_000,
            vram_free_mb: 141_000 - used,
            compute_capability: 90,
        }],
        models,
        latency: LatencyStats {
            ttft_p50_ms: 0.0,
            itl_p50_ms: 0.0,
            samples: 0,
        },
    }
}

/// `n` nodes; `qwen3-8b` is ready on the listed ones (with the given in-flight counts).
pub fn fleet(version: u64, n: usize, ready_on: &[(usize, u32)]) -> Arc<Fleet> {
    let nodes = (0..n)
        .map(|i| {
            let models = ready_on
                .iter()
                .filter(|(at, _)| *at == i)
                .map(|(_, busy)| resident("qwen3-8b", ModelState::Ready, *busy))
                .collect();
            node(&format!("node-{i:02}"), models)
        })
        .collect();
    Arc::new(Fleet { version, nodes })
}

/// Value of `helexa_policy_calls_total{plugin, kind, outcome}` (summed over versions).
pub fn calls(registry: &prometheus::Registry, plugin: &str, kind: &str, outcome: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "helexa_policy_calls_total")
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_owned())
            };
            label("plugin").as_deref() == Some(plugin)
                && label("kind").as_deref() == Some(kind)
                && label("outcome").as_deref() == Some(outcome)
        })
        .map(|metric| metric.get_counter().get_value() as u64)
        .sum()
}
