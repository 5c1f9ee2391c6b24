//! Token selection from logits: penalties, then greedy argmax (temperature 0) or temperature,
//! top-k, top-p and min-p filtering followed by a draw from a seeded `StdRng`.

use std::collections::HashMap;

use helexa_engine_abi::json::Sampling;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Per-request sampler state.
pub struct Sampler {
    params: Sampling,
    rng: StdRng,
    /// Occurrences of each generated token (presence/frequency penalties).
    generated: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: &Sampling) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            params: params.clone(),
            rng,
            generated: HashMap::new(),
        }
    }

    /// Whether the pick is the plain argmax of the logits (temperature 0, no penalties), so the
    /// logits need not leave the device.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        let penalised = (p.repetition_penalty > 0.0 && p.repetition_penalty != 1.0)
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0;
        !penalised && (p.temperature <= 0.0 || !p.temperature.is_finite())
    }

    /// Records a token produced by this request.
    pub fn observe(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
    }

    /// Picks the next token. `seen` holds prompt + generated tokens (repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        self.apply_penalties(logits, seen);
        let p = &self.params;
        if p.temperature <= 0.0 || !p.temperature.is_finite() {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (u32::try_from(i).unwrap_or(u32::MAX), l / p.temperature))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(usize::try_from(p.top_k).unwrap_or(usize::MAX).max(1));
        }
        // Softmax over the survivors (sorted, so the max is first).
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, q) in probs.iter().enumerate() {
            if r < *q {
                return cand[i].0;
            }
            r -= q;
        }
        cand[probs.len() - 1].0
    }

    fn apply_penalties(&self, logits: &mut [f32], seen: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty > 0.0 && p.repetition_penalty != 1.0 {
            // CTRL / transformers convention: shrink positive logits, grow negative ones, once
            // per distinct token.
            let mut done = std::collections::HashSet::new();
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize)
                    && done.insert(t)
                {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            // OpenAI convention: over generated tokens only.
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    #[allow(clippy::cast_precision_loss, reason = "counts are small")]
                    let count = n as f32;
                    *l -= p.presence_penalty + p.frequency_penalty * count;
                }
            }
        }
    }
}

/// Index of the largest logit (the lowest index on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    u32::try_from(best).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Sampling {
        Sampling::default()
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(&params());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]), 1);
    }

    /// Only temperature 0 without penalties may pick on the device (`fused::argmax`): any
    /// penalty or temperature needs the logits on the host.
    #[test]
    fn plain_greedy_is_temperature_zero_without_penalties() {
        let with = |f: &dyn Fn(&mut Sampling)| {
            let mut p = params();
            f(&mut p);
            Sampler::new(&p).is_plain_greedy()
        };
        assert!(with(&|_| {}));
        assert!(with(&|p| p.repetition_penalty = 1.0));
        assert!(!with(&|p| p.temperature = 0.7));
        assert!(!with(&|p| p.repetition_penalty = 1.1));
        assert!(!with(&|p| p.presence_penalty = 0.5));
        assert!(!with(&|p| p.frequency_penalty = -0.5));
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let mut p = params();
        p.repetition_penalty = 2.0;
        let mut s = Sampler::new(&p);
        // 3.0 / 2 = 1.5 < 2.9: the seen token loses.
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[1]), 2);
    }

    #[test]
    fn presence_and_frequency_penalties_apply_to_generated_tokens() {
        let mut p = params();
        p.frequency_penalty = 0.1;
        p.presence_penalty = 0.0;
        let mut s = Sampler::new(&p);
        s.observe(1);
        s.observe(1);
        // 3.0 - 0.2 = 2.8 < 2.9
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]), 2);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_top_k_1_is_greedy() {
        let mut p = params();
        p.temperature = 1.0;
        p.seed = Some(7);
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |p: &Sampling| {
            let mut s = Sampler::new(p);
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "{a:?}"
        );
        p.top_k = 1;
        assert!(draw(&p).iter().all(|&t| t == argmax(&logits)));
    }

    #[test]
    fn top_p_and_min_p_restrict_the_support() {
        let logits = [5.0, 4.9, 0.0, -3.0, -5.0];
        let mut p = params();
        p.temperature = 1.0;
        p.seed = Some(1);
        p.top_p = 0.5;
        let mut s = Sampler::new(&p);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
        p.top_p = 1.0;
        p.min_p = 0.5;
        let mut s = Sampler::new(&p);
        for _ in 0..50 {
            assert!(s.sample(&mut logits.clone(), &[]) <= 1);
        }
    }
}
