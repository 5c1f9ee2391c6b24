//! Token selection from logits: penalties, then greedy argmax (temperature 0) or temperature,
//! top-k, top-p and min-p filtering followed by a draw from a seeded `StdRng`.

use std::collections::{HashMap, HashSet};

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
    /// The distinct tokens of `seen` (repetition penalty), and how much of `seen` they cover:
    /// `seen` only grows within a request, so each call absorbs just its new tokens instead of
    /// walking a long prompt again for every generated token.
    seen_set: HashSet<u32>,
    seen_distinct: Vec<u32>,
    seen_absorbed: usize,
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
            seen_set: HashSet::new(),
            seen_distinct: Vec::new(),
            seen_absorbed: 0,
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
        self.sample_penalised(logits)
    }

    /// What a draw on the device needs ([`crate::fused::sample`]): the filters, the penalties
    /// as token lists, and the draw's uniform number, taken from this sampler's generator.
    /// `seen` as for [`Self::sample`].
    pub fn device_draw(&mut self, seen: &[u32]) -> DeviceDraw<'_> {
        let repeating = self.repetition_on();
        if repeating {
            self.absorb_seen(seen);
        }
        let p = &self.params;
        let (generated, subtract) = if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            self.generated
                .iter()
                .map(|(&t, &n)| (t, p.presence_penalty + p.frequency_penalty * count(n)))
                .unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        let uniform = self.rng.random::<f32>();
        let (temperature, top_k, top_p, min_p) =
            if p.temperature <= 0.0 || !p.temperature.is_finite() {
                // A greedy pick (here because of its penalties) is the top-1 draw at any
                // temperature.
                (1.0, 1, 1.0, 0.0)
            } else {
                // top-k 0 is off; a k beyond the vocabulary keeps everything, as off does.
                let top_k = i32::try_from(p.top_k).unwrap_or(0);
                (p.temperature, top_k, p.top_p, p.min_p)
            };
        DeviceDraw {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty: if repeating { p.repetition_penalty } else { 1.0 },
            repeated: if repeating { &self.seen_distinct } else { &[] },
            generated,
            subtract,
            uniform,
        }
    }

    /// Picks the next token from logits whose penalties are already applied (by the device,
    /// when its draw left the pick to the host).
    pub fn sample_penalised(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || !p.temperature.is_finite() {
            return argmax(logits);
        }
        let kept = kept_candidates(logits, p);
        let Some(last) = kept.last() else {
            return argmax(logits);
        };
        let total: f32 = kept.iter().map(|c| c.weight).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in &kept {
            if r < c.weight {
                return c.token;
            }
            r -= c.weight;
        }
        last.token
    }

    fn repetition_on(&self) -> bool {
        let r = self.params.repetition_penalty;
        r > 0.0 && r != 1.0
    }

    /// Adds the tokens of `seen` not absorbed yet to the distinct ones.
    fn absorb_seen(&mut self, seen: &[u32]) {
        if seen.len() < self.seen_absorbed {
            // Not the growing sequence this sampler followed: start over.
            self.seen_set.clear();
            self.seen_distinct.clear();
            self.seen_absorbed = 0;
        }
        for &t in &seen[self.seen_absorbed..] {
            if self.seen_set.insert(t) {
                self.seen_distinct.push(t);
            }
        }
        self.seen_absorbed = seen.len();
    }

    fn apply_penalties(&mut self, logits: &mut [f32], seen: &[u32]) {
        if self.repetition_on() {
            self.absorb_seen(seen);
        }
        let p = &self.params;
        if self.repetition_on() {
            // CTRL / transformers convention: shrink positive logits, grow negative ones, once
            // per distinct token.
            for &t in &self.seen_distinct {
                if let Some(l) = logits.get_mut(t as usize) {
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
                    *l -= p.presence_penalty + p.frequency_penalty * count(n);
                }
            }
        }
    }
}

#[allow(clippy::cast_precision_loss, reason = "counts are small")]
fn count(n: u32) -> f32 {
    n as f32
}

