// Batch-1 matrix-vector products over GGUF block-quantized weights (Q8_0, Q4_K, Q6_K), read in
// place in their GGUF layout: y = W x for one activation row x.
//
// Why not candle's (llama.cpp's) MMVQ kernel: it has each thread read its own block with 2- and
// 4-byte loads, so one warp-wide load touches ~17 cache lines and the load units, not the
// memory, set the pace (~2.3 TB/s of 4.8 on an H200); and it needs a separate launch to quantize
// x first. Here one warp owns one row at a time and copies it into shared memory 16 bytes per
// lane, coalesced and bypassing L1, in chunks of 2048 weights; then each lane takes 64 of the
// chunk's weights from shared memory (where unaligned reads are cheap) and multiplies them with
// 4-byte integer dot products.
//
// The copies are asynchronous (cp.async, global to shared without registers), STAGES chunks
// deep per warp: a warp asks for its next chunks while it computes the current one, so even a
// warp with one short row has its whole row in flight at once.
//
// x is quantized per 32 elements as llama.cpp's q8_1 does (scale amax/127, round to nearest),
// by every thread block into its shared memory while its first chunks of weights are on the
// way: no extra launch. Q4_K's minimums take the sum of the 32 quantized values times the scale,
// so the whole product is W times the quantized x, the arithmetic of MMVQ and of llama.cpp's CPU
// path up to summation order (mixing in the exact sum measured 2.5× further from the
// dequantized reference).
//
// Measured on an H200 (docs/benchmarks.md): decode +9% (Q8_0) and +15% (Q4_K_M) over MMVQ,
// then (sixth session) Q4_K_M +19-35% from the Q6_K dot product, the padded x and the loop's
// counters below. Nsight Compute after them: the Q8_0 vocabulary product streams at 90% of
// DRAM bandwidth, Q6_K's at 71% and Q4_K's large ones at ~60%, the latter two issue-bound;
// the small products (≤ 27 MB) are mostly fixed cost, 8-11 µs each.
//
// The same staged pipeline serves dense 16-bit weights (the Dense format, staged_gemv_…
// entry points) where that pays: x then stays in T, and the products have the bits of
// fused.cu's gemv.
//
// Compiled to PTX by build.rs when the `cuda` feature is on; launched from src/fused/cuda.rs.

#include "common.cuh"

// Warps per block: 8, or 16 in the "wide" build (build.rs passes -DQG_WARPS=16
// -DQG_MIN_BLOCKS=2). Every block forms and quantizes the whole input in its prologue, so
// four blocks of 8 warps on an SM do that work four times, sharing the SM's issue slots; two
// blocks of 16 do it twice. (The launch sweep's best shapes had one block per SM for the
// Q8_0 q/k/v and down products, eleventh session.)
#ifndef QG_WARPS
#define QG_WARPS 8
#endif
// Registers are capped for QG_MIN_BLOCKS resident blocks per SM (64 per thread either way);
// the chunks in flight per warp (the STAGES parameter, 2 to 4) and so the shared memory set
// how many fit (the launcher sizes its grid to match).
#ifndef QG_MIN_BLOCKS
#define QG_MIN_BLOCKS 4
#endif
// Weights per lane per chunk, and per chunk (a warp of lanes).
#define QG_UNIT 64
#define QG_CHUNK (32 * QG_UNIT)

// Where element `i` of the quantized x sits in shared memory: 16 bytes of padding after every
// 64 values. Lane l reads its 64 values from element 64·l (Q6_K: 16-value runs 128 apart), so
// without the padding the eight lanes of one 16-byte load phase start on two banks only (a
// 4-way conflict: Nsight Compute showed the shared-memory queue full, "MIO throttle" and
// "short scoreboard" the top stalls); with it they start on eight distinct banks.
__device__ __forceinline__ int x_slot(int i) { return i + (i / 64) * 16; }
// Bytes of the padded int8 x for `cols` values (the launcher's layout must match).
#define QG_X_BYTES(cols) ((cols) + (cols) / 4)

// Quantized x in shared memory: int8 values (padded, see x_slot), and per 32 values the scale
// and scale · Σ values.
struct QuantX {
    const int8_t *q;
    const float *d;
    const float *sum;
    // The 16 int8 values from element `i` (a multiple of 16) as four packed words.
    __device__ __forceinline__ int4 at(int i) const {
        return *reinterpret_cast<const int4 *>(q + x_slot(i));
    }
    // The 64 values from element `k` (a multiple of 64) as four such parts: one group of the
    // padded layout, so one address for all four.
    __device__ __forceinline__ const int4 *run64(int k) const {
        return reinterpret_cast<const int4 *>(q + x_slot(k));
    }
};

