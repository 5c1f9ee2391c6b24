// Fused kernels for batch-1 decoding (and the same ops at prefill), each replacing a chain of
// candle kernels whose launches dominate a decoded token once the GEMVs are out of the way
// (~5 µs per launch on an H200 against ~2-3 µs of useful work for these small ops).
//
// Rounding follows the unfused candle path where that is cheap to do: wherever candle would
// store an intermediate in the activation type T (bf16/f16), the value is rounded through T
// here too (`rnd<T>`), so greedy output matches the unfused path except where float
// summation order differs. Decode attention is the exception: it is a flash-decode kernel
// (online softmax in f32, no rounded scores), as transformers' fused attention is.
//
// Compiled to PTX by build.rs when the `cuda` feature is on; launched from src/fused/cuda.rs.

#include "common.cuh"

#include <cooperative_groups.h>

// ---- residual add + RMSNorm --------------------------------------------------------------------
// sum = x + delta (stored in T, the new residual stream); normed = sum / rms(sum) * w.
// One block per row, each thread keeping its ≤ ADD_NORM_MAX_PER_THREAD elements in registers
// and loading its weights before the reduction, so the only serial steps are one load, the
// block reduction and one store. Replaces candle's badd + rmsnorm (two launches per norm).
#define ADD_NORM_MAX_PER_THREAD 8
template <typename T>
__device__ void add_rms_norm(const T *x, const T *delta, T *sum, T *normed, const T *w,
                             int cols, float eps) {
    follow_previous_kernel();
    const size_t base = (size_t)blockIdx.x * cols;
    float s[ADD_NORM_MAX_PER_THREAD], wt[ADD_NORM_MAX_PER_THREAD];
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < ADD_NORM_MAX_PER_THREAD; k++) {
        const int c = threadIdx.x + k * blockDim.x;
        s[k] = 0.0f;
        wt[k] = 0.0f;
        if (c < cols) {
            s[k] = rnd<T>(to_f(x[base + c]) + to_f(delta[base + c]));
            wt[k] = to_f(w[c]);
            sum[base + c] = from_f<T>(s[k]);
            sq += s[k] * s[k];
        }
    }
    const float scale = rsqrtf(block_sum(sq) / cols + eps);
#pragma unroll
    for (int k = 0; k < ADD_NORM_MAX_PER_THREAD; k++) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < cols) normed[base + c] = from_f<T>(scale * s[k] * wt[k]);
    }
}

// ---- SwiGLU gate ---------------------------------------------------------------------------------
// out = silu(gate) * up, rows `rows` of `cols`, gate/up rows `*_stride` elements apart (they are
// usually the two halves of one stacked projection's output). Replaces silu + bmul.
template <typename T>
__device__ void silu_mul(const T *gate, const T *up, T *out, int rows, int cols,
                         long gate_stride, long up_stride) {
    follow_previous_kernel();
    const long n = (long)rows * cols;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long r = i / cols, c = i % cols;
        const float g = to_f(gate[r * gate_stride + c]);
        const float s = rnd<T>(g / (1.0f + expf(-g)));
        out[i] = from_f<T>(s * to_f(up[r * up_stride + c]));
    }
}

// ---- per-head q/k RMSNorm + RoPE + KV-cache write --------------------------------------------------
// One warp per (token, head) over q heads, then k heads, then v heads. q goes to q_out
// (heads, len, hd); k and v to the caches (kv_heads, cap, hd) at rows offset..offset+len.
// Replaces q-norm, k-norm, two rope kernels, the transposes' copies and the two cache writes.
// `q_w`/`k_w` may be null (no per-head norm). style 0: rotate i with i + hd/2 (NEOX / HF),
// style 1: rotate 2i with 2i+1 (GPT-J / llama.cpp's Llama layout). `offset_at`, when not null
// (the `_at` entry point), is a device int that replaces `offset` (a decode step replayed from
// a CUDA graph, whose arguments are fixed at capture).
#define ROPE_MAX_HD 256
#define ROPE_WARPS 4

// One warp: the head row `src` (hd elements) RMS-normed with `w` (none when null), rotated by the
// position's rows `cs`/`sn` of the rope tables, written to `dst`; `x` is hd floats of the warp's
// scratch (shared memory).
template <typename T>
__device__ __forceinline__ void norm_rope_row(const T *src, const T *w, const T *cs, const T *sn,
                                              T *dst, float *x, int hd, float eps, int style,
                                              int lane) {
    float sq = 0.0f;
    for (int d = lane; d < hd; d += 32) {
        const float e = to_f(src[d]);
        x[d] = e;
        sq += e * e;
    }
    if (w != nullptr) {
        const float scale = rsqrtf(warp_sum(sq) / hd + eps);
        for (int d = lane; d < hd; d += 32) x[d] = rnd<T>(scale * x[d] * to_f(w[d]));
    }
    __syncwarp();
    const int half = hd / 2;
    for (int i = lane; i < half; i += 32) {
        const int i1 = style == 0 ? i : 2 * i, i2 = style == 0 ? i + half : 2 * i + 1;
        const float c = to_f(cs[i]), s = to_f(sn[i]);
        const float a = x[i1], b = x[i2];
        // candle's rope computes in T: each product and the difference are rounded.
        dst[i1] = from_f<T>(rnd<T>(a * c) - rnd<T>(b * s));
        dst[i2] = from_f<T>(rnd<T>(a * s) + rnd<T>(b * c));
    }
}

