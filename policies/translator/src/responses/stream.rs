//! Streamed chat completion chunks → OpenAI Responses server-sent events.
//!
//! Every event is named after its `type` and carries a `sequence_number` that starts at 0 and
//! grows by one. Order: `response.created`, `response.in_progress`, then per output item
//! `response.output_item.added`, its part/delta/done events, `response.output_item.done`, and
//! finally `response.completed` (or `response.incomplete` when the token limit cut the answer,
//! `response.failed` when the upstream failed) carrying the same object a non-streamed request
//! gets.

use serde_json::{Value, json};

use super::response::{Context, ReasoningMode, output_text};
use crate::SseEvent;
use crate::chat::{self, Assembler, BlockKind, Step};
use crate::error::PolicyError;

/// The state of one streamed Responses response.
#[derive(Debug, Clone)]
pub struct ResponsesStream {
    context: Context,
    assembler: Assembler,
    sequence: u64,
    started: bool,
    done: bool,
}

impl ResponsesStream {
    /// A stream for a client that sent `request`; `response_id` becomes the response id.
    pub fn new(request: &str, response_id: &str, reasoning: ReasoningMode) -> Self {
        Self {
            context: Context::new(request, response_id, reasoning),
            assembler: Assembler::new(),
            sequence: 0,
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

    /// The Responses protocol has no keepalive event; the host may write an SSE comment.
    pub fn keepalive(&mut self) -> Vec<SseEvent> {
        Vec::new()
    }

    /// The upstream ended: closes the open item and sends the final response.
    pub fn finish(&mut self) -> Result<Vec<SseEvent>, PolicyError> {
        if self.done {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        self.start(&mut events);
        let steps = self.assembler.finish();
        self.render(steps, &mut events);
        let response = self.context.finished(
            &self.assembler.blocks,
            &self.assembler.finish,
            self.assembler.usage,
        );
        let kind = if self.assembler.finish.is_length() {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(&mut events, json!({"type": kind, "response": response}));
        self.done = true;
        Ok(events)
    }

    /// The upstream failed: one terminal `response.failed` carrying what was produced so far.
    pub fn fail(&mut self, message: &str) -> Vec<SseEvent> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut events = Vec::new();
        self.start(&mut events);
        let open = self.assembler.open_block();
        let output = self
            .assembler
            .blocks
            .iter()
            .enumerate()
            .map(|(index, block)| {
                let status = if Some(index) == open {
                    "incomplete"
                } else {
                    "completed"
                };
                self.context.item(block, index, status)
            })
            .collect();
        let response = self.context.response(
            "failed",
            output,
            &self.assembler.finish,
            self.assembler.usage,
            json!({"code": "server_error", "message": message}),
        );
        self.emit(
            &mut events,
            json!({"type": "response.failed", "response": response}),
        );
        events
    }

    fn emit(&mut self, events: &mut Vec<SseEvent>, mut data: Value) {
        if let Some(object) = data.as_object_mut() {
            object.insert("sequence_number".into(), self.sequence.into());
        }
        self.sequence += 1;
        let name = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        events.push(SseEvent {
            event: Some(name),
            data: data.to_string(),
        });
    }

    fn start(&mut self, events: &mut Vec<SseEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        self.context.created_at = self.assembler.created.unwrap_or(0);
        if let Some(model) = &self.assembler.model {
            self.context.model = model.clone();
        }
        let response = self.context.response(
            "in_progress",
            Vec::new(),
            &self.assembler.finish,
            None,
            Value::Null,
        );
        self.emit(
            events,
            json!({"type": "response.created", "response": response}),
        );
        self.emit(
            events,
            json!({"type": "response.in_progress", "response": response}),
        );
    }

    fn render(&mut self, steps: Vec<Step>, events: &mut Vec<SseEvent>) {
        for step in steps {
            let payloads = match step {
                Step::Open(index) => self.opened(index),
                Step::Delta(index, delta) => vec![self.delta(index, delta)],
                Step::Close(index) => self.closed(index),
            };
            for payload in payloads {
                self.emit(events, payload);
            }
        }
    }

    fn opened(&self, index: usize) -> Vec<Value> {
        let block = &self.assembler.blocks[index];
        let item_id = self.context.item_id(block, index);
        let mut out = vec![json!({
            "type": "response.output_item.added",
            "output_index": index,
            "item": self.context.item(block, index, "in_progress"),
        })];
        match (&block.kind, self.context.reasoning) {
            (BlockKind::Text, _) => out.push(json!({
                "type": "response.content_part.added",
                "item_id": item_id,
                "output_index": index,
                "content_index": 0,
                "part": output_text(""),
            })),
            (BlockKind::Reasoning, ReasoningMode::Summary) => out.push(json!({
                "type": "response.reasoning_summary_part.added",
                "item_id": item_id,
                "output_index": index,
                "summary_index": 0,
                "part": {"type": "summary_text", "text": ""},
            })),
            (BlockKind::Reasoning, ReasoningMode::Content) => out.push(json!({
                "type": "response.content_part.added",
                "item_id": item_id,
                "output_index": index,
                "content_index": 0,
                "part": {"type": "reasoning_text", "text": ""},
            })),
            (BlockKind::ToolCall { .. }, _) => {}
        }
        out
    }

    fn delta(&self, index: usize, delta: String) -> Value {
        let block = &self.assembler.blocks[index];
        let item_id = self.context.item_id(block, index);
        match (&block.kind, self.context.reasoning) {
            (BlockKind::Text, _) => json!({
                "type": "response.output_text.delta",
                "item_id": item_id,
                "output_index": index,
                "content_index": 0,
                "delta": delta,
                "logprobs": [],
            }),
            (BlockKind::Reasoning, ReasoningMode::Summary) => json!({
                "type": "response.reasoning_summary_text.delta",
                "item_id": item_id,
                "output_index": index,
                "summary_index": 0,
                "delta": delta,
            }),
            (BlockKind::Reasoning, ReasoningMode::Content) => json!({
                "type": "response.reasoning_text.delta",
                "item_id": item_id,
                "output_index": index,
                "content_index": 0,
                "delta": delta,
            }),
            (BlockKind::ToolCall { .. }, _) => json!({
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": index,
                "delta": delta,
            }),
        }
    }

    fn closed(&self, index: usize) -> Vec<Value> {
        let block = &self.assembler.blocks[index];
        let item_id = self.context.item_id(block, index);
        let text = block.text.as_str();
        let cut_short =
            self.assembler.finish.is_length() && index + 1 == self.assembler.blocks.len();
        let status = if cut_short { "incomplete" } else { "completed" };
        let mut out = match (&block.kind, self.context.reasoning) {
            (BlockKind::Text, _) => vec![
                json!({
                    "type": "response.output_text.done",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }),
                json!({
                    "type": "response.content_part.done",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": output_text(text),
                }),
            ],
            (BlockKind::Reasoning, ReasoningMode::Summary) => vec![
                json!({
                    "type": "response.reasoning_summary_text.done",
                    "item_id": item_id,
                    "output_index": index,
                    "summary_index": 0,
                    "text": text,
                }),
                json!({
                    "type": "response.reasoning_summary_part.done",
                    "item_id": item_id,
                    "output_index": index,
                    "summary_index": 0,
                    "part": {"type": "summary_text", "text": text},
                }),
            ],
            (BlockKind::Reasoning, ReasoningMode::Content) => vec![
                json!({
                    "type": "response.reasoning_text.done",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "text": text,
                }),
                json!({
                    "type": "response.content_part.done",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": {"type": "reasoning_text", "text": text},
                }),
            ],
            (BlockKind::ToolCall { name, .. }, _) => vec![json!({
                "type": "response.function_call_arguments.done",
                "item_id": item_id,
                "output_index": index,
                "name": name,
                "arguments": text,
            })],
        };
        out.push(json!({
            "type": "response.output_item.done",
            "output_index": index,
            "item": self.context.item(block, index, status),
        }));
        out
    }
}
