//! Anthropic Messages through the gateway (translated to chat by the translator policy and
//! back): tool use non-stream and stream, and `count_tokens` against the node's `/tokenize`.

use serde_json::{Value, json};

use crate::harness::{MODEL, Stack, expected_tool_call, post_json, post_sse, prompt};

/// The reference `tools` tool definition in Anthropic's shape.
fn anthropic_tools() -> Value {
    prompt("tools")["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| {
            let f = &t["function"];
            json!({"name": f["name"], "description": f["description"], "input_schema": f["parameters"]})
        })
        .collect()
}

fn messages_request(stream: bool) -> Value {
    json!({
        "model": MODEL,
        // The reference's messages are plain user turns, valid as Anthropic messages too.
        "messages": prompt("tools")["messages"],
        "tools": anthropic_tools(),
        "max_tokens": 64,
        "temperature": 0,
        "stream": stream,
    })
}

#[tokio::test]
async fn messages_tool_use_non_stream() {
    let stack = Stack::shared().await;
    let answer = post_json(
        &stack,
        &format!("{}/v1/messages", stack.gateway),
        &messages_request(false),
    )
    .await;
    let (name, arguments) = expected_tool_call();
    assert_eq!(answer["type"], "message", "{answer}");
    assert_eq!(answer["role"], "assistant", "{answer}");
    assert_eq!(answer["stop_reason"], "tool_use", "{answer}");
    let blocks = answer["content"].as_array().expect("content");
    let uses: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "tool_use").collect();
    assert_eq!(uses.len(), 1, "{answer}");
    assert_eq!(uses[0]["name"], name.as_str());
    assert_eq!(uses[0]["input"], arguments, "{answer}");
    assert!(
        uses[0]["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{answer}"
    );
    for text in blocks.iter().filter_map(|b| b["text"].as_str()) {
        assert!(
            !text.contains("<tool_call>"),
            "raw tool-call text: {answer}"
        );
    }
    // Anthropic splits the prompt into uncached + cache-read tokens; together: the reference's.
    let usage = &answer["usage"];
    let prompt_tokens = prompt("tools")["token_ids"].as_array().expect("ids").len() as u64;
    let input = usage["input_tokens"].as_u64().unwrap_or(0)
        + usage["cache_read_input_tokens"].as_u64().unwrap_or(0)
        + usage["cache_creation_input_tokens"].as_u64().unwrap_or(0);
    assert_eq!(input, prompt_tokens, "{usage}");
}

#[tokio::test]
async fn messages_tool_use_stream_event_sequence() {
    let stack = Stack::shared().await;
    let events = post_sse(
        &stack,
        &format!("{}/v1/messages", stack.gateway),
        &messages_request(true),
    )
    .await;
    let parsed: Vec<(String, Value)> = events
        .iter()
        .map(|e| {
            let data: Value = serde_json::from_str(&e.data).expect("event data is JSON");
            let kind = data["type"].as_str().expect("type").to_owned();
            // Anthropic names every event after its data's type.
            assert_eq!(e.event.as_deref(), Some(kind.as_str()), "{e:?}");
            (kind, data)
        })
        .filter(|(kind, _)| kind != "ping")
        .collect();
    let kinds: Vec<&str> = parsed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"message_start"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"message_stop"), "{kinds:?}");
    assert_eq!(kinds[kinds.len() - 2], "message_delta", "{kinds:?}");
    let (name, arguments) = expected_tool_call();
    // Exactly one tool_use block: start, input_json_delta*, stop, with nothing else between.
    let block_kinds = &kinds[1..kinds.len() - 2];
    assert_eq!(
        block_kinds.first(),
        Some(&"content_block_start"),
        "{kinds:?}"
    );
    assert_eq!(block_kinds.last(), Some(&"content_block_stop"), "{kinds:?}");
    assert!(
        block_kinds[1..block_kinds.len() - 1]
            .iter()
            .all(|k| *k == "content_block_delta"),
        "{kinds:?}"
    );
    let start = &parsed[1].1;
    assert_eq!(start["content_block"]["type"], "tool_use", "{start}");
    assert_eq!(start["content_block"]["name"], name.as_str(), "{start}");
    let index = start["index"].clone();
    let mut partial = String::new();
    for (kind, data) in &parsed[2..parsed.len() - 3] {
        assert_eq!(kind, "content_block_delta");
        assert_eq!(data["index"], index, "{data}");
        assert_eq!(data["delta"]["type"], "input_json_delta", "{data}");
        partial.push_str(
            data["delta"]["partial_json"]
                .as_str()
                .expect("partial_json"),
        );
    }
    assert!(!partial.is_empty(), "no input_json_delta: {kinds:?}");
    let input: Value = serde_json::from_str(&partial).expect("the deltas form JSON");
    assert_eq!(input, arguments);
    let delta = &parsed[parsed.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use", "{delta}");
}

#[tokio::test]
async fn count_tokens_equals_the_nodes_tokenize() {
    let stack = Stack::shared().await;
    let counted = post_json(
        &stack,
        &format!("{}/v1/messages/count_tokens", stack.gateway),
        &json!({"model": MODEL, "messages": prompt("tools")["messages"], "tools": anthropic_tools()}),
    )
    .await;
    let tokenized = post_json(
        &stack,
        &format!("{}/tokenize", stack.node),
        &json!({
            "model": MODEL,
            "messages": prompt("tools")["messages"],
            "tools": prompt("tools")["tools"],
            "add_generation_prompt": true,
        }),
    )
    .await;
    let count = counted["input_tokens"].as_u64().expect("input_tokens");
    assert!(count > 0, "{counted}");
    assert_eq!(
        Some(count),
        tokenized["count"].as_u64(),
        "{counted} vs {tokenized}"
    );
    // Both equal the reference's rendering of the same conversation.
    let reference: Vec<Value> = prompt("tools")["token_ids"]
        .as_array()
        .expect("ids")
        .clone();
    assert_eq!(tokenized["tokens"], Value::Array(reference));
}
