//! End-to-end tests of the whole helexa stack: the `helexa` gateway in front of a real
//! `helexa-node` that runs the CPU engine (`libhelexa_engine_cuda.so`) on the bundled
//! `fixtures/tiny-qwen3` model, spoken to over real HTTP with no mocks.
//!
//! This library is intentionally empty; everything lives in `tests/all/`:
//! `harness.rs` finds (or builds) the binaries, starts the stack on free ports and kills it on
//! drop; the other modules exercise the OpenAI, Anthropic and Responses surfaces and assert
//! against `fixtures/tiny-qwen3/reference.json` (answers computed by transformers, not helexa).
//!
//! Run with `cargo test -p helexa-e2e`.