__device__ __forceinline__ float half_bits(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

__device__ __forceinline__ int dot4x4(int4 w, int4 x, int acc) {
    acc = __dp4a(w.x, x.x, acc);
    acc = __dp4a(w.y, x.y, acc);
    acc = __dp4a(w.z, x.z, acc);
    return __dp4a(w.w, x.w, acc);
}

// dot4x4 with unsigned bytes in `w` (dp4a.u32.s32): Q4_K's high nibbles masked in place, each
// 16 times its value, so the sum is 16 times theirs, exactly (|sum| < 2^20), which saves
// shifting each word down.
__device__ __forceinline__ int dot4x4_u8(int4 w, int4 x, int acc) {
    asm("dp4a.u32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(w.x), "r"(x.x));
    asm("dp4a.u32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(w.y), "r"(x.y));
    asm("dp4a.u32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(w.z), "r"(x.z));
    asm("dp4a.u32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(w.w), "r"(x.w));
    return acc;
}

// A 32-bit word from a 2-byte-aligned shared-memory address.
__device__ __forceinline__ uint32_t word_a2(const uint8_t *p) {
    const uint16_t *h = reinterpret_cast<const uint16_t *>(p);
    return static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
}

// Four 32-bit words from a 2-byte-aligned shared-memory address: five aligned 4-byte loads
// shifted into place (eight 2-byte loads would queue twice as many shared-memory requests).
// Reads up to 4 bytes past the 16, which the callers keep inside the block.
__device__ __forceinline__ void words4_a2(const uint8_t *p, uint32_t out[4]) {
    // Offsetting the pointer (not rebuilding it from an integer) keeps the loads shared-memory
    // loads rather than generic ones.
    const uint32_t off = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p)) & 2;
    const uint32_t *w = reinterpret_cast<const uint32_t *>(p - off);
    const uint32_t shift = off * 8;
    uint32_t v[5];
#pragma unroll
    for (int i = 0; i < 5; i++) v[i] = w[i];
#pragma unroll
    for (int i = 0; i < 4; i++) out[i] = __funnelshift_r(v[i], v[i + 1], shift);
}

// Each format: its block (weights, bytes), the input it multiplies (`In`: x quantized in shared
// memory, QuantX, for the block-quantized formats), and `add`, the lane's share of a staged
// chunk (weights k0 … k0 + QG_CHUNK − 1 of the row, fewer at its end) times x, added to acc.
// The block-quantized formats' share is the lane's 64 consecutive weights, `dot`.
template <class F> struct Quantized {
    static constexpr bool QUANTIZED = true;
    using In = QuantX;
    static __device__ __forceinline__ float add(const uint8_t *chunk, int lane, int k0, int cols,
                                                const QuantX &x, float acc) {
        const int units = min(32, (cols - k0) / QG_UNIT);
        return lane < units ? acc + F::dot(chunk, lane, k0 + lane * QG_UNIT, x) : acc;
    }
};

// Q8_0: 34-byte blocks of 32: f16 scale, 32 int8. A lane takes two blocks (68 bytes, so 4-byte
// aligned, and lane strides of 17 words hit distinct shared-memory banks).
struct Q8_0 : Quantized<Q8_0> {
    static constexpr int BLOCK = 32, BYTES = 34;
    static __device__ __forceinline__ float dot(const uint8_t *chunk, int lane, int k, const QuantX &x) {
        const uint32_t *s = reinterpret_cast<const uint32_t *>(chunk + 68 * lane);
        uint32_t w[17];
#pragma unroll
        for (int i = 0; i < 17; i++) w[i] = s[i];
        // Block 0: scale in bytes 0-1, values from byte 2 (straddling words); block 1: scale
        // in bytes 34-35, values word-aligned from byte 36.
        int4 a0, a1, b0, b1;
        a0.x = __funnelshift_r(w[0], w[1], 16); a0.y = __funnelshift_r(w[1], w[2], 16);
        a0.z = __funnelshift_r(w[2], w[3], 16); a0.w = __funnelshift_r(w[3], w[4], 16);
        a1.x = __funnelshift_r(w[4], w[5], 16); a1.y = __funnelshift_r(w[5], w[6], 16);
        a1.z = __funnelshift_r(w[6], w[7], 16); a1.w = __funnelshift_r(w[7], w[8], 16);
        b0 = make_int4(w[9], w[10], w[11], w[12]);
        b1 = make_int4(w[13], w[14], w[15], w[16]);
        const int4 *xr = x.run64(k);
        const int s0 = dot4x4(a1, xr[1], dot4x4(a0, xr[0], 0));
        const int s1 = dot4x4(b1, xr[3], dot4x4(b0, xr[2], 0));
        const int g = k / 32;
        return half_bits(w[0]) * x.d[g] * s0 + half_bits(w[8] >> 16) * x.d[g + 1] * s1;
    }
};

// Q4_K: 144-byte blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and
// minimums, then 128 bytes of 4-bit values; weight = d·scale·q − dmin·min per 32. A lane takes
// a quarter block: 32 bytes whose low nibbles are sub-block 2j and high nibbles 2j+1.
struct Q4K : Quantized<Q4K> {
    static constexpr int BLOCK = 256, BYTES = 144;
    // The 6-bit scales and minimums of sub-blocks 2j and 2j+1 (ggml's get_scale_min_k4 for
    // both), packed two per 16-bit word: sc = both scales, m = both minimums. Computed for the
    // j < 2 and j >= 2 layouts alike and selected, so the lanes of a warp (all four j) never
    // diverge.
    static __device__ __forceinline__ void scales_mins(const uint8_t *q, int j, uint32_t &sc, uint32_t &m) {
        const uint16_t *w = reinterpret_cast<const uint16_t *>(q);
        const uint32_t a = w[j], b = w[j + 2], c = w[j ^ 2];
        const bool low = j < 2;
        sc = low ? a & 0x3f3f : (b & 0x0f0f) | ((c & 0xc0c0) >> 2);
        m = low ? b & 0x3f3f : ((b >> 4) & 0x0f0f) | ((a & 0xc0c0) >> 2);
    }
    static __device__ __forceinline__ float dot(const uint8_t *chunk, int lane, int k, const QuantX &x) {
        const uint8_t *blk = chunk + BYTES * (lane / 4);
        const int j = lane % 4;
        const uint32_t dm = *reinterpret_cast<const uint32_t *>(blk);
        const int4 v0 = *reinterpret_cast<const int4 *>(blk + 16 + 32 * j);
        const int4 v1 = *reinterpret_cast<const int4 *>(blk + 32 + 32 * j);
        const int lo_mask = 0x0F0F0F0F, hi_mask = static_cast<int>(0xF0F0F0F0u);
        const int4 l0 = make_int4(v0.x & lo_mask, v0.y & lo_mask, v0.z & lo_mask, v0.w & lo_mask);
        const int4 l1 = make_int4(v1.x & lo_mask, v1.y & lo_mask, v1.z & lo_mask, v1.w & lo_mask);
        const int4 h0 = make_int4(v0.x & hi_mask, v0.y & hi_mask, v0.z & hi_mask, v0.w & hi_mask);
        const int4 h1 = make_int4(v1.x & hi_mask, v1.y & hi_mask, v1.z & hi_mask, v1.w & hi_mask);
        const int4 *xr = x.run64(k);
        const int s_lo = dot4x4(l1, xr[1], dot4x4(l0, xr[0], 0));
        // The high nibbles' sum, from 16 times it (exact: a power of two, |sum| < 2^20).
        const float s_hi = static_cast<float>(dot4x4_u8(h1, xr[3], dot4x4_u8(h0, xr[2], 0))) * 0.0625f;
        uint32_t sc, m;
        scales_mins(blk + 4, j, sc, m);
        const float d = half_bits(dm), dmin = half_bits(dm >> 16);
        const int g = k / 32; // even: the pair of scales and of sums is one 8-byte read
        const float2 xd = *reinterpret_cast<const float2 *>(x.d + g);
        const float2 xs = *reinterpret_cast<const float2 *>(x.sum + g);
        return d * (float(sc & 0xff) * xd.x * s_lo + float(sc >> 8) * xd.y * s_hi) -
               dmin * (float(m & 0xff) * xs.x + float(m >> 8) * xs.y);
    }
};

// Q6_K: 210-byte blocks of 256: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8
// scales (one per 16 weights), f16 d; weight = d·scale·(q − 32). A lane takes a quarter: in
// half n of the block, the 16 positions l ∈ [16h, 16h + 16) of each of its four 32-runs.
// The 6-bit q (0..63) are multiplied as they are and 32·Σx taken off per 16 (four more dot
// products with −32 in every byte): subtracting 32 from each byte first is a saturating byte
// operation that sm_90 emulates in ~6 instructions per word, which made this format's product
// bound by instructions (Nsight Compute: math-pipe throttle, 48% of DRAM bandwidth).
struct Q6K : Quantized<Q6K> {
    static constexpr int BLOCK = 256, BYTES = 210;
    static __device__ __forceinline__ float dot(const uint8_t *chunk, int lane, int k, const QuantX &x) {
        const uint8_t *blk = chunk + BYTES * (lane / 4);
        const int n = (lane % 4) / 2, h = lane % 2;
        const uint8_t *ql = blk + 64 * n + 16 * h, *qh = blk + 128 + 32 * n + 16 * h;
        const int8_t *sc = reinterpret_cast<const int8_t *>(blk + 192) + 8 * n + h;
        const int base = k - 64 * (lane % 4) + 128 * n + 16 * h; // element of run 0, position 0
        uint32_t a[4], b[4], hi[4];
        words4_a2(ql, a);
        words4_a2(ql + 32, b);
        words4_a2(qh, hi);
        int run[4][4]; // run r: positions 128n + 32r + 16h + (0..15), 6-bit q × 4
#pragma unroll
        for (int i = 0; i < 4; i++) {
            run[0][i] = (a[i] & 0x0F0F0F0F) | ((hi[i] << 4) & 0x30303030);
            run[1][i] = (b[i] & 0x0F0F0F0F) | ((hi[i] << 2) & 0x30303030);
            run[2][i] = ((a[i] >> 4) & 0x0F0F0F0F) | (hi[i] & 0x30303030);
            run[3][i] = ((b[i] >> 4) & 0x0F0F0F0F) | ((hi[i] >> 2) & 0x30303030);
        }
        const int4 minus32 = make_int4(0xE0E0E0E0, 0xE0E0E0E0, 0xE0E0E0E0, 0xE0E0E0E0);
        float acc = 0.0f;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int e = base + 32 * r;
            const int4 w4 = make_int4(run[r][0], run[r][1], run[r][2], run[r][3]);
            const int4 x4 = x.at(e);
            acc += sc[2 * r] * x.d[e / 32] * dot4x4(w4, x4, dot4x4(minus32, x4, 0));
        }
        return half_bits(word_a2(blk + 208)) * acc;
    }
};

// Dense 16-bit weights (T = the activation type), x kept in T in shared memory: the staged
// pipeline serving a dense model's products in place of fused.cu's gemv (one block per eight
// rows, four loads of 16 bytes in flight per lane, the input formed again by every block of
// every wave). The launch sweep (eleventh session) timed q/k/v, o, down and the output product
// faster staged (down 29.05 → 26.26 µs) and gate/up with its SwiGLU gate slower (47.94 →
// 49.76), so the launcher stages all but that one. A "block" is one 16-byte piece of eight weights; lane l
// takes pieces l, l + 32, … of a chunk (conflict-free shared-memory reads), which are the
// pieces gemv's lane l reads from the same row, summed in the same order: groups of four while
// a whole group is left in the row, then one at a time. So the result has gemv's bits.
template <typename T> struct Dense {
    static constexpr bool QUANTIZED = false;
    static constexpr int BLOCK = 8, BYTES = 16;
    using In = const T *;
    static __device__ __forceinline__ float add(const uint8_t *chunk, int lane, int k0, int cols,
                                                const T *x, float acc) {
        const uint4 *w = reinterpret_cast<const uint4 *>(chunk);
        const uint4 *xr = reinterpret_cast<const uint4 *>(x + k0);
        const int pieces = (cols - k0) / 8; // in this chunk and after it
        constexpr int PER_LANE = QG_CHUNK / 8 / 32;
#pragma unroll
        for (int g = 0; g < PER_LANE; g += 4) {
            const int p = lane + 32 * g;
            if (p + 96 < pieces) { // a whole group of four
                float part = dot8<T>(w[p], xr[p]);
#pragma unroll
                for (int i = 1; i < 4; i++) part += dot8<T>(w[p + 32 * i], xr[p + 32 * i]);
                acc += part;
            } else {
#pragma unroll
                for (int i = 0; i < 4; i++)
                    if (p + 32 * i < pieces) acc += dot8<T>(w[p + 32 * i], xr[p + 32 * i]);
            }
        }
        return acc;
    }
};

// Quantizes the eight values `v` at element `e`; four neighbouring lanes hold one 32-group.
__device__ __forceinline__ void quantize8(const float v[8], int e, int cols, int8_t *q, float *d, float *sum) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float scale = amax / 127.0f;
    uint32_t packed[2] = {0, 0};
    int qsum = 0;
    if (amax != 0.0f) {
        // One division, not eight: a correctly rounded f32 division is a ~20-instruction
        // sequence on the path every block runs before its first product. (v·(127/amax) can
        // round a value at an exact half differently from v/(amax/127); both are q8_1.)
        const float inv = 127.0f / amax;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int qi = static_cast<int>(roundf(v[i] * inv));
            qsum += qi;
            packed[i / 4] |= (static_cast<uint32_t>(qi) & 0xFF) << (8 * (i % 4));
        }
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) qsum += __shfl_xor_sync(0xffffffffu, qsum, o);
    if (e >= cols) return;
    *reinterpret_cast<uint2 *>(q + x_slot(e)) = make_uint2(packed[0], packed[1]);
    if (threadIdx.x % 4 == 0) {
        d[e / 32] = scale;
        sum[e / 32] = scale * static_cast<float>(qsum);
    }
}

