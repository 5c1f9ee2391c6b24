//! OpenAI passthrough: bodies and streams reach the client unchanged.

use std::sync::Arc;
use std::time::Duration;

use helexa_node_api::ModelState;
use serde_json::{Value, json};

use crate::harness::{self, Options, TestPolicies, sse_events};
use crate::stand_in::{NodeSim, Script, chat_chunks, model};

async fn one_node() -> (Arc<NodeSim>, harness::Gw) {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url = sim.serve().await;
    let gw = harness::start(
        &[("a", &url)],
        Arc::new(TestPolicies::new()),
        Options::default(),
    )
    .await;
    (sim, gw)
}

#[tokio::test]
async fn chat_non_stream_is_passed_through() {
    let (sim, gw) = one_node().await;
    *sim.script.lock().unwrap() = Script::full();
    let response = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Checking the weather."
    );
    assert_eq!(
        body["choices"][0]["message"]["reasoning_content"],
        "Let me think."
    );
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\": \"Paris\"}"
    );
    assert_eq!(sim.calls().last().unwrap(), "chat:qwen3-8b");
    // Usage is read from the tail of the relayed body.
    assert_eq!(gw.metric("helexa_tokens_total{kind=\"prompt\"}"), 11.0);
    assert_eq!(gw.metric("helexa_tokens_total{kind=\"completion\"}"), 7.0);
    assert_eq!(
        gw.metric(
            "helexa_requests_total{model=\"qwen3-8b\",status=\"200\",surface=\"openai_chat\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn chat_stream_relays_every_chunk_in_order() {
    let (sim, gw) = one_node().await;
    *sim.script.lock().unwrap() = Script::full();
    let response = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "qwen3-8b", "stream": true, "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = response.text().await.unwrap();
    let data: Vec<String> = sse_events(&body).into_iter().map(|(_, d)| d).collect();
    let mut expected: Vec<String> = chat_chunks("qwen3-8b", &Script::full())
        .iter()
        .map(Value::to_string)
        .collect();
    expected.push("[DONE]".to_owned());
    assert_eq!(data, expected);
}

#[tokio::test]
async fn completions_are_passed_through() {
    let (sim, gw) = one_node().await;
    let response = gw
        .post(
            "/v1/completions",
            &json!({"model": "qwen3-8b", "prompt": "Say hi"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["text"], "Hello, world!");
    assert_eq!(sim.calls().last().unwrap(), "completions:qwen3-8b");
}

#[tokio::test]
async fn alias_is_rewritten_to_the_catalogue_id() {
    let (sim, gw) = one_node().await;
    let response = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": [], "extra_field": {"kept": true}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let seen = sim.last_chat.lock().unwrap().clone().unwrap();
    assert_eq!(seen["model"], "qwen3-8b");
    assert_eq!(seen["extra_field"]["kept"], true);
}

#[tokio::test]
async fn dead_node_mid_stream_ends_with_terminal_error_event() {
    let (sim, gw) = one_node().await;
    *sim.script.lock().unwrap() = Script {
        die_after: Some(2),
        delay: Duration::from_millis(20),
        ..Script::default()
    };
    let body = json!({"model": "qwen3-8b", "stream": true, "messages": []});
    let request = gw.post("/v1/chat/completions", &body);
    let response = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("no hang");
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), response.text())
        .await
        .expect("no hang")
        .unwrap();
    let events = sse_events(&body);
    // The node flushed one or two chunks before dying (hyper may drop its last write).
    let n = events.len();
    assert!((3..=4).contains(&n), "chunks, the error, [DONE]: {body}");
    for (_, chunk) in &events[..n - 2] {
        let chunk: Value = serde_json::from_str(chunk).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
    }
    let error: Value = serde_json::from_str(&events[n - 2].1).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(error["error"]["code"], "upstream_stream_error");
    assert_eq!(events[n - 1].1, "[DONE]");
    assert_eq!(
        gw.metric("helexa_errors_total{kind=\"stream\",surface=\"openai_chat\"}"),
        1.0
    );
}

#[tokio::test]
async fn node_4xx_is_relayed_with_its_status() {
    let (sim, gw) = one_node().await;
    *sim.chat_status.lock().unwrap() = Some(422);
    let response = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "qwen3-8b", "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "scripted failure");
}

#[tokio::test]
async fn stalled_node_is_cut_off_after_the_stall_timeout() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    *sim.script.lock().unwrap() = Script {
        stall_after: Some(2),
        ..Script::default()
    };
    let url = sim.serve().await;
    let options = Options {
        stall_timeout_secs: 1,
        ..Options::default()
    };
    let gw = harness::start(&[("a", &url)], Arc::new(TestPolicies::new()), options).await;
    let started = std::time::Instant::now();
    let body = json!({"model": "qwen3-8b", "stream": true, "messages": []});
    let response = gw.post("/v1/chat/completions", &body).await;
    let text = tokio::time::timeout(Duration::from_secs(10), response.text())
        .await
        .expect("no hang")
        .unwrap();
    let events = sse_events(&text);
    assert_eq!(events.len(), 4, "two chunks, the error, [DONE]: {text}");
    let error: Value = serde_json::from_str(&events[2].1).unwrap();
    assert_eq!(error["error"]["code"], "upstream_stream_error");
    assert_eq!(events[3].1, "[DONE]");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
}