template <typename T>
__device__ void qk_norm_rope_cache(const T *q, const T *k, const T *v, long q_stride, long k_stride,
                                   long v_stride, const T *q_w, const T *k_w, const T *cos,
                                   const T *sin, T *q_out, T *k_cache, T *v_cache, int len,
                                   int heads, int kv_heads, int hd, int cap, int offset, float eps,
                                   int style, const int *offset_at) {
    follow_previous_kernel();
    if (offset_at != nullptr) offset = *offset_at;
    __shared__ float vals[ROPE_WARPS][ROPE_MAX_HD];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int per_token = heads + 2 * kv_heads;
    const int unit = blockIdx.x * ROPE_WARPS + warp;
    if (unit >= len * per_token) return;
    const int t = unit / per_token, j = unit % per_token;
    float *x = vals[warp];

    if (j >= heads + kv_heads) { // v: straight into the cache
        const int head = j - heads - kv_heads;
        const T *src = v + t * v_stride + (long)head * hd;
        T *dst = v_cache + ((size_t)head * cap + offset + t) * hd;
        for (int d = lane; d < hd; d += 32) dst[d] = src[d];
        return;
    }
    const bool is_q = j < heads;
    const int head = is_q ? j : j - heads;
    const T *src = is_q ? q + t * q_stride + (long)head * hd : k + t * k_stride + (long)head * hd;
    T *dst = is_q ? q_out + ((size_t)head * len + t) * hd
                  : k_cache + ((size_t)head * cap + offset + t) * hd;
    const int half = hd / 2;
    norm_rope_row(src, is_q ? q_w : k_w, cos + (size_t)(offset + t) * half,
                  sin + (size_t)(offset + t) * half, dst, x, hd, eps, style, lane);
}