// Quantizes x (`cols` values, a multiple of 32) into shared memory: each thread takes eight
// values, the block 2048 per step, and two steps' loads are issued before either is used, so
// the prologue costs about one round trip to L2 per 4096 values rather than one per group.
// `load(e, v)` gives the eight values from element e (zeros past cols).
#define QG_X_STEP (QG_WARPS * 32 * 8) // values a block's threads take at once, eight each
template <typename Load>
__device__ void quantize_x(Load load, int cols, int8_t *q, float *d, float *sum) {
    constexpr int STEP = QG_X_STEP;
    for (int base = 0; base < cols; base += 2 * STEP) { // uniform over the block: shuffles stay full
        const int e0 = base + 8 * threadIdx.x, e1 = e0 + STEP;
        float a[8], b[8];
        load(e0, a);
        load(e1, b);
        quantize8(a, e0, cols, q, d, sum);
        quantize8(b, e1, cols, q, d, sum);
    }
}

// quantize_x over 16-bit x of at most QG_X_AT_ONCE steps (the down product's 12288 values are
// six): every load issued before the first is used, so the prologue costs one round trip to L2
// rather than one per two steps (the loop above is not unrolled, its trip count being a
// parameter, so its loads wait for the previous steps' shuffles). Same values, same bits.
#define QG_X_AT_ONCE 6
template <typename T>
__device__ void quantize_x_at_once(const T *x, int cols, int8_t *q, float *d, float *sum) {
    static_assert(sizeof(T) == 2, "eight 16-bit values are one 16-byte load");
    uint4 raw[QG_X_AT_ONCE];
#pragma unroll
    for (int i = 0; i < QG_X_AT_ONCE; i++) {
        const int e = 8 * threadIdx.x + i * QG_X_STEP;
        raw[i] = e < cols ? *reinterpret_cast<const uint4 *>(x + e) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < QG_X_AT_ONCE; i++) {
        if (i * QG_X_STEP >= cols) break; // uniform over the block: shuffles stay full
        const T *h = reinterpret_cast<const T *>(&raw[i]);
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = to_f<T>(h[k]);
        quantize8(v, 8 * threadIdx.x + i * QG_X_STEP, cols, q, d, sum);
    }
}

