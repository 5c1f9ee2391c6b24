//! Integration tests of the default translator, through its public API.
//!
//! Expected values are written from the published API references (Anthropic Messages, OpenAI
//! Responses and chat completions), not captured from this crate's output. Streaming fixtures
//! under `tests/cases/*.jsonl` are chat chunk sequences, one `data:` payload per line, shaped like
//! those of vLLM-compatible servers (role chunk first, usage-only chunk with empty `choices`
//! last).

mod anthropic;
mod passthrough;
mod responses;

use helexa_policy_translator::{
    DefaultTranslator, ResponseStream, SseEvent, Surface, Translator, TranslatorStream,
};
use serde_json::Value;

/// The chunk payloads of a fixture.
pub fn fixture(name: &str) -> Vec<String> {
    let path = format!("{}/tests/cases/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses events, checking that each is named after its `type` as both surfaces require.
pub fn parse_events(events: &[SseEvent]) -> Vec<(String, Value)> {
    events
        .iter()
        .map(|e| {
            let data: Value = serde_json::from_str(&e.data).expect("event data is JSON");
            let name = e.event.clone().expect("event is named");
            assert_eq!(
                data["type"],
                Value::String(name.clone()),
                "event name matches type"
            );
            (name, data)
        })
        .collect()
}

/// Runs a whole fixture through a stream: every chunk, then `finish`.
pub fn run_stream(
    surface: Surface,
    request: &str,
    response_id: &str,
    fixture_name: &str,
) -> Vec<(String, Value)> {
    let translator = DefaultTranslator::configure("{}").expect("default settings");
    let mut stream: ResponseStream = translator.new_stream(surface, request, response_id);
    let mut events = Vec::new();
    for chunk in fixture(fixture_name) {
        events.extend(stream.push(&chunk).expect("chunk translates"));
    }
    events.extend(stream.finish().expect("finish translates"));
    // A finished stream stays finished.
    assert!(stream.finish().expect("second finish").is_empty());
    parse_events(&events)
}

/// Parses a JSON text produced by the translator.
pub fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("translator output is JSON")
}

/// A non-streamed chat completion body (as a node returns it) for response tests.
pub fn completion(message: Value, finish_reason: &str, usage: Value) -> String {
    serde_json::json!({
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "qwen3-8b",
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
        "usage": usage,
    })
    .to_string()
}

#[test]
fn settings_are_validated() {
    assert!(DefaultTranslator::configure("").is_ok());
    assert!(DefaultTranslator::configure(r#"{"responses_reasoning":"content"}"#).is_ok());
    let error = DefaultTranslator::configure(r#"{"responses_reasoning":"loud"}"#).unwrap_err();
    assert!(matches!(
        error,
        helexa_policy_translator::PolicyError::BadSettings(_)
    ));
    let error = DefaultTranslator::configure(r#"{"typo":1}"#).unwrap_err();
    assert!(matches!(
        error,
        helexa_policy_translator::PolicyError::BadSettings(_)
    ));
}
