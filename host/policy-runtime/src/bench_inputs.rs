//! The inputs and timer the policy-call measurements share (`benches/policy_call.rs` and
//! `plugins-examples/call-cost`), so figures from both compare like with like: a 12-model
//! catalogue, a 16-node fleet of 8-device nodes with 4 residents each, and per-call timing.

use std::time::Instant;

use crate::types::*;

/// Catalogue entry `model-<i>` (alias `alias-<i>`, 20 GB, one device).
pub fn entry(i: usize) -> CatalogueEntry {
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

/// `model-0` … `model-11`.
pub fn catalogue() -> Catalogue {
    Catalogue {
        version: 1,
        entries: (0..12).map(entry).collect(),
    }
}

/// A node with 8 devices and `models` residents (`model-<k>` for k in 0..models).
pub fn node(i: usize, models: usize) -> Node {
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

/// 16 nodes of 4 residents each.
pub fn fleet(version: u64) -> Fleet {
    Fleet {
        version,
        nodes: (0..16).map(|i| node(i, 4)).collect(),
    }
}

/// Runs `call` `warmup` times untimed, then `calls` times; each call's duration in µs, sorted.
pub fn time_calls(warmup: usize, calls: usize, mut call: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        call();
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        call();
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    samples
}

/// The `q` quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}
