//! OpenAI Responses ⇄ chat.

use helexa_policy_translator::{
    DefaultTranslator, PolicyError, Surface, Translator, TranslatorStream,
};
use serde_json::{Value, json};

use crate::{completion, fixture, parse, parse_events, run_stream};

fn to_chat(request: &Value) -> Result<Value, PolicyError> {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    translator
        .request_to_chat(Surface::OpenaiResponses, &request.to_string())
        .map(|body| parse(&body))
}

fn from_chat(settings: &str, request: &Value, body: &str) -> Value {
    let translator = DefaultTranslator::configure(settings).expect("settings");
    parse(
        &translator
            .response_from_chat(Surface::OpenaiResponses, &request.to_string(), body)
            .expect("response translates"),
    )
}

#[test]
fn request_with_every_feature() {
    let request = json!({
        "model": "gpt-5",
        "instructions": "You are helpful.",
        "input": [
            {"type": "message", "role": "developer", "content": "Use metric units."},
            {"role": "user", "content": [
                {"type": "input_text", "text": "Weather in Paris and Rome? See map:"},
                {"type": "input_image", "image_url": "https://example.com/map.png", "detail": "low"}
            ]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Two cities."}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_p", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "id": "fc_2", "call_id": "call_r", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "call_p", "output": "18C"},
            {"type": "function_call_output", "call_id": "call_r", "output": [{"type": "input_text", "text": "21C"}]},
            {"type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Paris 18C, Rome 21C.", "annotations": []}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}]}
        ],
        "tools": [
            {"type": "function", "name": "get_weather", "description": "Current weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, "strict": true},
            {"type": "web_search"}
        ],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": false,
        "max_output_tokens": 500,
        "temperature": 0.2,
        "top_p": 0.8,
        "stream": true,
        "reasoning": {"effort": "minimal", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "weather", "strict": true,
                            "schema": {"type": "object", "properties": {"t": {"type": "number"}}}}},
        "store": false,
        "include": ["reasoning.encrypted_content"],
        "user": "u-1"
    });
    let expected = json!({
        "model": "gpt-5",
        "messages": [
            {"role": "system", "content": "You are helpful.\nUse metric units."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Rome? See map:"},
                {"type": "image_url", "image_url": {"url": "https://example.com/map.png", "detail": "low"}}
            ]},
            {"role": "assistant", "content": null, "reasoning_content": "Two cities.", "tool_calls": [
                {"id": "call_p", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_r", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_p", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_r", "content": "21C"},
            {"role": "assistant", "content": "Paris 18C, Rome 21C."},
            {"role": "user", "content": "Thanks"}
        ],
        "max_tokens": 500,
        "temperature": 0.2,
        "top_p": 0.8,
        "parallel_tool_calls": false,
        "stream": true,
        "stream_options": {"include_usage": true},
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "strict": true
        }}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "chat_template_kwargs": {"enable_thinking": false},
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "weather", "strict": true,
            "schema": {"type": "object", "properties": {"t": {"type": "number"}}}
        }},
        "user": "u-1"
    });
    assert_eq!(to_chat(&request).expect("translates"), expected);
}

#[test]
fn string_input_effort_and_text_with_calls_merge() {
    let chat = to_chat(&json!({"model": "m", "input": "Hello", "reasoning": {"effort": "high"}, "tool_choice": "required"}))
        .expect("translates");
    assert_eq!(
        chat["messages"],
        json!([{"role": "user", "content": "Hello"}])
    );
    assert_eq!(
        chat["chat_template_kwargs"],
        json!({"enable_thinking": true})
    );
    assert_eq!(chat["tool_choice"], "required");
    assert!(chat.get("max_tokens").is_none() && chat.get("stream").is_none());

    // A model turn with text and a call (message item, then function_call item) is one
    // assistant message again, as the model produced it.
    let chat = to_chat(&json!({"model": "m", "input": [
        {"role": "user", "content": "go"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Calling."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}
    ]}))
    .expect("translates");
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "Calling.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}
        ])
    );
}

