//! The plugin platform end to end, assembled the way `helexa serve` assembles it
//! (`PluginManager::start` → gateway → API + admin router, store watcher running), in
//! front of two stand-in nodes that answer with their own name:
//! - a router plugin installed, replaced 20 times and removed under steady concurrent
//!   load: no request fails and each swap shows within a bounded time;
//! - a bad plugin (bad settings, wrong WIT version written into the store) keeps the
//!   running set, and says why in `/health` and the admin API;
//! - hostile plugins installed live are refused at install or contained at call time;
//! - fail policy `reject` answers 503 naming the plugin; settings changed in the config
//!   file reach the plugin on reload; the admin API wants its key.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use helexa::catalogue::{self, CatalogueStore};
use helexa::config::{Config, Overrides};
use helexa::gateway::Gateway;
use helexa::metrics::Metrics;
use helexa::plugin_store::{InstallRequest, Manifest, PluginStore, StoreError, sha256_hex};
use helexa::policy::{PluginManager, PolicyKind};
use helexa_node_api::ModelState;
use helexa_policy_runtime::test_guests;
use serde_json::{Value, json};

use crate::harness::{self, CATALOGUE};
use crate::stand_in::{NodeSim, Script, model};

const ADMIN_KEY: &str = "admin-0123456789abcdef";
/// How long a swap may take to show in responses (debounce 20 ms + reload); generous
/// for a loaded CI machine, but bounded.
const SWAP_BOUND: Duration = Duration::from_secs(10);

struct Live {
    gw: harness::Gw,
    manager: Arc<PluginManager>,
    store: PluginStore,
    metrics_url: String,
    config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _nodes: [Arc<NodeSim>; 2],
}

/// Two nodes, `a` and `b`, with `qwen3-8b` ready; each answers "from-<name>".
async fn nodes() -> ([Arc<NodeSim>; 2], [String; 2]) {
    let mut sims = Vec::new();
    let mut urls = Vec::new();
    for text in ["from-a", "from-b"] {
        let sim = NodeSim::new(4000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
        *sim.script.lock().unwrap() = Script {
            text: vec![text],
            ..Script::default()
        };
        urls.push(sim.serve().await);
        sims.push(sim);
    }
    (
        [sims.remove(0), sims.remove(0)],
        [urls.remove(0), urls.remove(0)],
    )
}

fn config_text(urls: &[String; 2], store: &Path, extra: &str) -> String {
    format!(
        "[[nodes]]\nname = \"a\"\nendpoint = \"{}\"\n[[nodes]]\nname = \"b\"\nendpoint = \"{}\"\n\
         [proxy]\nqueue_budget_secs = 5\nstall_timeout_secs = 5\n\
         [admin]\nkey = \"{ADMIN_KEY}\"\n\
         [plugins]\ndir = \"{}\"\ndebounce_ms = 20\n\
         [plugins.settings.pin-a]\nnode = \"a\"\n[plugins.settings.pin-b]\nnode = \"b\"\n{extra}",
        urls[0],
        urls[1],
        store.display()
    )
}

async fn live(extra: &str) -> Live {
    let (sims, urls) = nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let config_path = dir.path().join("helexa.toml");
    std::fs::write(&config_path, config_text(&urls, &store_dir, extra)).unwrap();
    let config = Config::load(&config_path, &Overrides::default(), &|_| None).unwrap();

    let metrics = Metrics::new().unwrap();
    let (policies, manager) = {
        let (p, q, registry, path) = (
            config.policies.clone(),
            config.plugins.clone(),
            metrics.registry.clone(),
            config_path.clone(),
        );
        tokio::task::spawn_blocking(move || PluginManager::start(p, q, Some(path), &registry))
            .await
            .unwrap()
            .expect("policies load")
    };
    manager.spawn_watcher(config.plugins.debounce).unwrap();
    let names = vec!["a".to_owned(), "b".to_owned()];
    let specs = catalogue::parse(CATALOGUE, "catalogue", &names).unwrap();
    let state = Gateway::new(
        &config,
        Arc::new(CatalogueStore::from_specs(specs)),
        Arc::new(policies),
        metrics.clone(),
    )
    .unwrap();
    state.start_polling(Duration::from_millis(100)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = helexa::api::app(Arc::clone(&state)).merge(helexa::admin::router(
        Arc::clone(&manager),
        config.admin.key.clone(),
    ));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, metrics.router()).await.unwrap() });
    Live {
        gw: harness::Gw {
            url,
            state,
            http: reqwest::Client::new(),
        },
        store: manager.store().clone(),
        manager,
        metrics_url,
        config_path,
        _dir: dir,
        _nodes: sims,
    }
}

