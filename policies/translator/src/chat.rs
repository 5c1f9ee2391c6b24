//! The upstream side: OpenAI chat completions as the nodes produce them.
//!
//! Both client surfaces describe an answer as an ordered list of *blocks* (Anthropic content
//! blocks, Responses output items): reasoning, text, one per tool call. This module turns a chat
//! completion — whole or as a stream of chunks — into that list, so each surface only has to
//! render blocks in its own words and the streamed and non-streamed answers cannot drift apart.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{self, PolicyError};
use helexa_policy_sdk::log;

/// A non-streamed chat completion (only the fields translation needs; the rest is ignored).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// Unix seconds. The guest has no clock, so this is also the translated creation time.
    pub created: u64,
    /// Only the first choice is translated (neither client surface has `n`).
    pub choices: Vec<Choice>,
    /// Token accounting.
    pub usage: Option<Usage>,
}

/// One choice of a [`ChatCompletion`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Choice {
    /// The answer.
    pub message: ChatMessage,
    /// `stop`, `length`, `tool_calls`, `content_filter`.
    pub finish_reason: Option<String>,
    /// vLLM-style extension: the stop string (or token id) that ended generation.
    pub stop_reason: Option<Value>,
}

/// The assistant message of a [`Choice`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ChatMessage {
    /// Visible text.
    pub content: Option<String>,
    /// The model's thinking, as helexa nodes (and vLLM, DeepSeek) name it.
    pub reasoning_content: Option<String>,
    /// Newer vLLM name of the same field; read when `reasoning_content` is absent.
    pub reasoning: Option<String>,
    /// Tool calls in order.
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A complete tool call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ToolCall {
    /// `call_…`.
    pub id: String,
    /// What to call.
    pub function: FunctionCall,
}

/// Name and arguments of a [`ToolCall`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as JSON text (possibly malformed: it is model output).
    pub arguments: String,
}

/// Token accounting of a completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Generated tokens, reasoning included.
    pub completion_tokens: u64,
    /// Sum of the two.
    pub total_tokens: u64,
    /// Breakdown of the prompt.
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Breakdown of the completion.
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

impl Usage {
    /// Prompt tokens served from the prefix cache.
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }

    /// Generated tokens that were reasoning.
    pub fn reasoning_tokens(&self) -> u64 {
        self.completion_tokens_details
            .map_or(0, |d| d.reasoning_tokens)
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct CompletionTokensDetails {
    /// Generated tokens that were reasoning.
    pub reasoning_tokens: u64,
}

/// One streamed chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ChatChunk {
    /// Same for every chunk of a response.
    pub id: String,
    /// The model that answers.
    pub model: String,
    /// Unix seconds.
    pub created: u64,
    /// Usually one; empty in the final usage-only chunk.
    pub choices: Vec<ChunkChoice>,
    /// Present in the final chunk when `stream_options.include_usage` was set, and in every
    /// chunk with vLLM's `continuous_usage_stats` (running counts).
    pub usage: Option<Usage>,
}

/// One choice of a [`ChatChunk`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ChunkChoice {
    /// Choice number; only 0 is translated.
    pub index: u32,
    /// What this chunk adds.
    pub delta: ChunkDelta,
    /// Set on the last content chunk.
    pub finish_reason: Option<String>,
    /// As [`Choice::stop_reason`].
    pub stop_reason: Option<Value>,
}

/// The increment carried by a [`ChunkChoice`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ChunkDelta {
    /// More visible text.
    pub content: Option<String>,
    /// More thinking.
    pub reasoning_content: Option<String>,
    /// Newer vLLM name of `reasoning_content`.
    pub reasoning: Option<String>,
    /// Tool-call fragments.
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A fragment of a streamed tool call: the first fragment of a call carries `id` and name, the
/// following ones pieces of `arguments`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ToolCallDelta {
    /// Which call of this response the fragment belongs to.
    pub index: u32,
    /// `call_…`, on the first fragment.
    pub id: Option<String>,
    /// Name and argument text.
    pub function: Option<FunctionCallDelta>,
}

/// Function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FunctionCallDelta {
    /// On the first fragment.
    pub name: Option<String>,
    /// A piece of the arguments JSON text.
    pub arguments: Option<String>,
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockKind {
    /// The model's thinking.
    Reasoning,
    /// Visible text.
    Text,
    /// A tool call; the block's text is the arguments JSON.
    ToolCall {
        /// Call id (`call_…`), used by the client to send the result back.
        id: String,
        /// Function name.
        name: String,
    },
}

