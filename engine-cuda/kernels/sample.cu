// Sampling the next token on the device at batch 1: penalties, temperature, top-k, min-p and
// top-p, then the draw, so that only the token id crosses to the host.
//
// Why: copying the logits row (600 KB for a 152k vocabulary) and filtering it on the host took
// ~4 ms per token on the H200's host for a flat distribution, as long as the GPU's forward
// pass; a sampled request decoded at half the greedy rate (docs/benchmarks.md).
//
// The kept set is the one of src/sampling.rs (`kept_candidates`), the reference: the finite
// logits over the temperature ("keys") in rank order (higher first, then lower id), top-k of
// them, probabilities normalised over those, then min-p and the shortest top-p prefix. Every
// filter keeps a prefix in rank order, so each is a cut: the keys above a key t, and the first
// j (by id) of the keys equal to t. The kernel finds the cuts without sorting:
//   1. penalties in place (repetition once per distinct seen token, then presence/frequency);
//   2. every key's order-preserving bits and weight, once, into scratch buffers; the best key,
//      the number of finite ones and the normaliser;
//   3. top-k: a radix selection over the keys' order-preserving bits, 8 bits per round, four
//      rounds: per round, counts and weights per digit among the keys that share the digits
//      chosen so far, and the digit where the running count reaches k. The same for top-p by
//      weight, within the top-k cut when both are on; min-p is a threshold on the weight;
//   4. the draw: `u` (uniform in [0, 1), from the host's seeded generator) times the kept
//      weight, walked over the kept keys in id order (any order draws the same distribution):
//      each thread sums a contiguous run, a scan finds the run holding the draw, and that
//      thread walks it.
// The per-round histograms are per warp (summed in a fixed order afterwards), so the atomics
// of a flat distribution spread over 32 counters instead of one; within a warp, lanes adding to
// one digit still take turns (the likely rest of the draw's cost: docs/benchmarks.md).
//
// One block of 1024 threads: a pass over 600 KB by one SM takes microseconds, and one block
// needs no grid-wide synchronisation. If rounding leaves the draw unclaimed, or no key is kept
// (min-p above 1), the kernel says so and the host samples the penalised logits.
//
// Compiled to PTX by build.rs when the `cuda` feature is on; launched from src/fused/cuda.rs.

#include "common.cuh"

#define SAMPLE_WARPS 32
#define RADIX_BINS 256

// out[1]: picked, or left to the host (the logits are penalised in place either way).
#define SAMPLE_PICKED 0u
#define SAMPLE_ON_HOST 1u

// Not a finite logit: below every key's ordered bits (those of -inf are 0x007fffff).
#define NOT_A_KEY 0u

// The key's bits as an unsigned integer in the same order (total order: -0 before +0, as the
// host's `total_cmp`).
__device__ __forceinline__ uint32_t ordered(float f) {
    const uint32_t b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float unordered(uint32_t o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// Exclusive prefix sum of one value per thread in thread order; `*total` gets the sum.
__device__ float block_exclusive_scan(float v, float *scratch, float *total) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    float x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        float s = lane < warps ? scratch[lane] : 0.0f;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        scratch[lane] = s; // inclusive over warps
    }
    __syncthreads();
    const float before = warp > 0 ? scratch[warp - 1] : 0.0f;
    *total = scratch[warps - 1];
    __syncthreads();
    return before + x - v;
}

// A prefix of the keys in rank order: those above `key` (ordered bits), and the first `ties`
// (by id) of those equal to it. `above` and `above_w` count and weigh the keys above it,
// `tie_w` is one tie's weight.
struct Cut {
    uint32_t key;
    int ties;
    int above;
    float above_w;
    float tie_w;
};

// What the passes share through shared memory.
struct SampleShared {
    float scratch[SAMPLE_WARPS];
    uint32_t prefix;
    int above;
    float above_w;
    int reached;
    int pick;
};

