//! Latency of policy calls through the runtime (wasm, pooled instances, epoch deadline,
//! metrics): `cargo bench -p helexa-policy-runtime --bench policy_call`.
//!
//! Prints p50/p99 in µs for
//! - `route` with a 16-node fleet resident in the instance (the common case; target p50 ≤ 10 µs),
//! - `route` with a new fleet version every call (pays for copying the fleet in),
//! - `choose_victims` on one node with 8 residents.

use std::sync::Arc;

use helexa_policy_runtime::bench_inputs::*;
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

fn measure(call: impl FnMut()) -> Vec<f64> {
    time_calls(WARMUP, ITERATIONS, call)
}

fn report(name: &str, sorted: &[f64]) {
    println!(
        "{name:<36} p50 {:>8.2} µs   p99 {:>8.2} µs   ({} calls)",
        quantile(sorted, 0.5),
        quantile(sorted, 0.99),
        sorted.len()
    );
}
