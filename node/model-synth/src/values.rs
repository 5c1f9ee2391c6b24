//! The weights' values: a pure function of (seed, tensor name, row), so every format is the same
//! model, any thread can produce any row, and the result does not depend on the thread count.
//!
//! Rows are seeded SplitMix64 streams (Steele, Lea & Flood, "Fast splittable pseudorandom number
//! generators", 2014; the generator Java's `SplittableRandom` uses) turned into normal deviates by
//! the Box–Muller transform. Matrices are normal(0, 0.02) — Qwen3's `initializer_range` — rounded
//! to bf16, so that the bf16 checkpoint holds the values exactly and the GGUF files quantize those
//! same values, as llama.cpp's converter does with a bf16 checkpoint. Norm weights are 1.0.

use half::bf16;

use crate::shape::{Role, TensorSpec};

/// Standard deviation of the matrices (Qwen3's `initializer_range`).
pub const STD: f32 = 0.02;

/// SplitMix64: a 64-bit state advanced by a Weyl sequence and mixed by a finaliser.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (`n > 0`); the modulo bias is below 2⁻³² for the vocabularies used.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `(0, 1]` with 53 random bits (never 0, so `ln` is finite).
    fn unit_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// FNV-1a 64 of a tensor name: stable across platforms and releases (unlike `std`'s hasher).
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills `out` with row `row` of tensor `t` (bf16-exact values, as f32).
pub fn fill_row(seed: u64, t: &TensorSpec, row: usize, out: &mut [f32]) {
    if t.role == Role::Norm {
        out.fill(1.0);
        return;
    }
    // seed ⊕ name hash picks the tensor; the row index is mixed in through one SplitMix64 step so
    // that neighbouring rows get unrelated streams.
    let tensor_seed = seed ^ name_hash(&t.hf_name);
    let mut rng = SplitMix64::new(
        SplitMix64::new(tensor_seed ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64(),
    );
    for pair in out.chunks_mut(2) {
        let (u1, u2) = (rng.unit_open0(), rng.unit_open0());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        let z = [r * theta.cos(), r * theta.sin()];
        for (o, z) in pair.iter_mut().zip(z) {
            *o = bf16::from_f32(z as f32 * STD).to_f32();
        }
    }
}

/// The whole tensor `t` as f32 (row-major), for tests and small tensors.
pub fn tensor_values(seed: u64, t: &TensorSpec) -> Vec<f32> {
    let (rows, cols) = t.rows_cols();
    let mut out = vec![0f32; rows * cols];
    for (r, row) in out.chunks_mut(cols).enumerate() {
        fill_row(seed, t, r, row);
    }
    out
}
