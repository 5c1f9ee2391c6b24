//! The HTTP API through `oneshot`, on the in-process fake engine with the real tiny-qwen3
//! tokenizer and template, and scripted outputs taken from the fixture's greedy continuations.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use helexa_node::config::Admission;
use helexa_node::fake::FakeBackend;
use helexa_node::state::AppState;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::{fixtures, read_json};

fn reference() -> Value {
    read_json(&fixtures().join("tiny-qwen3/reference.json"))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// A fake engine answering each reference prompt with the model's real greedy continuation.
fn scripted() -> FakeBackend {
    let reference = reference();
    let table: Vec<(Vec<u32>, Vec<u32>)> = ["chat", "think", "tools"]
        .iter()
        .map(|name| {
            let p = &reference["prompts"][name];
            (ids(&p["token_ids"]), ids(&p["greedy_token_ids"]))
        })
        .collect();
    let fallback = ids(&reference["prompts"]["chat"]["greedy_token_ids"]);
    FakeBackend::new(Box::new(move |prompt: &[u32]| {
        table
            .iter()
            .find(|(p, _)| p == prompt)
            .map(|(_, out)| out.clone())
            .unwrap_or_else(|| fallback.clone())
    }))
}

async fn app_with(backend: FakeBackend, admission: Admission) -> Router {
    let state = AppState::new(Arc::new(backend), admission, None).expect("state");
    let app = helexa_node::app(state);
    let (status, body) = post(
        &app,
        "/models/load",
        json!({"id": "tiny", "source": fixtures().join("tiny-qwen3")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app
}

async fn app() -> Router {
    app_with(scripted(), Admission::default()).await
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        headers,
        String::from_utf8(bytes.to_vec()).expect("utf-8"),
    )
}

fn json_request(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let request = json_request(path, &body);
    let (status, _, text) = send(app, request).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(app: &Router, path: &str) -> (StatusCode, String) {
    let (status, _, text) = send(
        app,
        Request::get(path).body(Body::empty()).expect("request"),
    )
    .await;
    (status, text)
}

/// The `data:` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_owned)
        .collect()
}

fn tools_request(stream: bool) -> Value {
    let prompt = &reference()["prompts"]["tools"];
    json!({"model": "tiny", "messages": prompt["messages"], "tools": prompt["tools"],
           "temperature": 0, "stream": stream, "stream_options": {"include_usage": true}})
}

fn assert_weather_call(call: &Value) {
    assert!(
        call["id"].as_str().expect("id").starts_with("call_"),
        "{call}"
    );
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("string"))
        .expect("json");
    assert_eq!(args, json!({"city": "Oslo"}));
}

#[tokio::test]
async fn chat_tool_call_non_streaming() {
    let app = app().await;
    let (status, body) = post(&app, "/v1/chat/completions", tools_request(false)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1);
    assert_weather_call(&calls[0]);
    // 258 = the reference prompt's token count (template + tokenizer agree with transformers);
    // 38 greedy tokens including the final <|im_end|>.
    assert_eq!(body["usage"]["prompt_tokens"], 258);
    assert_eq!(body["usage"]["completion_tokens"], 38);
    assert_eq!(body["usage"]["total_tokens"], 296);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn chat_tool_call_streaming() {
    let app = app().await;
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(tools_request(true).to_string()))
        .expect("request");
    let (status, headers, text) = send(&app, request).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk["id"].as_str().expect("id").starts_with("chatcmpl-"));
        // No tool-call markup ever leaks into content.
        if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str() {
            assert!(
                !content.contains("tool_call") && !content.contains("get_weather"),
                "{content}"
            );
        }
    }
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["index"], 0);
    assert_weather_call(calls[0]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(finish["usage"], Value::Null);
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 258);
    assert_eq!(usage["usage"]["completion_tokens"], 38);
}

