//! Anthropic Messages ⇄ chat.

use helexa_policy_translator::{
    DefaultTranslator, PolicyError, RAW_ARGUMENTS_KEY, Surface, Translator, TranslatorStream,
};
use serde_json::{Value, json};

use crate::{completion, parse, parse_events, run_stream};

fn to_chat(request: &Value) -> Result<Value, PolicyError> {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    translator
        .request_to_chat(Surface::AnthropicMessages, &request.to_string())
        .map(|body| parse(&body))
}

fn from_chat(request: &Value, body: &str) -> Value {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    parse(
        &translator
            .response_from_chat(Surface::AnthropicMessages, &request.to_string(), body)
            .expect("response translates"),
    )
}

fn minimal() -> Value {
    json!({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]})
}

#[test]
fn request_with_every_feature() {
    let request = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [
            {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Answer briefly."}
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in these images?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Two images.", "signature": "c2ln"},
                {"type": "text", "text": "Let me look up the weather."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Rome"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18°C"},
                {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": true,
                 "content": [{"type": "text", "text": "service"}, {"type": "text", "text": "unavailable"}]},
                {"type": "text", "text": "Thanks"}
            ]},
            {"role": "assistant", "content": "You're welcome."},
            {"role": "user", "content": "Bye"}
        ],
        "tools": [
            {"name": "get_weather", "description": "Current weather",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "stop_sequences": ["\n\nHuman:"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stream": true,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "metadata": {"user_id": "user-42"},
        "service_tier": "auto",
        "some_future_field": {"x": 1}
    });
    let expected = json!({
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "You are helpful.\nAnswer briefly."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in these images?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
            ]},
            {"role": "assistant", "content": "Let me look up the weather.", "reasoning_content": "Two images.",
             "tool_calls": [
                {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "toolu_02", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}
             ]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "18°C"},
            {"role": "tool", "tool_call_id": "toolu_02", "content": "Error: service\nunavailable"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
            {"role": "user", "content": "Bye"}
        ],
        "max_tokens": 1024,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["\n\nHuman:"],
        "stream": true,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true},
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }}],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "chat_template_kwargs": {"enable_thinking": true},
        "user": "user-42"
    });
    assert_eq!(to_chat(&request).expect("translates"), expected);
}

#[test]
fn system_string_tool_choices_and_thinking_off() {
    let mut request = minimal();
    request["system"] = json!("Be terse.");
    request["thinking"] = json!({"type": "disabled"});
    request["tool_choice"] = json!({"type": "tool", "name": "lookup"});
    let chat = to_chat(&request).expect("translates");
    assert_eq!(
        chat["messages"][0],
        json!({"role": "system", "content": "Be terse."})
    );
    assert_eq!(
        chat["messages"][1],
        json!({"role": "user", "content": "Hi"})
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "lookup"}})
    );
    assert_eq!(
        chat["chat_template_kwargs"],
        json!({"enable_thinking": false})
    );
    assert!(chat.get("stream").is_none() && chat.get("parallel_tool_calls").is_none());

    for (choice, mapped) in [("auto", "auto"), ("none", "none"), ("any", "required")] {
        request["tool_choice"] = json!({"type": choice});
        assert_eq!(
            to_chat(&request).expect("translates")["tool_choice"],
            json!(mapped)
        );
    }
}

#[test]
fn images_in_tool_results_follow_as_a_user_message() {
    let mut request = minimal();
    request["messages"] = json!([
        {"role": "user", "content": "Screenshot please"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "done"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}}
        ]}]}
    ]);
    let chat = to_chat(&request).expect("translates");
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "user", "content": "Screenshot please"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "t1", "content": "done"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}
        ])
    );
}

#[test]
fn invalid_requests_name_the_field() {
    let cases = [
        (json!({"max_tokens": 1, "messages": []}), "`model`"),
        (json!({"model": "m", "messages": []}), "`max_tokens`"),
        (
            json!({"model": "m", "max_tokens": 0, "messages": []}),
            "`max_tokens`",
        ),
        (
            json!({"model": "m", "max_tokens": "9", "messages": []}),
            "`max_tokens`",
        ),
        (json!({"model": "m", "max_tokens": 1}), "`messages`"),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}),
            "`messages[0].role`",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": 3}]}),
            "`messages[0].content`",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]}),
            "`messages[0].content[0].source.type`",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [], "tool_choice": {"type": "tool"}}),
            "`tool_choice.name`",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [], "temperature": "hot"}),
            "`temperature`",
        ),
    ];
    for (request, field) in cases {
        match to_chat(&request) {
            Err(PolicyError::InvalidInput(message)) => {
                assert!(message.contains(field), "{message:?} should name {field}");
            }
            other => panic!("{request} should be invalid input, got {other:?}"),
        }
    }
    let translator = DefaultTranslator::configure("{}").expect("settings");
    assert!(matches!(
        translator.request_to_chat(Surface::AnthropicMessages, "{not json"),
        Err(PolicyError::InvalidInput(_))
    ));
}

