//! The routing path: every kind of decision, cold loads with eviction, single-flight
//! loads, fallbacks, and the fleet poller's debounce.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use helexa::policy::{Decision, Health, Rejection, ServePlan};
use helexa_node_api::ModelState;
use serde_json::{Value, json};

use crate::harness::{self, Options, TestPolicies};
use crate::stand_in::{ChatError, NodeSim, Script, closing_node, model};

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn cold_load_asks_the_evictor_unloads_then_loads_then_serves() {
    // 2000 MiB node holding qwen3-8b (1000) and llama-3b (1000, idle longer): "big"
    // (1500) needs 1500 freed; the LRU evictor picks llama-3b first, then qwen3-8b.
    let sim = NodeSim::new(
        2000,
        vec![
            model("qwen3-8b", ModelState::Ready, 1000, 10),
            model("llama-3b", ModelState::Ready, 1000, 5000),
        ],
    );
    let url = sim.serve().await;
    let policies = Arc::new(TestPolicies::new());
    let gw = harness::start(&[("a", &url)], policies.clone(), Options::default()).await;
    let response = gw.post("/v1/chat/completions", &chat("big")).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let evictions = policies.evictions.lock().unwrap().clone();
    assert_eq!(evictions, vec![("a".to_owned(), 1500, "big".to_owned())]);
    let calls: Vec<String> = sim
        .calls()
        .into_iter()
        .filter(|c| c != "discovery")
        .collect();
    assert_eq!(
        calls,
        ["unload:llama-3b", "unload:qwen3-8b", "load:big", "chat:big"]
    );
    assert_eq!(gw.metric("helexa_evictions_total"), 2.0);
    assert_eq!(gw.metric("helexa_cold_starts_total"), 1.0);
}

#[tokio::test]
async fn load_without_eviction_when_it_fits() {
    let sim = NodeSim::new(4000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url = sim.serve().await;
    let policies = Arc::new(TestPolicies::new());
    let gw = harness::start(&[("a", &url)], policies.clone(), Options::default()).await;
    let response = gw.post("/v1/chat/completions", &chat("llama-3b")).await;
    assert_eq!(response.status(), 200);
    assert!(policies.evictions.lock().unwrap().is_empty());
    assert!(sim.calls().contains(&"load:llama-3b".to_owned()));
    assert!(!sim.calls().iter().any(|c| c.starts_with("unload:")));
}

#[tokio::test]
async fn concurrent_cold_requests_share_one_load() {
    let sim = NodeSim::new(4000, vec![]);
    *sim.load_delay.lock().unwrap() = Duration::from_millis(300);
    let url = sim.serve().await;
    let gw = Arc::new(
        harness::start(
            &[("a", &url)],
            Arc::new(TestPolicies::new()),
            Options::default(),
        )
        .await,
    );
    let requests = (0..6).map(|_| {
        let gw = Arc::clone(&gw);
        async move {
            gw.post("/v1/chat/completions", &chat("llama-3b"))
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(requests).await;
    assert_eq!(statuses, vec![200; 6]);
    assert_eq!(sim.loads.load(Ordering::SeqCst), 1);
    assert_eq!(gw.metric("helexa_cold_starts_total"), 1.0);
}

#[tokio::test]
async fn fallback_is_tried_after_a_5xx_before_the_first_byte() {
    let a = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let b = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let (url_a, url_b) = (a.serve().await, b.serve().await);
    *a.chat_status.lock().unwrap() = Some(500);
    let gw = harness::start(
        &[("a", &url_a), ("b", &url_b)],
        Arc::new(TestPolicies::new()),
        Options::default(),
    )
    .await;
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(a.calls().last().unwrap(), "chat:qwen3-8b");
    assert_eq!(b.calls().last().unwrap(), "chat:qwen3-8b");
}

#[tokio::test]
async fn unreachable_node_falls_back_then_502_when_none_left() {
    let b = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url_b = b.serve().await;
    // Port 9 on loopback: nothing listens, the connect is refused.
    let dead = "http://127.0.0.1:9";
    let router = |_: &_, _: &_, _: &_| {
        Decision::Serve(ServePlan {
            node: "dead".into(),
            fallbacks: vec!["b".into()],
        })
    };
    let gw = harness::start(
        &[("dead", dead), ("b", &url_b)],
        Arc::new(TestPolicies::with_router(router)),
        Options::default(),
    )
    .await;
    assert_eq!(
        gw.post("/v1/chat/completions", &chat("qwen3-8b"))
            .await
            .status(),
        200
    );

    let only_dead = |_: &_, _: &_, _: &_| {
        Decision::Serve(ServePlan {
            node: "dead".into(),
            fallbacks: vec![],
        })
    };
    let gw = harness::start(
        &[("dead", dead)],
        Arc::new(TestPolicies::with_router(only_dead)),
        Options::default(),
    )
    .await;
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "node_unreachable");
}

#[tokio::test]
async fn retry_after_waits_within_the_budget_then_answers_503() {
    let sim = NodeSim::new(2000, vec![]);
    let url = sim.serve().await;
    let router = |_: &_, _: &_, _: &_| Decision::RetryAfter(300);
    let policies = Arc::new(TestPolicies::with_router(router));
    let options = Options {
        queue_budget_secs: 1,
        ..Options::default()
    };
    let gw = harness::start(&[("a", &url)], policies.clone(), options).await;
    let started = std::time::Instant::now();
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "it waited and asked again"
    );
    assert!(
        policies.callers.lock().unwrap().len() >= 3,
        "routed again after each wait"
    );
}

#[tokio::test]
async fn retry_after_succeeds_once_the_model_is_ready() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Loading, 1000, 0)]);
    let url = sim.serve().await;
    let gw = harness::start(
        &[("a", &url)],
        Arc::new(TestPolicies::new()),
        Options::default(),
    )
    .await;
    let flip = Arc::clone(&sim);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        flip.models.lock().unwrap()[0].state = ModelState::Ready;
    });
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn rejection_keeps_status_message_and_retry_after() {
    let sim = NodeSim::new(2000, vec![]);
    let url = sim.serve().await;
    let router = |_: &_, _: &_, _: &_| {
        Decision::Reject(Rejection {
            status: 429,
            message: "tier quota exhausted".into(),
            retry_after_ms: Some(2500),
        })
    };
    let gw = harness::start(
        &[("a", &url)],
        Arc::new(TestPolicies::with_router(router)),
        Options::default(),
    )
    .await;
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "tier quota exhausted");
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn unknown_model_is_404() {
    let sim = NodeSim::new(2000, vec![]);
    let url = sim.serve().await;
    let gw = harness::start(
        &[("a", &url)],
        Arc::new(TestPolicies::new()),
        Options::default(),
    )
    .await;
    let response = gw.post("/v1/chat/completions", &chat("nope")).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
}

