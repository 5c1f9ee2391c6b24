//! Latency of policy calls through the runtime (wasm, pooled instances, epoch deadline,
//! metrics): `cargo bench -p helexa-policy-runtime --bench policy_call`.
//!
//! Prints p50/p99 in µs for
//! - `route` with a 16-node fleet resident in the instance (the common case; target p50 ≤ 10 µs),
//! - `route` with a new fleet version every call (pays for copying the fleet in),
//! - `choose_victims` on one node with 8 residents.

use std::sync::Arc;
use std::time::Instant;

use helexa_policy_runtime::*;

const ITERATIONS: usize = 20_000;
const WARMUP: usize = 1_000;

fn main() {
    let registry = prometheus::Registry::new();
    let runtime = PolicyRuntime::new(RuntimeConfig::default(), &registry).expect("runtime");
    let set = runtime.default_set().expect("defaults");
    let catalogue = Arc::new(catalogue());
    let resident_fleet = Arc::new(fleet(1));
    let request = RequestInfo {
        model: "model-3".into(),
        surface: Surface::OpenaiChat,
        prompt_tokens_estimate: 1200,
        max_output_tokens: Some(512),
        stream: true,
        caller: Some("bench".into()),
        headers: vec![("x-helexa-tier".into(), "gold".into())],
    };
    assert!(matches!(
        set.route(&request, &catalogue, &resident_fleet),
        Decision::Serve(_)
    ));

    let resident = measure(|| {
        std::hint::black_box(set.route(&request, &catalogue, &resident_fleet));
    });
    report("route, 16-node fleet resident", &resident);

    let fleets: Vec<Arc<Fleet>> = (0..(WARMUP + ITERATIONS) as u64)
        .map(|v| Arc::new(fleet(v + 2)))
        .collect();
    let mut next = fleets.iter();
    let changing = measure(|| {
        let fleet = next.next().expect("enough fleets");
        std::hint::black_box(set.route(&request, &catalogue, fleet));
    });
    report("route, fleet changes every call", &changing);

    let on = node(0, 8);
    let incoming = entry(99);
    let evict = measure(|| {
        std::hint::black_box(set.choose_victims(&on, 30_000, &incoming));
    });
    report("choose_victims, 8 residents", &evict);
}

fn measure(mut call: impl FnMut()) -> Vec<f64> {
    for _ in 0..WARMUP {
        call();
    }
    let mut samples = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let start = Instant::now();
        call();
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    samples
}

fn report(name: &str, sorted: &[f64]) {
    let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<36} p50 {:>8.2} µs   p99 {:>8.2} µs   ({} calls)",
        at(0.5),
        at(0.99),
        sorted.len()
    );
}

fn entry(i: usize) -> CatalogueEntry {
    CatalogueEntry {
        id: format!("model-{i}"),
        aliases: vec![format!("alias-{i}")],
        vram_mb: 20_000,
        min_devices: 1,
        min_device_vram_mb: 0,
        pinned_on: vec![],
        residency_priority: None,
        context_length: 32_768,
    }
}

fn catalogue() -> Catalogue {
    Catalogue {
        version: 1,
        entries: (0..12).map(entry).collect(),
    }
}

/// A node with 8 devices and `models` residents (`model-<k>` for k in 0..models).
fn node(i: usize, models: usize) -> Node {
    Node {
        name: format!("node-{i:02}"),
        health: Health::Healthy,
        labels: vec!["gpu=h200".into(), format!("rack={}", i / 4)],
        devices: (0..8)
            .map(|d| Device {
                index: d,
                vram_total_mb: 141_000,
                vram_free_mb: 60_000,
                compute_capability: 90,
            })
            .collect(),
        models: (0..models)
            .map(|k| ResidentModel {
                id: format!("model-{k}"),
                state: ModelState::Ready,
                vram_mb: 20_000,
                devices: vec![k as u32 % 8],
                idle_ms: (k as u64 + 1) * 1000,
                in_flight: ((i + k) % 3) as u32,
                queue_depth: 0,
                residency_priority: 100,
            })
            .collect(),
        latency: LatencyStats {
            ttft_p50_ms: 40.0 + i as f32,
            itl_p50_ms: 12.0,
            samples: 100,
        },
    }
}

fn fleet(version: u64) -> Fleet {
    Fleet {
        version,
        nodes: (0..16).map(|i| node(i, 4)).collect(),
    }
}
