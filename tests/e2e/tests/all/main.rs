//! End-to-end tests: gateway + real node + real CPU engine + `fixtures/tiny-qwen3`, over HTTP.
//! Expected answers come from `fixtures/tiny-qwen3/reference.json` where it defines them
//! (greedy continuations computed by transformers), otherwise from the protocols.

mod anthropic;
mod harness;
mod openai;
mod responses;
mod rust_client;