// The staged kernel's `prologue` argument (packed by `WeightPrefetch::prologue` in cuda.rs): bit 0
// x quantized at once; bits 1-3 the chunks per warp requested before the wait; bits 4-7 the
// chunks per warp asked of L2 after it.
#define PROLOGUE_X_AT_ONCE 1
__device__ __forceinline__ int prologue_early_chunks(int prologue) { return (prologue >> 1) & 7; }
__device__ __forceinline__ int prologue_l2_chunks(int prologue) { return (prologue >> 4) & 15; }

// 16 bytes global → shared, asynchronously, not cached in L1.
__device__ __forceinline__ void copy16_async(void *dst, const void *src) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N> __device__ __forceinline__ void copies_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The product's input, formed by every block into shared memory at `at` (after its chunk
// buffers): x, or with NORM norm(x + delta), quantized (QuantX: QG_X_BYTES(cols) + cols/32·8
// bytes) or, for Dense, kept in T (cols · sizeof(T) bytes, as fused.cu's gemv keeps it).
template <class F, typename T, bool NORM>
__device__ typename F::In form_input(uint8_t *at, const T *__restrict__ x, const T *delta,
                                     const T *norm_w, T *sum, int cols, float eps, int x_at_once) {
    if constexpr (F::QUANTIZED) {
        int8_t *xq = reinterpret_cast<int8_t *>(at);
        float *xd = reinterpret_cast<float *>(xq + QG_X_BYTES(cols));
        float *xs = xd + cols / 32;
        if (NORM && cols <= 2 * QG_X_STEP) {
            float a[8], b[8];
            normed16(x, delta, norm_w, sum, cols, eps, a, b);
            const int e0 = 8 * threadIdx.x; // quantize_x's two elements of this thread
            quantize8(a, e0, cols, xq, xd, xs);
            quantize8(b, e0 + QG_X_STEP, cols, xq, xd, xs);
        } else if (NORM) {
            const float scale = residual_norm_scale(x, delta, sum, cols, eps);
            quantize_x([&](int e, float v[8]) { normed8(x, delta, norm_w, scale, e, cols, v); },
                       cols, xq, xd, xs);
        } else if (sizeof(T) == 2 && x_at_once && cols <= QG_X_AT_ONCE * QG_X_STEP) {
            if constexpr (sizeof(T) == 2) quantize_x_at_once(x, cols, xq, xd, xs);
        } else {
            quantize_x([&](int e, float v[8]) { load8(x, e, cols, v); }, cols, xq, xd, xs);
        }
        return QuantX{xq, xd, xs};
    } else {
        T *xt = reinterpret_cast<T *>(at);
        const int e0 = 8 * threadIdx.x;
        if (NORM && cols <= 2 * QG_X_STEP) {
            float a[8], b[8];
            normed16(x, delta, norm_w, sum, cols, eps, a, b);
            if (e0 < cols) store8(xt, e0, a);
            if (e0 + QG_X_STEP < cols) store8(xt, e0 + QG_X_STEP, b);
        } else if (NORM) {
            const float scale = residual_norm_scale(x, delta, sum, cols, eps);
            for (int e = e0; e < cols; e += QG_X_STEP) {
                float v[8];
                normed8(x, delta, norm_w, scale, e, cols, v);
                store8(xt, e, v);
            }
        } else {
            for (int e = e0; e < cols; e += QG_X_STEP)
                *reinterpret_cast<uint4 *>(xt + e) = *reinterpret_cast<const uint4 *>(x + e);
        }
        return xt;
    }
}

