//! Translated surfaces (Anthropic Messages, OpenAI Responses) through the real embedded
//! policies of the policy runtime (router, evictor and translator compiled from
//! `policies/`). Expected shapes follow the Anthropic and OpenAI API references.

use std::sync::Arc;
use std::time::Duration;

use helexa::policy::Policies;
use helexa_node_api::ModelState;
use serde_json::{Value, json};

use crate::harness::{self, Options, sse_events};
use crate::stand_in::{NodeSim, Script, model};

fn runtime_policies() -> Arc<dyn Policies> {
    let registry = prometheus::Registry::new();
    Arc::new(
        helexa::policy::load(&Default::default(), &registry).expect("embedded default policies"),
    )
}

async fn gateway(script: Script) -> (Arc<NodeSim>, harness::Gw) {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    *sim.script.lock().unwrap() = script;
    let url = sim.serve().await;
    let gw = harness::start(&[("a", &url)], runtime_policies(), Options::default()).await;
    (sim, gw)
}

fn weather_tool_anthropic() -> Value {
    json!({"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}})
}

fn messages_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "stream": stream,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [weather_tool_anthropic()],
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "some_future_field": {"ignored": true}
    })
}

async fn post_anthropic(gw: &harness::Gw, path: &str, body: &Value) -> reqwest::Response {
    gw.http
        .post(format!("{}{path}", gw.url))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "some-future-beta-2099-01-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn anthropic_messages_stream_has_the_full_event_sequence() {
    let (sim, gw) = gateway(Script::full()).await;
    let response = post_anthropic(&gw, "/v1/messages", &messages_body(true)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = response.text().await.unwrap();
    // The node got an OpenAI chat request for the catalogue id, streamed.
    let chat = sim.last_chat.lock().unwrap().clone().unwrap();
    assert_eq!(chat["model"], "qwen3-8b");
    assert_eq!(chat["stream"], true);

    let events: Vec<(String, Value)> = sse_events(&body)
        .into_iter()
        .map(|(name, data)| {
            (
                name.expect("every Anthropic event is named"),
                serde_json::from_str(&data).unwrap(),
            )
        })
        .filter(|(name, _)| name != "ping")
        .collect();
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "event name matches data.type");
    }
    // Collapse runs of deltas to check the structure.
    let mut shape: Vec<String> = Vec::new();
    for (name, data) in &events {
        let label = match name.as_str() {
            "content_block_start" => {
                format!("start:{}", data["content_block"]["type"].as_str().unwrap())
            }
            "content_block_delta" => format!("delta:{}", data["delta"]["type"].as_str().unwrap()),
            other => other.to_owned(),
        };
        if shape.last() != Some(&label) || !label.starts_with("delta:") {
            shape.push(label);
        }
    }
    let shape: Vec<String> = shape
        .into_iter()
        .filter(|s| s != "delta:signature_delta")
        .collect();
    assert_eq!(
        shape,
        [
            "message_start",
            "start:thinking",
            "delta:thinking_delta",
            "content_block_stop",
            "start:text",
            "delta:text_delta",
            "content_block_stop",
            "start:tool_use",
            "delta:input_json_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ],
        "{body}"
    );
    let concat = |kind: &str, field: &str| -> String {
        events
            .iter()
            .filter(|(n, d)| n == "content_block_delta" && d["delta"]["type"] == kind)
            .map(|(_, d)| d["delta"][field].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(concat("thinking_delta", "thinking"), "Let me think.");
    assert_eq!(concat("text_delta", "text"), "Checking the weather.");
    let input: Value = serde_json::from_str(&concat("input_json_delta", "partial_json")).unwrap();
    assert_eq!(input, json!({"city": "Paris"}));
    let start = &events[0].1["message"];
    assert_eq!(start["role"], "assistant");
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    let tool_start = events
        .iter()
        .find(|(_, d)| d["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(tool_start.1["content_block"]["name"], "get_weather");
    assert_eq!(tool_start.1["content_block"]["id"], "call_1");
    let message_delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(message_delta.1["delta"]["stop_reason"], "tool_use");
    // Block indices are 0, 1, 2 in order.
    let indices: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
}

#[tokio::test]
async fn anthropic_messages_non_stream_keeps_tool_use() {
    let (_sim, gw) = gateway(Script::full()).await;
    let response = post_anthropic(&gw, "/v1/messages", &messages_body(false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["stop_reason"], "tool_use");
    let content = body["content"].as_array().unwrap();
    let text: Vec<&Value> = content.iter().filter(|b| b["type"] == "text").collect();
    assert_eq!(text[0]["text"], "Checking the weather.");
    let tool = content
        .iter()
        .find(|b| b["type"] == "tool_use")
        .expect("tool_use block");
    assert_eq!(tool["id"], "call_1");
    assert_eq!(tool["name"], "get_weather");
    assert_eq!(tool["input"], json!({"city": "Paris"}));
    assert_eq!(body["usage"]["input_tokens"], 11);
    assert_eq!(body["usage"]["output_tokens"], 7);
}

#[tokio::test]
async fn anthropic_count_tokens_asks_the_node_to_tokenize() {
    let (sim, gw) = gateway(Script::default()).await;
    let body = json!({"model": "claude-sonnet-4-5", "tools": [weather_tool_anthropic()],
                      "messages": [{"role": "user", "content": "What is the weather in Paris?"}]});
    let response = post_anthropic(&gw, "/v1/messages/count_tokens", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(sim.calls().contains(&"tokenize:qwen3-8b".to_owned()));
    // The stand-in counts whitespace-separated words of the messages and tools it got:
    // "What is the weather in Paris?" alone is 6, the tool adds more.
    assert!(answer["input_tokens"].as_u64().unwrap() > 6, "{answer}");
    assert_eq!(answer.as_object().unwrap().len(), 1);
}

#[tokio::test]
async fn anthropic_dead_node_mid_stream_ends_with_an_error_event() {
    let script = Script {
        die_after: Some(3),
        delay: Duration::from_millis(20),
        ..Script::full()
    };
    let (_sim, gw) = gateway(script).await;
    let body = messages_body(true);
    let request = post_anthropic(&gw, "/v1/messages", &body);
    let response = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("no hang");
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), response.text())
        .await
        .expect("no hang")
        .unwrap();
    let events = sse_events(&body);
    let (name, data) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"), "{body}");
    let data: Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["type"], "error");
    assert!(data["error"]["message"].is_string());
}

#[tokio::test]
async fn anthropic_unknown_model_is_404_in_its_envelope() {
    let (_sim, gw) = gateway(Script::default()).await;
    let body =
        json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let response = post_anthropic(&gw, "/v1/messages", &body).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");
}

fn responses_body(stream: bool) -> Value {
    json!({
        "model": "qwen3-8b",
        "stream": stream,
        "input": "What is the weather in Paris?",
        "tools": [{"type": "function", "name": "get_weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    })
}

#[tokio::test]
async fn responses_stream_numbers_events_and_completes() {
    let (_sim, gw) = gateway(Script::full()).await;
    let response = gw.post("/v1/responses", &responses_body(true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let events: Vec<(Option<String>, Value)> = sse_events(&body)
        .into_iter()
        .map(|(n, d)| (n, serde_json::from_str(&d).unwrap()))
        .collect();
    assert_eq!(
        events.first().unwrap().1["type"],
        "response.created",
        "{body}"
    );
    let sequence: Vec<u64> = events
        .iter()
        .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(
        sequence.windows(2).all(|w| w[1] > w[0]),
        "sequence_number increases: {sequence:?}"
    );
    let (name, completed) = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed");
    if let Some(name) = name {
        assert_eq!(name, "response.completed");
    }
    let text: String = events
        .iter()
        .filter(|(_, d)| d["type"] == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Checking the weather.");
    let output = completed["response"]["output"].as_array().unwrap();
    let call = output
        .iter()
        .find(|o| o["type"] == "function_call")
        .expect("function_call item");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["call_id"], "call_1");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris"}));
}

#[tokio::test]
async fn responses_non_stream_keeps_the_function_call() {
    let (_sim, gw) = gateway(Script::full()).await;
    let response = gw.post("/v1/responses", &responses_body(false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    let output = body["output"].as_array().unwrap();
    let call = output
        .iter()
        .find(|o| o["type"] == "function_call")
        .expect("function_call item");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["call_id"], "call_1");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris"}));
    let message = output
        .iter()
        .find(|o| o["type"] == "message")
        .expect("message item");
    assert_eq!(message["content"][0]["text"], "Checking the weather.");
}

#[tokio::test]
async fn cold_load_through_the_real_router_and_evictor() {
    // Only "big" (1500 MiB) is asked for; the node holds two 1000 MiB models.
    let sim = NodeSim::new(
        2000,
        vec![
            model("qwen3-8b", ModelState::Ready, 1000, 10),
            model("llama-3b", ModelState::Ready, 1000, 60_000),
        ],
    );
    let url = sim.serve().await;
    let gw = harness::start(&[("a", &url)], runtime_policies(), Options::default()).await;
    let response = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "big", "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let calls: Vec<String> = sim
        .calls()
        .into_iter()
        .filter(|c| c != "discovery")
        .collect();
    assert!(calls.contains(&"load:big".to_owned()), "{calls:?}");
    let unloads: Vec<&String> = calls.iter().filter(|c| c.starts_with("unload:")).collect();
    assert!(!unloads.is_empty(), "memory had to be freed: {calls:?}");
    // LRU: the longest-idle model goes first.
    assert_eq!(unloads[0], "unload:llama-3b");
    assert_eq!(calls.last().unwrap(), "chat:big");
    assert_eq!(gw.metric("helexa_cold_starts_total"), 1.0);
}

#[tokio::test]
async fn anthropic_silence_gets_pings_then_a_stall_ends_the_stream() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    *sim.script.lock().unwrap() = Script {
        stall_after: Some(3),
        ..Script::default()
    };
    let url = sim.serve().await;
    // Keep-alive after 1 s of silence; the node is cut off after 3 s.
    let options = Options {
        stall_timeout_secs: 3,
        ..Options::default()
    };
    let gw = harness::start(&[("a", &url)], runtime_policies(), options).await;
    let response = post_anthropic(&gw, "/v1/messages", &messages_body(true)).await;
    let body = tokio::time::timeout(Duration::from_secs(15), response.text())
        .await
        .expect("no hang")
        .unwrap();
    let names: Vec<String> = sse_events(&body)
        .into_iter()
        .filter_map(|(n, _)| n)
        .collect();
    let pings = names.iter().filter(|n| *n == "ping").count();
    assert!(pings >= 2, "pings while the node is silent: {names:?}");
    assert_eq!(names.last().map(String::as_str), Some("error"), "{names:?}");
}

#[tokio::test]
async fn anthropic_stream_pings_while_a_cold_load_runs() {
    let sim = NodeSim::new(4000, vec![]);
    *sim.load_delay.lock().unwrap() = Duration::from_millis(2500);
    *sim.script.lock().unwrap() = Script::full();
    let url = sim.serve().await;
    let gw = harness::start(&[("a", &url)], runtime_policies(), Options::default()).await;
    let response = post_anthropic(&gw, "/v1/messages", &messages_body(true)).await;
    // The stream starts before the load is done (keep-alive interval 1 s).
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(15), response.text())
        .await
        .expect("no hang")
        .unwrap();
    // The translator opens the message and pings while the load runs (one interval
    // of waiting is spent deciding between an HTTP error and a stream, the next one
    // pings), then the content follows.
    let names: Vec<String> = sse_events(&body)
        .into_iter()
        .filter_map(|(n, _)| n)
        .collect();
    let first_block = names
        .iter()
        .position(|n| n == "content_block_start")
        .expect(&body);
    assert_eq!(names[0], "message_start", "{names:?}");
    assert!(
        names[1..first_block].iter().all(|n| n == "ping") && first_block >= 2,
        "{names:?}"
    );
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(sim.calls().contains(&"load:qwen3-8b".to_owned()));
}

/// The real policies, except that no translator stream can be had (as when the wasm
/// instance pool is exhausted by many concurrent streams).
struct NoStreams(Arc<dyn Policies>);

impl Policies for NoStreams {
    fn route(
        &self,
        request: &helexa::policy::RequestInfo,
        catalogue: &Arc<helexa::policy::Catalogue>,
        fleet: &Arc<helexa::policy::Fleet>,
    ) -> helexa::policy::Decision {
        self.0.route(request, catalogue, fleet)
    }

    fn choose_victims(
        &self,
        on: &helexa::policy::Node,
        need_mb: u64,
        incoming: &helexa::policy::CatalogueEntry,
    ) -> Vec<String> {
        self.0.choose_victims(on, need_mb, incoming)
    }

    fn request_to_chat(
        &self,
        from: helexa::policy::Surface,
        body: &str,
    ) -> Result<String, helexa::policy::TranslateError> {
        self.0.request_to_chat(from, body)
    }

    fn response_from_chat(
        &self,
        to: helexa::policy::Surface,
        request: &str,
        body: &str,
    ) -> Result<String, helexa::policy::TranslateError> {
        self.0.response_from_chat(to, request, body)
    }

    fn response_stream(
        &self,
        _: helexa::policy::Surface,
        _: &str,
        _: &str,
    ) -> Result<Box<dyn helexa::policy::EventStream>, helexa::policy::TranslateError> {
        Err(helexa::policy::TranslateError::Failed(
            "instance pool exhausted".into(),
        ))
    }

    fn describe(&self) -> Value {
        self.0.describe()
    }
}

#[tokio::test]
async fn no_translator_stream_is_a_503_before_the_node_is_asked() {
    let sim = NodeSim::new(2000, vec![model("qwen3-8b", ModelState::Ready, 1000, 0)]);
    let url = sim.serve().await;
    let policies = Arc::new(NoStreams(runtime_policies()));
    let gw = harness::start(&[("a", &url)], policies, Options::default()).await;
    let response = post_anthropic(&gw, "/v1/messages", &messages_body(true)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    // Anthropic's envelope.
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "overloaded_error", "{body}");
    let responses = json!({"model": "gpt-4o", "stream": true, "input": "hi"});
    let response = gw.post("/v1/responses", &responses).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(
        !sim.calls().iter().any(|c| c.starts_with("chat:")),
        "{:?}",
        sim.calls()
    );
}

#[tokio::test]
async fn count_tokens_never_loads_a_model() {
    let sim = NodeSim::new(4000, vec![]);
    let url = sim.serve().await;
    let gw = harness::start(&[("a", &url)], runtime_policies(), Options::default()).await;
    let body = json!({"model": "claude-sonnet-4-5",
                      "messages": [{"role": "user", "content": "hi"}]});
    let response = post_anthropic(&gw, "/v1/messages/count_tokens", &body).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let answer: Value = response.json().await.unwrap();
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("not loaded on any node"), "{message}");
    assert!(
        !sim.calls()
            .iter()
            .any(|c| c.starts_with("load:") || c.starts_with("tokenize:")),
        "{:?}",
        sim.calls()
    );
}
