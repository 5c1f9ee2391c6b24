//! Errors: the SDK's [`PolicyError`], which the WIT glue passes to the host unchanged.
//!
//! `InvalidInput` is a client mistake (the gateway answers 400 in the client's envelope, with
//! this message), `BadSettings` an operator mistake, `Internal` anything else (an upstream body
//! that is not a chat completion).

pub use helexa_policy_sdk::PolicyError;

/// A client error; the message names the offending field.
pub(crate) fn invalid(message: impl Into<String>) -> PolicyError {
    PolicyError::InvalidInput(message.into())
}

/// An upstream (node) body the translator cannot read.
pub(crate) fn upstream(message: impl Into<String>) -> PolicyError {
    PolicyError::Internal(message.into())
}