// ---- embedding rows by ids on the device ---------------------------------------------------------
// out row i = table row ids[i], rows of `cols` elements; one block per id. For a decode step
// replayed from a CUDA graph, whose token id lives in device memory: candle's index_select
// copies a parameter vector from the host on every call, which a capture cannot hold.
template <typename T>
__device__ void gather_rows(const T *table, const unsigned *ids, T *out, int cols) {
    follow_previous_kernel();
    const T *src = table + (size_t)ids[blockIdx.x] * cols;
    T *dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// ---- flash-decode attention ---------------------------------------------------------------------
// One query token against `L` cached positions. Grid (kv_heads, splits); each block serves the
// G query heads sharing one KV head (each K/V row is read once for all of them) over one chunk of
// positions. Each warp takes ATTN_ROWS positions at a time (all their K and V loads in flight
// together: one row at a time left the memory system idle at long contexts; and the next
// round's in flight during this round's arithmetic) and keeps an online softmax in f32. With
// one split the block writes the output; with several it writes unnormalised partials and
// their (max, sum), which `attn_combine` merges (or, launched in clusters, the cluster's first
// block: `merge_in_cluster`). Replaces q·Kᵀ, the scale, the softmax and p·V.
// `pos_at`, when not null (the `_at` entry points), is the device position of the query (a decode step replayed from a
// CUDA graph, whose grid and arguments are fixed at capture): L is that plus one and `chunk` is
// worked out as the launcher does for L: one split up to `one_split` positions, else one per 32
// positions, at most `max_splits` (`attention_split_count`). The grid then has
// the splits of the longest L the graph serves; splits past L see no position and write an
// empty partial (max −inf, sum 0), which the merge weighs 0, so the result is the same as a
// launch sized for L.
//
// ROPE (the `_rope` entry points): the query token's q/k norms, RoPE and cache write folded in,
// one launch fewer per layer. `q` then is the raw projection, and `raw` holds the rest of the
// raw token (k, v, norm weights, rope tables). Each block forms its G query heads into shared
// memory as qk_norm_rope_cache would store them; the block whose chunk holds the new position
// also forms its k row and copies its v row into the caches before reading them (no other
// block reads that row).
#define ATTN_WARPS 8
#define ATTN_ROWS 4
// A lane's EPL consecutive elements of a head row, moved in one vector load (two for 32 bytes)
// rather than EPL scalar ones; the launcher checks the rows are aligned to that.
struct alignas(16) Bytes32 { uint4 lo, hi; };
template <int N> struct VecOf;
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<32> { using type = Bytes32; };
template <typename T, int EPL> struct LanePart {
    using Raw = typename VecOf<EPL * sizeof(T)>::type;
    static __device__ __forceinline__ Raw load(const T *p) { return *reinterpret_cast<const Raw *>(p); }
    static __device__ __forceinline__ void to_floats(const Raw &raw, float out[EPL]) {
        const T *h = reinterpret_cast<const T *>(&raw);
#pragma unroll
        for (int e = 0; e < EPL; e++) out[e] = to_f(h[e]);
    }
};
template <typename T> struct RawToken {
    const T *k, *v, *q_w, *k_w, *cos, *sin;
    float eps;
    int style;
};
// One butterfly step of warp_sums at xor offset O, the lane holding N values in w[0..N): with
// N > 1 it keeps half (the upper half when its O bit is set), adds its partner's values of that
// half and hands the partner the other half; with one value left, a plain warp_sum step.
template <int N, int O>
__device__ __forceinline__ void warp_sums_step(float *w, int lane) {
    if constexpr (O >= 1) {
        if constexpr (N > 1) {
            const bool upper = lane & O;
#pragma unroll
            for (int i = 0; i < N / 2; i++) {
                const float give = upper ? w[i] : w[i + N / 2];
                const float keep = upper ? w[i + N / 2] : w[i];
                w[i] = keep + __shfl_xor_sync(0xffffffffu, give, O);
            }
            warp_sums_step<N / 2, O / 2>(w, lane);
        } else {
            w[0] += __shfl_xor_sync(0xffffffffu, w[0], O);
            warp_sums_step<1, O / 2>(w, lane);
        }
    }
}

// N per-lane values `v` each summed over the warp, as warp_sum sums one: the same pairs added in
// the same order, the lane's own value on the left, so the same bits (every lane of warp_sum
// ends with the same bits too, addition being commutative). 2·N + 4 − log2(N) shuffles instead
// of 5·N: the first log2(N) butterfly steps halve the values each lane holds
// (warp_sums_step). Lane (32/N)·k then holds sum k, which every lane gets back.
template <int N>
__device__ __forceinline__ void warp_sums(float v[N], int lane) {
    static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N a power of two up to 32");
    float w[N];
#pragma unroll
    for (int i = 0; i < N; i++) w[i] = v[i];
    warp_sums_step<N, 16>(w, lane);
#pragma unroll
    for (int k = 0; k < N; k++) v[k] = __shfl_sync(0xffffffffu, w[0], (32 / N) * k);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The splits' merge inside the attention launch, when the launcher groups the split blocks of
// each KV head into a thread-block cluster (HELEXA_ENGINE_ATTENTION_CLUSTER=1, at most 8
// splits): each block leaves its partial (`c_o`, and per query head its max and sum in
// `c_ml`) in its shared memory; block 0 of the cluster reads the others' through distributed
// shared memory and merges them in attn_combine's order (the same arithmetic, so the same
// bits) into `out`, the KV head's G query heads; the others wait until it has read them. No
// second launch, no partials through global memory.
template <typename T, int HD, int G>
__device__ void merge_in_cluster(float *c_o, float (*c_ml)[2], T *out, int splits) {
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster.sync(); // every block's partial written and visible to the cluster
    if (cluster.block_rank() == 0) {
        __shared__ float weight[G][8], total[G];
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (warp < G) { // warp g: query head g's weights, lane s the split s (as attn_combine)
            const float *ml = lane < splits ? cluster.map_shared_rank(c_ml[warp], lane) : nullptr;
            const float m = lane < splits ? ml[0] : -INFINITY;
            const float mx = warp_max(m);
            const float f = m > -INFINITY ? __expf(m - mx) : 0.0f; // -inf: an empty chunk
            if (lane < splits) weight[warp][lane] = f;
            const float sum = warp_sum(lane < splits ? ml[1] * f : 0.0f);
            if (lane == 0) total[warp] = sum;
        }
        __syncthreads();
        // Each split's partial, in its block's shared memory (loops unrolled to all 8 so that
        // the pointers stay in registers).
        const float *part[8];
#pragma unroll
        for (int sp = 0; sp < 8; sp++) part[sp] = cluster.map_shared_rank(c_o, sp < splits ? sp : 0);
        for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
            const int g = i / HD;
            float o = 0.0f;
#pragma unroll
            for (int sp = 0; sp < 8; sp++) {
                if (sp < splits) o = fmaf(part[sp][i], weight[g][sp], o);
            }
            out[i] = from_f<T>(o / total[g]);
        }
    }
    cluster.sync(); // the partials stay until block 0 has read them
}
#endif

// TR: the q·k dot products of a round summed with warp_sums (the same bits as warp_sum each).
template <typename T, int EPL, int G, bool ROPE, bool TR = false>
__device__ void decode_attention(const T *q, const T *k_cache, const T *v_cache, T *out,
                                 float *part_o, float *part_ml, int cap, int L, int chunk,
                                 float scale, const int *pos_at, int max_splits,
                                 int one_split, RawToken<T> raw) {
    // The device position is read before waiting for the previous kernel: the host writes it
    // before the graph's replay, and no kernel writes it.
    if (pos_at != nullptr) {
        L = *pos_at + 1;
        const int splits_for_l = L <= one_split ? 1 : min((L + 31) / 32, max_splits);
        chunk = (L + splits_for_l - 1) / splits_for_l;
    }
    constexpr int HD = EPL * 32;
    __shared__ float s_o[ATTN_WARPS][G * HD];
    __shared__ float s_m[ATTN_WARPS][G], s_l[ATTN_WARPS][G];
    __shared__ __align__(16) T q_formed[ROPE ? G * HD : 1];
    const int kvh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int start = split * chunk, end = min(L, start + chunk);

    using Part = LanePart<T, EPL>;
    const T *kb = k_cache + (size_t)kvh * cap * HD + lane * EPL;
    const T *vb = v_cache + (size_t)kvh * cap * HD + lane * EPL;
    // The rows of the warp's next round are requested before this round's arithmetic, so a
    // block's memory requests overlap its math (at long contexts a block takes several rounds).
    typename Part::Raw k_next[ATTN_ROWS], v_next[ATTN_ROWS];
    // Requests the warp's rows from j0: those of earlier positions (`old_rows`) and the new
    // position's (`new_row`).
    auto request = [&](int j0, bool old_rows, bool new_row) {
#pragma unroll
        for (int r = 0; r < ATTN_ROWS; r++) {
            const int j = min(j0 + r, end - 1); // past the end: a repeat, masked out below
            if (!(j == L - 1 ? new_row : old_rows)) continue;
            k_next[r] = Part::load(kb + (size_t)j * HD);
            v_next[r] = Part::load(vb + (size_t)j * HD);
        }
    };
    // The first round's earlier positions are requested before waiting for the previous
    // kernel, so their latency overlaps that wait and the prologue: earlier steps wrote them,
    // and finished before the previous kernel began. The new position's row is written by the
    // previous kernel (qk_norm_rope_cache) or by this launch (ROPE): requested once written.
    const int first = start + warp * ATTN_ROWS;
    if (first < end) request(first, true, false);
    follow_previous_kernel();

    if (ROPE) {
        const int pos = L - 1, half = HD / 2;
        const T *cs = raw.cos + (size_t)pos * half, *sn = raw.sin + (size_t)pos * half;
        const bool owner = pos >= start && pos < end;
        const size_t row = ((size_t)kvh * cap + pos) * HD;
        // Tasks: the G query heads, then (the owner only) the k row and the v row. s_o is free
        // until the loop below: each warp's row of it is its scratch.
        for (int task = warp; task < G + 2; task += ATTN_WARPS) {
            if (task < G) {
                norm_rope_row(q + (size_t)(kvh * G + task) * HD, raw.q_w, cs, sn,
                              q_formed + task * HD, s_o[warp], HD, raw.eps, raw.style, lane);
            } else if (owner && task == G) {
                norm_rope_row(raw.k + (size_t)kvh * HD, raw.k_w, cs, sn,
                              const_cast<T *>(k_cache) + row, s_o[warp], HD, raw.eps, raw.style,
                              lane);
            } else if (owner) {
                for (int d = lane; d < HD; d += 32) const_cast<T *>(v_cache)[row + d] = raw.v[(size_t)kvh * HD + d];
            }
            __syncwarp(); // the scratch is reused by the warp's next task
        }
        __syncthreads(); // q formed, the new k/v rows written, before anyone reads them
    }

    if (first < end && end == L) request(first, false, true); // the new position's row
    float qr[G][EPL], acc[G][EPL], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const T *qh = ROPE ? q_formed + g * HD + lane * EPL
                           : q + (size_t)(kvh * G + g) * HD + lane * EPL;
        Part::to_floats(Part::load(qh), qr[g]);
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            qr[g][e] *= scale;
            acc[g][e] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }

    for (int j0 = first; j0 < end; j0 += ATTN_WARPS * ATTN_ROWS) {
        float kr[ATTN_ROWS][EPL], vr[ATTN_ROWS][EPL];
#pragma unroll
        for (int r = 0; r < ATTN_ROWS; r++) {
            Part::to_floats(k_next[r], kr[r]);
            Part::to_floats(v_next[r], vr[r]);
        }
        if (j0 + ATTN_WARPS * ATTN_ROWS < end) request(j0 + ATTN_WARPS * ATTN_ROWS, true, true);
        float dots[G * ATTN_ROWS]; // TR: the round's dot products, summed over the warp at once
        if constexpr (TR) {
#pragma unroll
            for (int g = 0; g < G; g++) {
#pragma unroll
                for (int r = 0; r < ATTN_ROWS; r++) {
                    float d = 0.0f;
#pragma unroll
                    for (int e = 0; e < EPL; e++) d += qr[g][e] * kr[r][e];
                    dots[g * ATTN_ROWS + r] = d;
                }
            }
            warp_sums<G * ATTN_ROWS>(dots, lane);
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float sc[ATTN_ROWS], m_new = m[g];
#pragma unroll
            for (int r = 0; r < ATTN_ROWS; r++) {
                if constexpr (TR) {
                    sc[r] = j0 + r < end ? dots[g * ATTN_ROWS + r] : -INFINITY;
                } else {
                    float d = 0.0f;
#pragma unroll
                    for (int e = 0; e < EPL; e++) d += qr[g][e] * kr[r][e];
                    sc[r] = j0 + r < end ? warp_sum(d) : -INFINITY;
                }
                m_new = fmaxf(m_new, sc[r]);
            }
            const float corr = __expf(m[g] - m_new);
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < EPL; e++) acc[g][e] *= corr;
#pragma unroll
            for (int r = 0; r < ATTN_ROWS; r++) {
                const float p = __expf(sc[r] - m_new);
                l[g] += p;
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[g][e] += p * vr[r][e];
            }
            m[g] = m_new;
        }
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int e = 0; e < EPL; e++) s_o[warp][g * HD + lane * EPL + e] = acc[g][e];
        if (lane == 0) {
            s_m[warp][g] = m[g];
            s_l[warp][g] = l[g];
        }
    }
    __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The launcher clusters the splits of a KV head only when there are 2 to 8 of them.
    const bool clustered = splits > 1 && cooperative_groups::this_cluster().num_blocks() == splits;