// Shared memory: STAGES chunk buffers per warp, then the input (form_input). Requirements
// (checked by the launcher): cols a multiple of 64 (Dense: of 8), rows of `row_bytes` a
// multiple of 16, w and x 16-byte aligned.
// NORM: the product's input is norm(x + delta) with weight `norm_w`, formed by each block before
// it quantizes it, and block 0 stores x + delta to `sum` when that is not null (see
// residual_norm_scale in common.cuh); delta, norm_w and sum 16-byte aligned.
// prologue: how the kernel starts, in bits (PROLOGUE_… below, packed by the launcher):
// - PROLOGUE_X_AT_ONCE (not with NORM; 16-bit x of at most QG_X_AT_ONCE · QG_X_STEP values): x
//   quantized by quantize_x_at_once, in one round trip to L2 (HELEXA_ENGINE_QUANT_X_AT_ONCE);
// - the chunks per warp requested before waiting for the previous kernel (at most STAGES - 1,
//   the rest requested after it);
// - the chunks per warp after those asked of L2 once the previous kernel has finished.
// None changes the arithmetic.
// SWIGLU: w is `rows` gate rows followed by as many up rows (a stacked gate/up weight); the warp
// of row r also takes up row r + rows, and writes silu(gate) · up: the SwiGLU gate folded into
// the product (one launch fewer per layer, and half the output written).
// SPLIT (not with SWIGLU; the launcher asks for chunks per row a multiple of 2): the warps of a
// block work in pairs, each row shared by a pair, the first warp taking its even chunks and the
// second its odd ones; the second's sum reaches the first through shared memory, which writes
// first + second. For products with between one and two rows per warp of the grid (the q/k/v
// product of an 8B model: 6144 rows over 4224 warps), where half the warps take two rows and
// set the product's time at four chunks in a row, the pairs take three. The sum is taken in
// another order than the plain kernel's, so the output can differ in the last bit.
template <class F, typename T, int STAGES, bool NORM, bool SWIGLU, bool SPLIT = false>
__device__ void staged_gemv(const uint8_t *__restrict__ w, const T *__restrict__ x, T *__restrict__ y,
                           int rows, int cols, int row_bytes, const T *delta, const T *norm_w,
                           T *sum, float eps, int prologue) {
    static_assert(!(SPLIT && SWIGLU), "a split row is not a gate/up pair");
    constexpr int WAYS = SPLIT ? 2 : 1; // warps per row
    constexpr int CHUNK_BYTES = QG_CHUNK / F::BLOCK * F::BYTES;
    static_assert(CHUNK_BYTES % 16 == 0, "chunks must be whole 16-byte copies");
    extern __shared__ __align__(16) uint8_t smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    uint8_t *stages = smem + warp * STAGES * CHUNK_BYTES;

    // The warp's work: each chunk of its rows in turn, rows strided over the grid. Positions
    // are counters stepped per chunk, not t / chunks and t % chunks: an integer division is a
    // ~25-instruction sequence, and two per chunk were a third of the Q4_K loop's instructions.
    const int chunks = (cols + QG_CHUNK - 1) / QG_CHUNK;
    const int part = warp % WAYS; // SPLIT: the chunks part, part + 2, … of each row
    const int first_row = blockIdx.x * (QG_WARPS / WAYS) + warp / WAYS;
    const int row_step = gridDim.x * (QG_WARPS / WAYS);
    const int my_rows = first_row < rows ? (rows - first_row + row_step - 1) / row_step : 0;
    // Where the warp's next chunk to request lies: its row (ordinal among the warp's), chunk,
    // address (and with SWIGLU, whether the row's up half).
    struct Cursor {
        int row, chunk;
        bool up;
        const uint8_t *src;
    };
    Cursor next{0, part, false, w + (size_t)first_row * row_bytes + part * CHUNK_BYTES};
    // The chunk after `at`'s in the warp's order: each chunk of a row in turn (SPLIT: every
    // other one), with SWIGLU the gate row's then its up row's, then the next row.
    auto advance = [&](Cursor &at) {
        at.src += WAYS * CHUNK_BYTES;
        if ((at.chunk += WAYS) >= chunks) {
            at.chunk = part;
            if (SWIGLU && !at.up) { // the gate row done: its up row next
                at.up = true;
                at.src = w + (size_t)(first_row + at.row * row_step + rows) * row_bytes;
            } else {
                at.up = false;
                ++at.row;
                at.src = w + (size_t)(first_row + at.row * row_step) * row_bytes + part * CHUNK_BYTES;
            }
        }
    };
    int next_stage = 0;
    // Starts copying the next chunk into its stage (one commit group per chunk, empty past the
    // end, so the groups in flight always count STAGES - 1).
    auto issue = [&]() {
        if (next.row < my_rows) {
            uint8_t *dst = stages + next_stage * CHUNK_BYTES;
            const int left = row_bytes - next.chunk * CHUNK_BYTES;
            if (left >= CHUNK_BYTES) {
                // A whole chunk (every chunk when cols is a multiple of QG_CHUNK): a fixed
                // number of copies per lane, unrolled. The general loop below compiled to a
                // remainder loop with branches, ~40 instructions a chunk, a quarter of the
                // Q4_K loop's.
                constexpr int COPIES = CHUNK_BYTES / 16;
#pragma unroll
                for (int t = 0; t < (COPIES + 31) / 32; t++) {
                    const int i = lane + 32 * t;
                    if (COPIES % 32 == 0 || i < COPIES) copy16_async(dst + 16 * i, next.src + 16 * i);
                }
            } else {
                for (int i = lane; i < left / 16; i += 32) copy16_async(dst + 16 * i, next.src + 16 * i);
            }
            advance(next);
        }
        copies_commit();
        next_stage = next_stage + 1 == STAGES ? 0 : next_stage + 1;
    };
    // Weights only before the wait: the previous kernel may still run. `early` of the STAGES - 1
    // chunks are requested then (all by default), the rest once it has finished.
    const int early = min(prologue_early_chunks(prologue), STAGES - 1);
#pragma unroll
    for (int t = 0; t < STAGES - 1; t++) {
        if (t == early) follow_previous_kernel();
        issue();
    }
    if (early == STAGES - 1) follow_previous_kernel();
    // The chunks after those asked of L2 while the block forms its input, when the prologue
    // says so: the memory would otherwise idle from the previous kernel's end until the loop
    // below requests its next chunk, and those requests then hit L2. Lane p asks for chunk p.
    {
        Cursor ahead = next;
        const int l2 = prologue_l2_chunks(prologue);
        for (int p = 0; p < l2 && ahead.row < my_rows; p++) {
            if (lane == p) prefetch_l2(ahead.src, min(CHUNK_BYTES, row_bytes - ahead.chunk * CHUNK_BYTES));
            advance(ahead);
        }
    }
    const typename F::In input = form_input<F, T, NORM>(smem + QG_WARPS * STAGES * CHUNK_BYTES, x,
                                                        delta, norm_w, sum, cols, eps,
                                                        prologue & PROLOGUE_X_AT_ONCE);
    __syncthreads();

    int stage = 0;
    __shared__ float second_part[SPLIT ? QG_WARPS / 2 : 1]; // SPLIT: each pair's second sum
    for (int r = 0; r < my_rows; r++) {
        float gate = 0.0f;
#pragma unroll
        for (int half = 0; half < (SWIGLU ? 2 : 1); half++) { // SWIGLU: the gate row, then up
            float acc = 0.0f;
            for (int c = part; c < chunks; c += WAYS) {
                issue(); // into the stage computed last round
                copies_wait<STAGES - 1>();
                __syncwarp(); // every lane's copies of this chunk have landed
                acc = F::add(stages + stage * CHUNK_BYTES, lane, c * QG_CHUNK, cols, input, acc);
                stage = stage + 1 == STAGES ? 0 : stage + 1;
                __syncwarp(); // the stage is refilled next round
            }
            acc = warp_sum(acc);
            if (SPLIT) {
                // The pair's own barrier (ids 1-4; 0 is __syncthreads): both warps of a pair
                // take the same rows, so they meet here equally often.
                const int pair = warp / 2;
                if (part == 1 && lane == 0) second_part[pair] = acc;
                pair_barrier(pair);
                if (part == 0 && lane == 0) y[first_row + r * row_step] = from_f<T>(acc + second_part[pair]);
                pair_barrier(pair); // read before rewritten
            } else if (SWIGLU && half == 0) {
                gate = acc;
            } else if (lane == 0) {
                y[first_row + r * row_step] = SWIGLU ? swiglu<T>(gate, acc) : from_f<T>(acc);
            }
        }
    }
    copies_wait<0>();
}