/// The JSON chunks of a streamed response (the final `[DONE]` checked and dropped).
async fn stream_chunks(app: &Router, path: &str, body: Value) -> Vec<Value> {
    let request = json_request(path, &body);
    let (status, _, text) = send(app, request).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect()
}

#[tokio::test]
async fn chat_streaming_continuous_usage_stats() {
    let mut backend = scripted();
    backend.reused_prompt_tokens = 200;
    let app = app_with(backend, Admission::default()).await;
    let mut request = tools_request(true);
    // As the Anthropic translator sends it; an unknown option is still accepted.
    request["stream_options"] =
        json!({"include_usage": true, "continuous_usage_stats": true, "future_option": 1});
    let chunks = stream_chunks(&app, "/v1/chat/completions", request).await;

    // The role chunk already carries the prompt size (vLLM's shape: nothing generated yet).
    let first = &chunks[0];
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["usage"]["prompt_tokens"], 258);
    assert_eq!(first["usage"]["completion_tokens"], 0);
    assert_eq!(first["usage"]["total_tokens"], 258);

    // Every chunk with a choice has running counts that never go down.
    let mut previous = 0;
    for chunk in &chunks[..chunks.len() - 1] {
        let usage = &chunk["usage"];
        assert_eq!(usage["prompt_tokens"], 258, "{chunk}");
        let completion = usage["completion_tokens"].as_u64().expect("completion");
        assert!(completion >= previous, "{chunk}");
        assert!(completion <= 38, "{chunk}");
        assert_eq!(usage["total_tokens"], 258 + completion, "{chunk}");
        previous = completion;
    }

    // The finish chunk has the final counts, the cache hit included; the usage-only chunk
    // of `include_usage` still follows.
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(finish["usage"]["completion_tokens"], 38);
    assert_eq!(
        finish["usage"]["prompt_tokens_details"]["cached_tokens"],
        200
    );
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 258);
    assert_eq!(last["usage"]["completion_tokens"], 38);
    assert_eq!(last["usage"]["total_tokens"], 296);
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 200);
}

#[tokio::test]
async fn streaming_usage_options_off_and_completions() {
    let app = app().await;
    let prompt = &reference()["prompts"]["chat"];

    // Without `stream_options` (standard OpenAI): no `usage` field at all.
    let chunks = stream_chunks(
        &app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": prompt["messages"], "stream": true,
               "max_tokens": 4, "stream_options": {"unknown_key": true}}),
    )
    .await;
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "{chunks:?}"
    );

    // `continuous_usage_stats` on the completions surface: counts on every chunk, no
    // usage-only chunk without `include_usage`.
    let chunks = stream_chunks(
        &app,
        "/v1/completions",
        json!({"model": "tiny", "prompt": prompt["text"], "stream": true, "max_tokens": 3,
               "stream_options": {"continuous_usage_stats": true}}),
    )
    .await;
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().is_some_and(|a| a.len() == 1))
    );
    assert_eq!(chunks[0]["usage"]["prompt_tokens"], 43);
    assert_eq!(chunks[0]["usage"]["completion_tokens"], 1);
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 3);
    assert_eq!(last["usage"]["total_tokens"], 46);
}

#[tokio::test]
async fn chat_reasoning_split_and_accounting() {
    let app = app().await;
    let prompt = &reference()["prompts"]["think"];
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": prompt["messages"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = &body["choices"][0]["message"];
    // Greedy output: "<think>\n\n</think>\n\nThe Rust language is a language, …" (48 tokens, no eos).
    let greedy = prompt["greedy_text"].as_str().expect("text");
    let answer = greedy
        .split("</think>")
        .nth(1)
        .expect("after think")
        .trim_start();
    assert_eq!(message["content"], answer);
    assert_eq!(
        message.get("reasoning_content"),
        None,
        "empty reasoning is omitted"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // <think>, \n, \n, </think> are the reasoning tokens.
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );
}

