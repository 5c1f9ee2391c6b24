//! Engine behaviour: prefix reuse, stop/length/cancel, seeded sampling, load validation, error
//! kinds and poisoning.

use helexa_engine_abi::json::{Finish, GenerateParams, Sampling};
use helexa_engine_abi::{ErrorKind, Flow};

use crate::common::*;

const QWEN3: &str = "Qwen3ForCausalLM";

fn prompt(name: &str) -> Vec<u32> {
    reference("tiny-qwen3").prompts[name].token_ids.clone()
}

#[test]
fn kv_prefix_reuse_reports_reused_tokens_and_matches_a_fresh_run() {
    let engine = engine();
    let h = engine
        .load(&safetensors_spec("tiny-qwen3", QWEN3))
        .expect("load")
        .handle;
    let chat = prompt("chat");

    let (first, s1) = run(&engine, h, &greedy(8), &chat);
    assert_eq!(s1.reused_prompt_tokens, 0, "nothing cached yet");
    assert_eq!(first.len(), 8);

    // A follow-up turn: the previous prompt, part of the answer, and new tokens.
    let mut follow = chat.clone();
    follow.extend_from_slice(&first[..5]);
    follow.extend_from_slice(&[2, 207, 1, 289]);
    let (second, s2) = run(&engine, h, &greedy(12), &follow);
    // Cached: the prompt and the 7 answer tokens fed back; shared: prompt + 5 answer tokens.
    assert_eq!(s2.reused_prompt_tokens as usize, chat.len() + 5);
    assert_eq!(s2.prompt_tokens as usize, follow.len());

    let fresh_engine = engine_with_model();
    let (fresh, s3) = run(&fresh_engine.0, fresh_engine.1, &greedy(12), &follow);
    assert_eq!(s3.reused_prompt_tokens, 0);
    assert_eq!(
        second, fresh,
        "reused KV cache gives the same continuation as a fresh run"
    );

    // The same prompt again reuses all but its last token.
    let (third, s4) = run(&engine, h, &greedy(12), &follow);
    assert_eq!(s4.reused_prompt_tokens as usize, follow.len() - 1);
    assert_eq!(third, fresh);

    // A different prompt shares only `<|im_start|>`.
    let think = prompt("think");
    let (_, s5) = run(&engine, h, &greedy(2), &think);
    let common = follow
        .iter()
        .zip(&think)
        .take_while(|(a, b)| a == b)
        .count();
    assert_eq!(s5.reused_prompt_tokens as usize, common);
    assert!(common >= 1);
}

fn engine_with_model() -> (helexa_engine_cuda::Engine, u64) {
    let engine = engine();
    let h = engine
        .load(&safetensors_spec("tiny-qwen3", QWEN3))
        .expect("load")
        .handle;
    (engine, h)
}

#[test]
fn small_prefill_chunks_give_the_same_logits() {
    let engine = engine();
    let mut spec = safetensors_spec("tiny-qwen3", QWEN3);
    let a = engine.load(&spec).expect("load").handle;
    spec.prefill_chunk = Some(7);
    let b = engine.load(&spec).expect("load").handle;
    let ids = prompt("tools");
    let (la, lb) = (
        engine.forward_logits(a, &ids).expect("a"),
        engine.forward_logits(b, &ids).expect("b"),
    );
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            max_abs(x, y) < 1e-4,
            "chunked prefill changes logits by {}",
            max_abs(x, y)
        );
    }
}

#[test]
fn stop_length_and_cancel() {
    let (engine, h) = engine_with_model();
    let tools = reference("tiny-qwen3").prompts["tools"].clone();
    // The reference continuation ends with <|im_end|>: a stop token, delivered then reported.
    let (tokens, s) = run(&engine, h, &greedy(64), &tools.token_ids);
    assert_eq!(s.finish, Finish::Stop);
    assert_eq!(s.stop_id, Some(2));
    assert_eq!(tokens.last(), Some(&2));
    assert_eq!(tokens, tools.greedy_token_ids);
    assert_eq!(s.generated_tokens as usize, tokens.len());

    let (tokens, s) = run(&engine, h, &greedy(5), &tools.token_ids);
    assert_eq!(
        (s.finish, s.generated_tokens, tokens.len()),
        (Finish::Length, 5, 5)
    );

    let mut seen = 0;
    let s = engine
        .generate(h, &greedy(40), &tools.token_ids, &mut |_| {
            seen += 1;
            if seen == 3 {
                Flow::Cancel
            } else {
                Flow::Continue
            }
        })
        .expect("generate");
    assert_eq!(
        (s.finish, s.generated_tokens, seen),
        (Finish::Cancelled, 3, 3)
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (engine, h) = engine_with_model();
    let ids = prompt("chat");
    let params = |seed| GenerateParams {
        max_tokens: 24,
        stop_ids: Vec::new(),
        sampling: Sampling {
            temperature: 1.2,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.01,
            repetition_penalty: 1.1,
            presence_penalty: 0.1,
            frequency_penalty: 0.1,
            seed: Some(seed),
        },
    };
    let (a, _) = run(&engine, h, &params(42), &ids);
    let (b, _) = run(&engine, h, &params(42), &ids);
    assert_eq!(a, b, "same seed, same tokens");
    let others: Vec<Vec<u32>> = (0..4)
        .map(|s| run(&engine, h, &params(s), &ids).0)
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds should differ somewhere"
    );
    let (g, _) = run(&engine, h, &greedy(24), &ids);
    assert!(
        others.iter().chain([&a]).any(|o| *o != g),
        "sampling should leave the greedy path"
    );
}