/// A draw for the device ([`Sampler::device_draw`]): the semantics of [`Sampler::sample`], with
/// the penalties as lists and the draw's uniform number in hand.
pub struct DeviceDraw<'a> {
    /// Above 0 (a greedy pick with penalties comes as top-k 1 at temperature 1).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    /// 1 when off.
    pub repetition_penalty: f32,
    /// The distinct tokens the repetition penalty applies to.
    pub repeated: &'a [u32],
    /// Generated tokens (distinct), and what the presence and frequency penalties subtract from
    /// each one's logit.
    pub generated: Vec<u32>,
    pub subtract: Vec<f32>,
    /// In `[0, 1)`: the draw's position in the kept probability mass.
    pub uniform: f32,
}

/// The tokens a draw at `p.temperature` (> 0) chooses from after top-k, min-p and top-p, each
/// with a weight proportional to its probability; empty when no logit is finite.
///
/// No sort of the whole vocabulary (152k candidates took ~4 ms per token on one core, as long as
/// the GPU takes for the token): top-k is a selection, min-p a threshold, and top-p sorts only
/// the candidates at its cut ([`nucleus`]). The kept set is the one of the definitions (a prefix
/// of the candidates in rank order); the probabilities are the same up to the order in which
/// their normaliser is summed.
fn kept_candidates(logits: &[f32], p: &Sampling) -> Vec<Candidate> {
    let k = usize::try_from(p.top_k).unwrap_or(usize::MAX);
    let mut cand = if (1..=SMALL_TOP_K).contains(&k) {
        top_k_streamed(logits, p.temperature, k)
    } else {
        let mut cand: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| Candidate::new(i, l / p.temperature))
            .collect();
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, Candidate::rank);
            cand.truncate(k);
        }
        cand
    };
    if cand.is_empty() {
        return cand;
    }
    let max = cand
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    for c in &mut cand {
        c.weight = (c.logit - max).exp();
    }
    // Probabilities are weight / z, z over the survivors of top-k.
    let z: f32 = cand.iter().map(|c| c.weight).sum();
    if p.min_p > 0.0 {
        // p_i >= p_max · min_p, and the best token's weight is 1.
        cand.retain(|c| c.weight >= p.min_p);
    }
    if p.top_p > 0.0 && p.top_p < 1.0 {
        let keep = nucleus(&mut cand, max, p.top_p * z);
        cand.truncate(keep);
    }
    cand
}

/// A token still in the running: its logit over the temperature, and `exp(logit - max)`.
struct Candidate {
    token: u32,
    logit: f32,
    weight: f32,
}

impl Candidate {
    fn new(index: usize, logit: f32) -> Self {
        Self {
            token: u32::try_from(index).unwrap_or(u32::MAX),
            logit,
            weight: 0.0,
        }
    }

    /// Rank order: higher logit first, then lower token id.
    fn rank(a: &Self, b: &Self) -> std::cmp::Ordering {
        b.logit.total_cmp(&a.logit).then(a.token.cmp(&b.token))
    }
}

/// Largest top-k taken in one streaming pass over the logits ([`top_k_streamed`]) rather than by
/// collecting every candidate and selecting.
const SMALL_TOP_K: usize = 4096;

/// The `k` best finite logits (over `temperature`) in rank order's sense, unsorted: one pass with
/// a heap of the `k` best so far, so nothing is allocated per vocabulary entry (Qwen3's default
/// top-k of 20 made the collect-and-select path most of a draw's time).
fn top_k_streamed(logits: &[f32], temperature: f32, k: usize) -> Vec<Candidate> {
    // Ordered so that the heap's top is the worst kept candidate.
    struct Worst(Candidate);
    impl PartialEq for Worst {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other).is_eq()
        }
    }
    impl Eq for Worst {}
    impl PartialOrd for Worst {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Worst {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            Candidate::rank(&self.0, &other.0)
        }
    }
    let mut heap = std::collections::BinaryHeap::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_finite() {
            continue;
        }
        let c = Candidate::new(i, l / temperature);
        if heap.len() < k {
            heap.push(Worst(c));
        } else if heap
            .peek()
            .is_some_and(|w| Candidate::rank(&c, &w.0).is_lt())
        {
            heap.pop();
            heap.push(Worst(c));
        }
    }
    heap.into_iter().map(|w| w.0).collect()
}

/// Buckets per round of [`nucleus`].
const NUCLEUS_BUCKETS: usize = 64;
/// A window of [`nucleus`] this small is sorted rather than bucketed again.
const NUCLEUS_SORTED: usize = 1024;