#else
    const bool clustered = false;
#endif
    __shared__ float c_ml[G][2]; // clustered: this split's max and sum per query head
    // Merge the warps: each thread one output element of one query head (clustered, into
    // s_o[0] in place: only this thread reads column i).
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD, head = kvh * G + g;
        float mx = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, s_m[w][g]);
        float sum = 0.0f, o = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            if (s_m[w][g] == -INFINITY) continue; // this warp saw no position
            const float f = __expf(s_m[w][g] - mx);
            sum += s_l[w][g] * f;
            o += s_o[w][i] * f;
        }
        if (splits == 1) {
            out[(size_t)head * HD + d] = from_f<T>(o / sum);
        } else if (clustered) {
            s_o[0][i] = o;
            if (d == 0) {
                c_ml[g][0] = mx;
                c_ml[g][1] = sum;
            }
        } else {
            part_o[((size_t)head * splits + split) * HD + d] = o;
            if (d == 0) {
                part_ml[((size_t)head * splits + split) * 2] = mx;
                part_ml[((size_t)head * splits + split) * 2 + 1] = sum;
            }
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (clustered) merge_in_cluster<T, HD, G>(s_o[0], c_ml, out + (size_t)kvh * G * HD, splits);
#endif
}

// Merges the splits of `decode_attention`: one block per query head (at least as many threads
// as splits). The per-split weights exp(m_s - max) are computed once, in parallel, into shared
// memory; each thread then sums one output dimension over the splits with independent loads.
#define ATTN_MAX_SPLITS 1024
template <typename T>
__device__ void attn_combine(const float *part_o, const float *part_ml, T *out, int splits, int hd) {
    follow_previous_kernel();
    __shared__ float weight[ATTN_MAX_SPLITS];
    const int head = blockIdx.x, t = threadIdx.x;
    const float *ml = part_ml + (size_t)head * splits * 2;
    const float m = t < splits ? ml[2 * t] : -INFINITY;
    const float mx = block_max(m);
    const float f = m > -INFINITY ? __expf(m - mx) : 0.0f; // -inf: an empty chunk
    if (t < splits) weight[t] = f;
    const float sum = block_sum(t < splits ? ml[2 * t + 1] * f : 0.0f);
    __syncthreads();
    for (int d = t; d < hd; d += blockDim.x) {
        const float *po = part_o + (size_t)head * splits * hd + d;
        float o = 0.0f;
        // fmaf, as merge_in_cluster accumulates (the same bits either way).
#pragma unroll 8
        for (int sp = 0; sp < splits; sp++) o = fmaf(po[(size_t)sp * hd], weight[sp], o);
        out[(size_t)head * hd + d] = from_f<T>(o / sum);
    }
}