#[test]
fn response_with_text_only() {
    let body = completion(
        json!({"role": "assistant", "content": "Hello!"}),
        "stop",
        json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 4}}),
    );
    assert_eq!(
        from_chat(&minimal(), &body),
        json!({
            "id": "msg_abc123",
            "type": "message",
            "role": "assistant",
            "model": "qwen3-8b",
            "content": [{"type": "text", "text": "Hello!"}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 6, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}
        })
    );
}

#[test]
fn response_with_reasoning_text_and_tool_calls() {
    let body = completion(
        json!({
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Need weather.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": ""}},
                {"id": "call_3", "type": "function", "function": {"name": "broken", "arguments": "{\"a\": "}}
            ]
        }),
        "tool_calls",
        json!({"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}),
    );
    let message = from_chat(&minimal(), &body);
    assert_eq!(
        message["content"],
        json!([
            {"type": "thinking", "thinking": "Need weather.", "signature": ""},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "noop", "input": {}},
            {"type": "tool_use", "id": "call_3", "name": "broken", "input": {RAW_ARGUMENTS_KEY: "{\"a\": "}}
        ])
    );
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(message["usage"]["input_tokens"], 30);
    assert_eq!(message["usage"]["output_tokens"], 20);

    // The raw fallback round-trips: sent back as history, the model sees what it wrote.
    let mut request = minimal();
    request["messages"] = json!([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [message["content"][4].clone()]}
    ]);
    let chat = to_chat(&request).expect("translates");
    assert_eq!(
        chat["messages"][1]["tool_calls"][0]["function"]["arguments"],
        "{\"a\": "
    );
}

#[test]
fn response_stop_reasons() {
    let mut request = minimal();
    request["stop_sequences"] = json!(["END"]);
    let usage = json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2});
    let length = completion(json!({"content": "cut"}), "length", usage.clone());
    assert_eq!(from_chat(&request, &length)["stop_reason"], "max_tokens");

    // A node that reports the matched stop string (vLLM's `stop_reason`).
    let mut stopped: Value = parse(&completion(
        json!({"content": "done"}),
        "stop",
        usage.clone(),
    ));
    stopped["choices"][0]["stop_reason"] = json!("END");
    let message = from_chat(&request, &stopped.to_string());
    assert_eq!(
        (
            message["stop_reason"].clone(),
            message["stop_sequence"].clone()
        ),
        (json!("stop_sequence"), json!("END"))
    );

    // Tool calls finished with `stop` by lenient servers are still tool use.
    let tools = completion(
        json!({"content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
        "stop",
        usage,
    );
    assert_eq!(from_chat(&request, &tools)["stop_reason"], "tool_use");
}

#[test]
fn response_errors_are_internal() {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    for body in ["not json", r#"{"id":"x","choices":[]}"#] {
        assert!(matches!(
            translator.response_from_chat(Surface::AnthropicMessages, "{}", body),
            Err(PolicyError::Internal(_))
        ));
    }
}

/// `(event name, index or -1, delta type or block type or "")` for compact sequence assertions.
fn shape(events: &[(String, Value)]) -> Vec<(String, i64, String)> {
    events
        .iter()
        .map(|(name, data)| {
            let index = data["index"].as_i64().unwrap_or(-1);
            let detail = data["delta"]["type"]
                .as_str()
                .or(data["content_block"]["type"].as_str())
                .or(data["delta"]["stop_reason"].as_str())
                .unwrap_or_default();
            (name.clone(), index, detail.to_owned())
        })
        .collect()
}

fn ev(name: &str, index: i64, detail: &str) -> (String, i64, String) {
    (name.to_owned(), index, detail.to_owned())
}

/// Concatenates the deltas of content block `index` (text, thinking or partial JSON).
fn reassemble(events: &[(String, Value)], index: i64) -> String {
    events
        .iter()
        .filter(|(name, data)| name == "content_block_delta" && data["index"] == index)
        .filter_map(|(_, data)| {
            let delta = &data["delta"];
            delta["text"]
                .as_str()
                .or(delta["thinking"].as_str())
                .or(delta["partial_json"].as_str())
        })
        .collect()
}

const REQUEST: &str = r#"{"model":"claude-x","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

#[test]
fn stream_text_only() {
    let events = run_stream(
        Surface::AnthropicMessages,
        REQUEST,
        "msg_h1",
        "stream_text.jsonl",
    );
    assert_eq!(
        shape(&events),
        vec![
            ev("message_start", -1, ""),
            ev("content_block_start", 0, "text"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_stop", 0, ""),
            ev("message_delta", -1, "end_turn"),
            ev("message_stop", -1, ""),
        ]
    );
    assert_eq!(reassemble(&events, 0), "Hello, world!");
    let start = &events[0].1["message"];
    assert_eq!(start["id"], "msg_h1");
    assert_eq!(start["model"], "qwen3-8b");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(
        events[6].1,
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"input_tokens": 12, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8}
        })
    );
}

