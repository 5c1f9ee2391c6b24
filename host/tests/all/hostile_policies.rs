//! The gateway with the real policy runtime, assembled the way `helexa serve` does it
//! (config → `helexa::policy::load` into the gateway's metrics registry → `Gateway`):
//! hostile router plugins cost nothing but a fallback, an incompatible one stops the
//! start-up, the policy set can be swapped under load, and an unpolled fleet is a 503.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use helexa::catalogue::{self, CatalogueStore};
use helexa::config::{Config, Overrides};
use helexa::gateway::Gateway;
use helexa::metrics::Metrics;
use helexa::policy::{PolicyKind, PolicyLoadError, RuntimePolicies};
use helexa_node_api::ModelState;
use helexa_policy_runtime::test_guests;
use serde_json::{Value, json};

use crate::harness::{self, CATALOGUE};
use crate::stand_in::{NodeSim, model};

/// A gateway built like `helexa serve` builds it, plus the address of its `/metrics`.
struct Served {
    gw: harness::Gw,
    metrics_url: String,
    policies: RuntimePolicies,
}

/// The gateway config for `nodes` with `policies` (TOML of `[policies.*]` sections).
fn config(nodes: &[(&str, &str)], policies: &str) -> Config {
    let mut toml = String::new();
    for (name, endpoint) in nodes {
        toml.push_str(&format!(
            "[[nodes]]\nname = \"{name}\"\nendpoint = \"{endpoint}\"\n"
        ));
    }
    toml.push_str("[proxy]\nqueue_budget_secs = 5\nstall_timeout_secs = 5\n");
    toml.push_str(policies);
    Config::from_toml(
        &toml,
        "test",
        Path::new("."),
        &Overrides::default(),
        &|_| None,
    )
    .expect("valid test config")
}

/// `[policies.router] plugin = …` for `bytes` written to `<dir>/<name>.wasm`.
fn router_plugin(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).expect("write plugin");
    format!(
        "[policies.router]\nplugin = \"{}\"\nversion = \"1.0.0\"\n",
        path.display()
    )
}

async fn serve(config: &Config) -> Served {
    let metrics = Metrics::new().unwrap();
    let policies = {
        let (policies, registry) = (config.policies.clone(), metrics.registry.clone());
        tokio::task::spawn_blocking(move || helexa::policy::load(&policies, &registry))
            .await
            .unwrap()
            .expect("policies load")
    };
    let names: Vec<String> = config.nodes.iter().map(|n| n.name.clone()).collect();
    let specs = catalogue::parse(CATALOGUE, "catalogue", &names).unwrap();
    let catalogue = Arc::new(CatalogueStore::from_specs(specs));
    let state = Gateway::new(
        config,
        catalogue,
        Arc::new(policies.clone()),
        metrics.clone(),
    )
    .unwrap();
    state.start_polling(Duration::from_millis(100)).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = helexa::api::app(Arc::clone(&state));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, metrics.router()).await.unwrap() });

    Served {
        gw: harness::Gw {
            url,
            state,
            http: reqwest::Client::new(),
        },
        metrics_url,
        policies,
    }
}

fn chat() -> Value {
    json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]})
}

/// Router calls of `plugin` that ended in `outcome`, from `GET /metrics`.
async fn policy_calls(served: &Served, plugin: &str, outcome: &str) -> u64 {
    let labels = [("plugin", plugin), ("outcome", outcome), ("kind", "router")];
    crate::harness::policy_calls(&served.gw, &served.metrics_url, &labels).await
}