// ---- causal softmax over materialised scores (prefill) -------------------------------------------
// probs = softmax(scores · scale) over each row's positions up to its own, zero beyond: row r of
// (kv_heads, groups·len, total) scores is query r % len at absolute position offset + r % len.
// Replaces the scale, the broadcast add of a host-built causal mask and the softmax (three
// passes over the scores, the mask add alone ~38% of a prefill on an H200). The scale and the
// scaled scores are rounded through T as candle's affine op stores them; the softmax runs in
// f32 as candle's does. One block per row; three passes over the row (it stays in L1/L2).
template <typename T>
__device__ void causal_softmax(const T *scores, T *probs, int len, int total, int offset,
                               float scale) {
    follow_previous_kernel();
    const size_t r = blockIdx.x;
    const int valid = min(total, offset + (int)(r % len) + 1);
    const T *x = scores + r * total;
    T *y = probs + r * total;
    const float sc = rnd<T>(scale);
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) mx = fmaxf(mx, rnd<T>(to_f(x[j]) * sc));
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) sum += expf(rnd<T>(to_f(x[j]) * sc) - mx);
    sum = block_sum(sum);
    for (int j = threadIdx.x; j < total; j += blockDim.x)
        y[j] = from_f<T>(j < valid ? expf(rnd<T>(to_f(x[j]) * sc) - mx) / sum : 0.0f);
}

// ---- batch-1 matrix-vector product ---------------------------------------------------------------
// y = W x for W (rows, cols) row-major, x (cols), 16-bit T, f32 accumulation. One warp per row;
// each lane streams 16-byte chunks of the row (8 elements) with the weights marked read-once,
// four chunks in flight per lane. x is re-read by every warp and stays in L1. Replaces cuBLAS's
// split-K GEMV + its reduction kernel at one token (cols % 8 == 0).
#define GEMV_WARPS 8
// Chunk c of x: from shared memory (the input formed in the block, NORM) or through the
// read-only cache.
template <bool SHARED>
__device__ __forceinline__ uint4 x_chunk(const uint4 *xr, int c) {
    return SHARED ? xr[c] : __ldg(xr + c);
}

// The lane's part of one row's dot product from chunk `c` on, four chunks in flight.
template <typename T, bool SHARED_X>
__device__ __forceinline__ float row_from(const uint4 *wr, const uint4 *xr, int c, int chunks,
                                          float acc) {
    for (; c + 96 < chunks; c += 128) {
        const uint4 w0 = __ldcs(wr + c), w1 = __ldcs(wr + c + 32), w2 = __ldcs(wr + c + 64),
                    w3 = __ldcs(wr + c + 96);
        acc += dot8<T>(w0, x_chunk<SHARED_X>(xr, c)) + dot8<T>(w1, x_chunk<SHARED_X>(xr, c + 32)) +
               dot8<T>(w2, x_chunk<SHARED_X>(xr, c + 64)) + dot8<T>(w3, x_chunk<SHARED_X>(xr, c + 96));
    }
    for (; c < chunks; c += 32) acc += dot8<T>(__ldcs(wr + c), x_chunk<SHARED_X>(xr, c));
    return acc;
}

