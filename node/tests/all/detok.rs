//! Incremental detokenization against one-shot decoding of real token sequences.

use helexa_node::detok::ModelTokenizer;

use crate::{fixtures, read_json};

#[test]
fn streamed_pieces_equal_one_shot_decode() {
    let tokenizer = ModelTokenizer::from_file(
        &fixtures().join("tiny-qwen3/tokenizer.json"),
        &[2, 0],
        Some("<|im_end|>"),
    )
    .expect("tokenizer");
    assert_eq!(tokenizer.eos_ids, vec![2, 0]);
    let reference = read_json(&fixtures().join("tiny-qwen3/reference.json"));
    let cases = read_json(&fixtures().join("templates/cases.json"));
    let mut sequences: Vec<Vec<u32>> = ["chat", "think", "tools"]
        .iter()
        .map(|name| {
            reference["prompts"][name]["greedy_token_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect()
        })
        .collect();
    // "Grüße 🌍 — naïve café 你好": multi-byte characters split across byte-level tokens.
    let unicode = cases["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "unicode")
        .expect("unicode case");
    sequences.push(
        unicode["expected_token_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect(),
    );
    for ids in sequences {
        let mut detok = tokenizer.detokenizer();
        let mut streamed = String::new();
        let mut pieces = 0;
        for &id in &ids {
            let piece = detok.push(id).expect("push");
            assert!(
                !piece.contains('\u{FFFD}'),
                "broken UTF-8 emitted: {piece:?}"
            );
            pieces += usize::from(!piece.is_empty());
            streamed.push_str(&piece);
        }
        streamed.push_str(&detok.finish().expect("finish"));
        let visible: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| tokenizer.is_visible(id))
            .collect();
        assert_eq!(streamed, tokenizer.decode(&visible).expect("decode"));
        assert!(pieces > 1, "text must stream in pieces");
        // Hidden specials (<|im_end|>, <|im_start|>) never show; markers (<think>) do.
        assert!(!streamed.contains("<|im_end|>") && !streamed.contains("<|im_start|>"));
    }
    let mut detok = tokenizer.detokenizer();
    let think: String = [3u32, 207, 4]
        .iter()
        .map(|&id| detok.push(id).expect("push"))
        .collect();
    assert_eq!(think, "<think>\n</think>");
}