#[tokio::test]
async fn completions_stop_strings_and_length() {
    let app = app().await;
    let prompt = &reference()["prompts"]["chat"];
    let (status, body) = post(
        &app,
        "/v1/completions",
        json!({"model": "tiny", "prompt": prompt["text"], "stop": ["language,"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "The Rust language is a ");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    let (status, body) = post(
        &app,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ids(&prompt["token_ids"]), "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "The Rust language");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["prompt_tokens"], 43);

    // Streaming: the pieces concatenate to the one-shot text, and the stop string never shows.
    let request = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"model": "tiny", "prompt": prompt["text"], "stream": true, "stop": "default"})
                .to_string(),
        ))
        .expect("request");
    let (_, _, text) = send(&app, request).await;
    let data = sse_data(&text);
    let mut joined = String::new();
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).expect("json");
        joined.push_str(chunk["choices"][0]["text"].as_str().expect("text"));
    }
    assert_eq!(
        joined,
        "The Rust language is a language, which is a language. There’s a good "
    );
}

#[tokio::test]
async fn bad_requests_get_openai_envelopes() {
    let app = app().await;
    let cases = [
        (
            json!({"model": "tiny"}),
            StatusCode::BAD_REQUEST,
            "messages",
        ),
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            StatusCode::NOT_FOUND,
            "not loaded",
        ),
        (
            json!({"model": "tiny", "messages": []}),
            StatusCode::BAD_REQUEST,
            "must not be empty",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            StatusCode::BAD_REQUEST,
            "wizard",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 5}),
            StatusCode::BAD_REQUEST,
            "temperature",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}),
            StatusCode::BAD_REQUEST,
            "n: 1",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}),
            StatusCode::BAD_REQUEST,
            "only allowed first",
        ),
        (
            json!({"model": "tiny", "messages": "hello"}),
            StatusCode::BAD_REQUEST,
            "messages",
        ),
    ];
    for (body, expected_status, needle) in cases {
        let (status, answer) = post(&app, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, expected_status, "{body} → {answer}");
        let message = answer["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("envelope: {answer}"));
        assert!(message.contains(needle), "{body}: {message}");
        assert!(answer["error"]["type"].is_string());
    }
    // Not JSON at all.
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .expect("request");
    let (status, _, text) = send(&app, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let answer: Value = serde_json::from_str(&text).expect("envelope");
    assert!(
        answer["error"]["message"]
            .as_str()
            .expect("message")
            .contains("not valid JSON")
    );
    // Unknown route.
    let (status, text) = get(&app, "/v2/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("\"error\""));
}