// SWIGLU: `rows` gate rows followed by as many up rows (a stacked gate/up weight); the warp of
// row r also takes up row r + rows and writes silu(gate) · up, the SwiGLU gate folded into the
// product (one launch fewer per layer, and half the output written).
// NORM: the input is norm(x + delta) with weight `norm_w` (cols ≤ 16 per thread), formed by each
// block into its shared memory with normed16 (common.cuh), as the quantized product does; block
// 0 stores x + delta to `sum` when that is not null. The grid stays one warp per row: a grid of
// resident blocks taking rows in turn (the seventh session's first try) left a bubble between
// each warp's rows and made BF16 decode 0.21 ms slower.
#define GEMV_NORM_MAX_COLS (16 * GEMV_WARPS * 32)
// SPLIT (not with SWIGLU; the launcher asks for cols a multiple of 16): the warps of a block
// work in pairs, each row shared by a pair, the first warp taking its first half and the second
// its second; the second's sum reaches the first through shared memory, which writes first +
// second. For products whose rows fill the resident warps one and a half times or so (the q/k/v
// product of an 8B model: 6144 rows of 4096), where the last wave of whole rows sets the time,
// half rows come in shorter waves. The sum is taken in another order than the plain kernel's,
// so the output can differ in the last bit.
template <typename T, bool SWIGLU, bool NORM, bool SPLIT = false>
__device__ void gemv(const T *w, const T *x, T *y, int rows, int cols, const T *delta,
                     const T *norm_w, T *sum, float eps) {
    static_assert(!(SPLIT && SWIGLU), "a split row is not a gate/up pair");
    constexpr int WAYS = SPLIT ? 2 : 1; // warps per row
    __shared__ __align__(16) T x_formed[NORM ? GEMV_NORM_MAX_COLS : 1];
    __shared__ float second_part[SPLIT ? GEMV_WARPS / 2 : 1]; // SPLIT: each pair's second sum
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % WAYS;
    const int row = blockIdx.x * (GEMV_WARPS / WAYS) + warp / WAYS;
    const int chunks = cols / 8 / WAYS; // this warp's 16-byte chunks of the row
    const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)row * cols) + part * chunks;
    const uint4 *xr = reinterpret_cast<const uint4 *>(NORM ? x_formed : x) + part * chunks;
    // The first four chunks are requested while the previous kernel may still be writing x.
    const bool ahead = row < rows && lane + 96 < chunks;
    uint4 p0, p1, p2, p3;
    if (ahead) {
        p0 = __ldcs(wr + lane); p1 = __ldcs(wr + lane + 32); p2 = __ldcs(wr + lane + 64);
        p3 = __ldcs(wr + lane + 96);
    }
    follow_previous_kernel();
    if (NORM) { // every thread, before any returns: the block reduction needs them all
        float a[8], b[8];
        normed16(x, delta, norm_w, sum, cols, eps, a, b);
        const int e0 = 8 * threadIdx.x, e1 = e0 + 8 * blockDim.x;
        if (e0 < cols) store8(x_formed, e0, a);
        if (e1 < cols) store8(x_formed, e1, b);
        __syncthreads();
    }
    if (row >= rows) return;
    float acc = 0.0f;
    int c = lane;
    if (ahead) {
        acc += dot8<T>(p0, x_chunk<NORM>(xr, c)) + dot8<T>(p1, x_chunk<NORM>(xr, c + 32)) +
               dot8<T>(p2, x_chunk<NORM>(xr, c + 64)) + dot8<T>(p3, x_chunk<NORM>(xr, c + 96));
        c += 128;
    }
    acc = warp_sum(row_from<T, NORM>(wr, xr, c, chunks, acc));
    if (SPLIT) {
        // Both warps of a pair have the same row, so both got here (or both returned above).
        const int pair = warp / 2;
        if (part == 1 && lane == 0) second_part[pair] = acc;
        pair_barrier(pair);
        if (part == 0 && lane == 0) y[row] = from_f<T>(acc + second_part[pair]);
    } else if (SWIGLU) {
        const float up =
            warp_sum(row_from<T, NORM>(wr + (size_t)rows * chunks, xr, lane, chunks, 0.0f));
        if (lane == 0) y[row] = swiglu<T>(acc, up);
    } else if (lane == 0) {
        y[row] = from_f<T>(acc);
    }
}

// ---- attention output layout ---------------------------------------------------------------------
// (heads, len, hd) -> (len, heads·hd), the o projection's input: each (head, token) row of hd
// elements moves whole, 16 bytes per thread. candle's generic strided copy did this at ~330 GB/s,
// 5% of a 2048-token prefill. hd·sizeof(T) is a multiple of 16 (checked by the launcher).
template <typename T>
__device__ void heads_to_rows(const T *src, T *dst, int heads, int len, int hd) {
    follow_previous_kernel();
    const int per_row = hd * (int)sizeof(T) / 16;
    const long total = (long)heads * len * per_row;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        const long row = i / per_row; // head · len + token
        const int c = (int)(i % per_row), head = (int)(row / len), token = (int)(row % len);
        reinterpret_cast<uint4 *>(dst + ((long)token * heads + head) * hd)[c] =
            reinterpret_cast<const uint4 *>(src + row * hd)[c];
    }
}

// ---- greedy sampling -----------------------------------------------------------------------------
// Index of the largest of `n` f32 logits, the lowest index on ties (as torch.argmax and the
// host sampler); NaN never wins. One block of 1024 threads reading 16 bytes at a time, eight
// loads in flight per thread: at batch 1 this replaces copying the whole logits row (600 KB for
// a 152k vocabulary) to the host for every token. `x` must be 16-byte aligned.
__device__ __forceinline__ void argmax_take(float &v, int &idx, float e, int i, int n) {
    if (e > v || (e == v && i < idx) || (idx == n && e == e)) { v = e; idx = i; }
}

__device__ __forceinline__ void argmax_merge(float &v, int &idx, int n) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (oi < n) argmax_take(v, idx, ov, oi, n);
    }
}

// The block's argmax of x, valid in thread 0 (the block must be the whole grid).
__device__ __forceinline__ uint32_t argmax_block(const float *x, int n) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    float v = -INFINITY;
    int idx = n; // past the end: loses every comparison
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    const int n4 = n / 4;
#pragma unroll 8
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 e = x4[i];
        argmax_take(v, idx, e.x, 4 * i, n);
        argmax_take(v, idx, e.y, 4 * i + 1, n);
        argmax_take(v, idx, e.z, 4 * i + 2, n);
        argmax_take(v, idx, e.w, 4 * i + 3, n);
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) argmax_take(v, idx, x[i], i, n);
    argmax_merge(v, idx, n);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { best_v[warp] = v; best_i[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? best_v[lane] : -INFINITY;
        idx = lane < blockDim.x / 32 ? best_i[lane] : n;
        argmax_merge(v, idx, n);
    }
    return idx < n ? idx : 0;
}

extern "C" __global__ void argmax_f32(const float *x, int n, uint32_t *out) {
    follow_previous_kernel();
    const uint32_t picked = argmax_block(x, n);
    if (threadIdx.x == 0) *out = picked;
}