#[tokio::test]
async fn fleet_health_is_debounced_and_versions_bump_only_on_change() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url = sim.serve().await;
    // Pollers that tick once an hour: only the test's explicit polls count.
    let options = Options {
        poll_interval: Duration::from_secs(3600),
        ..Options::default()
    };
    let gw = harness::start(&[("a", &url)], Arc::new(TestPolicies::new()), options).await;
    let fleet = gw.state.fleet();
    fleet.poll_all().await;
    let v1 = fleet.view().version;
    fleet.poll_all().await;
    assert_eq!(fleet.view().version, v1, "nothing changed, no new version");
    assert_eq!(fleet.view().nodes[0].health, Health::Healthy);

    sim.failing.store(true, Ordering::SeqCst);
    fleet.refresh("a").await;
    assert_eq!(
        fleet.view().nodes[0].health,
        Health::Healthy,
        "one failure is noise"
    );
    assert_eq!(fleet.view().version, v1);
    fleet.refresh("a").await;
    assert_eq!(fleet.view().nodes[0].health, Health::Unreachable);
    assert!(fleet.view().nodes[0].models.is_empty());
    assert!(fleet.view().version > v1);

    sim.failing.store(false, Ordering::SeqCst);
    fleet.refresh("a").await;
    assert_eq!(
        fleet.view().nodes[0].health,
        Health::Healthy,
        "one success is enough"
    );
    assert_eq!(fleet.view().nodes[0].models.len(), 1);
    let discoveries = sim.calls().iter().filter(|c| *c == "discovery").count();
    assert_eq!(
        discoveries, 2,
        "discovery once at start and once after reconnecting"
    );
}

/// Two replicas of qwen3-8b ("a" first), each a stand-in node.
async fn two_replicas() -> (Arc<NodeSim>, Arc<NodeSim>, harness::Gw) {
    let a = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let b = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let (url_a, url_b) = (a.serve().await, b.serve().await);
    let router = |_: &_, _: &_, _: &_| {
        Decision::Serve(ServePlan {
            node: "a".into(),
            fallbacks: vec!["b".into()],
        })
    };
    let gw = harness::start(
        &[("a", &url_a), ("b", &url_b)],
        Arc::new(TestPolicies::with_router(router)),
        Options::default(),
    )
    .await;
    (a, b, gw)
}

fn chat_calls(sim: &NodeSim) -> usize {
    sim.calls()
        .iter()
        .filter(|c| c.starts_with("chat:"))
        .count()
}

fn model_failed() -> ChatError {
    ChatError {
        status: 503,
        code: helexa_node_api::error_code::MODEL_FAILED,
        message: "device 0 faulted: CUDA_ERROR_ILLEGAL_ADDRESS",
        retry_after_secs: None,
    }
}

