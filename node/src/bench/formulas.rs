//! The ceilings: what the hardware would allow if one resource were the only limit.
//!
//! - decode tok/s ≤ memory bandwidth ÷ bytes read per token, where a token reads every weight
//!   once as the engine holds it (block-quantized GGUF matrices as stored, everything else in the
//!   compute dtype), one row of the embedding table, and the K and V cache of every layer at the
//!   mean context of the timed tokens;
//! - prefill tok/s ≤ FLOP rate ÷ FLOPs per token, where a token costs 2 FLOPs per matrix
//!   parameter of the layers, the LM head once per prompt (only the last position's logits are
//!   computed), and causal attention (QKᵀ and AV over the keys before it: 4 · head_dim FLOPs per
//!   key and head, i.e. 2 · layers · heads · head_dim · (N + 1) on average over N positions);
//! - load seconds ≥ file bytes ÷ read bandwidth.
//!
//! Dense decoders only: a mixture-of-experts model would read and multiply only its active experts.

use serde::Serialize;

use super::model::{ModelDescription, Stored};

/// The hardware rates the figures are compared with (defaults: an H200).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceilings {
    /// Memory read bandwidth, bytes/s (decode).
    pub mem_bandwidth: f64,
    /// Dense matmul rate, FLOP/s (prefill).
    pub flops: f64,
    /// File read bandwidth, bytes/s (load).
    pub load_bandwidth: f64,
}

/// Bytes per element of an engine compute dtype name.
pub fn dtype_bytes(dtype: &str) -> Option<u64> {
    match dtype {
        "f32" | "float32" => Some(4),
        "bf16" | "bfloat16" | "f16" | "float16" => Some(2),
        _ => None,
    }
}

/// FLOPs per prompt token of an `n`-token prefill.
pub fn prefill_flops_per_token(m: &ModelDescription, n: u32) -> f64 {
    let n = f64::from(n.max(1));
    let d = &m.dims;
    let layer_matmul: u64 = m
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2 && !t.is_embedding() && !t.is_head())
        .map(|t| t.elements())
        .sum();
    let head = (d.vocab * d.hidden) as f64;
    let attention = 2.0 * (d.layers * d.heads * d.head_dim) as f64 * (n + 1.0);
    2.0 * layer_matmul as f64 + 2.0 * head / n + attention
}

/// Bytes read per decoded token after a `context`-token prompt, averaged over `tokens` tokens.
pub fn decode_bytes_per_token(
    m: &ModelDescription,
    dtype_bytes: u64,
    context: u32,
    tokens: u32,
) -> f64 {
    let d = &m.dims;
    let stored = |s: Stored, elements: u64| match s {
        Stored::Float => elements * dtype_bytes,
        Stored::Quantized(bytes) => bytes,
    };
    let has_head = m.tensors.iter().any(|t| t.is_head());
    let mut weights = 0u64;
    for t in &m.tensors {
        if t.is_embedding() {
            // The engine keeps embeddings dense in the compute dtype and reads one row; a tied
            // head multiplies with the whole (stored) table.
            weights += d.hidden * dtype_bytes;
            if !has_head {
                weights += stored(t.stored, t.elements());
            }
        } else {
            weights += stored(t.stored, t.elements());
        }
    }
    // The k-th timed token (k = 1..=tokens) attends over context + k positions.
    let mean_positions = f64::from(context) + (f64::from(tokens) + 1.0) / 2.0;
    let kv_per_position = 2 * d.layers * d.kv_heads * d.head_dim * dtype_bytes;
    weights as f64 + kv_per_position as f64 * mean_positions
}

#[cfg(test)]
mod tests {
    use helexa_model_synth::{Format, Shape};

    use super::*;
    use crate::bench::model::{Dims, Tensor};

