//! Integration tests of the policy runtime against the real embedded components: the
//! default policies built from `policies/` and the misbehaving guests of
//! `policies/test-guests/` (see `build.rs`).

mod cache;
mod common;
mod hostile;
mod router;
mod swap;
mod translator;