/// The length of the top-p nucleus: the shortest prefix of `cand` in rank order whose weights
/// reach `mass`, or all of it; moves that prefix to the front (in no particular order).
///
/// Rounds of bucketing instead of a sort: the candidates not yet placed (a window, ranked after
/// those already in the nucleus) are split into buckets of equal logit width over their range,
/// the weights summed per bucket; the buckets above the one where the mass is reached join the
/// nucleus, and that bucket is the next window. A window of at most [`NUCLEUS_SORTED`] is
/// sorted and walked; one of equal logits (ranked by token id, equal weights) takes as many of
/// its lowest ids as the mass needs. Each round's window spans at most 1/64 of the last one's
/// logit range (the best and the worst fall in different buckets), so a few rounds reach a
/// small or tied window. One round of half-logit buckets sufficed for peaked logits; nearly
/// flat ones (a random-weight model's, where the nucleus holds tens of thousands of tokens)
/// left them in one or a few buckets; the probe's flat case sorted ~50k: 2.0 ms per draw, now
/// 1.0 ms (`sampling_cost`).
fn nucleus(cand: &mut [Candidate], max: f32, mass: f32) -> usize {
    let (mut front, mut end, mut above) = (0, cand.len(), 0.0f32);
    let mut high = max;
    loop {
        let window = &mut cand[front..end];
        if window.len() <= NUCLEUS_SORTED {
            window.sort_unstable_by(Candidate::rank);
            let mut reached = above;
            for (i, c) in window.iter().enumerate() {
                reached += c.weight;
                if reached >= mass {
                    return front + i + 1;
                }
            }
            return end;
        }
        let low = window.iter().map(|c| c.logit).fold(f32::INFINITY, f32::min);
        if high <= low {
            // All tied: equal weights, ranked by token id.
            let w = window[0].weight;
            #[allow(clippy::cast_precision_loss, reason = "a window's length")]
            let all = above + w * (window.len() as f32);
            if all < mass {
                return end;
            }
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a non-negative count, capped below"
            )]
            let need = (((mass - above) / w).ceil() as usize).clamp(1, window.len());
            window.select_nth_unstable_by_key(need - 1, |c| c.token);
            return front + need;
        }
        #[allow(clippy::cast_precision_loss, reason = "a small constant")]
        let scale = NUCLEUS_BUCKETS as f32 / (high - low);
        let bucket = |c: &Candidate| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a non-negative distance, capped"
            )]
            let b = ((high - c.logit) * scale) as usize;
            b.min(NUCLEUS_BUCKETS - 1)
        };
        let mut sums = [0.0f32; NUCLEUS_BUCKETS];
        for c in window.iter() {
            sums[bucket(c)] += c.weight;
        }
        let mut cut = None;
        for (b, &sum) in sums.iter().enumerate() {
            if above + sum >= mass {
                cut = Some(b);
                break;
            }
            above += sum;
        }
        let Some(cut) = cut else {
            return end; // not reached (rounding): all of it
        };
        // The buckets above the cut join the nucleus; the cut's bucket is the next window.
        let mut before = 0;
        for i in 0..window.len() {
            if bucket(&window[i]) < cut {
                window.swap(before, i);
                before += 1;
            }
        }
        let mut at_cut = before;
        for i in before..window.len() {
            if bucket(&window[i]) == cut {
                window.swap(at_cut, i);
                at_cut += 1;
            }
        }
        high = window[before..at_cut]
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        (front, end) = (front + before, front + at_cut);
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

    /// The repetition penalty follows a growing `seen` incrementally and gives what a fresh
    /// sampler computes from the whole sequence (and starts over on a shorter one).
    #[test]
    fn repetition_penalty_tracks_a_growing_sequence() {
        let p = Sampling {
            repetition_penalty: 1.5,
            ..Sampling::default()
        };
        let logits = [2.0f32, -1.0, 3.0, 2.5, 0.5];
        let mut incremental = Sampler::new(&p);
        let mut seen = vec![2, 2];
        for next in [3, 0, 1, 3] {
            let mut a = logits;
            incremental.apply_penalties(&mut a, &seen);
            let mut b = logits;
            Sampler::new(&p).apply_penalties(&mut b, &seen);
            assert_eq!(a, b, "after {seen:?}");
            seen.push(next);
        }
        let mut a = logits;
        incremental.apply_penalties(&mut a, &[1]);
        let mut b = logits;
        Sampler::new(&p).apply_penalties(&mut b, &[1]);
        assert_eq!(a, b, "a shorter sequence");
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

    /// The definitions, computed the plain way: every candidate sorted by rank, top-k, softmax
    /// over the survivors, top-p, then min-p. Returns the ranked tokens with their probability
    /// and cumulative probability, and how many of them are kept.
    pub(super) fn reference(logits: &[f32], p: &Sampling) -> (Vec<(u32, f32, f32)>, usize) {
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (u32::try_from(i).expect("token"), l / p.temperature))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(usize::try_from(p.top_k).expect("k"));
        }
        let max = cand[0].1;
        // Summed in f64: over thousands of kept tokens an f32 running sum drifts by ~1e-4, more
        // than the rounding the checks allow the code under test.
        let z: f64 = cand.iter().map(|(_, l)| f64::from((l - max).exp())).sum();
        let mut acc = 0.0f64;
        #[allow(
            clippy::cast_possible_truncation,
            reason = "probabilities, compared in f32"
        )]
        let ranked: Vec<(u32, f32, f32)> = cand
            .iter()
            .map(|&(t, l)| {
                let q = f64::from((l - max).exp()) / z;
                acc += q;
                (t, q as f32, acc as f32)
            })
            .collect();
        let mut keep = ranked.len();
        if p.top_p > 0.0 && p.top_p < 1.0 {
            keep = ranked
                .iter()
                .position(|&(_, _, c)| c >= p.top_p)
                .map_or(keep, |i| i + 1);
        }
        if p.min_p > 0.0 {
            let floor = ranked[0].1 * p.min_p;
            keep = keep.min(
                ranked
                    .iter()
                    .take_while(|&&(_, q, _)| q >= floor)
                    .count()
                    .max(1),
            );
        }
        (ranked, keep)
    }

    /// The kept tokens and their probabilities equal the plain computation's, over peaked and
    /// flat distributions of a large vocabulary, ties and masked logits, for each filter and
    /// their combinations. A token may fall on the other side of the top-p cut only where the
    /// cumulative probability there is within rounding of top-p (the normaliser is summed in
    /// another order).
    #[test]
    fn kept_candidates_follow_the_definitions() {
        let vocab = 20_000usize;
        #[allow(clippy::cast_precision_loss, reason = "small test values")]
        let noise = |i: usize| ((i * 7919) % 10_007) as f32;
        #[allow(clippy::cast_precision_loss, reason = "small test values")]
        let peaked: Vec<f32> = (0..vocab)
            .map(|i| {
                if i % 997 == 3 {
                    12.0 - (i / 997) as f32 * 0.5
                } else {
                    noise(i) * 1e-3
                }
            })
            .collect();
        let flat: Vec<f32> = (0..vocab).map(|i| noise(i) * 4e-4).collect();
        let mut masked = peaked.clone();
        masked
            .iter_mut()
            .step_by(3)
            .for_each(|l| *l = f32::NEG_INFINITY);
        let mut tied = flat.clone();
        tied[..64].iter_mut().for_each(|l| *l = 9.0);
        // A plateau of 5000 equal best logits: top-p ends inside it, past what is sorted.
        let mut plateau = flat.clone();
        plateau
            .iter_mut()
            .skip(7)
            .step_by(4)
            .take(5000)
            .for_each(|l| *l = 9.0);
        let cases = [
            ("peaked", &peaked),
            ("flat", &flat),
            ("masked", &masked),
            ("tied", &tied),
            ("plateau", &plateau),
        ];
        for (name, logits) in cases {
            for (top_k, top_p, min_p) in [
                (0, 1.0, 0.0),
                (50, 1.0, 0.0),
                (0, 0.9, 0.0),
                (0, 0.5, 0.0),
                (0, 1.0, 0.1),
                (40, 0.8, 0.05),
                (5000, 0.9, 0.0), // above SMALL_TOP_K: collected and selected
                (0, 0.95, 0.01),
            ] {
                for temperature in [0.3, 1.0, 2.5] {
                    let p = Sampling {
                        temperature,
                        top_k,
                        top_p,
                        min_p,
                        ..Sampling::default()
                    };
                    let case = format!("{name} T={temperature} k={top_k} p={top_p} min_p={min_p}");
                    let (ranked, keep) = reference(logits, &p);
                    let kept = kept_candidates(logits, &p);
                    let got: HashMap<u32, f32> = kept.iter().map(|c| (c.token, c.weight)).collect();
                    // Kept by both (probabilities compared over these), or on one side only at
                    // the cut.
                    let mut both = Vec::new();
                    for (rank, &(token, q, cumulative)) in ranked.iter().enumerate() {
                        match (rank < keep, got.get(&token)) {
                            (true, Some(&w)) => both.push((w, q)),
                            (false, None) => {}
                            _ => {
                                // Within rounding of the top-p mass (f32 sums over
                                // thousands of tokens, in another order than the f64
                                // reference's) or of the min-p floor.
                                let floor = ranked[0].1 * min_p;
                                let at_cut = (cumulative - top_p).abs() <= 1e-4
                                    || (cumulative - q - top_p).abs() <= 1e-4
                                    || (min_p > 0.0 && (q - floor).abs() <= 1e-5 * floor);
                                assert!(at_cut, "{case}: token {token} (rank {rank}, {keep} kept)");
                            }
                        }
                    }
                    assert!(
                        both.len() + 1 >= keep,
                        "{case}: {} of {keep} agree",
                        both.len()
                    );
                    let got_total: f32 = both.iter().map(|&(w, _)| w).sum();
                    let want_total: f32 = both.iter().map(|&(_, q)| q).sum();
                    for &(w, q) in &both {
                        let (g, want) = (w / got_total, q / want_total);
                        assert!(
                            (g - want).abs() <= 1e-4 * want.max(1e-3),
                            "{case}: {g} vs {want}"
                        );
                    }
                }
            }
        }
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

/// The device draw ([`crate::fused::sample`]) against the definitions: for each filter
/// combination and several uniform numbers, the picked token is one the host keeps, and the
/// uniform number falls in its share of the kept mass (within rounding of its edges).
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::fused::{Drawn, sample, sample_variant};

    const VOCAB: usize = 151_936;

    fn device() -> Device {
        Device::new_cuda(0).expect("a CUDA device")
    }

    /// Logits shaped like a language model's: a few clear leaders over a spread of noise.
    fn model_like(seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut l: Vec<f32> = (0..VOCAB)
            .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 3.0)
            .collect();
        for (rank, i) in [77usize, 1234, 99_000, 5, 151_935].into_iter().enumerate() {
            #[allow(clippy::cast_precision_loss, reason = "small ranks")]
            let lead = 20.0 - rank as f32 * 0.7;
            l[i] = lead;
        }
        l
    }

    fn draw_params(
        temperature: f32,
        top_k: i32,
        top_p: f32,
        min_p: f32,
        u: f32,
    ) -> DeviceDraw<'static> {
        DeviceDraw {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty: 1.0,
            repeated: &[],
            generated: Vec::new(),
            subtract: Vec::new(),
            uniform: u,
        }
    }

    /// The device draw, each way of counting the histograms (plain, folded).
    fn run(logits: &[f32], d: &DeviceDraw) -> [Drawn; 2] {
        [false, true].map(|fold| {
            let t = Tensor::from_slice(logits, (1, logits.len()), &device()).expect("logits");
            sample_variant(&t, d, fold).expect("device draw")
        })
    }

    /// Kept tokens with their probability and the cumulative probability up to each, in f64.
    type Kept = Vec<(u32, f64, f64)>;

    /// The reference's kept count, and the kept sets a correct draw may use, each in id order:
    /// the top-p cut may fall anywhere the cumulative probability is within rounding of top-p
    /// (both sides sum their normaliser in f32, in different orders; over thousands of flat
    /// candidates that moves it by a few tokens), bounded by the other filters' cut.
    fn kept_sets(logits: &[f32], p: &Sampling) -> (usize, Vec<Kept>) {
        let (ranked, keep) = super::tests::reference(logits, p);
        let (_, others) = super::tests::reference(
            logits,
            &Sampling {
                top_p: 1.0,
                ..p.clone()
            },
        );
        let reach = |mass: f32| {
            ranked
                .iter()
                .position(|r| r.2 >= mass)
                .map_or(ranked.len(), |i| i + 1)
        };
        let mut keeps = vec![keep];
        if p.top_p < 1.0 {
            keeps.push(reach(p.top_p - 1e-4).min(others));
            keeps.push(reach(p.top_p + 1e-4).min(others));
        }
        keeps.dedup();
        let sets = keeps.iter().map(|&k| in_id_order(&ranked[..k])).collect();
        (keep, sets)
    }

    /// The kept tokens in id order, the order the device walks, with their cumulative
    /// probabilities (in f64: 152k f32 additions would round more than the check allows).
    fn in_id_order(kept: &[(u32, f32, f32)]) -> Kept {
        let mut kept: Vec<(u32, f64, f64)> = kept
            .iter()
            .map(|&(t, q, _)| (t, f64::from(q), 0.0))
            .collect();
        kept.sort_by_key(|&(t, _, _)| t);
        let mut acc = 0.0;
        for k in &mut kept {
            acc += k.1;
            k.2 = acc;
        }
        kept
    }

    /// Whether `u` falls in `token`'s share of the kept mass, `kept` being (token, p,
    /// cumulative p) in the order the draw walks.
    fn in_share(kept: &[(u32, f64, f64)], token: u32, u: f32) -> bool {
        let total = kept[kept.len() - 1].2;
        let u = f64::from(u);
        kept.iter().any(|&(t, q, c)| {
            let (lo, hi) = ((c - q) / total, c / total);
            t == token && u >= lo - 2e-4 && u <= hi + 2e-4
        })
    }

    #[test]
    fn device_draw_follows_the_definitions() {
        let peaked = model_like(1);
        let mut masked = model_like(2);
        masked
            .iter_mut()
            .step_by(3)
            .for_each(|l| *l = f32::NEG_INFINITY);
        let mut tied = model_like(3);
        tied[..40].iter_mut().for_each(|l| *l = 16.0);
        #[allow(clippy::cast_precision_loss, reason = "synthetic logits")]
        let flat: Vec<f32> = (0..VOCAB)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-4)
            .collect();
        let cases = [
            ("peaked", &peaked),
            ("masked", &masked),
            ("tied", &tied),
            ("flat", &flat),
        ];
        let filters = [
            (0, 1.0, 0.0),
            (1, 1.0, 0.0),
            (20, 1.0, 0.0),
            (0, 0.95, 0.0),
            (20, 0.95, 0.0),
            (0, 1.0, 0.05),
            (40, 0.9, 0.05),
            (0, 0.8, 0.1),
        ];
        let mut picked = 0;
        for (name, logits) in cases {
            for temperature in [0.7f32, 1.0] {
                for (top_k, top_p, min_p) in filters {
                    let p = Sampling {
                        temperature,
                        top_k: u32::try_from(top_k).expect("k"),
                        top_p,
                        min_p,
                        ..Sampling::default()
                    };
                    let (keep, kept_sets) = kept_sets(logits, &p);
                    for u in [0.0f32, 0.3, 0.7, 0.999_99] {
                        let what = format!(
                            "{name}, T {temperature}, k {top_k}, p {top_p}, min-p {min_p}, u {u}"
                        );
                        let drawn = run(logits, &draw_params(temperature, top_k, top_p, min_p, u));
                        for (way, drawn) in ["plain", "folded"].into_iter().zip(drawn) {
                            match drawn {
                                Drawn::Picked(t) => {
                                    assert!(
                                        kept_sets.iter().any(|kept| in_share(kept, t, u)),
                                        "{what}, {way}: picked {t}"
                                    );
                                    picked += 1;
                                }
                                Drawn::Penalised | Drawn::NotHere => {
                                    panic!("{what}, {way}: not drawn on the device ({keep} kept)")
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(picked, 2 * 4 * 2 * filters.len() * 4);
    }

    /// A vocabulary that is not a multiple of 4 (the kernel pads its scratch to one): the
    /// padding is never drawn, and the draws follow the definitions.
    #[test]
    fn device_draw_with_an_odd_vocabulary() {
        #[allow(clippy::cast_precision_loss, reason = "synthetic logits")]
        let logits: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        for (top_k, top_p, min_p) in [(0, 1.0, 0.0), (20, 0.9, 0.0), (0, 0.8, 0.05)] {
            let p = Sampling {
                temperature: 1.0,
                top_k: u32::try_from(top_k).expect("k"),
                top_p,
                min_p,
                ..Sampling::default()
            };
            let (_, sets) = kept_sets(&logits, &p);
            for u in [0.0f32, 0.5, 0.999_99] {
                for drawn in run(&logits, &draw_params(1.0, top_k, top_p, min_p, u)) {
                    let Drawn::Picked(t) = drawn else {
                        panic!("k {top_k}, p {top_p}, min-p {min_p}, u {u}: not drawn");
                    };
                    let ok = t < 1003 && sets.iter().any(|kept| in_share(kept, t, u));
                    assert!(ok, "k {top_k}, p {top_p}, min-p {min_p}, u {u}: picked {t}");
                }
            }
        }
    }

    /// The penalties the device applies in place equal the host's.
    #[test]
    fn device_penalties_match_the_host() {
        let logits = model_like(4);
        let params = Sampling {
            temperature: 0.8,
            top_k: 50,
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Sampling::default()
        };
        let seen: Vec<u32> = [77u32, 5, 5, 300, 151_935, 8].into_iter().collect();
        let mut host = Sampler::new(&params);
        let mut device_side = Sampler::new(&params);
        for &t in &seen[3..] {
            host.observe(t);
            device_side.observe(t);
        }
        let mut want = logits.clone();
        host.apply_penalties(&mut want, &seen);
        let t = Tensor::from_slice(&logits, (1, VOCAB), &device()).expect("logits");
        let d = device_side.device_draw(&seen);
        assert!(matches!(sample(&t, &d).expect("draw"), Drawn::Picked(_)));
        let got = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("back");
        assert_eq!(got, want);
    }
}

/// How long a draw from a 152k-token vocabulary takes on the host (`cargo test --release -p
/// helexa-engine-cuda --lib sampling_cost -- --ignored --nocapture`; figures in
/// docs/benchmarks.md). A probe, not a test: it asserts nothing.
#[cfg(test)]
mod probes {
    use super::*;

    #[test]
    #[ignore = "a timing probe"]
    fn sampling_cost() {
        #[allow(clippy::cast_precision_loss, reason = "synthetic logits")]
        let logits: Vec<f32> = (0..151_936u32)
            .map(|i| ((i as f32) * 0.618).sin() * 8.0 + ((i * 7919) % 1000) as f32 * 0.004)
            .collect();
        // A 32k-token prompt, as an agent's request carries.
        let prompt: Vec<u32> = (0..32_768u32).map(|i| (i * 7919) % 151_936).collect();
        let cases = [
            ("temperature 0.7", 1.0, 0, 1.0),
            ("temperature 0.7, top-p 0.95", 0.95, 0, 1.0),
            (
                "temperature 0.7, top-k 20, repetition 1.05, 32k prompt",
                1.0,
                20,
                1.05,
            ),
            (
                "temperature 0.7, top-k 20, top-p 0.95 (Qwen3's defaults)",
                0.95,
                20,
                1.0,
            ),
        ];
        // Nearly flat logits, as a random-weight model gives (the bench's synthesized models):
        // top-p keeps most of the vocabulary.
        #[allow(clippy::cast_precision_loss, reason = "synthetic logits")]
        let flat: Vec<f32> = (0..151_936u32)
            .map(|i| ((i * 7919) % 10_007) as f32 * 1e-4)
            .collect();
        for (name, top_p, top_k, repetition_penalty, logits) in cases
            .into_iter()
            .map(|(n, p, k, r)| (n, p, k, r, &logits))
            .chain([(
                "flat logits, temperature 0.7, top-p 0.95",
                0.95,
                0,
                1.0,
                &flat,
            )])
        {
            let p = Sampling {
                temperature: 0.7,
                top_p,
                top_k,
                repetition_penalty,
                seed: Some(3),
                ..Sampling::default()
            };
            let mut sampler = Sampler::new(&p);
            let mut scratch = logits.clone();
            let mut seen = prompt.clone();
            let start = std::time::Instant::now();
            for _ in 0..50 {
                scratch.copy_from_slice(logits);
                let token = sampler.sample(&mut scratch, &seen);
                seen.push(std::hint::black_box(token));
            }
            eprintln!("{name}: {:?} per token", start.elapsed() / 50);
        }
    }
}