#[test]
fn stream_message_start_without_usage_claims_nothing() {
    // A node without continuous usage stats: the prompt size is unknown at the start.
    let events = run_stream(
        Surface::AnthropicMessages,
        REQUEST,
        "msg_h1",
        "stream_text.jsonl",
    );
    assert_eq!(
        events[0].1["message"]["usage"],
        json!({"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    );
}

/// `stream_text.jsonl` as a node with `continuous_usage_stats` sends it: running counts on
/// every chunk (the cache hit only known at the end), then the usage-only chunk.
fn continuous_usage_chunks() -> Vec<String> {
    let mut chunks: Vec<Value> = crate::fixture("stream_text.jsonl")
        .iter()
        .map(|c| serde_json::from_str(c).expect("fixture chunk"))
        .collect();
    let last = chunks.len() - 1;
    for (generated, chunk) in chunks[..last].iter_mut().enumerate() {
        let generated = generated.min(4);
        chunk["usage"] = json!({"prompt_tokens": 20, "completion_tokens": generated,
                                "total_tokens": 20 + generated});
    }
    chunks[last - 1]["usage"] = chunks[last]["usage"].clone();
    chunks.iter().map(Value::to_string).collect()
}

#[test]
fn stream_message_start_with_continuous_usage() {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    let mut stream = translator.new_stream(Surface::AnthropicMessages, REQUEST, "msg_u");
    let mut events = Vec::new();
    for chunk in continuous_usage_chunks() {
        events.extend(stream.push(&chunk).expect("chunk translates"));
    }
    events.extend(stream.finish().expect("finish"));
    let events = parse_events(&events);
    assert_eq!(
        shape(&events),
        vec![
            ev("message_start", -1, ""),
            ev("content_block_start", 0, "text"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_stop", 0, ""),
            ev("message_delta", -1, "end_turn"),
            ev("message_stop", -1, ""),
        ]
    );
    // The first chunk's prompt count, nothing cached known yet.
    assert_eq!(
        events[0].1["message"]["usage"],
        json!({"input_tokens": 20, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    );
    // message_delta keeps the final counts (cached tokens split out of the input).
    assert_eq!(
        events[6].1["usage"],
        json!({"input_tokens": 12, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8})
    );
}

#[test]
fn stream_message_start_splits_cached_tokens() {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    let mut stream = translator.new_stream(Surface::AnthropicMessages, REQUEST, "msg_c");
    let first = r#"{"id":"chatcmpl-c","object":"chat.completion.chunk","created":1700000000,"model":"qwen3-8b","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":{"prompt_tokens":300,"completion_tokens":0,"total_tokens":300,"prompt_tokens_details":{"cached_tokens":256}}}"#;
    let events = parse_events(&stream.push(first).expect("first chunk"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "message_start");
    assert_eq!(events[0].1["message"]["model"], "qwen3-8b");
    assert_eq!(
        events[0].1["message"]["usage"],
        json!({"input_tokens": 44, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 256})
    );

    // message_start forced by a keepalive before any chunk: the count is unknown, as before.
    let mut stream = translator.new_stream(Surface::AnthropicMessages, REQUEST, "msg_k");
    let events = parse_events(&stream.keepalive());
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 0);
    assert!(
        parse_events(&stream.push(first).expect("first chunk"))
            .iter()
            .all(|(name, _)| name != "message_start"),
        "message_start is not repeated"
    );
}

#[test]
fn stream_reasoning_then_text() {
    let events = run_stream(
        Surface::AnthropicMessages,
        REQUEST,
        "h2",
        "stream_reasoning_text.jsonl",
    );
    assert_eq!(
        shape(&events),
        vec![
            ev("message_start", -1, ""),
            ev("content_block_start", 0, "thinking"),
            ev("content_block_delta", 0, "thinking_delta"),
            ev("content_block_delta", 0, "thinking_delta"),
            ev("content_block_delta", 0, "thinking_delta"),
            ev("content_block_delta", 0, "signature_delta"),
            ev("content_block_stop", 0, ""),
            ev("content_block_start", 1, "text"),
            ev("content_block_delta", 1, "text_delta"),
            ev("content_block_delta", 1, "text_delta"),
            ev("content_block_stop", 1, ""),
            ev("message_delta", -1, "end_turn"),
            ev("message_stop", -1, ""),
        ]
    );
    assert_eq!(events[0].1["message"]["id"], "msg_h2");
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    assert_eq!(reassemble(&events, 0), "The user greets me.\n");
    assert_eq!(reassemble(&events, 1), "Hi there.");
}

#[test]
fn stream_text_then_two_tool_calls() {
    let events = run_stream(
        Surface::AnthropicMessages,
        REQUEST,
        "msg_h3",
        "stream_text_two_tools.jsonl",
    );
    assert_eq!(
        shape(&events),
        vec![
            ev("message_start", -1, ""),
            ev("content_block_start", 0, "text"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_delta", 0, "text_delta"),
            ev("content_block_stop", 0, ""),
            ev("content_block_start", 1, "tool_use"),
            ev("content_block_delta", 1, "input_json_delta"),
            ev("content_block_delta", 1, "input_json_delta"),
            ev("content_block_delta", 1, "input_json_delta"),
            ev("content_block_stop", 1, ""),
            ev("content_block_start", 2, "tool_use"),
            ev("content_block_delta", 2, "input_json_delta"),
            ev("content_block_delta", 2, "input_json_delta"),
            ev("content_block_stop", 2, ""),
            ev("message_delta", -1, "tool_use"),
            ev("message_stop", -1, ""),
        ]
    );
    assert_eq!(reassemble(&events, 0), "Let me check both cities.");
    assert_eq!(
        events[5].1["content_block"],
        json!({"type": "tool_use", "id": "call_paris", "name": "get_weather", "input": {}})
    );
    assert_eq!(events[10].1["content_block"]["id"], "call_rome");
    let paris: Value = serde_json::from_str(&reassemble(&events, 1)).expect("arguments are JSON");
    let rome: Value = serde_json::from_str(&reassemble(&events, 2)).expect("arguments are JSON");
    assert_eq!(
        (paris, rome),
        (json!({"city": "Paris"}), json!({"city": "Rome"}))
    );
    assert_eq!(events[14].1["usage"]["output_tokens"], 40);
}

#[test]
fn stream_cut_by_length() {
    let events = run_stream(
        Surface::AnthropicMessages,
        REQUEST,
        "msg_h4",
        "stream_length.jsonl",
    );
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(
        events[5].1["delta"],
        json!({"stop_reason": "max_tokens", "stop_sequence": null})
    );
    assert_eq!(reassemble(&events, 0), "Once upon a time");
}

#[test]
fn stream_keepalive_fail_and_upstream_error() {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    let mut stream = translator.new_stream(Surface::AnthropicMessages, REQUEST, "msg_k");
    // A ping before any chunk still comes after message_start (with the requested model).
    let first = parse_events(&stream.keepalive());
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].0, "message_start");
    assert_eq!(first[0].1["message"]["model"], "claude-x");
    assert_eq!(first[1].1, json!({"type": "ping"}));
    let again = parse_events(&stream.keepalive());
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, "ping");
    let chunk = crate::fixture("stream_text.jsonl")[1].clone();
    let events = parse_events(&stream.push(&chunk).expect("chunk"));
    assert_eq!(
        events[0].0, "content_block_start",
        "message_start is not repeated"
    );
    let failed = parse_events(&stream.fail("node went away"));
    assert_eq!(
        failed,
        vec![(
            "error".to_owned(),
            json!({"type": "error", "error": {"type": "api_error", "message": "node went away"}})
        )]
    );
    assert!(stream.finish().expect("finish after fail").is_empty());
    assert!(stream.keepalive().is_empty());

    let mut stream = translator.new_stream(Surface::AnthropicMessages, REQUEST, "msg_e");
    let events = parse_events(
        &stream
            .push(r#"{"error":{"message":"CUDA error","type":"server_error"}}"#)
            .expect("error chunk"),
    );
    assert_eq!(
        events
            .last()
            .map(|(n, d)| (n.as_str(), d["error"]["message"].clone())),
        Some(("error", json!("CUDA error")))
    );
    assert!(
        stream
            .push("not json at all")
            .expect("ignored after the end")
            .is_empty()
    );

    let mut stream = translator.new_stream(Surface::AnthropicMessages, REQUEST, "msg_bad");
    assert!(matches!(
        stream.push("not json"),
        Err(PolicyError::Internal(_))
    ));
}