// The argmax of a replayed decode step that also feeds the next replay: the pick becomes the
// next step's token id (`ids`) and the position moves on by one, so a replay queued before
// this one's pick is read needs nothing from the host (`HELEXA_ENGINE_GRAPH_AHEAD`). Every
// earlier kernel of the step has finished before this one passes its wait (each waits on the
// one before), so none still reads the words.
extern "C" __global__ void argmax_feed_f32(const float *x, int n, uint32_t *out, uint32_t *ids,
                                           uint32_t *position) {
    follow_previous_kernel();
    const uint32_t picked = argmax_block(x, n);
    if (threadIdx.x == 0) {
        *out = picked;
        *ids = picked;
        *position += 1;
    }
}

// ---- entry points, one per element type --------------------------------------------------------

#define ENTRY_POINTS(T, SUF)                                                                        \
    extern "C" __global__ void add_rms_norm_##SUF(const T *x, const T *delta, T *sum, T *normed,   \
                                                  const T *w, int cols, float eps) {               \
        add_rms_norm<T>(x, delta, sum, normed, w, cols, eps);                                      \
    }                                                                                               \
    extern "C" __global__ void silu_mul_##SUF(const T *gate, const T *up, T *out, int rows,         \
                                              int cols, long gate_stride, long up_stride) {         \
        silu_mul<T>(gate, up, out, rows, cols, gate_stride, up_stride);                            \
    }                                                                                               \
    extern "C" __global__ void qk_norm_rope_cache_##SUF(                                            \
        const T *q, const T *k, const T *v, long q_stride, long k_stride, long v_stride,           \
        const T *q_w, const T *k_w, const T *cos, const T *sin, T *q_out, T *k_cache, T *v_cache,  \
        int len, int heads, int kv_heads, int hd, int cap, int offset, float eps, int style) {     \
        qk_norm_rope_cache<T>(q, k, v, q_stride, k_stride, v_stride, q_w, k_w, cos, sin, q_out,    \
                              k_cache, v_cache, len, heads, kv_heads, hd, cap, offset, eps, style, \
                              nullptr);                                                             \
    }                                                                                               \
    extern "C" __global__ void qk_norm_rope_cache_at_##SUF(                                         \
        const T *q, const T *k, const T *v, long q_stride, long k_stride, long v_stride,           \
        const T *q_w, const T *k_w, const T *cos, const T *sin, T *q_out, T *k_cache, T *v_cache,  \
        int len, int heads, int kv_heads, int hd, int cap, int offset, float eps, int style,       \
        const int *offset_at) {                                                                     \
        qk_norm_rope_cache<T>(q, k, v, q_stride, k_stride, v_stride, q_w, k_w, cos, sin, q_out,    \
                              k_cache, v_cache, len, heads, kv_heads, hd, cap, offset, eps, style, \
                              offset_at);                                                           \
    }                                                                                               \
    extern "C" __global__ void gather_rows_##SUF(const T *table, const unsigned *ids, T *out,      \
                                                 int cols) {                                       \
        gather_rows<T>(table, ids, out, cols);                                                     \
    }                                                                                               \
    extern "C" __global__ void causal_softmax_##SUF(const T *scores, T *probs, int len, int total,  \
                                                    int offset, float scale) {                     \
        causal_softmax<T>(scores, probs, len, total, offset, scale);                               \
    }                                                                                               \
    extern "C" __global__ void heads_to_rows_##SUF(const T *src, T *dst, int heads, int len,     \
                                                   int hd) {                                      \
        heads_to_rows<T>(src, dst, heads, len, hd);                                                \
    }                                                                                               \
    extern "C" __global__ void attn_combine_##SUF(const float *part_o, const float *part_ml, T *out,\
                                                  int splits, int hd) {                            \
        attn_combine<T>(part_o, part_ml, out, splits, hd);                                         \
    }                                                                                               \
    DECODE_ATTN(T, SUF, 2, 1) DECODE_ATTN(T, SUF, 2, 2) DECODE_ATTN(T, SUF, 2, 4)                   \
    DECODE_ATTN(T, SUF, 2, 8) DECODE_ATTN(T, SUF, 4, 1) DECODE_ATTN(T, SUF, 4, 2)                   \
    DECODE_ATTN(T, SUF, 4, 4) DECODE_ATTN(T, SUF, 4, 8) DECODE_ATTN(T, SUF, 8, 1)                   \
    DECODE_ATTN(T, SUF, 8, 2) DECODE_ATTN(T, SUF, 8, 4)

