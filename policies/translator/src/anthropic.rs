//! Anthropic Messages (`POST /v1/messages`) ⇄ OpenAI chat completions.
//!
//! Reference: Anthropic's Messages API and "Streaming Messages" documentation, and the type
//! definitions of the official `anthropic` Python SDK (`types/raw_message_stream_event.py` …).

pub mod request;
pub mod response;
pub mod stream;

pub use request::to_chat;
pub use response::from_chat;
pub use stream::MessagesStream;