#[tokio::test]
async fn load_preflight_errors_are_typed() {
    let state = AppState::new(Arc::new(scripted()), Admission::default(), None).expect("state");
    let app = helexa_node::app(state);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (status, body) = post(
        &app,
        "/models/load",
        json!({"id": "x", "source": tmp.path()}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "missing_files");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("config.json")
    );

    let (status, body) = post(
        &app,
        "/models/load",
        json!({"id": "x", "source": fixtures().join("tiny-qwen3"), "quant": "Q2_K"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "quant_not_found");
    let message = body["error"]["message"].as_str().expect("msg");
    for quant in ["BF16", "Q4_K_M", "Q6_K", "Q8_0"] {
        assert!(message.contains(quant), "{message}");
    }

    // An architecture the engine lacks.
    let llama = fixtures().join("tiny-llama");
    let (status, body) = post(&app, "/models/load", json!({"id": "x", "source": llama})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "unknown_architecture");

    let mut small = scripted();
    small.total_mb = 1;
    let app = helexa_node::app(
        AppState::new(Arc::new(small), Admission::default(), None).expect("state"),
    );
    let (status, body) = post(
        &app,
        "/models/load",
        json!({"id": "x", "source": fixtures().join("tiny-qwen3")}),
    )
    .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_memory");
    let (_, models) = get(&app, "/models").await;
    assert!(
        !models.contains("\"x\""),
        "a refused load leaves nothing behind: {models}"
    );
}

#[tokio::test]
async fn gguf_source_and_unload() {
    let app = app().await;
    let (status, body) = post(
        &app,
        "/models/load",
        json!({"id": "q8", "source": fixtures().join("tiny-qwen3"), "quant": "q8_0"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model"]["architecture"], "qwen3");
    assert_eq!(body["model"]["state"], "ready");
    assert_eq!(body["model"]["tool_calls"], true);
    assert_eq!(body["model"]["reasoning"], true);
    let (status, body) = post(&app, "/models/unload", json!({"id": "q8"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&app, "/tokenize", json!({"model": "q8", "prompt": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn tokenize_detokenize_apply_template() {
    let app = app().await;
    let reference = reference();
    for name in ["chat", "tools"] {
        let p = &reference["prompts"][name];
        let expected = ids(&p["token_ids"]);
        let (status, body) = post(
            &app,
            "/tokenize",
            json!({"model": "tiny", "prompt": p["text"]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["count"], expected.len());
        let mut request = json!({"model": "tiny", "messages": p["messages"],
                                 "chat_template_kwargs": p["chat_template_kwargs"]});
        if let Some(tools) = p.get("tools") {
            request["tools"] = tools.clone();
        }
        let (_, body) = post(&app, "/tokenize", request.clone()).await;
        assert_eq!(ids(&body["tokens"]), expected, "{name}");
        let (_, body) = post(&app, "/apply-template", request).await;
        assert_eq!(body["prompt"], p["text"]);
        let (_, body) = post(
            &app,
            "/detokenize",
            json!({"model": "tiny", "tokens": expected}),
        )
        .await;
        assert_eq!(body["text"], p["text"]);
    }
    let (status, body) = post(
        &app,
        "/detokenize",
        json!({"model": "tiny", "tokens": [999999]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn health_discovery_models_metrics() {
    let app = app().await;
    let (status, text) = get(&app, "/health").await;
    assert_eq!(status, StatusCode::OK);
    let health: helexa_node_api::Health = serde_json::from_str(&text).expect("Health");
    assert_eq!(health.status, helexa_node_api::NodeStatus::Ok);
    assert_eq!(health.models.len(), 1);
    assert_eq!(health.devices[0].vram_total_mb, 1024);
    let (_, text) = get(&app, "/discovery").await;
    let discovery: helexa_node_api::Discovery = serde_json::from_str(&text).expect("Discovery");
    assert_eq!(discovery.engine.abi_version, "1.0");
    let (_, text) = get(&app, "/models").await;
    let models: helexa_node_api::ModelList = serde_json::from_str(&text).expect("ModelList");
    assert_eq!(models.data[0].id, "tiny");
    assert_eq!(models.data[0].architecture, "Qwen3ForCausalLM");
    assert_eq!(models.data[0].context_length, 4096);
    let _ = post(&app, "/v1/chat/completions", tools_request(false)).await;
    let (status, text) = get(&app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains(
            "helexa_node_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("helexa_node_generated_tokens_total{model=\"tiny\"} 38"),
        "{text}"
    );
    assert!(
        text.contains("helexa_node_prompt_tokens_total{model=\"tiny\"} 258"),
        "{text}"
    );
}

#[tokio::test]
async fn admission_queue_full_is_429_with_retry_after() {
    let mut backend = scripted();
    backend.token_delay = Some(Duration::from_millis(20));
    let admission = Admission {
        max_in_flight: 1,
        max_queue: 0,
        queue_timeout: Duration::from_secs(5),
    };
    let app = app_with(backend, admission).await;
    let busy = {
        let app = app.clone();
        tokio::spawn(async move { post(&app, "/v1/chat/completions", tools_request(false)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(tools_request(false).to_string()))
        .expect("request");
    let (status, headers, text) = send(&app, request).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert!(text.contains("\"overloaded\""), "{text}");
    let (status, _) = busy.await.expect("join");
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn client_disconnect_cancels_generation() {
    let mut backend = scripted();
    backend.token_delay = Some(Duration::from_millis(100));
    let admission = Admission {
        max_in_flight: 1,
        max_queue: 1,
        queue_timeout: Duration::from_millis(1500),
    };
    let app = app_with(backend, admission).await;
    let prompt = &reference()["prompts"]["chat"];
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"model": "tiny", "messages": prompt["messages"], "stream": true,
                   "chat_template_kwargs": prompt["chat_template_kwargs"]})
            .to_string(),
        ))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("ok");
    assert!(first.data_ref().is_some());
    // The client goes away after the first chunk; 43 tokens at 100 ms would hold the only slot
    // for 4.3 s, far beyond the 1.5 s queue limit of the next request.
    drop(body);
    let started = std::time::Instant::now();
    let (status, answer) = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": prompt["messages"], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let (_, metrics) = get(&app, "/metrics").await;
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("helexa_node_generated_tokens_total{model=\"tiny\"} "))
        .expect("counter")
        .parse()
        .expect("number");
    assert!(
        generated < 43,
        "the cancelled generation stopped early: {generated}"
    );
}

/// Poll `/models` until `id` has `state` (or is absent for `None`); panics after 10 s.
async fn wait_for_state(app: &Router, id: &str, state: Option<&str>) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = get(app, "/models").await;
        let models: Value = serde_json::from_str(&text).expect("json");
        let entry = models["data"]
            .as_array()
            .expect("data")
            .iter()
            .find(|m| m["id"] == id)
            .cloned();
        if entry.as_ref().map(|m| m["state"].as_str().expect("state")) == state {
            return entry.unwrap_or(Value::Null);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never reached {state:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn load_request(body: Value) -> Request<Body> {
    json_request("/models/load", &body)
}

#[tokio::test]
async fn abandoned_load_and_unload_still_finish() {
    let mut backend = scripted();
    backend.load_delay = Some(Duration::from_millis(300));
    backend.token_delay = Some(Duration::from_millis(20));
    let backend = Arc::new(backend);
    let state = AppState::new(backend.clone(), Admission::default(), None).expect("state");
    let app = helexa_node::app(state);
    // The caller gives up long before the engine finishes loading (a gateway load timeout).
    let request = load_request(json!({"id": "tiny", "source": fixtures().join("tiny-qwen3")}));
    let abandoned = tokio::time::timeout(Duration::from_millis(20), app.clone().oneshot(request));
    assert!(abandoned.await.is_err(), "the load should still be running");
    let (_, text) = get(&app, "/models").await;
    assert!(text.contains("\"loading\""), "{text}");
    let info = wait_for_state(&app, "tiny", Some("ready")).await;
    assert_eq!(info["error"], Value::Null, "{info}");
    use helexa_node::backend::Backend as _;
    assert_eq!(backend.memory().expect("memory").models.len(), 1);

    // A non-streaming generation whose client goes away must not leave the gauge raised.
    let prompt = &reference()["prompts"]["chat"];
    let chat = json!({"model": "tiny", "messages": prompt["messages"], "max_tokens": 10});
    let request = json_request("/v1/chat/completions", &chat);
    let dropped = tokio::time::timeout(Duration::from_millis(60), app.clone().oneshot(request));
    assert!(
        dropped.await.is_err(),
        "the generation should still be running"
    );

    // An unload abandoned while it waits for a running generation still completes.
    let busy = {
        let app = app.clone();
        tokio::spawn(async move { post(&app, "/v1/chat/completions", chat).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let request = Request::post("/models/unload")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"id": "tiny"}).to_string()))
        .expect("request");
    let abandoned = tokio::time::timeout(Duration::from_millis(20), app.clone().oneshot(request));
    assert!(abandoned.await.is_err(), "the unload should be waiting");
    let (status, _) = busy.await.expect("join");
    assert_eq!(status, StatusCode::OK);
    wait_for_state(&app, "tiny", None).await;
    assert!(backend.memory().expect("memory").models.is_empty());
    let (_, metrics) = get(&app, "/metrics").await;
    assert!(
        metrics.contains("helexa_node_in_flight{model=\"tiny\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn device_fault_marks_the_model_failed_until_reloaded() {
    let backend = Arc::new(scripted());
    let state = AppState::new(backend.clone(), Admission::default(), None).expect("state");
    let app = helexa_node::app(state);
    let load = json!({"id": "tiny", "source": fixtures().join("tiny-qwen3")});
    let (status, body) = post(&app, "/models/load", load.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 3});
    backend
        .device_fault
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = post(&app, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "model_failed");
    backend
        .device_fault
        .store(false, std::sync::atomic::Ordering::SeqCst);

    let (_, text) = get(&app, "/models").await;
    let models: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(models["data"][0]["state"], "failed", "{text}");
    assert!(
        models["data"][0]["error"]
            .as_str()
            .expect("error")
            .contains("fake device lost"),
        "{text}"
    );
    let (_, text) = get(&app, "/health").await;
    let health: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(health["status"], "degraded", "{text}");
    // Later requests are refused at once, without reaching the engine.
    let request = json_request("/v1/chat/completions", &chat);
    let (status, headers, text) = send(&app, request).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("\"model_failed\""), "{text}");
    assert!(headers.contains_key(header::RETRY_AFTER));

    // Reloading the same id frees the faulted handle and serves again.
    use helexa_node::backend::Backend as _;
    let (status, body) = post(&app, "/models/load", load.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model"]["state"], "ready");
    assert_eq!(backend.memory().expect("memory").models.len(), 1);
    let (status, body) = post(&app, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, text) = get(&app, "/health").await;
    assert!(text.contains("\"ok\""), "{text}");

    // Fault again; this time unload then load.
    backend
        .device_fault
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, _) = post(&app, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    backend
        .device_fault
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = post(&app, "/models/unload", json!({"id": "tiny"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(backend.memory().expect("memory").models.is_empty());
    let (status, body) = post(&app, "/models/load", load).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn malformed_sources_are_client_errors() {
    let state = AppState::new(Arc::new(scripted()), Admission::default(), None).expect("state");
    let app = helexa_node::app(state);
    let tmp = tempfile::tempdir().expect("tempdir");
    let text_file = tmp.path().join("weights.bin");
    std::fs::write(&text_file, "not weights").expect("write");
    let corrupt = tmp.path().join("model.gguf");
    std::fs::write(&corrupt, "GGUF but not really").expect("write");
    for (source, needle) in [
        (json!("just-a-name"), "neither an existing path"),
        (json!("a b/c"), "neither an existing path"),
        (json!(text_file), "not a .gguf file"),
        (json!(corrupt), "not a readable GGUF file"),
    ] {
        let (status, body) = post(&app, "/models/load", json!({"id": "x", "source": source})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{source}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["param"], "source", "{body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(needle), "{message}");
        assert!(
            message.contains("org/name"),
            "says what is valid: {message}"
        );
    }
    let (_, models) = get(&app, "/models").await;
    assert!(!models.contains("\"x\""), "{models}");
}

#[tokio::test]
async fn stop_limits_and_prompt_param() {
    let app = app().await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": messages, "stop": ["a", "b", "c", "d", "e"]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "stop");
    let (status, body) = post(
        &app,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi", "stop": "x".repeat(257)}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "stop");
    // Four stops of the maximum length are fine.
    let stops: Vec<String> = (0..4).map(|i| format!("{i}").repeat(256)).collect();
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": messages, "stop": stops, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = post(
        &app,
        "/models/load",
        json!({"id": "short", "source": fixtures().join("tiny-qwen3"), "context_length": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(
        &app,
        "/v1/completions",
        json!({"model": "short", "prompt": "one two three four five six seven"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "prompt", "{body}");
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "short", "messages": messages}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "messages", "{body}");
}

/// A fake engine that records the prompt it was given and answers with `reply` (text encoded
/// with the fixture's tokenizer).
fn recording(reply: &str) -> (FakeBackend, Arc<std::sync::Mutex<Vec<u32>>>) {
    let tokenizer = tokenizers::Tokenizer::from_file(fixtures().join("tiny-qwen3/tokenizer.json"))
        .expect("tokenizer");
    let ids = tokenizer
        .encode(reply, false)
        .expect("encode")
        .get_ids()
        .to_vec();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let backend = FakeBackend::new(Box::new(move |prompt: &[u32]| {
        *record.lock().expect("lock") = prompt.to_vec();
        ids.clone()
    }));
    (backend, seen)
}

fn decode(ids: &[u32]) -> String {
    tokenizers::Tokenizer::from_file(fixtures().join("tiny-qwen3/tokenizer.json"))
        .expect("tokenizer")
        .decode(ids, false)
        .expect("decode")
}

/// `tool_choice` naming a tool, or `required`: the reply starts inside a call (its opening is
/// part of the prompt), so the model writes only what follows and the response is that call.
#[tokio::test]
async fn tool_choice_forces_a_call() {
    let reference = reference();
    let chat = &reference["prompts"]["chat"];
    let tools = &reference["prompts"]["tools"]["tools"];
    let cases = [
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": ",
            "{\"city\": \"Oslo\"}}\n</tool_call><|im_end|>",
        ),
        (
            json!("required"),
            "<tool_call>\n",
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>",
        ),
    ];
    for (choice, prompt_end, reply) in cases {
        let (backend, seen) = recording(reply);
        let app = app_with(backend, Admission::default()).await;
        let request = json!({"model": "tiny", "messages": chat["messages"], "tools": tools,
                             "tool_choice": choice, "temperature": 0});
        let (status, body) = post(&app, "/v1/chat/completions", request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let prompt = decode(&seen.lock().expect("lock"));
        assert!(prompt.ends_with(prompt_end), "{choice}: {prompt:?}");
        let choice_out = &body["choices"][0];
        assert_eq!(choice_out["finish_reason"], "tool_calls", "{body}");
        assert_eq!(choice_out["message"]["content"], Value::Null, "{body}");
        let calls = choice_out["message"]["tool_calls"]
            .as_array()
            .expect("calls");
        assert_eq!(calls.len(), 1, "{body}");
        assert_weather_call(&calls[0]);

        // Streamed, the same call arrives as one delta and no markup leaks into content.
        let streamed = json!({"model": "tiny", "messages": chat["messages"], "tools": tools,
                              "tool_choice": choice, "temperature": 0, "stream": true});
        let chunks = stream_chunks(&app, "/v1/chat/completions", streamed).await;
        let calls: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert_eq!(calls.len(), 1, "{chunks:?}");
        assert_weather_call(calls[0]);
        assert!(
            chunks.iter().all(|c| c["choices"][0]["delta"]["content"]
                .as_str()
                .is_none_or(str::is_empty)),
            "{chunks:?}"
        );
        assert!(
            chunks
                .iter()
                .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"),
            "{chunks:?}"
        );
    }
}

/// A `tool_choice` that cannot be honoured is a 400 naming the field, not silently ignored.
#[tokio::test]
async fn impossible_tool_choice_is_a_400() {
    let app = app().await;
    let reference = reference();
    let chat = &reference["prompts"]["chat"];
    let tools = &reference["prompts"]["tools"]["tools"];
    for (choice, with_tools) in [
        (json!("sometimes"), true),
        (json!({"type": "function"}), true),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            true,
        ),
        (json!("required"), false),
        (json!(42), true),
    ] {
        let mut request = json!({"model": "tiny", "messages": chat["messages"],
                                 "tool_choice": choice});
        if with_tools {
            request["tools"] = tools.clone();
        }
        let (status, body) = post(&app, "/v1/chat/completions", request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{choice}: {body}");
        assert_eq!(body["error"]["param"], "tool_choice", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
}