#[test]
fn invalid_requests_name_the_field() {
    let cases = [
        (json!({"input": "x"}), "`model`"),
        (json!({"model": "m"}), "`input`"),
        (json!({"model": "m", "input": 5}), "`input`"),
        (
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            "`previous_response_id`",
        ),
        (
            json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
            "`input[0]`",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "name": "f"}]}),
            "`input[0].call_id`",
        ),
        (
            json!({"model": "m", "input": [{"role": "tool", "content": "x"}]}),
            "`input[0].role`",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": "many"}),
            "`max_output_tokens`",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}),
            "`text.format.name`",
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
}

fn request() -> Value {
    json!({"model": "gpt-x", "input": "Hi", "instructions": "Be nice.", "max_output_tokens": 64,
           "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]})
}

#[test]
fn response_with_text_reasoning_and_tool_calls() {
    let body = completion(
        json!({
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Need weather.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}
            ]
        }),
        "tool_calls",
        json!({"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50,
               "prompt_tokens_details": {"cached_tokens": 10}, "completion_tokens_details": {"reasoning_tokens": 5}}),
    );
    let response = from_chat("{}", &request(), &body);
    assert_eq!(response["id"], "resp_abc123");
    assert_eq!(response["object"], "response");
    assert_eq!(response["created_at"], 1_700_000_000);
    assert_eq!(response["status"], "completed");
    assert_eq!(response["model"], "qwen3-8b");
    assert_eq!(response["incomplete_details"], Value::Null);
    assert_eq!(response["instructions"], "Be nice.");
    assert_eq!(response["max_output_tokens"], 64);
    assert_eq!(response["tools"], request()["tools"]);
    assert_eq!(
        response["output"],
        json!([
            {"type": "reasoning", "id": "rs_abc123_0", "status": "completed",
             "summary": [{"type": "summary_text", "text": "Need weather."}]},
            {"type": "message", "id": "msg_abc123_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
            {"type": "function_call", "id": "fc_abc123_2", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
            {"type": "function_call", "id": "fc_abc123_3", "call_id": "call_2", "name": "get_weather",
             "arguments": "{\"city\":\"Rome\"}", "status": "completed"}
        ])
    );
    assert_eq!(
        response["usage"],
        json!({"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10},
               "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 50})
    );

    // Raw reasoning content instead of a summary, when the operator asks for it.
    let response = from_chat(r#"{"responses_reasoning":"content"}"#, &request(), &body);
    assert_eq!(
        response["output"][0],
        json!({"type": "reasoning", "id": "rs_abc123_0", "status": "completed", "summary": [],
               "content": [{"type": "reasoning_text", "text": "Need weather."}]})
    );
}

#[test]
fn response_cut_by_length_is_incomplete() {
    let body = completion(
        json!({"role": "assistant", "content": "Once upon"}),
        "length",
        json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
    );
    let response = from_chat("{}", &request(), &body);
    assert_eq!(response["status"], "incomplete");
    assert_eq!(
        response["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(response["output"][0]["status"], "incomplete");
    assert_eq!(response["output"][0]["content"][0]["text"], "Once upon");
}

/// `(name, sequence_number, output_index or -1)`.
fn shape(events: &[(String, Value)]) -> Vec<(String, i64)> {
    events
        .iter()
        .map(|(name, data)| (name.clone(), data["output_index"].as_i64().unwrap_or(-1)))
        .collect()
}

fn ev(name: &str, output_index: i64) -> (String, i64) {
    (name.to_owned(), output_index)
}

fn assert_sequence_numbers(events: &[(String, Value)]) {
    for (n, (name, data)) in events.iter().enumerate() {
        assert_eq!(
            data["sequence_number"].as_u64(),
            Some(n as u64),
            "sequence_number of {name}"
        );
    }
}

fn deltas(events: &[(String, Value)], name: &str, output_index: i64) -> String {
    events
        .iter()
        .filter(|(n, d)| n == name && d["output_index"] == output_index)
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect()
}

const STREAM_REQUEST: &str = r#"{"model":"gpt-x","input":"Hi","stream":true}"#;

/// The final object of a stream equals what the non-streamed path makes of the same answer.
fn assert_final_matches(
    events: &[(String, Value)],
    terminal: &str,
    message: Value,
    finish: &str,
    usage: Value,
) {
    let (name, data) = events.last().expect("events");
    assert_eq!(name, terminal);
    let body = completion(message, finish, usage);
    let expected = from_chat("{}", &parse(STREAM_REQUEST), &body);
    assert_eq!(data["response"], expected);
}

#[test]
fn stream_text_only() {
    let events = run_stream(
        Surface::OpenaiResponses,
        STREAM_REQUEST,
        "resp_abc123",
        "stream_text.jsonl",
    );
    assert_eq!(
        shape(&events),
        vec![
            ev("response.created", -1),
            ev("response.in_progress", -1),
            ev("response.output_item.added", 0),
            ev("response.content_part.added", 0),
            ev("response.output_text.delta", 0),
            ev("response.output_text.delta", 0),
            ev("response.output_text.delta", 0),
            ev("response.output_text.done", 0),
            ev("response.content_part.done", 0),
            ev("response.output_item.done", 0),
            ev("response.completed", -1),
        ]
    );
    assert_sequence_numbers(&events);
    let created = &events[0].1["response"];
    assert_eq!(
        (created["status"].clone(), created["output"].clone()),
        (json!("in_progress"), json!([]))
    );
    assert_eq!(created["created_at"], 1_700_000_000);
    assert_eq!(
        events[2].1["item"],
        json!({"type": "message", "id": "msg_abc123_0", "status": "in_progress", "role": "assistant", "content": []})
    );
    assert_eq!(events[4].1["item_id"], "msg_abc123_0");
    assert_eq!(events[4].1["content_index"], 0);
    assert_eq!(
        deltas(&events, "response.output_text.delta", 0),
        "Hello, world!"
    );
    assert_eq!(events[7].1["text"], "Hello, world!");
    assert_final_matches(
        &events,
        "response.completed",
        json!({"role": "assistant", "content": "Hello, world!"}),
        "stop",
        json!({"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24, "prompt_tokens_details": {"cached_tokens": 8}}),
    );
}

#[test]
fn stream_reasoning_then_text() {
    let events = run_stream(
        Surface::OpenaiResponses,
        STREAM_REQUEST,
        "resp_abc123",
        "stream_reasoning_text.jsonl",
    );
    assert_eq!(
        shape(&events),
        vec![
            ev("response.created", -1),
            ev("response.in_progress", -1),
            ev("response.output_item.added", 0),
            ev("response.reasoning_summary_part.added", 0),
            ev("response.reasoning_summary_text.delta", 0),
            ev("response.reasoning_summary_text.delta", 0),
            ev("response.reasoning_summary_text.delta", 0),
            ev("response.reasoning_summary_text.done", 0),
            ev("response.reasoning_summary_part.done", 0),
            ev("response.output_item.done", 0),
            ev("response.output_item.added", 1),
            ev("response.content_part.added", 1),
            ev("response.output_text.delta", 1),
            ev("response.output_text.delta", 1),
            ev("response.output_text.done", 1),
            ev("response.content_part.done", 1),
            ev("response.output_item.done", 1),
            ev("response.completed", -1),
        ]
    );
    assert_sequence_numbers(&events);
    assert_eq!(events[4].1["summary_index"], 0);
    assert_eq!(
        deltas(&events, "response.reasoning_summary_text.delta", 0),
        "The user greets me.\n"
    );
    assert_eq!(
        deltas(&events, "response.output_text.delta", 1),
        "Hi there."
    );
    assert_final_matches(
        &events,
        "response.completed",
        json!({"role": "assistant", "content": "Hi there.", "reasoning_content": "The user greets me.\n"}),
        "stop",
        json!({"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21, "completion_tokens_details": {"reasoning_tokens": 5}}),
    );
}

#[test]
fn stream_reasoning_as_content_when_configured() {
    let translator =
        DefaultTranslator::configure(r#"{"responses_reasoning":"content"}"#).expect("settings");
    let mut stream = translator.new_stream(Surface::OpenaiResponses, STREAM_REQUEST, "resp_c");
    let mut events = Vec::new();
    for chunk in fixture("stream_reasoning_text.jsonl") {
        events.extend(stream.push(&chunk).expect("chunk"));
    }
    events.extend(stream.finish().expect("finish"));
    let events = parse_events(&events);
    let names: Vec<&str> = events.iter().take(10).map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.delta",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
        ]
    );
    assert_eq!(
        events[3].1["part"],
        json!({"type": "reasoning_text", "text": ""})
    );
    assert_eq!(events[7].1["text"], "The user greets me.\n");
    assert_eq!(
        events[9].1["item"]["content"],
        json!([{"type": "reasoning_text", "text": "The user greets me.\n"}])
    );
}

#[test]
fn stream_text_then_two_tool_calls() {
    let events = run_stream(
        Surface::OpenaiResponses,
        STREAM_REQUEST,
        "resp_abc123",
        "stream_text_two_tools.jsonl",
    );
    assert_eq!(
        shape(&events),
        vec![
            ev("response.created", -1),
            ev("response.in_progress", -1),
            ev("response.output_item.added", 0),
            ev("response.content_part.added", 0),
            ev("response.output_text.delta", 0),
            ev("response.output_text.delta", 0),
            ev("response.output_text.done", 0),
            ev("response.content_part.done", 0),
            ev("response.output_item.done", 0),
            ev("response.output_item.added", 1),
            ev("response.function_call_arguments.delta", 1),
            ev("response.function_call_arguments.delta", 1),
            ev("response.function_call_arguments.delta", 1),
            ev("response.function_call_arguments.done", 1),
            ev("response.output_item.done", 1),
            ev("response.output_item.added", 2),
            ev("response.function_call_arguments.delta", 2),
            ev("response.function_call_arguments.delta", 2),
            ev("response.function_call_arguments.done", 2),
            ev("response.output_item.done", 2),
            ev("response.completed", -1),
        ]
    );
    assert_sequence_numbers(&events);
    assert_eq!(
        events[9].1["item"],
        json!({"type": "function_call", "id": "fc_abc123_1", "call_id": "call_paris", "name": "get_weather",
               "arguments": "", "status": "in_progress"})
    );
    let paris = deltas(&events, "response.function_call_arguments.delta", 1);
    assert_eq!(parse(&paris), json!({"city": "Paris"}));
    assert_eq!(events[13].1["arguments"], paris);
    assert_eq!(
        parse(&deltas(
            &events,
            "response.function_call_arguments.delta",
            2
        )),
        json!({"city": "Rome"})
    );
    assert_final_matches(
        &events,
        "response.completed",
        json!({"role": "assistant", "content": "Let me check both cities.", "tool_calls": [
            {"id": "call_paris", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "call_rome", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}
        ]}),
        "tool_calls",
        json!({"prompt_tokens": 150, "completion_tokens": 40, "total_tokens": 190}),
    );
}

#[test]
fn stream_cut_by_length() {
    let events = run_stream(
        Surface::OpenaiResponses,
        STREAM_REQUEST,
        "resp_abc123",
        "stream_length.jsonl",
    );
    assert_sequence_numbers(&events);
    let (name, done) = &events[events.len() - 2];
    assert_eq!(name, "response.output_item.done");
    assert_eq!(done["item"]["status"], "incomplete");
    assert_final_matches(
        &events,
        "response.incomplete",
        json!({"role": "assistant", "content": "Once upon a time"}),
        "length",
        json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
    );
    let final_response = &events.last().expect("events").1["response"];
    assert_eq!(
        final_response["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
}

#[test]
fn stream_failure_keeps_numbering_and_output_so_far() {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    let mut stream = translator.new_stream(Surface::OpenaiResponses, STREAM_REQUEST, "resp_f");
    assert!(stream.keepalive().is_empty());
    let mut events = Vec::new();
    for chunk in fixture("stream_text.jsonl").iter().take(3) {
        events.extend(stream.push(chunk).expect("chunk"));
    }
    events.extend(stream.fail("node went away"));
    let events = parse_events(&events);
    assert_sequence_numbers(&events);
    let (name, failed) = events.last().expect("events");
    assert_eq!(name, "response.failed");
    assert_eq!(failed["response"]["status"], "failed");
    assert_eq!(
        failed["response"]["error"],
        json!({"code": "server_error", "message": "node went away"})
    );
    assert_eq!(
        failed["response"]["output"][0]["content"][0]["text"],
        "Hello, wor"
    );
    assert_eq!(failed["response"]["output"][0]["status"], "incomplete");
    assert!(stream.finish().expect("finish after fail").is_empty());
}