/// One piece of an answer in output order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// What it is.
    pub kind: BlockKind,
    /// Its text: reasoning, visible text, or a tool call's arguments.
    pub text: String,
}

/// Why generation ended, with what helps the client surfaces report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finish {
    /// The chat `finish_reason`, if one arrived.
    pub reason: Option<String>,
    /// The stop string that ended generation, when the node reports it (vLLM's `stop_reason`).
    pub matched_stop: Option<String>,
}

impl Finish {
    /// The output was cut by the token limit.
    pub fn is_length(&self) -> bool {
        self.reason.as_deref() == Some("length")
    }
}

/// Parses a non-streamed chat completion body.
pub fn parse_completion(body: &str) -> Result<ChatCompletion, PolicyError> {
    let completion: ChatCompletion = serde_json::from_str(body).map_err(|error| {
        error::upstream(format!("upstream body is not a chat completion: {error}"))
    })?;
    if completion.choices.is_empty() {
        return Err(error::upstream("upstream chat completion has no choices"));
    }
    Ok(completion)
}

impl ChatCompletion {
    /// The blocks of the first choice, in output order: reasoning, text, tool calls.
    pub fn blocks(&self) -> Vec<Block> {
        let Some(choice) = self.choices.first() else {
            return Vec::new();
        };
        let message = &choice.message;
        let mut blocks = Vec::new();
        let reasoning = message
            .reasoning_content
            .as_deref()
            .or(message.reasoning.as_deref());
        if let Some(reasoning) = reasoning.filter(|r| !r.is_empty()) {
            blocks.push(Block {
                kind: BlockKind::Reasoning,
                text: reasoning.to_owned(),
            });
        }
        if let Some(content) = message.content.as_deref().filter(|c| !c.is_empty()) {
            blocks.push(Block {
                kind: BlockKind::Text,
                text: content.to_owned(),
            });
        }
        for (n, call) in message.tool_calls.iter().flatten().enumerate() {
            blocks.push(Block {
                kind: BlockKind::ToolCall {
                    id: call_id_or_fallback(&call.id, &self.id, n),
                    name: call.function.name.clone(),
                },
                text: call.function.arguments.clone(),
            });
        }
        blocks
    }

    /// How the first choice ended.
    pub fn finish(&self) -> Finish {
        let Some(choice) = self.choices.first() else {
            return Finish::default();
        };
        Finish {
            reason: choice.finish_reason.clone(),
            matched_stop: stop_string(choice.stop_reason.as_ref()),
        }
    }
}

fn stop_string(stop_reason: Option<&Value>) -> Option<String> {
    stop_reason.and_then(Value::as_str).map(str::to_owned)
}

/// Tool calls without an id (some servers omit it) still need one the client can answer to.
fn call_id_or_fallback(id: &str, response_id: &str, n: usize) -> String {
    if id.is_empty() {
        format!("call_{}_{n}", strip_prefix(response_id))
    } else {
        id.to_owned()
    }
}

/// The distinctive part of an id such as `chatcmpl-abc` or `resp_abc`, to build related ids.
pub fn strip_prefix(id: &str) -> &str {
    for prefix in ["chatcmpl-", "msg_", "resp_"] {
        if let Some(rest) = id.strip_prefix(prefix) {
            return rest;
        }
    }
    id
}

/// One step of a streamed answer, in the order the client must see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Block `block` (an index into [`Assembler::blocks`]) begins.
    Open(usize),
    /// Block `block` grows by `text`.
    Delta(usize, String),
    /// Block `block` is complete.
    Close(usize),
}

/// A streamed tool call whose name has not arrived yet; it cannot open a block before that
/// because both client surfaces announce the name when the block starts.
#[derive(Debug, Clone, Default)]
struct PendingCall {
    id: Option<String>,
    arguments: String,
}

