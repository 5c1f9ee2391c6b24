//! Integration tests of the engine against the real fixture models in `fixtures/` (see its
//! README): parity with Hugging Face transformers (safetensors, f32) and with llama.cpp (GGUF),
//! and the engine's behaviour (prefix reuse, sampling, stop/cancel, errors, poisoning).

mod common;
mod devices;
mod engine;
mod llamacpp;
mod transformers;
