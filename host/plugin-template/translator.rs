//! {{name}}: a helexa translation policy (world `translator` of `helexa:policy@0.1.0`).
//!
//! **A starting point, not a translator yet.** Nodes speak OpenAI chat completions; a
//! translator turns other surfaces (Anthropic messages, OpenAI responses, completions)
//! into chat requests and the answers back. This one passes OpenAI chat bodies and
//! stream chunks through unchanged and refuses every other surface with a clear
//! `invalid-input` (a 400 to the client) — so installing it as-is makes the gateway
//! serve only `/v1/chat/completions`. Replace [`request_to_chat`], [`response_from_chat`]
//! and the [`Stream`] state machine with your own mapping.
//!
//! It takes no settings (`{}`); any key is refused so a typo is reported.

wit_bindgen::generate!({ path: "wit", world: "translator" });

use std::cell::RefCell;

use exports::helexa::policy::translation::{Guest, GuestResponseStream, SseEvent};
use helexa::policy::types::{PolicyError, Surface};
use serde::Deserialize;

/// No settings: an empty object only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

/// The exported policy (stateless).
pub struct Policy;

impl Guest for Policy {
    type ResponseStream = Stream;

    fn configure(settings: String) -> Result<(), PolicyError> {
        let text = if settings.trim().is_empty() {
            "{}"
        } else {
            &settings
        };
        serde_json::from_str::<Settings>(text)
            .map(drop)
            .map_err(|error| PolicyError::BadSettings(error.to_string()))
    }

    fn request_to_chat(from: Surface, body: String) -> Result<String, PolicyError> {
        request_to_chat(from, body)
    }

    fn response_from_chat(
        to: Surface,
        _request: String,
        body: String,
    ) -> Result<String, PolicyError> {
        response_from_chat(to, body)
    }
}

// Only the wasm build exports the interface; native builds (unit tests) skip the glue.
#[cfg(target_arch = "wasm32")]
export!(Policy);

/// Why a surface other than OpenAI chat is refused.
fn unsupported(surface: Surface) -> PolicyError {
    PolicyError::InvalidInput(format!(
        "this gateway's translator passes OpenAI chat completions through and does not \
         translate {surface:?}; use POST /v1/chat/completions"
    ))
}

/// A client body into an OpenAI chat completions request: the identity for OpenAI chat.
pub fn request_to_chat(from: Surface, body: String) -> Result<String, PolicyError> {
    match from {
        Surface::OpenaiChat => Ok(body),
        other => Err(unsupported(other)),
    }
}

/// A complete chat completion into the client's surface: the identity for OpenAI chat.
pub fn response_from_chat(to: Surface, body: String) -> Result<String, PolicyError> {
    match to {
        Surface::OpenaiChat => Ok(body),
        other => Err(unsupported(other)),
    }
}

/// One streamed response: chunks pass through as `data:` events.
pub struct Stream {
    /// Whether `finish` or `fail` already closed the stream (nothing is sent after that).
    closed: RefCell<bool>,
}

impl GuestResponseStream for Stream {
    fn new(_to: Surface, _request: String, _response_id: String) -> Self {
        Stream {
            closed: RefCell::new(false),
        }
    }

    fn push(&self, chunk: String) -> Result<Vec<SseEvent>, PolicyError> {
        Ok(vec![SseEvent {
            event: None,
            data: chunk,
        }])
    }

    fn keepalive(&self) -> Vec<SseEvent> {
        // OpenAI chat has no keep-alive event.
        Vec::new()
    }

    fn finish(&self) -> Result<Vec<SseEvent>, PolicyError> {
        Ok(close(&self.closed, || SseEvent {
            event: None,
            data: "[DONE]".into(),
        }))
    }

    fn fail(&self, message: String) -> Vec<SseEvent> {
        close(&self.closed, || SseEvent {
            event: None,
            data: error_data(&message),
        })
    }
}

/// The closing event, once.
fn close(closed: &RefCell<bool>, event: impl FnOnce() -> SseEvent) -> Vec<SseEvent> {
    if closed.replace(true) {
        Vec::new()
    } else {
        vec![event()]
    }
}

/// An OpenAI-style error object as the `data:` of a terminal event.
pub fn error_data(message: &str) -> String {
    serde_json::json!({ "error": { "message": message, "type": "upstream_error" } }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_chat_passes_through_and_other_surfaces_are_refused() {
        let body = r#"{"model":"m","messages":[]}"#.to_owned();
        assert_eq!(
            request_to_chat(Surface::OpenaiChat, body.clone()).unwrap(),
            body
        );
        assert!(matches!(
            request_to_chat(Surface::AnthropicMessages, body.clone()),
            Err(PolicyError::InvalidInput(_))
        ));
        assert!(response_from_chat(Surface::OpenaiResponses, body).is_err());
    }

    #[test]
    fn errors_are_json_and_a_stream_closes_once() {
        let data = error_data("node \"a\" went away");
        let parsed: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(parsed["error"]["message"], "node \"a\" went away");
        let closed = RefCell::new(false);
        assert_eq!(
            close(&closed, || SseEvent {
                event: None,
                data: "[DONE]".into()
            })
            .len(),
            1
        );
        assert!(
            close(&closed, || SseEvent {
                event: None,
                data: "[DONE]".into()
            })
            .is_empty()
        );
    }
}
