//! Auth, bad input, envelopes, `/v1/models`, `/health`, metrics.

use std::sync::Arc;

use helexa_node_api::ModelState;
use serde_json::{Value, json};

use crate::harness::{self, ALICE_KEY, BOB_KEY, Options, TestPolicies};
use crate::stand_in::{NodeSim, model};

async fn gateway(auth: bool) -> (Arc<NodeSim>, Arc<TestPolicies>, harness::Gw) {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url = sim.serve().await;
    let policies = Arc::new(TestPolicies::new());
    let gw = harness::start(
        &[("a", &url)],
        policies.clone(),
        Options {
            auth,
            ..Options::default()
        },
    )
    .await;
    (sim, policies, gw)
}

fn chat() -> Value {
    json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn bearer_and_x_api_key_authenticate_and_name_the_caller() {
    let (_sim, policies, gw) = gateway(true).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let r = gw
        .http
        .post(&url)
        .bearer_auth(ALICE_KEY)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = gw
        .http
        .post(&url)
        .header("x-api-key", BOB_KEY)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let callers = policies.callers.lock().unwrap().clone();
    assert_eq!(
        callers,
        vec![Some("alice".to_owned()), Some("bob".to_owned())]
    );
}

#[tokio::test]
async fn missing_or_wrong_key_is_401_in_the_surface_envelope() {
    let (_sim, _, gw) = gateway(true).await;
    let r = gw.post("/v1/chat/completions", &chat()).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-api-key")
    );

    let r = gw
        .http
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", "sk-wrong-key-000")
        .json(&json!({"model": "qwen3-8b", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}})
    );

    let r = gw.get("/v1/models").await;
    assert_eq!(r.status(), 401);
    // Health stays public for load balancers.
    assert_eq!(gw.get("/health").await.status(), 200);
}

#[tokio::test]
async fn bad_json_is_400_in_the_surface_envelope() {
    let (_sim, _, gw) = gateway(false).await;
    let send = |path: &'static str, body: &'static str| {
        gw.http
            .post(format!("{}{path}", gw.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = send("/v1/chat/completions", "{\"model\": ").await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body")
    );

    let r = send("/v1/messages", "not json").await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let r = send("/v1/chat/completions", "[\"qwen3-8b\", true]")
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a JSON array is not a request");

    let r = send("/v1/chat/completions", "{\"messages\": []}")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model");

    let r = send(
        "/v1/chat/completions",
        "{\"model\": \"qwen3-8b\", \"max_tokens\": -1}",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let (_sim, _, gw) = gateway(false).await;
    let r = gw.get("/v1/nothing").await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].is_string());
}

#[tokio::test]
async fn models_list_joins_catalogue_and_fleet() {
    let (_sim, _, gw) = gateway(false).await;
    let body: Value = gw.get("/v1/models").await.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let qwen = &data[0];
    assert_eq!(qwen["id"], "qwen3-8b");
    assert_eq!(qwen["object"], "model");
    assert_eq!(qwen["owned_by"], "helexa");
    assert_eq!(qwen["loaded"], true);
    assert_eq!(qwen["locations"], json!(["a"]));
    assert_eq!(qwen["feasible_on"], json!(["a"]));
    assert_eq!(qwen["aliases"], json!(["gpt-4o", "claude-sonnet-4-5"]));
    assert_eq!(qwen["context_length"], 4096);
    assert_eq!(data[1]["loaded"], false);
    assert_eq!(data[1]["locations"], json!([]));
    // 1500 MiB fits the 2000 MiB device.
    assert_eq!(data[2]["feasible_on"], json!(["a"]));
}

#[tokio::test]
async fn health_reports_nodes_and_policies() {
    let (_sim, _, gw) = gateway(true).await;
    let body: Value = gw.get("/health").await.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["auth"], true);
    assert_eq!(body["nodes"][0]["name"], "a");
    assert_eq!(body["nodes"][0]["health"], "healthy");
    assert_eq!(body["nodes"][0]["engine"]["backend"], "cpu");
    assert_eq!(body["nodes"][0]["models"][0]["id"], "qwen3-8b");
    assert_eq!(body["policies"][0]["name"], "test");
}

#[tokio::test]
async fn metrics_router_serves_prometheus_text() {
    let (_sim, _, gw) = gateway(false).await;
    gw.post(
        "/v1/chat/completions",
        &json!({"model": "qwen3-8b", "stream": true, "messages": []}),
    )
    .await
    .text()
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let router = gw.state.metrics().clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    for name in [
        "helexa_requests_total",
        "helexa_ttft_seconds_bucket",
        "helexa_inter_token_seconds_bucket",
        "helexa_node_health{node=\"a\"} 1",
        "helexa_device_vram_total_mb{device=\"0\",node=\"a\"} 2000",
        "helexa_device_vram_free_mb{device=\"0\",node=\"a\"} 1000",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}