// The shortest prefix in rank order, among the keys at or above `floor` (ordered bits), whose
// count reaches `need` (by_weight false) or whose weight reaches `need_w` (by_weight true).
// Returns false when the keys do not reach it (rounding of a weight target): all of them then.
// `okeys` and `weights` hold 4·n4 entries, 16-byte aligned; `hist_n`, `hist_w`: SAMPLE_WARPS ×
// RADIX_BINS each, in shared memory.
__device__ bool radix_select(const uint32_t *okeys, const float *weights, int n4, float best,
                             uint32_t floor, bool by_weight, int need, float need_w, bool fold,
                             uint32_t *hist_n, float *hist_w, SampleShared *sh, Cut *cut) {
    const int tid = threadIdx.x, threads = blockDim.x, warp = tid / 32;
    if (tid == 0) {
        sh->prefix = 0;
        sh->above = 0;
        sh->above_w = 0.0f;
        sh->reached = 1;
    }
    for (int round = 0; round < 4; round++) {
        const int shift = 24 - 8 * round;
        for (int i = tid; i < SAMPLE_WARPS * RADIX_BINS; i += threads) {
            hist_n[i] = 0;
            hist_w[i] = 0.0f;
        }
        __syncthreads();
        const uint32_t prefix = sh->prefix;
        uint32_t *my_n = hist_n + warp * RADIX_BINS;
        float *my_w = hist_w + warp * RADIX_BINS;
        // With `fold`, a thread adds each run of its keys that share a digit with one pair of
        // atomics: on flat logits nearly every key has the first rounds' digits, and the lanes
        // of a warp adding to one counter take turns.
        int run_d = 0;
        uint32_t run_n = 0;
        float run_w = 0.0f;
        auto flush = [&]() {
            if (run_n == 0) return;
            atomicAdd(&my_n[run_d], run_n);
            atomicAdd(&my_w[run_d], run_w);
            run_n = 0;
            run_w = 0.0f;
        };
        auto count = [&](uint32_t o, float w) {
            if (o == NOT_A_KEY || o < floor || (round > 0 && (o >> (shift + 8)) != prefix)) return;
            const int d = (o >> shift) & (RADIX_BINS - 1);
            if (!fold) {
                atomicAdd(&my_n[d], 1u);
                atomicAdd(&my_w[d], w);
                return;
            }
            if (d != run_d) {
                flush();
                run_d = d;
            }
            run_n++;
            run_w += w;
        };
        const uint4 *ok4 = reinterpret_cast<const uint4 *>(okeys);
        const float4 *w4 = reinterpret_cast<const float4 *>(weights);
#pragma unroll 4
        for (int i = tid; i < n4; i += threads) {
            const uint4 o = ok4[i];
            const float4 w = w4[i];
            count(o.x, w.x);
            count(o.y, w.y);
            count(o.z, w.z);
            count(o.w, w.w);
        }
        flush();
        __syncthreads();
        // Per digit, the warps' counts and weights summed in warp order into warp 0's row.
        for (int d = tid; d < RADIX_BINS; d += threads) {
            uint32_t cn = 0;
            float cw = 0.0f;
            for (int w = 0; w < SAMPLE_WARPS; w++) {
                cn += hist_n[w * RADIX_BINS + d];
                cw += hist_w[w * RADIX_BINS + d];
            }
            hist_n[d] = cn;
            hist_w[d] = cw;
        }
        __syncthreads();
        if (tid == 0) {
            int above = sh->above;
            float above_w = sh->above_w;
            int d = RADIX_BINS - 1;
            for (; d >= 0; d--) {
                const int cn = (int)hist_n[d];
                if (cn == 0) continue;
                const float cw = hist_w[d];
                if (by_weight ? above_w + cw >= need_w : above + cn >= need) break;
                above += cn;
                above_w += cw;
            }
            if (d < 0) {
                sh->reached = 0;
            } else {
                sh->prefix = (prefix << 8) | (uint32_t)d;
                sh->above = above;
                sh->above_w = above_w;
                if (round == 3) {
                    // The exact key: its ties, and how many of them the prefix takes.
                    const int ties = (int)hist_n[d];
                    const float tie_w = expf(unordered(sh->prefix) - best);
                    int take = by_weight ? (int)ceilf((need_w - above_w) / tie_w) : need - above;
                    take = max(1, min(take, ties));
                    *cut = Cut{sh->prefix, take, above, above_w, tie_w};
                }
            }
        }
        __syncthreads();
        if (!sh->reached) return false;
    }
    return true;
}

