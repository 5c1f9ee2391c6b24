//! OpenAI chat completion → OpenAI Responses response object.
//!
//! The same builder renders the non-streamed body and the `response` carried by the streamed
//! `response.created` / `response.completed` events, so both paths agree on every field.

use serde_json::{Value, json};

use crate::chat::{self, Block, BlockKind, Finish, Usage};
use crate::error::PolicyError;
use crate::json::{self, Object};

/// How reasoning is shown to Responses clients (translator setting `responses_reasoning`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningMode {
    /// As a reasoning *summary* (`summary: [{type: summary_text}]`,
    /// `response.reasoning_summary_text.*` events): what every Responses client renders.
    #[default]
    Summary,
    /// As raw reasoning *content* (`content: [{type: reasoning_text}]`,
    /// `response.reasoning_text.*` events): the spec's place for full chain of thought, as
    /// open-weight servers emit it, but older clients reject it.
    Content,
}

/// What a response object echoes from the request and how it names things.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// `resp_…`.
    pub id: String,
    /// Unix seconds (from the upstream `created`: the guest has no clock).
    pub created_at: u64,
    /// The model that answered (the request's until the upstream names one).
    pub model: String,
    /// The request, for echoed parameters.
    pub request: Object,
    /// How reasoning is rendered.
    pub reasoning: ReasoningMode,
}

impl Context {
    pub fn new(request: &str, id: &str, reasoning: ReasoningMode) -> Self {
        let request = json::parse_object_lenient(request);
        Self {
            id: response_id(id),
            created_at: 0,
            model: request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            request,
            reasoning,
        }
    }

    /// The id of output item `index`: derived from the response id, because the guest has no
    /// randomness, and unique within the response (which is what clients key on).
    pub fn item_id(&self, block: &Block, index: usize) -> String {
        let prefix = match block.kind {
            BlockKind::Reasoning => "rs",
            BlockKind::Text => "msg",
            BlockKind::ToolCall { .. } => "fc",
        };
        format!("{prefix}_{}_{index}", chat::strip_prefix(&self.id))
    }

    /// Output item `index` for `block`; `status` is `in_progress`, `completed` or `incomplete`.
    /// In-progress items are the empty shells announced by `response.output_item.added`.
    pub fn item(&self, block: &Block, index: usize, status: &str) -> Value {
        let id = self.item_id(block, index);
        let text = if status == "in_progress" {
            ""
        } else {
            block.text.as_str()
        };
        match &block.kind {
            BlockKind::Reasoning => {
                let parts = if status == "in_progress" {
                    json!([])
                } else {
                    match self.reasoning {
                        ReasoningMode::Summary => json!([{"type": "summary_text", "text": text}]),
                        ReasoningMode::Content => json!([{"type": "reasoning_text", "text": text}]),
                    }
                };
                match self.reasoning {
                    ReasoningMode::Summary => json!({
                        "type": "reasoning", "id": id, "summary": parts, "status": status,
                    }),
                    ReasoningMode::Content => json!({
                        "type": "reasoning", "id": id, "summary": [], "content": parts, "status": status,
                    }),
                }
            }
            BlockKind::Text => {
                let content = if status == "in_progress" {
                    json!([])
                } else {
                    json!([output_text(text)])
                };
                json!({
                    "type": "message",
                    "id": id,
                    "status": status,
                    "role": "assistant",
                    "content": content,
                })
            }
            BlockKind::ToolCall { id: call_id, name } => json!({
                "type": "function_call",
                "id": id,
                "call_id": call_id,
                "name": name,
                "arguments": text,
                "status": status,
            }),
        }
    }

    /// The response object. `status`: `in_progress`, `completed`, `incomplete` or `failed`.
    pub fn response(
        &self,
        status: &str,
        output: Vec<Value>,
        finish: &Finish,
        usage: Option<Usage>,
        error: Value,
    ) -> Value {
        let request = &self.request;
        let echo = |field: &str, default: Value| {
            request
                .get(field)
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or(default)
        };
        let incomplete_details = if status == "incomplete" && finish.is_length() {
            json!({"reason": "max_output_tokens"})
        } else {
            Value::Null
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": error,
            "incomplete_details": incomplete_details,
            "instructions": echo("instructions", Value::Null),
            "max_output_tokens": echo("max_output_tokens", Value::Null),
            "metadata": echo("metadata", json!({})),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": echo("parallel_tool_calls", json!(true)),
            "previous_response_id": null,
            "reasoning": echo("reasoning", json!({"effort": null, "summary": null})),
            "store": false,
            "temperature": echo("temperature", json!(1.0)),
            "text": echo("text", json!({"format": {"type": "text"}})),
            "tool_choice": echo("tool_choice", json!("auto")),
            "tools": echo("tools", json!([])),
            "top_p": echo("top_p", json!(1.0)),
            "truncation": "disabled",
            "usage": usage.map_or(Value::Null, usage_object),
            "user": echo("user", Value::Null),
        })
    }

    /// The final object for a finished answer: every block as a closed item.
    pub fn finished(&self, blocks: &[Block], finish: &Finish, usage: Option<Usage>) -> Value {
        let status = if finish.is_length() {
            "incomplete"
        } else {
            "completed"
        };
        let last = blocks.len().saturating_sub(1);
        let output = blocks
            .iter()
            .enumerate()
            .map(|(index, block)| {
                // Only the item the limit cut short is incomplete; earlier ones were finished.
                let item_status = if finish.is_length() && index == last {
                    "incomplete"
                } else {
                    "completed"
                };
                self.item(block, index, item_status)
            })
            .collect();
        self.response(status, output, finish, usage, Value::Null)
    }
}

/// A finished `output_text` content part.
pub(crate) fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// `resp_…` from an upstream or host id.
pub(crate) fn response_id(id: &str) -> String {
    if id.starts_with("resp_") {
        id.to_owned()
    } else {
        format!("resp_{}", chat::strip_prefix(id))
    }
}

fn usage_object(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens()},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens()},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// Translates a non-streamed chat completion into a Responses object.
pub fn from_chat(
    request: &str,
    body: &str,
    reasoning: ReasoningMode,
) -> Result<String, PolicyError> {
    let completion = chat::parse_completion(body)?;
    let mut context = Context::new(request, &completion.id, reasoning);
    context.created_at = completion.created;
    if !completion.model.is_empty() {
        context.model = completion.model.clone();
    }
    let response = context.finished(&completion.blocks(), &completion.finish(), completion.usage);
    json::to_string(&response)
}