#[tokio::test]
async fn model_failed_goes_to_the_fallback_at_once() {
    let (a, b, gw) = two_replicas().await;
    *a.chat_error.lock().unwrap() = Some(model_failed());
    let started = std::time::Instant::now();
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 200);
    assert_eq!((chat_calls(&a), chat_calls(&b)), (1, 1));
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn model_failed_on_the_only_replica_is_a_503_at_once_not_a_retry_loop() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    *sim.chat_error.lock().unwrap() = Some(model_failed());
    let url = sim.serve().await;
    // The fleet view still says Ready (as it would until the next poll), so a retry
    // loop would keep choosing this node for the whole 5 s budget.
    let router = |_: &_, _: &_, _: &_| {
        Decision::Serve(ServePlan {
            node: "a".into(),
            fallbacks: vec![],
        })
    };
    let gw = harness::start(
        &[("a", &url)],
        Arc::new(TestPolicies::with_router(router)),
        Options::default(),
    )
    .await;
    let started = std::time::Instant::now();
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert!(started.elapsed() < Duration::from_secs(1), "no retry loop");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"a\"") && message.contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{message}"
    );
    assert_eq!(body["error"]["code"], "model_failed");
    assert_eq!(chat_calls(&sim), 1);
}

#[tokio::test]
async fn node_429_falls_back_then_is_relayed_with_retry_after() {
    let (a, b, gw) = two_replicas().await;
    let busy = ChatError {
        status: 429,
        code: "overloaded",
        message: "queue full",
        retry_after_secs: Some(7),
    };
    *a.chat_error.lock().unwrap() = Some(busy.clone());
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 200);
    assert_eq!((chat_calls(&a), chat_calls(&b)), (1, 1));

    *b.chat_error.lock().unwrap() = Some(busy);
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "queue full");
    assert_eq!((chat_calls(&a), chat_calls(&b)), (2, 2));
}

#[tokio::test]
async fn a_relayed_4xx_keeps_its_retry_after_and_content_type() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    *sim.chat_error.lock().unwrap() = Some(ChatError {
        status: 413,
        code: "context_length_exceeded",
        message: "too long for now",
        retry_after_secs: Some(3),
    });
    let url = sim.serve().await;
    let gw = harness::start(
        &[("a", &url)],
        Arc::new(TestPolicies::new()),
        Options::default(),
    )
    .await;
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(response.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn a_non_streamed_generation_longer_than_the_stall_timeout_succeeds() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    *sim.script.lock().unwrap() = Script {
        answer_delay: Duration::from_millis(2500),
        ..Script::default()
    };
    let url = sim.serve().await;
    let options = Options {
        stall_timeout_secs: 1,
        ..Options::default()
    };
    let gw = harness::start(&[("a", &url)], Arc::new(TestPolicies::new()), options).await;
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello, world!");
}

#[tokio::test]
async fn a_node_that_drops_the_request_is_not_retried_elsewhere() {
    let (closing_url, received) = closing_node().await;
    let b = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url_b = b.serve().await;
    let router = |_: &_, _: &_, _: &_| {
        Decision::Serve(ServePlan {
            node: "closing".into(),
            fallbacks: vec!["b".into()],
        })
    };
    let gw = harness::start(
        &[("closing", &closing_url), ("b", &url_b)],
        Arc::new(TestPolicies::with_router(router)),
        Options::default(),
    )
    .await;
    let response = gw.post("/v1/chat/completions", &chat("qwen3-8b")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "node_failed", "{body}");
    assert_eq!(received.load(Ordering::SeqCst), 1);
    assert_eq!(chat_calls(&b), 0, "the generation must not be re-sent");
}

#[tokio::test]
async fn feasible_on_uses_the_routers_largest_devices_rule() {
    // 2 × 24 GiB: a 40 GiB model without `min_devices` is placed on one device by the
    // router, so it is not feasible there; with `min_devices = 2` it is.
    let sim = NodeSim::new(24576, vec![]);
    {
        let mut devices = sim.devices.lock().unwrap();
        let mut second = devices[0].clone();
        second.index = 1;
        devices.push(second);
    }
    let url = sim.serve().await;
    let options = Options {
        extra_catalogue: r#"
[[models]]
id = "forty"
source = "org/forty"
vram_mb = 40960

[[models]]
id = "forty-split"
source = "org/forty"
vram_mb = 40960
min_devices = 2
"#,
        ..Options::default()
    };
    let gw = harness::start(&[("a", &url)], Arc::new(TestPolicies::new()), options).await;
    let feasible = |body: &Value, id: &str| -> Vec<Value> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()["feasible_on"]
            .as_array()
            .unwrap()
            .clone()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let body: Value = gw.get("/v1/models").await.json().await.unwrap();
        if !feasible(&body, "qwen3-8b").is_empty() || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(feasible(&body, "qwen3-8b"), vec![json!("a")], "{body}");
    assert!(feasible(&body, "forty").is_empty(), "{body}");
    assert_eq!(feasible(&body, "forty-split"), vec![json!("a")], "{body}");
}
