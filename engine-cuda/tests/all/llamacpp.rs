//! Parity with llama.cpp on the GGUF files of `fixtures/` (llama.cpp's own conversion and
//! quantization): logits and greedy continuations against `reference-llamacpp.json`.
//!
//! Tolerances per type come from how the two implementations differ: llama.cpp computes BF16
//! models with bf16 activations (we use f32), and for block-quantized types both quantize the
//! activations to 8 bits but accumulate in a different order.

use crate::common::*;

struct Tolerance {
    /// Minimum cosine similarity of every compared logits row.
    cosine: f64,
    /// Maximum absolute difference of every compared logits row.
    max_abs: f32,
    /// Greedy steps are compared up to the first whose llama.cpp margin is below this.
    margin: f32,
}

fn tolerance(ty: &str) -> Tolerance {
    match ty {
        "BF16" => Tolerance {
            cosine: 0.9999,
            max_abs: 0.08,
            margin: 0.1,
        },
        "Q8_0" => Tolerance {
            cosine: 0.998,
            max_abs: 0.6,
            margin: 0.3,
        },
        "Q6_K" => Tolerance {
            cosine: 0.998,
            max_abs: 0.8,
            margin: 0.4,
        },
        "Q4_K_M" => Tolerance {
            cosine: 0.995,
            max_abs: 1.2,
            margin: 0.6,
        },
        other => panic!("no tolerance for {other}"),
    }
}

fn parity(model: &str, ty: &str) {
    let file = format!("{model}-{ty}.gguf");
    let tol = tolerance(ty);
    let prompts = reference(model).prompts;
    let llamacpp = llamacpp_reference(model);
    let refs = &llamacpp.files[&file].prompts;
    let arch = reference(model).architecture;
    let engine = engine();
    let loaded = engine
        .load(&gguf_spec(model, &arch, &file))
        .expect("load gguf");
    assert_eq!(loaded.quant, ty.to_lowercase());
    for name in PROMPTS {
        let r = &refs[name];
        let ids = &prompts[name].token_ids;
        // Greedy first, so that generate runs its own chunked prefill (after `forward_logits` it
        // would find the prompt cached).
        let params = greedy(u32::try_from(r.greedy_token_ids.len()).expect("len"));
        let (tokens, _) = run(&engine, loaded.handle, &params, ids);
        let n = assert_greedy(
            &format!("{file}/{name}"),
            &tokens,
            &r.greedy_token_ids,
            &r.greedy_top1_minus_top2,
            tol.margin,
        );
        let expected = read_logits(
            &model_dir(model).join("gguf").join(&r.logits_file),
            r.logits_shape,
        );
        let got = engine
            .forward_logits(loaded.handle, ids)
            .expect("forward_logits");
        let first = got.len() - expected.len();
        let mut worst = 0f32;
        let mut worst_cos = 1f64;
        for (i, row) in expected.iter().enumerate() {
            let g = &got[first + i];
            worst = worst.max(max_abs(g, row));
            worst_cos = worst_cos.min(cosine(g, row));
        }
        let last_cos = cosine(&got[got.len() - 1], &expected[expected.len() - 1]);
        assert!(
            worst_cos >= tol.cosine,
            "{file}/{name}: cosine {worst_cos} < {}",
            tol.cosine
        );
        assert!(
            worst <= tol.max_abs,
            "{file}/{name}: max-abs {worst} > {}",
            tol.max_abs
        );

        eprintln!(
            "llama.cpp parity {file}/{name}: rows {} cosine(last) {last_cos:.6} cosine(min) {worst_cos:.6} max-abs {worst:.3}; greedy {n}/{} steps equal",
            expected.len(),
            r.greedy_token_ids.len()
        );
    }
}

#[test]
fn qwen3_bf16_matches_llamacpp() {
    parity("tiny-qwen3", "BF16");
}

#[test]
fn qwen3_q8_0_matches_llamacpp() {
    parity("tiny-qwen3", "Q8_0");
}

#[test]
fn qwen3_q6_k_matches_llamacpp() {
    parity("tiny-qwen3", "Q6_K");
}

#[test]
fn qwen3_q4_k_m_matches_llamacpp() {
    parity("tiny-qwen3", "Q4_K_M");
}

#[test]
fn llama_q4_k_m_matches_llamacpp() {
    // Llama GGUFs hold Q/K rows permuted by llama.cpp's converter for interleaved rotary pairs.
    parity("tiny-llama", "Q4_K_M");
}

#[test]
fn qwen3_moe_q8_0_matches_llamacpp() {
    // Experts are stored stacked (`ffn_*_exps`) and split per expert at load.
    parity("tiny-qwen3-moe", "Q8_0");
}