fn chat() -> Value {
    json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]})
}

impl Live {
    async fn install(&self, name: &str, bytes: &'static [u8]) -> Result<Manifest, StoreError> {
        let (store, manager, name) = (
            self.store.clone(),
            Arc::clone(&self.manager),
            name.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            store.install(
                manager.runtime(),
                bytes,
                &InstallRequest {
                    name,
                    version: Some("1.0.0".into()),
                    source: "test".into(),
                    sha256: None,
                },
            )
        })
        .await
        .unwrap()
    }

    /// The node that answered one chat (`a`/`b`), or the failure.
    async fn served_by(&self) -> Result<String, String> {
        served_by(&self.gw.http, &self.gw.url).await
    }

    /// Wait until chats are answered by `node` (at most [`SWAP_BOUND`]); the time it took.
    async fn wait_for(&self, node: &str) -> Duration {
        let start = Instant::now();
        loop {
            match self.served_by().await {
                Ok(n) if n == node => return start.elapsed(),
                Ok(_) => {}
                Err(e) => panic!("request failed while waiting for {node}: {e}"),
            }
            assert!(
                start.elapsed() < SWAP_BOUND,
                "still not served by {node} after {SWAP_BOUND:?}; health: {}",
                self.health().await
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until `/health` shows `plugin` as the router.
    async fn wait_for_router(&self, plugin: &str) {
        let start = Instant::now();
        loop {
            let health = self.health().await;
            if health["plugins"]["worlds"][0]["plugin"] == plugin {
                return;
            }
            assert!(
                start.elapsed() < SWAP_BOUND,
                "router is not {plugin}: {health}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn health(&self) -> Value {
        self.gw.get("/health").await.json().await.unwrap()
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::Response {
        let request = self
            .gw
            .http
            .request(method, format!("{}{path}", self.gw.url));
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        request.send().await.unwrap()
    }

    /// `POST /admin/plugins/reload` with the admin key.
    async fn reload(&self) -> reqwest::Response {
        self.admin(
            reqwest::Method::POST,
            "/admin/plugins/reload",
            Some(ADMIN_KEY),
        )
        .await
    }

    async fn policy_calls(&self, plugin: &str, outcome: &str) -> u64 {
        crate::harness::policy_calls(
            &self.gw,
            &self.metrics_url,
            &[("plugin", plugin), ("outcome", outcome)],
        )
        .await
    }
}

async fn served_by(http: &reqwest::Client, url: &str) -> Result<String, String> {
    let response = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    body["choices"][0]["message"]["content"]
        .as_str()
        .and_then(|c| c.strip_prefix("from-"))
        .map(str::to_owned)
        .ok_or_else(|| format!("unexpected answer {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_installed_replaced_20_times_and_removed_under_load_fails_no_request() {
    let live = live("").await;
    live.install("pin-a", test_guests::PIN_NODE).await.unwrap();
    live.install("pin-b", test_guests::PIN_NODE).await.unwrap();

    // Steady load: 4 clients in a loop until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let (http, url) = (live.gw.http.clone(), live.gw.url.clone());
        clients.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match served_by(&http, &url).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        }));
    }

    // Install = make live; then 20 replacements alternating the two pins.
    let mut slowest = Duration::ZERO;
    for i in 0..=20 {
        let (name, node) = if i % 2 == 0 {
            ("pin-b", "b")
        } else {
            ("pin-a", "a")
        };
        let start = Instant::now();
        live.store
            .set_active(PolicyKind::Router, Some(name))
            .unwrap();
        // The default router may pick either node, so "answered by b" alone could be
        // the old policy: wait for the swap (`/health`), then for the answers.
        live.wait_for_router(name).await;
        live.wait_for(node).await;
        slowest = slowest.max(start.elapsed());
        // Stable after the switch: the next answers all come from the new policy.
        for _ in 0..3 {
            assert_eq!(live.served_by().await.as_deref(), Ok(node), "swap {i}");
        }
    }
    // Removed: the default router takes over (visible in /health), still serving.
    let active = live.store.active().unwrap();
    live.store
        .remove(active.router.as_deref().unwrap())
        .unwrap();
    live.wait_for_router("default").await;
    for _ in 0..5 {
        assert!(live.served_by().await.is_ok());
    }

    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for client in clients {
        errors.extend(client.await.unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "failed requests under swaps: {errors:?}");
    assert!(ok >= 40, "the load was not steady: {ok} requests");
    assert!(slowest < SWAP_BOUND, "slowest swap {slowest:?}");
    eprintln!("{ok} requests, 0 failed; slowest swap to show in answers: {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_plugin_keeps_the_running_set_and_says_why() {
    let live = live("").await;
    live.install("pin-a", test_guests::PIN_NODE).await.unwrap();
    live.store
        .set_active(PolicyKind::Router, Some("pin-a"))
        .unwrap();
    live.wait_for_router("pin-a").await;
    live.wait_for("a").await;

    // Installed under a name with no settings: its `configure` refuses (no `node`).
    live.install("pin-c", test_guests::PIN_NODE).await.unwrap();
    live.store
        .set_active(PolicyKind::Router, Some("pin-c"))
        .unwrap();
    let response = live.reload().await;
    assert_eq!(response.status(), 422);
    let report: Value = response.json().await.unwrap();
    assert!(
        report["message"].as_str().unwrap().contains("pin-c"),
        "{report}"
    );
    let health = live.health().await;
    let router = &health["plugins"]["worlds"][0];
    assert_eq!(
        (&router["plugin"], &router["last_reload_ok"]),
        (&json!("pin-a"), &json!(false)),
        "{health}"
    );
    assert!(
        router["last_error"].as_str().unwrap().contains("configure"),
        "{health}"
    );
    assert_eq!(live.served_by().await.as_deref(), Ok("a"));

    // A wrong-WIT-version component written straight into the store (bypassing
    // `install`, which refuses it): the reload refuses it too, naming the versions.
    let bytes = test_guests::WRONG_VERSION;
    live.store
        .write_plugin(
            bytes,
            &Manifest {
                name: "sneaky".into(),
                version: "1".into(),
                world: PolicyKind::Router,
                wit_version: "0.1.0".into(),
                sha256: sha256_hex(bytes),
                source: "test".into(),
                installed_at: 0,
            },
        )
        .unwrap();
    live.store
        .set_active(PolicyKind::Router, Some("sneaky"))
        .unwrap();
    let report = {
        let manager = Arc::clone(&live.manager);
        tokio::task::spawn_blocking(move || manager.reload("test", false))
            .await
            .unwrap()
    };
    assert!(!report.ok && report.message.contains("9.0.0"), "{report:?}");
    assert_eq!(live.served_by().await.as_deref(), Ok("a"));

    // Back to a good plugin: the next reload succeeds and clears the error.
    live.store
        .set_active(PolicyKind::Router, Some("pin-a"))
        .unwrap();
    let response = live.reload().await;
    assert_eq!(response.status(), 200);
    let health = live.health().await;
    assert_eq!(
        health["plugins"]["worlds"][0]["last_reload_ok"], true,
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_installed_live_are_refused_or_contained() {
    let live = live("").await;
    // Wrong WIT version: refused at install, with a message naming the versions.
    let refused = live
        .install("wrong", test_guests::WRONG_VERSION)
        .await
        .unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("9.0.0") && message.contains("0.1"),
        "{message}"
    );
    assert!(live.store.list().unwrap().is_empty());
    // Not a component at all.
    let refused = live.install("junk", b"not wasm").await.unwrap_err();
    assert!(matches!(refused, StoreError::Refused(_)), "{refused}");

    // Valid components that misbehave when called: live, contained, the gateway serves.
    for (name, bytes, outcomes) in [
        (
            "infinite-loop",
            test_guests::INFINITE_LOOP,
            &["timeout"][..],
        ),
        (
            "memory-bomb",
            test_guests::MEMORY_BOMB,
            &["trap", "timeout"][..],
        ),
        ("trap", test_guests::TRAP, &["trap"][..]),
        (
            "huge-output",
            test_guests::HUGE_OUTPUT,
            &["trap", "error", "timeout"][..],
        ),
    ] {
        live.install(name, bytes).await.unwrap();
        live.store
            .set_active(PolicyKind::Router, Some(name))
            .unwrap();
        live.wait_for_router(name).await;
        for i in 0..5 {
            let answer = live.served_by().await;
            assert!(answer.is_ok(), "{name}: request {i}: {answer:?}");
        }
        let mut failures = 0;
        for outcome in outcomes {
            failures += live.policy_calls(name, outcome).await;
        }
        assert!(
            failures >= 5,
            "{name}: {failures} contained failures in /metrics"
        );
    }
    assert!(live.policy_calls("default", "fallback").await >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_policy_reject_answers_503_naming_the_plugin() {
    let live = live("[plugins.limits.trap]\non_failure = \"reject\"\n").await;
    live.install("trap", test_guests::TRAP).await.unwrap();
    live.store
        .set_active(PolicyKind::Router, Some("trap"))
        .unwrap();
    live.wait_for_router("trap").await;
    let response = live.gw.post("/v1/chat/completions", &chat()).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("policy \"trap\"") && message.contains("reject"),
        "{body}"
    );
    // The Anthropic surface gets its own envelope.
    let response = live
        .gw
        .post(
            "/v1/messages",
            &json!({"model": "qwen3-8b", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("policy \"trap\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_settings_in_the_config_reload_the_plugin() {
    let live = live("").await;
    live.install("pin-a", test_guests::PIN_NODE).await.unwrap();
    live.store
        .set_active(PolicyKind::Router, Some("pin-a"))
        .unwrap();
    live.wait_for_router("pin-a").await;
    live.wait_for("a").await;
    // Point pin-a at node b in the config file; the watcher sees the file change.
    let text = std::fs::read_to_string(&live.config_path).unwrap();
    let text = text.replace(
        "[plugins.settings.pin-a]\nnode = \"a\"",
        "[plugins.settings.pin-a]\nnode = \"b\"",
    );
    std::fs::write(&live.config_path, text).unwrap();
    live.wait_for("b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_key_and_health_stays_public() {
    let live = live("").await;
    live.install("pin-a", test_guests::PIN_NODE).await.unwrap();
    let path = "/admin/plugins";
    assert_eq!(
        live.admin(reqwest::Method::GET, path, None).await.status(),
        401
    );
    assert_eq!(
        live.admin(reqwest::Method::GET, path, Some("wrong-key-0123456789"))
            .await
            .status(),
        403
    );
    assert_eq!(
        live.admin(reqwest::Method::POST, "/admin/plugins/reload", None)
            .await
            .status(),
        401
    );
    let response = live
        .admin(reqwest::Method::GET, path, Some(ADMIN_KEY))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["plugins"][0]["manifest"]["name"], "pin-a", "{body}");
    assert_eq!(body["plugins"][0]["active"], false, "{body}");
    assert_eq!(live.gw.get("/health").await.status(), 200);
    let health = live.health().await;
    assert_eq!(
        health["plugins"]["worlds"].as_array().map(Vec::len),
        Some(3),
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_plugin_limits_apply_and_show_in_the_latency_histogram() {
    // A generous deadline and a small memory cap: the bomb must hit the cap (a trap),
    // never the deadline; the histogram records it under its outcome.
    let live = live("[plugins.limits.memory-bomb]\ndeadline_ms = 2000\nmemory_mb = 8\n").await;
    live.install("memory-bomb", test_guests::MEMORY_BOMB)
        .await
        .unwrap();
    live.store
        .set_active(PolicyKind::Router, Some("memory-bomb"))
        .unwrap();
    live.wait_for_router("memory-bomb").await;
    for _ in 0..3 {
        assert!(live.served_by().await.is_ok());
    }
    assert_eq!(live.policy_calls("memory-bomb", "trap").await, 3);
    assert_eq!(live.policy_calls("memory-bomb", "timeout").await, 0);
    let text = crate::harness::metrics_text(&live.gw, &live.metrics_url).await;
    let count = text
        .lines()
        .find(|l| {
            l.starts_with("helexa_policy_call_seconds_count{")
                && l.contains("plugin=\"memory-bomb\"")
                && l.contains("outcome=\"trap\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!(count, Some(3), "{text}");
}
