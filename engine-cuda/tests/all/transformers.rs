//! Parity with Hugging Face transformers (f32, CPU) on the safetensors checkpoints: logits of the
//! last position (every prompt, incl. the 2616-token `long` one, which the automatic chunking
//! runs as 2048 + 568 tokens, and, for Qwen3, fixed chunks of 300 as well), of every position
//! (short prompts), and the greedy continuation through the KV cache.

use helexa_engine_abi::json::LoadSpec;

use crate::common::*;

/// Last-position cosine similarity must reach this.
const MIN_COSINE: f64 = 0.9999;
/// Largest absolute logit difference allowed at any compared position (logits span ~±20;
/// measured ≤ 2.2e-5, the rest is f32 summation order).
const MAX_ABS: f32 = 1e-4;
/// Greedy steps are compared up to the first one whose reference margin is below this.
const MARGIN: f32 = 0.05;

fn parity(model: &str) {
    parity_in_chunks(model, None);
}

/// [`parity`] with the prompt cut into `chunk`-token forward passes (`None`: the engine's
/// automatic chunks).
fn parity_in_chunks(model: &str, chunk: Option<u32>) {
    let reference = reference(model);
    let engine = engine();
    let spec = LoadSpec {
        prefill_chunk: chunk,
        ..safetensors_spec(model, &reference.architecture)
    };
    let loaded = engine.load(&spec).expect("load");
    assert_eq!(loaded.vocab_size, 2048);
    assert_eq!(loaded.dtype, "f32");
    for name in PROMPTS {
        let p = &reference.prompts[name];
        // Greedy first: its prompt then goes through generate's own chunked prefill (after
        // `forward_logits`, generate would find the whole prompt cached and reuse it).
        let params = greedy(u32::try_from(p.greedy_token_ids.len()).expect("len"));
        let (tokens, summary) = run(&engine, loaded.handle, &params, &p.token_ids);
        let n = assert_greedy(
            &format!("{model}/{name}"),
            &tokens,
            &p.greedy_token_ids,
            &p.greedy_top1_minus_top2,
            MARGIN,
        );
        assert_eq!(summary.prompt_tokens as usize, p.token_ids.len());

        let expected = read_logits(&model_dir(model).join(&p.logits_file), p.logits_shape);
        let got = engine
            .forward_logits(loaded.handle, &p.token_ids)
            .expect("forward_logits");
        assert_eq!(got.len(), p.token_ids.len());
        // The reference rows are the last `rows` positions.
        let first = got.len() - expected.len();
        let (last_got, last_ref) = (&got[got.len() - 1], &expected[expected.len() - 1]);
        let cos = cosine(last_got, last_ref);
        let mut worst = 0f32;
        for (i, row) in expected.iter().enumerate() {
            let g = &got[first + i];
            let (c, m) = (cosine(g, row), max_abs(g, row));
            let at = format!(
                "{model}/{name} row {}: cosine {c:.7}, max-abs {m:.2e}",
                first + i
            );
            assert!(m <= MAX_ABS, "{at}: max-abs above {MAX_ABS}");
            assert!(c >= MIN_COSINE, "{at}: cosine below {MIN_COSINE}");
            assert_eq!(argmax(g), argmax(row), "{at}: argmax differs");
            worst = worst.max(m);
        }
        assert!(
            cos >= MIN_COSINE,
            "{model}/{name}: last-position cosine {cos}"
        );
        assert!(
            worst <= MAX_ABS,
            "{model}/{name}: max-abs {worst} over {} rows",
            expected.len()
        );

        eprintln!(
            "transformers parity {model}/{name}: rows {} 1-cosine(last) {:.1e} max-abs {worst:.2e}; greedy {n}/{} steps equal",
            expected.len(),
            1.0 - cos,
            p.greedy_token_ids.len()
        );
    }
}

#[test]
fn qwen3_matches_transformers() {
    parity("tiny-qwen3");
}

/// Nine chunks for the long prompt: every chunk boundary, and the chunks before the last run
/// without logits, still give the reference's rows and continuation.
#[test]
fn qwen3_matches_transformers_in_small_chunks() {
    parity_in_chunks("tiny-qwen3", Some(300));
}

#[test]
fn llama_matches_transformers() {
    parity("tiny-llama");
}

#[test]
fn qwen3_moe_matches_transformers() {
    parity("tiny-qwen3-moe");
}