// Draws from `n` logits. `rep_tokens` (distinct, `n_rep`) get the repetition penalty,
// `gen_tokens` (distinct, `n_gen`) lose `gen_sub` each (presence + frequency · count).
// `okeys` and `weights` (n rounded up to a multiple of 4 each, 16-byte aligned) are scratch:
// every key's ordered bits and weight, computed once (a division and an exponential per logit
// in every pass made the passes compute-bound), read 16 bytes at a time after that.
// `fold`: count runs of equal digits per thread before the atomics (HELEXA_ENGINE_SAMPLE_FOLD).
// Dynamic shared memory: SAMPLE_WARPS × RADIX_BINS counts and weights (64 KB). Writes
// out[0] = token, out[1] = SAMPLE_PICKED or SAMPLE_ON_HOST.
extern "C" __global__ void __launch_bounds__(1024)
    sample_f32(float *logits, int n, const uint32_t *rep_tokens, int n_rep, float rep_penalty,
               const uint32_t *gen_tokens, const float *gen_sub, int n_gen, float temperature,
               int top_k, float top_p, float min_p, float u, uint32_t *okeys, float *weights,
               int fold, uint32_t *out) {
    extern __shared__ __align__(16) uint8_t sample_smem[];
    uint32_t *hist_n = reinterpret_cast<uint32_t *>(sample_smem);
    float *hist_w = reinterpret_cast<float *>(hist_n + SAMPLE_WARPS * RADIX_BINS);
    __shared__ SampleShared sh;
    __shared__ Cut cut_k, cut_p;
    const int tid = threadIdx.x, threads = blockDim.x;

    follow_previous_kernel();

    // 1. Penalties, as Sampler::apply_penalties: each list holds a token once, so no two threads
    //    write one logit; the barrier orders the two lists.
    for (int i = tid; i < n_rep; i += threads) {
        const uint32_t t = rep_tokens[i];
        if (t < (uint32_t)n) {
            const float l = logits[t];
            logits[t] = l > 0.0f ? l / rep_penalty : l * rep_penalty;
        }
    }
    __syncthreads();
    for (int i = tid; i < n_gen; i += threads) {
        const uint32_t t = gen_tokens[i];
        if (t < (uint32_t)n) logits[t] -= gen_sub[i];
    }
    __syncthreads();

    // 2. The keys, the best of them and how many are finite; then the weights and their sum
    //    in a fixed order (the normaliser without top-k).
    const int n4 = (n + 3) / 4;
    float best = -INFINITY, finite = 0.0f;
    for (int i = tid; i < 4 * n4; i += threads) {
        const float l = i < n ? logits[i] : NAN; // the padding is no key
        uint32_t o = NOT_A_KEY;
        if (isfinite(l)) {
            const float key = l / temperature;
            o = ordered(key);
            best = fmaxf(best, key);
            finite += 1.0f;
        }
        okeys[i] = o;
    }
    best = block_max(best);
    const int n_finite = (int)block_sum(finite);
    float z_part = 0.0f;
    for (int i = tid; i < 4 * n4; i += threads) {
        const uint32_t o = okeys[i];
        const float w = o == NOT_A_KEY ? 0.0f : expf(unordered(o) - best);
        weights[i] = w;
        z_part += w;
    }
    __syncthreads(); // the weights are read 16 bytes at a time, across threads, from here on
    const float z_all = block_sum(z_part);
    const bool k_on = top_k > 0 && top_k < n_finite, p_on = top_p > 0.0f && top_p < 1.0f,
               m_on = min_p > 0.0f;
    if (n_finite == 0) {
        if (tid == 0) { out[0] = 0; out[1] = SAMPLE_ON_HOST; }
        return;
    }

    // 3. The cut: top-k, then top-p within it (normalised over it), as kept_candidates.
    bool has_cut = false;
    Cut cut{0, 0, 0, 0.0f, 0.0f};
    if (k_on) {
        radix_select(okeys, weights, n4, best, 0, false, top_k, 0.0f, fold, hist_n, hist_w, &sh,
                     &cut_k);
        __syncthreads();
        cut = cut_k;
        has_cut = true;
    }
    if (p_on) {
        const float z = k_on ? cut.above_w + cut.ties * cut.tie_w : z_all;
        const uint32_t floor = k_on ? cut.key : 0u;
        if (radix_select(okeys, weights, n4, best, floor, true, 0, top_p * z, fold, hist_n,
                         hist_w, &sh, &cut_p)) {
            __syncthreads();
            Cut p = cut_p;
            // Past the top-k cut's ties only by rounding: the top-k cut then.
            if (k_on && p.key == cut.key) p.ties = min(p.ties, cut.ties);
            cut = p;
            has_cut = true;
        }
    }

    // 4. The draw over the kept keys, in id order, each thread a contiguous run of 4-entry
    //    pieces.
    const uint4 *ok4 = reinterpret_cast<const uint4 *>(okeys);
    const float4 *w4 = reinterpret_cast<const float4 *>(weights);
    const int per = (n4 + threads - 1) / threads, start = min(n4, tid * per),
              end = min(n4, start + per);
    // Ties of the cut before this run: which of them are kept depends on their id order.
    float run_ties = 0.0f;
    if (has_cut) {
        for (int i = start; i < end; i++) {
            const uint4 o = ok4[i];
            run_ties += (o.x == cut.key) + (o.y == cut.key) + (o.z == cut.key) + (o.w == cut.key);
        }
    }
    float ignored;
    const int ties_before = (int)block_exclusive_scan(run_ties, sh.scratch, &ignored);
    // Whether a candidate (a tie if its key is the cut's, `*tie` of them seen) is kept.
    auto kept = [&](uint32_t o, float w, int *tie) {
        if (o == NOT_A_KEY) return false;
        bool in = true;
        if (has_cut) {
            if (o == cut.key) in = (*tie)++ < cut.ties;
            else in = o > cut.key;
        }
        return in && (!m_on || w >= min_p);
    };
    float part = 0.0f;
    {
        int tie = ties_before;
        for (int i = start; i < end; i++) {
            const uint4 o = ok4[i];
            const float4 w = w4[i];
            part += kept(o.x, w.x, &tie) ? w.x : 0.0f;
            part += kept(o.y, w.y, &tie) ? w.y : 0.0f;
            part += kept(o.z, w.z, &tie) ? w.z : 0.0f;
            part += kept(o.w, w.w, &tie) ? w.w : 0.0f;
        }
    }
    float total;
    const float before = block_exclusive_scan(part, sh.scratch, &total);
    // The run that holds r, by the scan's own boundaries (the lowest claimant if rounding
    // makes two claim).
    float *bounds = hist_w; // free again
    bounds[tid] = before;
    if (tid == 0) sh.pick = -1;
    __syncthreads();
    const float r = u * total;
    const float upper = tid + 1 < threads ? bounds[tid + 1] : INFINITY;
    if (part > 0.0f && r >= before && r < upper) {
        float acc = before;
        int pick = -1, tie = ties_before;
        for (int i = 4 * start; i < 4 * end && acc <= r; i++) {
            if (!kept(okeys[i], weights[i], &tie)) continue;
            pick = i;
            acc += weights[i];
        }
        atomicMin(reinterpret_cast<unsigned int *>(&sh.pick), (unsigned int)pick);
    }
    __syncthreads();
    if (tid == 0) {
        const bool picked = total > 0.0f && sh.pick >= 0;
        out[0] = picked ? (uint32_t)sh.pick : 0u;
        out[1] = picked ? SAMPLE_PICKED : SAMPLE_ON_HOST;
    }
}