#[test]
fn load_validation_and_error_kinds() {
    let engine = engine();
    let e = engine
        .load(&safetensors_spec("tiny-qwen3", "MambaForCausalLM"))
        .expect_err("arch");
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.message.contains("MambaForCausalLM"), "{}", e.message);

    let mut spec = safetensors_spec("tiny-qwen3", QWEN3);
    spec.files.safetensors = vec![model_dir("tiny-qwen3").join("missing.safetensors")];
    let e = engine.load(&spec).expect_err("missing file");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("missing.safetensors"), "{}", e.message);

    let mut spec = safetensors_spec("tiny-qwen3", QWEN3);
    spec.files.config = None;
    assert_eq!(
        engine.load(&spec).expect_err("no config").kind,
        ErrorKind::BadInput
    );

    let e = engine
        .load(&gguf_spec("tiny-qwen3", QWEN3, "nope.gguf"))
        .expect_err("gguf");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("nope.gguf"), "{}", e.message);

    // A llama checkpoint declared as Qwen3: tensors are missing (no q_norm).
    let mut spec = safetensors_spec("tiny-llama", QWEN3);
    spec.id = "mislabelled".into();
    let e = engine.load(&spec).expect_err("wrong arch");
    assert_eq!(e.kind, ErrorKind::BadInput);
    assert!(e.message.contains("q_norm"), "{}", e.message);

    let mut spec = safetensors_spec("tiny-qwen3", QWEN3);
    spec.dtype = Some("int3".into());
    assert_eq!(
        engine.load(&spec).expect_err("dtype").kind,
        ErrorKind::Unsupported
    );

    let mut spec = safetensors_spec("tiny-qwen3", QWEN3);
    spec.context_length = Some(64);
    let loaded = engine.load(&spec).expect("load");
    assert_eq!(loaded.context_length, 64);
    let h = loaded.handle;
    let too_long = prompt("tools");
    assert_eq!(
        engine
            .generate(h, &greedy(1), &too_long, &mut |_| Flow::Continue)
            .expect_err("ctx")
            .kind,
        ErrorKind::BadInput
    );
    assert_eq!(
        engine
            .generate(h, &greedy(1), &[], &mut |_| Flow::Continue)
            .expect_err("empty")
            .kind,
        ErrorKind::BadInput
    );
    assert_eq!(
        engine
            .generate(h, &greedy(1), &[1, 5000], &mut |_| Flow::Continue)
            .expect_err("id")
            .kind,
        ErrorKind::BadInput
    );
    // Near the context end, generation stops at the context length.
    let (tokens, s) = run(&engine, h, &greedy(100), &prompt("chat"));
    assert_eq!(s.finish, Finish::Length);
    assert!(
        prompt("chat").len() + tokens.len() <= 64 + 1,
        "{}",
        tokens.len()
    );

    assert!(
        engine
            .memory()
            .models
            .iter()
            .any(|m| m.handle == h && m.vram_mb >= 1)
    );
    engine.unload(h).expect("unload");
    assert_eq!(
        engine.unload(h).expect_err("twice").kind,
        ErrorKind::NotFound
    );
    assert_eq!(
        engine
            .generate(h, &greedy(1), &[1], &mut |_| Flow::Continue)
            .expect_err("gone")
            .kind,
        ErrorKind::NotFound
    );
    assert_eq!(
        engine.forward_logits(999, &[1]).expect_err("unknown").kind,
        ErrorKind::NotFound
    );
}

#[test]
fn device_fault_poisons_every_model_on_the_device() {
    let engine = engine();
    let spec = safetensors_spec("tiny-qwen3", QWEN3);
    let bad = engine.load(&spec).expect("load").handle;
    let other = engine.load(&spec).expect("load").handle;
    let ids = prompt("think");
    engine
        .inject_device_fault(bad, "CUDA_ERROR_ILLEGAL_ADDRESS")
        .expect("inject");
    let e = engine
        .generate(bad, &greedy(4), &ids, &mut |_| Flow::Continue)
        .expect_err("fault");
    assert_eq!(e.kind, ErrorKind::DeviceFault);
    assert!(
        e.message.contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{}",
        e.message
    );
    // Both models share the faulted device: both are poisoned, naming the cause.
    for handle in [bad, other] {
        let e = engine
            .generate(handle, &greedy(4), &ids, &mut |_| Flow::Continue)
            .expect_err("still poisoned");
        assert_eq!(e.kind, ErrorKind::DeviceFault);
        assert!(
            e.message.contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
            "{}",
            e.message
        );
    }
    assert_eq!(
        engine.load(&spec).expect_err("faulted device").kind,
        ErrorKind::DeviceFault
    );
    assert_eq!(engine.device_faults().len(), 1);
    engine
        .unload(bad)
        .expect("a poisoned model can be unloaded");
    engine.unload(other).expect("unload");
    // The last model gone, the device is re-created and serves again.
    assert!(engine.device_faults().is_empty());
    let good = engine.load(&spec).expect("reload").handle;
    let (tokens, _) = run(&engine, good, &greedy(4), &ids);
    assert_eq!(
        tokens,
        reference("tiny-qwen3").prompts["think"].greedy_token_ids[..4]
    );
}

#[test]
fn engine_info_and_init() {
    let engine = engine();
    let info = engine.info();
    assert_eq!(info.backend, "cpu");
    assert_eq!(info.devices.len(), 1);
    let e = helexa_engine_cuda::Engine::new(&helexa_engine_abi::json::InitOptions {
        devices: Some(vec![3]),
    });
    assert_eq!(e.err().map(|e| e.kind), Some(ErrorKind::BadInput));
}
