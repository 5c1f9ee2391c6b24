//! The default translator through wasm: Anthropic Messages ⇄ OpenAI chat, whole and
//! streamed (expected shapes from the Anthropic Messages API reference).

use helexa_policy_runtime::*;
use serde_json::{Value, json};

use crate::common::*;

const ANTHROPIC_REQUEST: &str = r#"{
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "system": "Be brief.",
    "messages": [{"role": "user", "content": "Hello"}],
    "stream": false
}"#;

fn chat_completion() -> String {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "qwen3-8b",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hi there"},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    })
    .to_string()
}

#[test]
fn an_anthropic_request_and_response_round_trip() {
    let (runtime, registry) = runtime();
    let set = runtime.default_set().unwrap();

    let chat: Value = serde_json::from_str(
        &set.request_to_chat(Surface::AnthropicMessages, ANTHROPIC_REQUEST)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(chat["model"], "claude-sonnet-4-5");
    let messages = chat["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "{chat}");
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[1]["role"], "user");
    let text = |m: &Value| match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        other => panic!("content {other}"),
    };
    assert_eq!(text(&messages[0]), "Be brief.");
    assert_eq!(text(&messages[1]), "Hello");
    let max = chat
        .get("max_completion_tokens")
        .or_else(|| chat.get("max_tokens"));
    assert_eq!(max, Some(&json!(100)), "{chat}");

    let message: Value = serde_json::from_str(
        &set.response_from_chat(
            Surface::AnthropicMessages,
            ANTHROPIC_REQUEST,
            &chat_completion(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"][0]["type"], "text");
    assert_eq!(message["content"][0]["text"], "Hi there");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["input_tokens"], 5);
    assert_eq!(message["usage"]["output_tokens"], 2);
    assert_eq!(calls(&registry, "default", "translator", "ok"), 2);
}

#[test]
fn a_malformed_client_body_is_invalid_input_not_a_fallback() {
    let (runtime, registry) = runtime();
    let set = runtime.default_set().unwrap();
    let error = set
        .request_to_chat(Surface::AnthropicMessages, "{not json")
        .unwrap_err();
    assert!(
        matches!(error, TranslateError::InvalidInput(_)),
        "{error:?}"
    );
    assert_eq!(calls(&registry, "default", "translator", "error"), 0);
    assert_eq!(calls(&registry, "default", "translator", "fallback"), 0);
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "qwen3-8b",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    })
    .to_string()
}

#[test]
fn an_anthropic_stream_is_translated_event_by_event() {
    let (runtime, _) = runtime();
    let set = runtime.default_set().unwrap();
    let mut stream = set
        .response_stream(Surface::AnthropicMessages, ANTHROPIC_REQUEST, "msg_test1")
        .unwrap();
    let mut events = Vec::new();
    events.extend(
        stream
            .push(&chunk(json!({"role": "assistant", "content": ""}), None))
            .unwrap(),
    );
    events.extend(stream.push(&chunk(json!({"content": "Hi"}), None)).unwrap());
    events.extend(stream.keepalive());
    events.extend(
        stream
            .push(&chunk(json!({"content": " there"}), None))
            .unwrap(),
    );
    events.extend(stream.push(&chunk(json!({}), Some("stop"))).unwrap());
    events.extend(stream.finish().unwrap());
    assert!(stream.is_ended());

    let names: Vec<&str> = events.iter().filter_map(|e| e.event.as_deref()).collect();
    let position = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no {name} in {names:?}"))
    };
    assert!(position("message_start") < position("content_block_start"));
    assert!(position("content_block_start") < position("content_block_delta"));
    assert!(position("content_block_stop") < position("message_delta"));
    assert_eq!(names.last(), Some(&"message_stop"), "{names:?}");
    assert!(names.contains(&"ping"), "keepalive is a ping: {names:?}");
    let text: String = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["delta"]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(text, "Hi there");
    let start: Value = serde_json::from_str(&events[position("message_start")].data).unwrap();
    assert_eq!(start["message"]["id"], "msg_test1");
}

#[test]
fn an_upstream_failure_ends_the_stream_with_an_error_event() {
    let (runtime, _) = runtime();
    let set = runtime.default_set().unwrap();
    let mut stream = set
        .response_stream(Surface::AnthropicMessages, ANTHROPIC_REQUEST, "msg_test2")
        .unwrap();
    stream
        .push(&chunk(json!({"role": "assistant", "content": "Hi"}), None))
        .unwrap();
    let events = stream.fail("node went away");
    assert!(
        events.iter().any(|e| e.event.as_deref() == Some("error")),
        "{events:?}"
    );
    assert!(stream.is_ended());
    assert!(
        stream
            .push(&chunk(json!({"content": "late"}), None))
            .unwrap()
            .is_empty()
    );
}
