//! The `async-openai` client crate (typed requests and responses, its own SSE parsing)
//! against the gateway: chat, the tools round trip, and a streamed answer.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionMessageToolCalls, ChatCompletionRequestAssistantMessageArgs,
    ChatCompletionRequestMessage, ChatCompletionRequestToolMessageArgs, ChatCompletionTools,
    CreateChatCompletionRequest, CreateChatCompletionRequestArgs, FinishReason,
};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{MODEL, Stack, prompt};

fn client(stack: &Stack) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", stack.gateway))
            .with_api_key("unused"),
    )
}

fn messages(name: &str) -> Vec<ChatCompletionRequestMessage> {
    serde_json::from_value(prompt(name)["messages"].clone()).expect("typed messages")
}

fn request(name: &str, max_tokens: u32) -> CreateChatCompletionRequest {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model(MODEL)
        .messages(messages(name))
        .max_completion_tokens(max_tokens)
        .temperature(0.0);
    if name == "tools" {
        let tools: Vec<ChatCompletionTools> =
            serde_json::from_value(prompt("tools")["tools"].clone()).expect("typed tools");
        args.tools(tools);
    }
    args.build().expect("a valid request")
}

#[tokio::test]
async fn async_openai_chat_completes() {
    let stack = Stack::shared().await;
    let chat = request("chat", 32);
    let answer = client(&stack)
        .chat()
        .create(chat)
        .await
        .expect("a completion");
    let choice = &answer.choices[0];
    let text = choice.message.content.clone().unwrap_or_default();
    assert!(!text.trim().is_empty(), "{answer:?}");
    let usage = answer.usage.expect("usage");
    assert!(
        usage.prompt_tokens > 0 && usage.completion_tokens <= 32,
        "{usage:?}"
    );
}

#[tokio::test]
async fn async_openai_tools_round_trip() {
    let stack = Stack::shared().await;
    let client = client(&stack);
    let first = client
        .chat()
        .create(request("tools", 64))
        .await
        .expect("a completion");
    let choice = &first.choices[0];
    assert_eq!(
        choice.finish_reason,
        Some(FinishReason::ToolCalls),
        "{first:?}"
    );
    let calls = choice.message.tool_calls.clone().expect("tool calls");
    let [ChatCompletionMessageToolCalls::Function(call)] = calls.as_slice() else {
        panic!("one function call expected: {calls:?}");
    };
    assert_eq!(call.function.name, "get_weather");
    let arguments: Value = serde_json::from_str(&call.function.arguments).expect("JSON arguments");
    assert_eq!(arguments, json!({"city": "Oslo"}));

    let mut second = request("tools", 48);
    second.messages.push(
        ChatCompletionRequestAssistantMessageArgs::default()
            .tool_calls(calls.clone())
            .build()
            .expect("assistant message")
            .into(),
    );
    second.messages.push(
        ChatCompletionRequestToolMessageArgs::default()
            .tool_call_id(call.id.clone())
            .content(r#"{"city": "Oslo", "temperature_c": 7, "sky": "cloudy"}"#)
            .build()
            .expect("tool message")
            .into(),
    );
    let answer = client.chat().create(second).await.expect("a completion");
    let text = answer.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert!(!text.trim().is_empty(), "{answer:?}");
    assert!(answer.choices[0].message.tool_calls.is_none(), "{answer:?}");
}

#[tokio::test]
async fn async_openai_stream_assembles_a_tool_call() {
    let stack = Stack::shared().await;
    let mut stream = client(&stack)
        .chat()
        .create_stream(request("tools", 64))
        .await
        .expect("a stream");
    let (mut name, mut arguments, mut finish) = (String::new(), String::new(), None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("a well-formed chunk");
        for choice in chunk.choices {
            for call in choice.delta.tool_calls.unwrap_or_default() {
                if let Some(function) = call.function {
                    name += function.name.as_deref().unwrap_or("");
                    arguments += function.arguments.as_deref().unwrap_or("");
                }
            }
            finish = choice.finish_reason.or(finish);
        }
    }
    assert_eq!(name, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).expect("JSON arguments"),
        json!({"city": "Oslo"})
    );
    assert_eq!(finish, Some(FinishReason::ToolCalls));
}