/// Reassembles a stream of chat chunks into blocks, one open at a time.
///
/// A block closes when the next one of another kind (or another tool call) starts, so the
/// client sees reasoning → text → each tool call as separate, strictly ordered blocks.
#[derive(Debug, Clone, Default)]
pub struct Assembler {
    /// Every block so far, closed or open, with its full text.
    pub blocks: Vec<Block>,
    /// The open block, if any, and the chat tool-call index it belongs to (tool calls only).
    open: Option<(usize, Option<u32>)>,
    /// Tool-call index → block, for calls that have a block.
    tool_blocks: Vec<(u32, usize)>,
    /// Tool calls waiting for their name.
    pending: Vec<(u32, PendingCall)>,
    /// The `id` of the first chunk (used for fallback tool-call ids).
    pub response_id: Option<String>,
    /// The model of the first chunk.
    pub model: Option<String>,
    /// The `created` of the first chunk.
    pub created: Option<u64>,
    /// How generation ended, once known.
    pub finish: Finish,
    /// The last usage reported.
    pub usage: Option<Usage>,
    /// `finish` was called.
    finished: bool,
}

impl Assembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// The block currently open, if any.
    pub fn open_block(&self) -> Option<usize> {
        self.open.map(|(block, _)| block)
    }

    /// Whether any tool call was produced.
    pub fn has_tool_calls(&self) -> bool {
        !self.tool_blocks.is_empty() || !self.pending.is_empty()
    }

    /// Feeds one parsed chunk; returns the steps it causes.
    pub fn push(&mut self, chunk: &ChatChunk) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.finished {
            return steps;
        }
        if self.response_id.is_none() && !chunk.id.is_empty() {
            self.response_id = Some(chunk.id.clone());
        }
        if self.model.is_none() && !chunk.model.is_empty() {
            self.model = Some(chunk.model.clone());
        }
        if self.created.is_none() && chunk.created != 0 {
            self.created = Some(chunk.created);
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        for choice in &chunk.choices {
            if choice.index != 0 {
                log::warn("translator: ignoring a chat choice other than index 0");
                continue;
            }
            let delta = &choice.delta;
            let reasoning = delta
                .reasoning_content
                .as_deref()
                .or(delta.reasoning.as_deref());
            if let Some(text) = reasoning.filter(|t| !t.is_empty()) {
                self.append(BlockKind::Reasoning, text, &mut steps);
            }
            if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                self.append(BlockKind::Text, text, &mut steps);
            }
            for call in delta.tool_calls.iter().flatten() {
                self.tool_fragment(call, &mut steps);
            }
            if let Some(reason) = &choice.finish_reason {
                self.finish.reason = Some(reason.clone());
                if let Some(stop) = stop_string(choice.stop_reason.as_ref()) {
                    self.finish.matched_stop = Some(stop);
                }
            }
        }
        steps
    }

    /// The upstream ended: flushes tool calls that never got a name and closes the open block.
    pub fn finish(&mut self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.finished {
            return steps;
        }
        for (index, call) in std::mem::take(&mut self.pending) {
            log::warn("translator: a streamed tool call never received a function name");
            self.open_tool(index, call, String::new(), &mut steps);
        }
        self.close(&mut steps);
        self.finished = true;
        steps
    }

    fn append(&mut self, kind: BlockKind, text: &str, steps: &mut Vec<Step>) {
        let block = match self.open {
            Some((block, _)) if self.blocks[block].kind == kind => block,
            _ => {
                self.close(steps);
                self.start(kind, None, steps)
            }
        };
        self.blocks[block].text.push_str(text);
        steps.push(Step::Delta(block, text.to_owned()));
    }

    fn tool_fragment(&mut self, call: &ToolCallDelta, steps: &mut Vec<Step>) {
        let name = call.function.as_ref().and_then(|f| f.name.clone());
        let arguments = call
            .function
            .as_ref()
            .and_then(|f| f.arguments.clone())
            .unwrap_or_default();
        if let Some(&(_, block)) = self.tool_blocks.iter().find(|(i, _)| *i == call.index) {
            if arguments.is_empty() {
                return;
            }
            self.blocks[block].text.push_str(&arguments);
            if self.open.map(|(open, _)| open) == Some(block) {
                steps.push(Step::Delta(block, arguments));
            } else {
                // Interleaved fragments of parallel calls: the block was already closed on the
                // wire, so the text is kept for the final object but cannot be streamed.
                log::warn("translator: tool-call fragment arrived after its block closed");
            }
            return;
        }
        let position = self.pending.iter().position(|(i, _)| *i == call.index);
        let mut pending = match position {
            Some(p) => self.pending.remove(p).1,
            None => PendingCall::default(),
        };
        if pending.id.is_none() {
            pending.id = call.id.clone().filter(|id| !id.is_empty());
        }
        pending.arguments.push_str(&arguments);
        match name.filter(|n| !n.is_empty()) {
            Some(name) => self.open_tool(call.index, pending, name, steps),
            None => self.pending.push((call.index, pending)),
        }
    }

    fn open_tool(&mut self, index: u32, call: PendingCall, name: String, steps: &mut Vec<Step>) {
        self.close(steps);
        let fallback_n = self.tool_blocks.len();
        let id = call.id.unwrap_or_else(|| {
            call_id_or_fallback("", self.response_id.as_deref().unwrap_or(""), fallback_n)
        });
        let block = self.start(BlockKind::ToolCall { id, name }, Some(index), steps);
        self.tool_blocks.push((index, block));
        if !call.arguments.is_empty() {
            self.blocks[block].text.push_str(&call.arguments);
            steps.push(Step::Delta(block, call.arguments));
        }
    }

    fn start(&mut self, kind: BlockKind, tool_index: Option<u32>, steps: &mut Vec<Step>) -> usize {
        let block = self.blocks.len();
        self.blocks.push(Block {
            kind,
            text: String::new(),
        });
        self.open = Some((block, tool_index));
        steps.push(Step::Open(block));
        block
    }

    fn close(&mut self, steps: &mut Vec<Step>) {
        if let Some((block, _)) = self.open.take() {
            steps.push(Step::Close(block));
        }
    }
}