/// Configure `bytes` as the router, send 20 chats: every one is served (by the default
/// router standing in), and `/metrics` and `/health` count 20 failures of the plugin.
async fn keeps_answering_with(name: &str, bytes: &[u8], outcomes: &[&str]) {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url = sim.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let served = serve(&config(
        &[("a", &url)],
        &router_plugin(dir.path(), name, bytes),
    ))
    .await;

    for i in 0..20 {
        let response = served.gw.post("/v1/chat/completions", &chat()).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{name}: request {i}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello, world!");
    }
    assert_eq!(
        sim.calls().iter().filter(|c| *c == "chat:qwen3-8b").count(),
        20
    );

    let mut failures = 0;
    for outcome in outcomes {
        failures += policy_calls(&served, name, outcome).await;
    }
    assert_eq!(failures, 20, "{name}: {outcomes:?} in /metrics");
    assert_eq!(policy_calls(&served, name, "ok").await, 0, "{name}: ok");
    assert_eq!(
        policy_calls(&served, "default", "fallback").await,
        20,
        "{name}: the default answered each request"
    );

    // `/health` describes the active plugin with its call and error counts.
    let health: Value = served.gw.get("/health").await.json().await.unwrap();
    let mine = health["policies"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("{name} not in /health: {health}"));
    assert_eq!(
        (&mine["kind"], &mine["calls"], &mine["errors"]),
        (&json!("router"), &json!(20), &json!(20)),
        "{mine}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_router_times_out_and_the_gateway_keeps_answering() {
    keeps_answering_with("infinite-loop", test_guests::INFINITE_LOOP, &["timeout"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_router_is_cut_off_and_the_gateway_keeps_answering() {
    // With the default 64 MiB cap and 20 ms deadline, whichever limit a loaded machine
    // hits first stops it.
    keeps_answering_with(
        "memory-bomb",
        test_guests::MEMORY_BOMB,
        &["trap", "timeout"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_router_falls_back_and_the_gateway_keeps_answering() {
    keeps_answering_with("trap", test_guests::TRAP, &["trap"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_output_router_is_contained_and_the_gateway_keeps_answering() {
    // The 64 MiB message traps inside the memory cap or is refused on the way out.
    keeps_answering_with(
        "huge-output",
        test_guests::HUGE_OUTPUT,
        &["trap", "error", "timeout"],
    )
    .await;
}

#[test]
fn a_wrong_wit_version_router_stops_the_start_up_naming_plugin_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let section = router_plugin(dir.path(), "wrong-version", test_guests::WRONG_VERSION);
    let config = config(&[("a", "http://127.0.0.1:9")], &section);
    let error = helexa::policy::load(&config.policies, &prometheus::Registry::new())
        .err()
        .expect("an incompatible router must be refused");
    assert!(
        matches!(
            &error,
            PolicyLoadError::Plugin {
                kind: PolicyKind::Router,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    let path = dir.path().join("wrong-version.wasm");
    for needle in [
        "[policies.router]",
        path.to_str().unwrap(),
        "policy \"wrong-version\" v1.0.0",
        "helexa:policy/routing@9.0.0",
        "helexa:policy/routing@0.1.x",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swapping_the_policy_set_under_load_fails_no_request() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 50;
    const SWAPS: usize = 20;
    const TOTAL: usize = CLIENTS * PER_CLIENT;

    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url = sim.serve().await;
    let served = Arc::new(serve(&config(&[("a", &url)], "")).await);

    // Three sets: the defaults; the default router re-configured (a different plugin
    // instance with its own settings); a router that traps on every call.
    let runtime = &served.policies.runtime;
    let defaults = runtime.default_set().unwrap();
    let reconfigured = defaults.with(
        runtime
            .load_plugin(
                PolicyKind::Router,
                "retuned",
                "1",
                helexa_policy_runtime::embedded::ROUTER,
                r#"{"loading_retry_ms": 100}"#,
            )
            .unwrap(),
    );
    let trapping = defaults.with(
        runtime
            .load_plugin(PolicyKind::Router, "trap", "1", test_guests::TRAP, "{}")
            .unwrap(),
    );
    let sets = [defaults, trapping, reconfigured].map(Arc::new);

    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (served, done) = (Arc::clone(&served), Arc::clone(&done));
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for _ in 0..PER_CLIENT {
                    let response = served.gw.post("/v1/chat/completions", &chat()).await;
                    if response.status() != 200 {
                        failures.push(format!(
                            "{}: {}",
                            response.status(),
                            response.text().await.unwrap()
                        ));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                failures
            })
        })
        .collect();

    // Spread the swaps over the run: swap i waits until i/(SWAPS+1) of the requests are
    // done, so every swap lands while clients are still sending.
    let mut swapped_at = Vec::new();
    for i in 1..=SWAPS {
        while done.load(Ordering::SeqCst) < i * TOTAL / (SWAPS + 1) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        served
            .policies
            .handle
            .store(Arc::clone(&sets[i % sets.len()]));
        swapped_at.push(done.load(Ordering::SeqCst));
    }

    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(
        swapped_at.iter().all(|&n| n < TOTAL),
        "every swap happened under load: {swapped_at:?}"
    );
    assert_eq!(
        sim.calls().iter().filter(|c| *c == "chat:qwen3-8b").count(),
        TOTAL
    );
    // Each set really was used.
    assert!(policy_calls(&served, "trap", "trap").await > 0);
    assert!(policy_calls(&served, "retuned", "ok").await > 0);
    assert!(policy_calls(&served, "default", "ok").await > 0);
}

#[tokio::test]
async fn an_unpolled_fleet_is_a_503_with_retry_after_not_a_404() {
    // Nothing listens on these ports: the poller never reaches either node, so the fleet
    // has two unreachable nodes without devices. Their capacity is unknown, not absent.
    let dead = |port| format!("http://127.0.0.1:{port}");
    let (a, b) = (dead(unused_port()), dead(unused_port()));
    let served = serve(&config(
        &[("gpu-a", &a), ("gpu-b", &b)],
        "[policies.router.settings]\nunavailable_retry_ms = 3000\n",
    ))
    .await;
    let response = served.gw.post("/v1/chat/completions", &chat()).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "3");
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("node gpu-a is unreachable")
            && message.contains("node gpu-b is unreachable"),
        "{body}"
    );
}

/// A loopback port nothing listens on (bound, read, released).
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
