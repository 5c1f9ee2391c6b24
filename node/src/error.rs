//! The node library's one error type; each variant names the phase that failed.

/// Everything that can fail inside the node (outside the HTTP layer, see [`crate::api::ApiError`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The template itself rejected the conversation (`raise_exception`): a client error.
    #[error("{0}")]
    TemplateRejected(String),
    /// Reading or using a tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// Resolving model files failed.
    #[error("model source: {0}")]
    Source(String),
}
