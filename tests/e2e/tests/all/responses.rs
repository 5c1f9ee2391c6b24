//! OpenAI Responses through the gateway (translated to chat and back): a function call,
//! non-stream and stream.

use serde_json::{Value, json};

use crate::harness::{
    MODEL, Stack, expected_tool_call, parse_arguments, post_json, post_sse, prompt,
};

/// The reference tool in the Responses shape (flat: `type`, `name`, `parameters`).
fn responses_request(stream: bool) -> Value {
    let tools: Vec<Value> = prompt("tools")["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| {
            let f = &t["function"];
            json!({"type": "function", "name": f["name"], "description": f["description"], "parameters": f["parameters"]})
        })
        .collect();
    json!({
        "model": MODEL,
        "input": prompt("tools")["messages"],
        "tools": tools,
        "max_output_tokens": 64,
        "temperature": 0,
        "stream": stream,
    })
}

fn assert_function_call(response: &Value) {
    let (name, arguments) = expected_tool_call();
    let calls: Vec<&Value> = response["output"]
        .as_array()
        .expect("output")
        .iter()
        .filter(|item| item["type"] == "function_call")
        .collect();
    assert_eq!(calls.len(), 1, "{response}");
    assert_eq!(calls[0]["name"], name.as_str(), "{response}");
    assert!(
        calls[0]["call_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{response}"
    );
    assert_eq!(
        parse_arguments(&calls[0]["arguments"]),
        arguments,
        "{response}"
    );
}

#[tokio::test]
async fn responses_function_call_non_stream() {
    let stack = Stack::shared().await;
    let response = post_json(
        &stack,
        &format!("{}/v1/responses", stack.gateway),
        &responses_request(false),
    )
    .await;
    assert_eq!(response["object"], "response", "{response}");
    assert_eq!(response["status"], "completed", "{response}");
    assert_function_call(&response);
}

#[tokio::test]
async fn responses_stream_ends_with_completed() {
    let stack = Stack::shared().await;
    let events = post_sse(
        &stack,
        &format!("{}/v1/responses", stack.gateway),
        &responses_request(true),
    )
    .await;
    let parsed: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("event data is JSON"))
        .collect();
    let kinds: Vec<&str> = parsed
        .iter()
        .map(|d| d["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds.first(), Some(&"response.created"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"response.completed"), "{kinds:?}");
    // Sequence numbers count up from 0 without gaps.
    for (i, data) in parsed.iter().enumerate() {
        assert_eq!(data["sequence_number"], i, "{data}");
    }
    let streamed: String = parsed
        .iter()
        .filter(|d| d["type"] == "response.function_call_arguments.delta")
        .map(|d| d["delta"].as_str().unwrap_or(""))
        .collect();
    let (_, arguments) = expected_tool_call();
    assert_eq!(parse_arguments(&Value::String(streamed)), arguments);
    let completed = &parsed[parsed.len() - 1]["response"];
    assert_eq!(completed["status"], "completed", "{completed}");
    assert_function_call(completed);
}