// quant_gemv_<format>_<activation type>_s<stages>; with 16-bit activations also
// quant_gemv_norm_… (NORM above), quant_gemv_swiglu_… and quant_gemv_norm_swiglu_… (SWIGLU),
// and, at the default two stages only, quant_gemv_split_… and quant_gemv_norm_split_… (SPLIT;
// it and SWIGLU take the norm parameters, unused without NORM). Every entry point ends with
// `prologue`.
#define QUANT_GEMV_KERNEL(NAME, F, T, S, NORM, SWIGLU)                                              \
    extern "C" __global__ void __launch_bounds__(QG_WARPS * 32, QG_MIN_BLOCKS)                      \
        NAME(const uint8_t *w, const T *x, T *y, int rows, int cols, int row_bytes, const T *delta, \
             const T *norm_w, T *sum, float eps, int prologue) {                                    \
        staged_gemv<F, T, S, NORM, SWIGLU>(w, x, y, rows, cols, row_bytes, delta, norm_w, sum, eps,  \
                                          prologue);                                                \
    }
#define QUANT_GEMV(F, FSUF, T, SUF, S)                                                              \
    extern "C" __global__ void __launch_bounds__(QG_WARPS * 32, QG_MIN_BLOCKS)                      \
        quant_gemv_##FSUF##_##SUF##_s##S(const uint8_t *w, const T *x, T *y, int rows, int cols,    \
                                         int row_bytes, int prologue) {                             \
        staged_gemv<F, T, S, false, false>(w, x, y, rows, cols, row_bytes, nullptr, nullptr,         \
                                          nullptr, 0.0f, prologue);                                 \
    }
