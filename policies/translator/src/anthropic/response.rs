//! OpenAI chat completion → Anthropic Messages response.

use serde_json::{Value, json};

use crate::chat::{self, Block, BlockKind, Finish, Usage};
use crate::error::PolicyError;
use crate::json;

/// Translates a non-streamed chat completion into a Messages response. `request` is the
/// client's original body (its `stop_sequences` tell `stop_sequence` from `end_turn`).
pub fn from_chat(request: &str, body: &str) -> Result<String, PolicyError> {
    let request = json::parse_object_lenient(request);
    let completion = chat::parse_completion(body)?;
    let blocks = completion.blocks();
    let stops = super::request::stop_sequences(&request)
        .ok()
        .flatten()
        .unwrap_or_default();
    let (stop_reason, stop_sequence) = stop_reason(&completion.finish(), &blocks, &stops);
    let model = if completion.model.is_empty() {
        request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    } else {
        completion.model.clone()
    };
    let message = json!({
        "id": message_id(&completion.id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks.iter().map(content_block).collect::<Vec<_>>(),
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage(completion.usage.unwrap_or_default()),
    });
    json::to_string(&message)
}

/// `msg_…` from an upstream or host id.
pub(crate) fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else {
        format!("msg_{}", chat::strip_prefix(id))
    }
}

/// A finished block as an Anthropic content block.
fn content_block(block: &Block) -> Value {
    match &block.kind {
        // Signatures authenticate Claude's own thinking; this gateway has none to give, and the
        // request side ignores them, so an empty string keeps strict clients' types satisfied.
        BlockKind::Reasoning => {
            json!({"type": "thinking", "thinking": block.text, "signature": ""})
        }
        BlockKind::Text => json!({"type": "text", "text": block.text}),
        BlockKind::ToolCall { id, name } => json!({
            "type": "tool_use",
            "id": id,
            "name": name,
            "input": json::arguments_object(&block.text),
        }),
    }
}

/// `stop_reason` and `stop_sequence` from the chat finish.
///
/// `stop_sequence` needs the matched string; nodes that report it (vLLM's `stop_reason`) get
/// it, otherwise a stop is reported as `end_turn`. Tool calls win over `stop` because some
/// servers finish tool-calling turns with `stop`.
pub(crate) fn stop_reason(finish: &Finish, blocks: &[Block], stops: &[String]) -> (Value, Value) {
    let has_tools = blocks
        .iter()
        .any(|b| matches!(b.kind, BlockKind::ToolCall { .. }));
    match finish.reason.as_deref() {
        Some("length") => (json!("max_tokens"), Value::Null),
        Some("tool_calls" | "function_call") => (json!("tool_use"), Value::Null),
        Some("content_filter") => (json!("refusal"), Value::Null),
        _ if has_tools => (json!("tool_use"), Value::Null),
        _ => match &finish.matched_stop {
            Some(stop) if stops.contains(stop) => (json!("stop_sequence"), json!(stop)),
            _ => (json!("end_turn"), Value::Null),
        },
    }
}

/// Anthropic counts cache reads apart from `input_tokens`, while chat's `prompt_tokens`
/// includes them; subtracting keeps `input_tokens + cache_read_input_tokens` equal to the prompt.
pub(crate) fn usage(usage: Usage) -> Value {
    let cached = usage.cached_tokens().min(usage.prompt_tokens);
    json!({
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    })
}