    /// The description of a synthesized shape without writing it.
    fn describe(shape: &Shape, format: Format) -> ModelDescription {
        let tensors = shape
            .tensors()
            .into_iter()
            .map(|t| {
                let dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
                let elements: u64 = dims.iter().product();
                let stored = match format.gguf_dtype(&t, shape) {
                    Some(d) if d.block_size() > 1 => {
                        Stored::Quantized(elements / d.block_size() as u64 * d.type_size() as u64)
                    }
                    _ => Stored::Float,
                };
                let name = if format.is_gguf() {
                    t.gguf_name
                } else {
                    t.hf_name
                };
                Tensor { name, dims, stored }
            })
            .collect();
        ModelDescription {
            architecture: "Qwen3ForCausalLM".to_owned(),
            files: Default::default(),
            file_bytes: 0,
            dims: Dims {
                hidden: shape.hidden_size as u64,
                layers: shape.num_hidden_layers as u64,
                heads: shape.num_attention_heads as u64,
                kv_heads: shape.num_key_value_heads as u64,
                head_dim: shape.head_dim as u64,
                vocab: shape.vocab_size as u64,
            },
            tensors,
        }
    }

    #[test]
    fn qwen3_8b_bf16_decode_reads_about_15_gb_per_token() {
        let shape = Shape::preset("qwen3-8b").unwrap();
        let m = describe(&shape, Format::Bf16);
        // 8.19e9 parameters, of which the 151936 × 4096 embedding table is read one row at a time.
        assert_eq!(m.parameters(), 8_190_735_360);
        let embed = 151_936 * 4096;
        let weights = (8_190_735_360u64 - embed + 4096) * 2;
        let at_empty = decode_bytes_per_token(&m, 2, 0, 128);
        // KV: 2 (K, V) × 36 layers × 8 heads × 128 × 2 bytes = 147456 B per position, at a mean
        // of 64.5 positions.
        assert_eq!(at_empty, weights as f64 + 147_456.0 * 64.5);
        // ≈ 291 tok/s on 4.40 TB/s.
        let ceiling = 4.40e12 / at_empty;
        assert!((285.0..295.0).contains(&ceiling), "{ceiling}");
        let at_4096 = decode_bytes_per_token(&m, 2, 4096, 128);
        assert_eq!(at_4096 - at_empty, 147_456.0 * 4096.0);
    }

    #[test]
    fn quantized_decode_reads_fewer_bytes_in_the_expected_ratio() {
        let shape = Shape::preset("qwen3-8b").unwrap();
        let bf16 = decode_bytes_per_token(&describe(&shape, Format::Bf16), 2, 0, 128);
        let q8 = decode_bytes_per_token(&describe(&shape, Format::Q8_0), 2, 0, 128);
        let q4 = decode_bytes_per_token(&describe(&shape, Format::Q4KM), 2, 0, 128);
        // Q8_0 is 34 bytes per 32 weights (8.5 bits), Q4_K 144 per 256 (4.5), Q6_K 210 per 256.
        assert!((0.52..0.54).contains(&(q8 / bf16)), "{}", q8 / bf16);
        assert!((0.29..0.33).contains(&(q4 / bf16)), "{}", q4 / bf16);
    }

    #[test]
    fn prefill_flops_count_matmuls_head_once_and_causal_attention() {
        let shape = Shape::preset("qwen3-8b").unwrap();
        let m = describe(&shape, Format::Bf16);
        let layer_params: u64 = 36 * (4096 * 4096 * 2 + 1024 * 4096 * 2 + 3 * 4096 * 12288);
        let f = prefill_flops_per_token(&m, 512);
        let expected = 2.0 * layer_params as f64
            + 2.0 * (151_936.0 * 4096.0) / 512.0
            + 2.0 * 36.0 * 32.0 * 128.0 * 513.0;
        assert_eq!(f, expected);
        // ≈ 1.4e10 FLOP/token → ≈ 56k tok/s on 790 TFLOP/s.
        assert!(
            (55_000.0..58_000.0).contains(&(790e12 / f)),
            "{}",
            790e12 / f
        );
    }
}
