//! The default translator policy of helexa.
//!
//! helexa nodes speak OpenAI chat completions (`/v1/chat/completions`, with `reasoning_content`
//! for thinking and `tool_calls`). This policy lets clients of other API surfaces use them:
//!
//! | surface | request | response | stream |
//! |---|---|---|---|
//! | Anthropic Messages | [`anthropic::to_chat`] | [`anthropic::from_chat`] | [`anthropic::MessagesStream`] |
//! | OpenAI Responses | [`responses::to_chat`] | [`responses::from_chat`] | [`responses::ResponsesStream`] |
//! | OpenAI chat / completions | unchanged | unchanged | chunks passed through, then `[DONE]` |
//!
//! Layout: [`chat`] reads what the node produces (whole completions and chunk streams) into an
//! ordered list of blocks — reasoning, text, one per tool call — which each surface renders in
//! its own words; that keeps the streamed and non-streamed answers of a surface identical.
//! All logic is plain Rust over `serde_json` values and unit-tested natively; the WIT glue is one
//! `export_translator!` under `cfg(target_arch = "wasm32")`.
//!
//! Guest constraints: no clock (timestamps come from the upstream `created`), no randomness (ids
//! derive from the ids the host and the node assign; hence no `HashMap` with `RandomState`), and
//! no stderr (diagnostics go through the host's `log` import, [`helexa_policy_sdk::log`]).

pub mod anthropic;
pub mod chat;
pub mod error;
mod json;
pub mod responses;

pub use error::PolicyError;
pub use helexa_policy_sdk::{SseEvent, Surface, Translator, TranslatorStream};
pub use json::RAW_ARGUMENTS_KEY;
pub use responses::ReasoningMode;

/// Operator settings (`{}` by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How reasoning reaches Responses clients: `"summary"` (default) or `"content"`.
    pub responses_reasoning: ReasoningMode,
}

/// The default translator: stateless apart from its settings.
#[derive(Debug, Clone, Default)]
pub struct DefaultTranslator {
    settings: Settings,
}

impl Translator for DefaultTranslator {
    type Stream = ResponseStream;

    /// Reads the operator's settings (JSON text; empty means defaults).
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        Ok(Self {
            settings: helexa_policy_sdk::parse_settings(settings)?,
        })
    }

    fn request_to_chat(&self, from: Surface, body: &str) -> Result<String, PolicyError> {
        match from {
            Surface::OpenaiChat | Surface::OpenaiCompletions => Ok(body.to_owned()),
            Surface::AnthropicMessages => anthropic::to_chat(body),
            Surface::OpenaiResponses => responses::to_chat(body),
        }
    }

    fn response_from_chat(
        &self,
        to: Surface,
        request: &str,
        body: &str,
    ) -> Result<String, PolicyError> {
        match to {
            Surface::OpenaiChat | Surface::OpenaiCompletions => Ok(body.to_owned()),
            Surface::AnthropicMessages => anthropic::from_chat(request, body),
            Surface::OpenaiResponses => {
                responses::from_chat(request, body, self.settings.responses_reasoning)
            }
        }
    }

    fn new_stream(&self, to: Surface, request: &str, response_id: &str) -> ResponseStream {
        match to {
            Surface::OpenaiChat | Surface::OpenaiCompletions => {
                ResponseStream::Passthrough(Passthrough::default())
            }
            Surface::AnthropicMessages => {
                ResponseStream::Anthropic(anthropic::MessagesStream::new(request, response_id))
            }
            Surface::OpenaiResponses => ResponseStream::Responses(responses::ResponsesStream::new(
                request,
                response_id,
                self.settings.responses_reasoning,
            )),
        }
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_translator!(DefaultTranslator);

/// One streamed response of any surface.
#[derive(Debug, Clone)]
pub enum ResponseStream {
    /// OpenAI chat / completions: the node's chunks as they are.
    Passthrough(Passthrough),
    /// Anthropic Messages events.
    Anthropic(anthropic::MessagesStream),
    /// OpenAI Responses events.
    Responses(responses::ResponsesStream),
}

impl TranslatorStream for ResponseStream {
    fn push(&mut self, chunk: &str) -> Result<Vec<SseEvent>, PolicyError> {
        match self {
            Self::Passthrough(stream) => Ok(stream.push(chunk)),
            Self::Anthropic(stream) => stream.push(chunk),
            Self::Responses(stream) => stream.push(chunk),
        }
    }

    fn keepalive(&mut self) -> Vec<SseEvent> {
        match self {
            Self::Passthrough(_) => Vec::new(),
            Self::Anthropic(stream) => stream.keepalive(),
            Self::Responses(stream) => stream.keepalive(),
        }
    }

    fn finish(&mut self) -> Result<Vec<SseEvent>, PolicyError> {
        match self {
            Self::Passthrough(stream) => Ok(stream.finish()),
            Self::Anthropic(stream) => stream.finish(),
            Self::Responses(stream) => stream.finish(),
        }
    }

    fn fail(&mut self, message: &str) -> Vec<SseEvent> {
        match self {
            Self::Passthrough(stream) => stream.fail(message),
            Self::Anthropic(stream) => stream.fail(message),
            Self::Responses(stream) => stream.fail(message),
        }
    }
}

/// The chat and completions surfaces already are what the node speaks.
#[derive(Debug, Clone, Default)]
pub struct Passthrough {
    done: bool,
}

impl Passthrough {
    fn push(&mut self, chunk: &str) -> Vec<SseEvent> {
        // `[DONE]` is written once by `finish`, whether or not the host also pushes it.
        if self.done || chunk.trim() == "[DONE]" {
            return Vec::new();
        }
        vec![SseEvent {
            event: None,
            data: chunk.to_owned(),
        }]
    }

    fn finish(&mut self) -> Vec<SseEvent> {
        if std::mem::replace(&mut self.done, true) {
            return Vec::new();
        }
        vec![SseEvent {
            event: None,
            data: "[DONE]".to_owned(),
        }]
    }

    /// OpenAI streams report a mid-stream failure as a chunk holding an error envelope.
    fn fail(&mut self, message: &str) -> Vec<SseEvent> {
        if std::mem::replace(&mut self.done, true) {
            return Vec::new();
        }
        let data = serde_json::json!({
            "error": {"message": message, "type": "server_error", "param": null, "code": null}
        });
        vec![SseEvent {
            event: None,
            data: data.to_string(),
        }]
    }
}