/// Parses one upstream `data:` payload. `Ok(None)` for `[DONE]`; an upstream error object
/// (`{"error": {...}}`) comes back as `Err(message)` in the inner result so the stream can end
/// with its surface's error event.
pub fn parse_chunk(data: &str) -> Result<Option<Result<ChatChunk, String>>, PolicyError> {
    let data = data.trim();
    if data == "[DONE]" || data.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(data)
        .map_err(|error| error::upstream(format!("upstream chunk is not JSON: {error}")))?;
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_owned);
        return Ok(Some(Err(message)));
    }
    let chunk = serde_json::from_value(value).map_err(|error| {
        error::upstream(format!(
            "upstream chunk is not a chat completion chunk: {error}"
        ))
    })?;
    Ok(Some(Ok(chunk)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(json: &str) -> ChatChunk {
        serde_json::from_str(json).expect("test chunk parses")
    }

    #[test]
    fn kinds_switch_blocks_and_text_accumulates() {
        let mut asm = Assembler::new();
        let mut steps = Vec::new();
        for c in [
            r#"{"id":"chatcmpl-1","model":"m","created":5,"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"m."}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        ] {
            steps.extend(asm.push(&chunk(c)));
        }
        steps.extend(asm.finish());
        assert_eq!(
            steps,
            vec![
                Step::Open(0),
                Step::Delta(0, "hm".into()),
                Step::Delta(0, "m.".into()),
                Step::Close(0),
                Step::Open(1),
                Step::Delta(1, "Hi".into()),
                Step::Close(1),
            ]
        );
        assert_eq!(asm.blocks[0].text, "hmm.");
        assert_eq!(asm.blocks[1].kind, BlockKind::Text);
        assert_eq!(asm.finish.reason.as_deref(), Some("stop"));
        assert_eq!(asm.created, Some(5));
    }

    #[test]
    fn tool_call_waits_for_its_name_and_keeps_early_arguments() {
        let mut asm = Assembler::new();
        let mut steps = asm.push(&chunk(
            r#"{"id":"chatcmpl-9","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","function":{"arguments":"{\"x\""}}]}}]}"#,
        ));
        assert!(steps.is_empty());
        steps.extend(asm.push(&chunk(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":":1}"}}]}}]}"#,
        )));
        steps.extend(asm.finish());
        assert_eq!(
            steps,
            vec![
                Step::Open(0),
                Step::Delta(0, "{\"x\":1}".into()),
                Step::Close(0)
            ]
        );
        assert_eq!(
            asm.blocks[0].kind,
            BlockKind::ToolCall {
                id: "call_a".into(),
                name: "f".into()
            }
        );
    }

    #[test]
    fn upstream_error_chunk_and_done_are_recognised() {
        assert!(parse_chunk("[DONE]").expect("parses").is_none());
        let error = parse_chunk(r#"{"error":{"message":"boom"}}"#).expect("parses");
        assert_eq!(error.map(|r| r.err()), Some(Some("boom".to_owned())));
        assert!(parse_chunk("{nope").is_err());
    }
}