// decode_attention_<type>_e<elements per lane>_g<query heads per KV head>, its `_at` twin
// reading the position on the device (a step replayed from a CUDA graph), and both again as
// decode_attention_rope_[at_]… (ROPE: the raw token's k, v, norm weights, rope tables, eps and
// style after the common arguments).
#define DECODE_ATTN(T, SUF, EPL, G)                                                                 \
    extern "C" __global__ void decode_attention_##SUF##_e##EPL##_g##G(                              \
        const T *q, const T *k_cache, const T *v_cache, T *out, float *part_o, float *part_ml,      \
        int cap, int L, int chunk, float scale) {                                                   \
        decode_attention<T, EPL, G, false>(q, k_cache, v_cache, out, part_o, part_ml, cap, L,       \
                                           chunk, scale, nullptr, 0, 0, RawToken<T>{});             \
    }                                                                                               \
    extern "C" __global__ void decode_attention_at_##SUF##_e##EPL##_g##G(                           \
        const T *q, const T *k_cache, const T *v_cache, T *out, float *part_o, float *part_ml,      \
        int cap, int L, int chunk, float scale, const int *pos_at, int max_splits, int one_split) { \
        decode_attention<T, EPL, G, false>(q, k_cache, v_cache, out, part_o, part_ml, cap, L,       \
                                           chunk, scale, pos_at, max_splits, one_split,             \
                                           RawToken<T>{});                                          \
    }                                                                                               \
    extern "C" __global__ void decode_attention_rope_##SUF##_e##EPL##_g##G(                         \
        const T *q, const T *k_cache, const T *v_cache, T *out, float *part_o, float *part_ml,      \
        int cap, int L, int chunk, float scale, const T *k, const T *v, const T *q_w,               \
        const T *k_w, const T *cos, const T *sin, float eps, int style) {                           \
        decode_attention<T, EPL, G, true>(q, k_cache, v_cache, out, part_o, part_ml, cap, L, chunk, \
                                          scale, nullptr, 0, 0,                                     \
                                          RawToken<T>{k, v, q_w, k_w, cos, sin, eps, style});       \
    }                                                                                               \
    extern "C" __global__ void decode_attention_rope_at_##SUF##_e##EPL##_g##G(                      \
        const T *q, const T *k_cache, const T *v_cache, T *out, float *part_o, float *part_ml,      \
        int cap, int L, int chunk, float scale, const T *k, const T *v, const T *q_w,               \
        const T *k_w, const T *cos, const T *sin, float eps, int style, const int *pos_at,          \
        int max_splits, int one_split) {                                                            \
        decode_attention<T, EPL, G, true>(q, k_cache, v_cache, out, part_o, part_ml, cap, L, chunk, \
                                          scale, pos_at, max_splits, one_split,                     \
                                          RawToken<T>{k, v, q_w, k_w, cos, sin, eps, style});       \
    }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(__nv_bfloat16, bf16)
ENTRY_POINTS(__half, f16)

// decode_attention_rope_at_tr_<type>_e…_g… (16-bit types): the graph's decode attention with
// its dot products summed by warp_sums (TR), behind HELEXA_ENGINE_ATTENTION_SUMS=1 until
// measured.
#define DECODE_ATTN_TR(T, SUF, EPL, G)                                                              \
    extern "C" __global__ void decode_attention_rope_at_tr_##SUF##_e##EPL##_g##G(                   \
        const T *q, const T *k_cache, const T *v_cache, T *out, float *part_o, float *part_ml,      \
        int cap, int L, int chunk, float scale, const T *k, const T *v, const T *q_w,               \
        const T *k_w, const T *cos, const T *sin, float eps, int style, const int *pos_at,          \
        int max_splits, int one_split) {                                                            \
        decode_attention<T, EPL, G, true, true>(q, k_cache, v_cache, out, part_o, part_ml, cap, L,  \
                                                chunk, scale, pos_at, max_splits, one_split,        \
                                                RawToken<T>{k, v, q_w, k_w, cos, sin, eps, style}); \
    }
#define DECODE_ATTN_TR_ALL(T, SUF)                                                                  \
    DECODE_ATTN_TR(T, SUF, 2, 1) DECODE_ATTN_TR(T, SUF, 2, 2) DECODE_ATTN_TR(T, SUF, 2, 4)          \
    DECODE_ATTN_TR(T, SUF, 2, 8) DECODE_ATTN_TR(T, SUF, 4, 1) DECODE_ATTN_TR(T, SUF, 4, 2)          \
    DECODE_ATTN_TR(T, SUF, 4, 4) DECODE_ATTN_TR(T, SUF, 4, 8) DECODE_ATTN_TR(T, SUF, 8, 1)          \
    DECODE_ATTN_TR(T, SUF, 8, 2) DECODE_ATTN_TR(T, SUF, 8, 4)
DECODE_ATTN_TR_ALL(__nv_bfloat16, bf16)
DECODE_ATTN_TR_ALL(__half, f16)

// gemv_<T>, gemv_swiglu_<T> (SWIGLU), gemv_split_<T> (SPLIT), and gemv_norm_<T> /
// gemv_norm_swiglu_<T> / gemv_norm_split_<T> (NORM: the norm input's delta, weight, residual
// output and eps after the common arguments; registers capped at 64 for four blocks per SM,
// which the plain kernel's ~40 registers allow anyway).
#define GEMV(T, SUF)                                                                                \
    extern "C" __global__ void gemv_##SUF(const T *w, const T *x, T *y, int rows, int cols) {       \
        gemv<T, false, false>(w, x, y, rows, cols, nullptr, nullptr, nullptr, 0.0f);               \
    }                                                                                               \
    extern "C" __global__ void gemv_swiglu_##SUF(const T *w, const T *x, T *y, int rows,            \
                                                 int cols) {                                        \
        gemv<T, true, false>(w, x, y, rows, cols, nullptr, nullptr, nullptr, 0.0f);                \
    }                                                                                               \
    extern "C" __global__ void gemv_split_##SUF(const T *w, const T *x, T *y, int rows, int cols) { \
        gemv<T, false, false, true>(w, x, y, rows, cols, nullptr, nullptr, nullptr, 0.0f);         \
    }                                                                                               \
    GEMV_NORM(T, gemv_norm_##SUF, false, false) GEMV_NORM(T, gemv_norm_swiglu_##SUF, true, false)   \
    GEMV_NORM(T, gemv_norm_split_##SUF, false, true)
#define GEMV_NORM(T, NAME, SWIGLU, SPLIT)                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)                                \
        NAME(const T *w, const T *x, T *y, int rows, int cols, const T *delta, const T *norm_w,     \
             T *sum, float eps) {                                                                   \
        gemv<T, SWIGLU, true, SPLIT>(w, x, y, rows, cols, delta, norm_w, sum, eps);                \
    }
GEMV(__nv_bfloat16, bf16)
GEMV(__half, f16)