#define QUANT_GEMV_NORM(F, FSUF, T, SUF, S)                                                         \
    QUANT_GEMV_KERNEL(quant_gemv_norm_##FSUF##_##SUF##_s##S, F, T, S, true, false)
#define QUANT_GEMV_STAGES(KERNEL, F, FSUF, T, SUF)                                                  \
    KERNEL(F, FSUF, T, SUF, 2) KERNEL(F, FSUF, T, SUF, 3) KERNEL(F, FSUF, T, SUF, 4)
#define QUANT_GEMV_SWIGLU_AT(F, FSUF, T, SUF, S)                                                    \
    QUANT_GEMV_KERNEL(quant_gemv_swiglu_##FSUF##_##SUF##_s##S, F, T, S, false, true)                \
    QUANT_GEMV_KERNEL(quant_gemv_norm_swiglu_##FSUF##_##SUF##_s##S, F, T, S, true, true)
#define QUANT_GEMV_SWIGLU(F, FSUF, T, SUF)                                                          \
    QUANT_GEMV_STAGES(QUANT_GEMV_SWIGLU_AT, F, FSUF, T, SUF)                                        \
    QUANT_GEMV_SPLIT_KERNEL(quant_gemv_split_##FSUF##_##SUF##_s2, F, T, false)                      \
    QUANT_GEMV_SPLIT_KERNEL(quant_gemv_norm_split_##FSUF##_##SUF##_s2, F, T, true)
// SPLIT, at two stages and 16-bit activations only, and not in the wide build (its pairs'
// barriers are four: pair_barrier).
#if QG_WARPS != 8
#define QUANT_GEMV_SPLIT_KERNEL(NAME, F, T, NORM)
#else
#define QUANT_GEMV_SPLIT_KERNEL(NAME, F, T, NORM)                                                   \
    extern "C" __global__ void __launch_bounds__(QG_WARPS * 32, QG_MIN_BLOCKS)                      \
        NAME(const uint8_t *w, const T *x, T *y, int rows, int cols, int row_bytes, const T *delta, \
             const T *norm_w, T *sum, float eps, int prologue) {                                    \
        staged_gemv<F, T, 2, NORM, false, true>(w, x, y, rows, cols, row_bytes, delta, norm_w, sum,  \
                                               eps, prologue);                                      \
    }
#endif
#define QUANT_GEMV_TYPES(F, FSUF)                                                                   \
    QUANT_GEMV_STAGES(QUANT_GEMV, F, FSUF, float, f32)                                              \
    QUANT_GEMV_STAGES(QUANT_GEMV, F, FSUF, __nv_bfloat16, bf16)                                     \
    QUANT_GEMV_STAGES(QUANT_GEMV, F, FSUF, __half, f16)                                             \
    QUANT_GEMV_STAGES(QUANT_GEMV_NORM, F, FSUF, __nv_bfloat16, bf16)                                \
    QUANT_GEMV_STAGES(QUANT_GEMV_NORM, F, FSUF, __half, f16)                                        \
    QUANT_GEMV_SWIGLU(F, FSUF, __nv_bfloat16, bf16) QUANT_GEMV_SWIGLU(F, FSUF, __half, f16)
QUANT_GEMV_TYPES(Q8_0, q8_0)
QUANT_GEMV_TYPES(Q4K, q4k)
QUANT_GEMV_TYPES(Q6K, q6k)

// Dense weights: staged_gemv_[norm_][swiglu_]<T>_s2, all with the norm parameters (null when
// unused). Two stages only: three (96 KB of chunk buffers per block) exceed the shared memory
// the launcher asks for.
#define STAGED_DENSE(T, SUF)                                                                        \
    QUANT_GEMV_KERNEL(staged_gemv_##SUF##_s2, Dense<T>, T, 2, false, false)                         \
    QUANT_GEMV_KERNEL(staged_gemv_norm_##SUF##_s2, Dense<T>, T, 2, true, false)                     \
    QUANT_GEMV_KERNEL(staged_gemv_swiglu_##SUF##_s2, Dense<T>, T, 2, false, true)                   \
    QUANT_GEMV_KERNEL(staged_gemv_norm_swiglu_##SUF##_s2, Dense<T>, T, 2, true, true)
STAGED_DENSE(__nv_bfloat16, bf16)
STAGED_DENSE(__half, f16)
