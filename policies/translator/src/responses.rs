//! OpenAI Responses (`POST /v1/responses`) ⇄ OpenAI chat completions.
//!
//! Reference: OpenAI's Responses API reference and the type definitions of the official `openai`
//! Python SDK (`types/responses/response_stream_event.py` and the event types it lists).

pub mod request;
pub mod response;
pub mod stream;

pub use request::to_chat;
pub use response::{ReasoningMode, from_chat};
pub use stream::ResponsesStream;
