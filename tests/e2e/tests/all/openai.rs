//! OpenAI chat completions through the gateway: tool calls (non-stream, stream, round trip),
//! reasoning split on the `think` prompt, `/v1/models` and error envelopes.

use serde_json::{Value, json};

use crate::harness::{
    MODEL, Stack, expected_tool_call, parse_arguments, post, post_json, post_sse, prompt,
};

/// The reference `tools` request: its messages and tool definition, greedy decoding.
fn tools_request(stream: bool) -> Value {
    let tools = prompt("tools");
    json!({
        "model": MODEL,
        "messages": tools["messages"],
        "tools": tools["tools"],
        "max_tokens": 64,
        "temperature": 0,
        "stream": stream,
    })
}

#[tokio::test]
async fn chat_tool_call_non_stream_matches_reference() {
    let stack = Stack::shared().await;
    let answer = post_json(
        &stack,
        &format!("{}/v1/chat/completions", stack.gateway),
        &tools_request(false),
    )
    .await;
    let (name, arguments) = expected_tool_call();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    let message = &choice["message"];
    let content = message["content"].as_str().unwrap_or("");
    assert!(
        !content.contains("<tool_call>"),
        "raw tool-call text leaked into content: {answer}"
    );
    let calls = message["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1, "{answer}");
    assert_eq!(calls[0]["type"], "function");
    assert!(
        calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{answer}"
    );
    assert_eq!(calls[0]["function"]["name"], name.as_str());
    assert_eq!(
        parse_arguments(&calls[0]["function"]["arguments"]),
        arguments
    );
    assert_eq!(
        arguments,
        json!({"city": "Oslo"}),
        "the reference's own answer"
    );
    // The prompt is the reference's rendering, token for token.
    let prompt_tokens = prompt("tools")["token_ids"]
        .as_array()
        .expect("token_ids")
        .len();
    assert_eq!(answer["usage"]["prompt_tokens"], prompt_tokens, "{answer}");
}

#[tokio::test]
async fn chat_tool_call_stream_reassembles_to_reference() {
    let stack = Stack::shared().await;
    let events = post_sse(
        &stack,
        &format!("{}/v1/chat/completions", stack.gateway),
        &tools_request(true),
    )
    .await;
    assert_eq!(
        events.last().map(|e| e.data.as_str()),
        Some("[DONE]"),
        "{events:?}"
    );
    // Reassemble per tool-call index as OpenAI clients do: id/name once, arguments appended.
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut content = String::new();
    let mut finish = Vec::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(&event.data).expect("chunk JSON");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        let choice = &chunk["choices"][0];
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish.push(reason.to_owned());
        }
        let delta = &choice["delta"];
        content.push_str(delta["content"].as_str().unwrap_or(""));
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().expect("tool call index") as usize;
            if calls.len() <= index {
                calls.resize(index + 1, Default::default());
            }
            let slot = &mut calls[index];
            if let Some(id) = call["id"].as_str() {
                slot.0 = id.to_owned();
            }
            if let Some(name) = call["function"]["name"].as_str() {
                slot.1.push_str(name);
            }
            slot.2
                .push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    let (name, arguments) = expected_tool_call();
    assert_eq!(finish, ["tool_calls"], "{events:?}");
    assert!(
        !content.contains("<tool_call>"),
        "raw tool-call text in content: {content:?}"
    );
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(!calls[0].0.is_empty(), "tool call without id: {calls:?}");
    assert_eq!(calls[0].1, name);
    assert_eq!(
        parse_arguments(&Value::String(calls[0].2.clone())),
        arguments
    );
}

