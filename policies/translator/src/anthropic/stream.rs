//! Streamed chat completion chunks → Anthropic Messages server-sent events.
//!
//! Event order (Anthropic "Streaming Messages"): `message_start`, then per content block
//! `content_block_start`, `content_block_delta`…, `content_block_stop` with increasing `index`,
//! then `message_delta` (stop reason, usage) and `message_stop`. `ping` may appear anywhere
//! after `message_start`; an `error` event ends the stream.

use serde_json::{Value, json};

use super::response::{message_id, stop_reason, usage};
use crate::SseEvent;
use crate::chat::{self, Assembler, BlockKind, Step};
use crate::error::PolicyError;
use crate::json;

/// The state of one streamed Messages response.
#[derive(Debug, Clone)]
pub struct MessagesStream {
    assembler: Assembler,
    id: String,
    request_model: String,
    stop_sequences: Vec<String>,
    started: bool,
    done: bool,
}

impl MessagesStream {
    /// A stream for a client that sent `request`; `response_id` becomes the message id.
    pub fn new(request: &str, response_id: &str) -> Self {
        let request = json::parse_object_lenient(request);
        Self {
            assembler: Assembler::new(),
            id: message_id(response_id),
            request_model: request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            stop_sequences: super::request::stop_sequences(&request)
                .ok()
                .flatten()
                .unwrap_or_default(),
            started: false,
            done: false,
        }
    }

    /// One upstream chunk (`data:` text).
    pub fn push(&mut self, data: &str) -> Result<Vec<SseEvent>, PolicyError> {
        if self.done {
            return Ok(Vec::new());
        }
        let chunk = match chat::parse_chunk(data)? {
            None => return Ok(Vec::new()),
            Some(Err(message)) => return Ok(self.fail(&message)),
            Some(Ok(chunk)) => chunk,
        };
        let steps = self.assembler.push(&chunk);
        let mut events = Vec::new();
        self.start(&mut events);
        self.render(steps, &mut events);
        Ok(events)
    }

    /// While the upstream is silent (model loading, long prefill).
    pub fn keepalive(&mut self) -> Vec<SseEvent> {
        if self.done {
            return Vec::new();
        }
        let mut events = Vec::new();
        self.start(&mut events);
        events.push(event(json!({"type": "ping"})));
        events
    }

    /// The upstream ended: closes the open block and the message.
    pub fn finish(&mut self) -> Result<Vec<SseEvent>, PolicyError> {
        if self.done {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        self.start(&mut events);
        let steps = self.assembler.finish();
        self.render(steps, &mut events);
        let (reason, sequence) = stop_reason(
            &self.assembler.finish,
            &self.assembler.blocks,
            &self.stop_sequences,
        );
        let mut delta_usage = usage(self.assembler.usage.unwrap_or_default());
        if self.assembler.usage.is_none() {
            // Without a usage chunk the input count is unknown; claim nothing rather than 0.
            if let Some(object) = delta_usage.as_object_mut() {
                object.retain(|key, _| key == "output_tokens");
            }
        }
        events.push(event(json!({
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": delta_usage,
        })));
        events.push(event(json!({"type": "message_stop"})));
        self.done = true;
        Ok(events)
    }

    /// The upstream failed: one terminal `error` event.
    pub fn fail(&mut self, message: &str) -> Vec<SseEvent> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        vec![event(json!({
            "type": "error",
            "error": {"type": "api_error", "message": message},
        }))]
    }

    fn start(&mut self, events: &mut Vec<SseEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        let model = self
            .assembler
            .model
            .clone()
            .unwrap_or_else(|| self.request_model.clone());
        // Chat streams report usage only at the end, but a node with continuous usage stats
        // (which `request` asks for) already sends the prompt count in the first chunk: split it
        // as `message_delta` does. Without it (older node, or a keepalive forced the start) every
        // count is 0.
        let mut start_usage = usage(self.assembler.usage.unwrap_or_default());
        // Nothing is generated yet; the final count comes with `message_delta`.
        start_usage["output_tokens"] = 0.into();
        events.push(event(json!({
            "type": "message_start",
            "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": start_usage,
            },
        })));
    }

    fn render(&self, steps: Vec<Step>, events: &mut Vec<SseEvent>) {
        for step in steps {
            match step {
                Step::Open(index) => {
                    let content_block = match &self.assembler.blocks[index].kind {
                        BlockKind::Reasoning => {
                            json!({"type": "thinking", "thinking": "", "signature": ""})
                        }
                        BlockKind::Text => json!({"type": "text", "text": ""}),
                        BlockKind::ToolCall { id, name } => {
                            json!({"type": "tool_use", "id": id, "name": name, "input": {}})
                        }
                    };
                    events.push(event(json!({
                        "type": "content_block_start",
                        "index": index,
                        "content_block": content_block,
                    })));
                }
                Step::Delta(index, text) => {
                    let delta = match &self.assembler.blocks[index].kind {
                        BlockKind::Reasoning => json!({"type": "thinking_delta", "thinking": text}),
                        BlockKind::Text => json!({"type": "text_delta", "text": text}),
                        BlockKind::ToolCall { .. } => {
                            json!({"type": "input_json_delta", "partial_json": text})
                        }
                    };
                    events.push(event(json!({
                        "type": "content_block_delta",
                        "index": index,
                        "delta": delta,
                    })));
                }
                Step::Close(index) => {
                    if self.assembler.blocks[index].kind == BlockKind::Reasoning {
                        // The spec closes every thinking block with its signature; ours is empty
                        // (see `response::content_block`).
                        events.push(event(json!({
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "signature_delta", "signature": ""},
                        })));
                    }
                    events.push(event(json!({"type": "content_block_stop", "index": index})));
                }
            }
        }
    }
}

/// An event named after its `type`, as Anthropic sends them.
fn event(data: Value) -> SseEvent {
    let name = data
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    SseEvent {
        event: Some(name),
        data: data.to_string(),
    }
}
