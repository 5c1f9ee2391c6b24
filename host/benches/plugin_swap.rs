//! Plugin hot reload and call cost (issue 5's benchmark), without HTTP:
//!
//! - swap latency: `active.toml` rewritten (what `helexa plugin use` does) → the
//!   gateway's policy handle serves the new router, observed by polling the handle
//!   (what the next request would load). Includes the watcher's debounce (20 ms here;
//!   the default is 200 ms) and the reload (reading, hashing, loading the component
//!   from the compilation cache, instantiating and configuring it). 40 swaps
//!   alternating two routers; also the reload alone (`PluginManager::reload`, what
//!   `POST /admin/plugins/reload` runs).
//! - call cost: `PolicySet::route` through the embedded default router and through a
//!   store plugin (`pin-node`, the test guest) on the fleet of
//!   `policies/router/tests/cases/03-serve-least-busy.json`; 20 000 calls each.
//!
//! Run: `cargo bench -p helexa --bench plugin_swap`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use helexa::config::{Config, Overrides};
use helexa::plugin_store::InstallRequest;
use helexa::policy::{Catalogue, PluginManager, PolicyKind};
use helexa_policy_runtime::{CatalogueEntry, Fleet, PolicySet, RequestInfo, test_guests};

const SWAPS: usize = 40;
const CALLS: usize = 20_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(run());
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn show(what: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.5);
    let p99 = percentile(samples, 0.99);
    let max = *samples.iter().max().expect("samples");
    println!(
        "{what}: p50 {p50:?}, p99 {p99:?}, max {max:?} (n = {})",
        samples.len()
    );
}

async fn run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[[nodes]]\nname = \"a\"\nendpoint = \"http://127.0.0.1:1\"\n\
         [plugins]\ndir = \"{}\"\ndebounce_ms = 20\n\
         [plugins.settings.pin-a]\nnode = \"a\"\n[plugins.settings.pin-b]\nnode = \"b\"\n",
        dir.path().join("store").display()
    );
    let config = Config::from_toml(
        &text,
        "bench",
        Path::new("."),
        &Overrides::default(),
        &|_| None,
    )
    .expect("config");
    let registry = prometheus::Registry::new();
    let (_, manager) = PluginManager::start(
        config.policies.clone(),
        config.plugins.clone(),
        None,
        &registry,
    )
    .expect("start");
    let store = manager.store().clone();
    for name in ["pin-a", "pin-b"] {
        let request = InstallRequest {
            name: name.into(),
            version: Some("1".into()),
            source: "bench".into(),
            sha256: None,
        };
        store
            .install(manager.runtime(), test_guests::PIN_NODE, &request)
            .expect("install");
    }
    manager
        .spawn_watcher(config.plugins.debounce)
        .expect("watcher");

    // Swap latency through the watcher.
    let mut swaps = Vec::new();
    for i in 0..SWAPS {
        let name = if i % 2 == 0 { "pin-a" } else { "pin-b" };
        let start = Instant::now();
        store
            .set_active(PolicyKind::Router, Some(name))
            .expect("use");
        while manager.handle().load().plugin(PolicyKind::Router).name() != name {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "swap never showed"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        swaps.push(start.elapsed());
        // Let the watcher settle so swaps do not overlap.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    show(
        "file change → new router serving (debounce 20 ms)",
        &mut swaps,
    );

    // The reload alone, alternating so every reload loads a plugin.
    let mut reloads = Vec::new();
    for i in 0..SWAPS {
        let name = if i % 2 == 0 { "pin-b" } else { "pin-a" };
        let manager = Arc::clone(&manager);
        let store = store.clone();
        let took = tokio::task::spawn_blocking(move || {
            store
                .set_active(PolicyKind::Router, Some(name))
                .expect("use");
            let start = Instant::now();
            let report = manager.reload("bench", false);
            assert!(report.ok, "{report:?}");
            start.elapsed()
        })
        .await
        .expect("reload task");
        reloads.push(took);
    }
    show("reload (validate + swap), no debounce", &mut reloads);

    // Call cost.
    let case: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../policies/router/tests/cases/03-serve-least-busy.json"),
        )
        .expect("case file"),
    )
    .expect("case json");
    let request: RequestInfo = serde_json::from_value(case["request"].clone()).expect("request");
    let entries: Vec<CatalogueEntry> =
        serde_json::from_value(case["catalogue"].clone()).expect("catalogue");
    let fleet: Arc<Fleet> = Arc::new(serde_json::from_value(case["fleet"].clone()).expect("fleet"));
    let catalogue = Arc::new(Catalogue {
        version: 1,
        entries,
    });
    let default_set = manager.runtime().default_set().expect("defaults");
    let plugin_set: Arc<PolicySet> = manager.handle().load_full();
    for (what, set) in [
        ("route() via the default router", &default_set),
        ("route() via store plugin pin-node", &*plugin_set),
    ] {
        for _ in 0..1000 {
            std::hint::black_box(set.route(&request, &catalogue, &fleet));
        }
        let mut samples = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let start = Instant::now();
            std::hint::black_box(set.route(&request, &catalogue, &fleet));
            samples.push(start.elapsed());
        }
        show(what, &mut samples);
    }
}