#[tokio::test]
async fn tool_result_round_trip_gives_a_text_answer() {
    let stack = Stack::shared().await;
    let url = format!("{}/v1/chat/completions", stack.gateway);
    let first = post_json(&stack, &url, &tools_request(false)).await;
    let assistant = first["choices"][0]["message"].clone();
    let call = &assistant["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{first}");
    let tools = prompt("tools");
    let mut messages = tools["messages"].as_array().expect("messages").clone();
    messages.push(assistant.clone());
    messages.push(json!({
        "role": "tool",
        "tool_call_id": call["id"],
        "content": "{\"city\": \"Oslo\", \"temperature_c\": 7, \"sky\": \"cloudy\"}",
    }));
    let second = post_json(
        &stack,
        &url,
        &json!({
            "model": MODEL,
            "messages": messages,
            "tools": tools["tools"],
            "max_tokens": 64,
            "temperature": 0,
        }),
    )
    .await;
    let choice = &second["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap_or("");
    assert!(!content.trim().is_empty(), "no final text: {second}");
    assert!(
        ["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap_or("")),
        "{second}"
    );
    assert!(
        choice["message"]["tool_calls"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{second}"
    );
    // The tool result and the earlier call are part of the new prompt.
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().expect("usage");
    let second_prompt = second["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(
        second_prompt > first_prompt,
        "{first_prompt} → {second_prompt}"
    );
}

/// Greedy steps of `name` that are safe to compare in f32 (up to the first margin < 0.05).
fn safe_steps(name: &str) -> usize {
    prompt(name)["greedy_top1_minus_top2"]
        .as_array()
        .expect("margins")
        .iter()
        .position(|m| m.as_f64().unwrap_or(0.0) < 0.05)
        .unwrap_or(usize::MAX)
}

#[tokio::test]
async fn think_prompt_streams_reasoning_apart_from_content() {
    let stack = Stack::shared().await;
    let think = prompt("think");
    let greedy: Vec<u64> = think["greedy_token_ids"]
        .as_array()
        .expect("greedy_token_ids")
        .iter()
        .map(|t| t.as_u64().expect("token id"))
        .collect();
    // The reference's greedy answer opens with an *empty* think block (`<think>\n\n</think>\n\n`,
    // tokens 3 207 207 4 207 207): the expected reasoning is blank, the content follows it.
    let close = greedy
        .iter()
        .position(|&t| t == 4)
        .expect("</think> in the reference");
    let reference_text = think["greedy_text"].as_str().expect("greedy_text");
    let (reasoning_ref, _) = reference_text
        .trim_start_matches("<think>")
        .split_once("</think>")
        .expect("a think block");
    assert!(
        reasoning_ref.trim().is_empty(),
        "the reference's reasoning: {reasoning_ref:?}"
    );
    // Expected content: the tokens after `</think>\n\n`, up to the first low-margin step, as the
    // node's detokenizer spells them.
    let content_start = close + 3;
    let cut = safe_steps("think").min(greedy.len());
    let detok = post_json(
        &stack,
        &format!("{}/detokenize", stack.node),
        &json!({"model": MODEL, "tokens": greedy[content_start..cut]}),
    )
    .await;
    let expected_prefix = detok["text"].as_str().expect("text").to_owned();
    assert!(
        reference_text.contains(&expected_prefix),
        "{expected_prefix:?}"
    );

    let events = post_sse(
        &stack,
        &format!("{}/v1/chat/completions", stack.gateway),
        &json!({
            "model": MODEL,
            "messages": think["messages"],
            "max_tokens": greedy.len(),
            "temperature": 0,
            "stream": true,
        }),
    )
    .await;
    assert_eq!(
        events.last().map(|e| e.data.as_str()),
        Some("[DONE]"),
        "{events:?}"
    );
    let (mut reasoning, mut content) = (String::new(), String::new());
    let mut reasoning_after_content = false;
    let mut finish = None;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(&event.data).expect("chunk JSON");
        let choice = &chunk["choices"][0];
        if let Some(r) = choice["finish_reason"].as_str() {
            finish = Some(r.to_owned());
        }
        if let Some(r) = choice["delta"]["reasoning_content"].as_str() {
            reasoning_after_content |= !content.is_empty() && !r.is_empty();
            reasoning.push_str(r);
        }
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(
        !reasoning_after_content,
        "reasoning after content: {events:?}"
    );
    assert!(
        reasoning.trim().is_empty(),
        "reference reasoning is blank, got {reasoning:?}"
    );
    for tag in ["<think>", "</think>"] {
        assert!(
            !content.contains(tag),
            "{tag} leaked into content: {content:?}"
        );
    }
    assert!(
        content
            .trim_start()
            .starts_with(expected_prefix.trim_start()),
        "content {content:?} does not start with the reference's {expected_prefix:?}"
    );
    // 48 greedy tokens without a stop id in the reference.
    assert!(
        matches!(finish.as_deref(), Some("length" | "stop")),
        "{finish:?}"
    );
}

#[tokio::test]
async fn models_lists_tiny_qwen3_loaded_on_the_node() {
    let stack = Stack::shared().await;
    let answer: Value = reqwest::get(format!("{}/v1/models", stack.gateway))
        .await
        .expect("GET /v1/models")
        .json()
        .await
        .expect("JSON");
    assert_eq!(answer["object"], "list");
    let model = answer["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|m| m["id"] == MODEL)
        .unwrap_or_else(|| panic!("{MODEL} missing: {answer}"));
    assert_eq!(model["object"], "model");
    assert_eq!(model["loaded"], true, "{model}");
    assert_eq!(model["locations"], json!(["local"]), "{model}");
    // And the node agrees.
    let node: Value = reqwest::get(format!("{}/models", stack.node))
        .await
        .expect("GET node /models")
        .json()
        .await
        .expect("JSON");
    let on_node = node["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|m| m["id"] == MODEL)
        .unwrap_or_else(|| panic!("{MODEL} missing on the node: {node}"));
    assert_eq!(on_node["state"], "ready", "{on_node}");
}

/// An OpenAI error envelope: `{"error": {"message", "type", "code", "param"}}`.
fn assert_openai_error(text: &str) -> Value {
    let body: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    for key in ["code", "param"] {
        assert!(error.get(key).is_some(), "envelope lacks {key}: {body}");
    }
    body
}

#[tokio::test]
async fn missing_messages_is_a_400_in_the_openai_envelope() {
    let stack = Stack::shared().await;
    let (status, text) = post(
        &stack,
        &format!("{}/v1/chat/completions", stack.gateway),
        &json!({"model": MODEL, "max_tokens": 8}),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let body = assert_openai_error(&text);
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("messages"),
        "{body}"
    );
}

#[tokio::test]
async fn unknown_model_is_a_404_in_the_openai_envelope() {
    let stack = Stack::shared().await;
    let (status, text) = post(
        &stack,
        &format!("{}/v1/chat/completions", stack.gateway),
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404, "{text}");
    let body = assert_openai_error(&text);
    assert_eq!(body["error"]["param"], "model", "{body}");
}
