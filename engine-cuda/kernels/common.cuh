// Helpers shared by the engine's kernel files: element conversions and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ---- element conversions ---------------------------------------------------------------------

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// The value a T-typed store of `x` would keep.
template <typename T> __device__ __forceinline__ float rnd(float x) { return to_f<T>(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the block (blockDim.x a multiple of 32, at most 1024) in a fixed order;
// every thread gets the result.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float partial[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const float none = MAX ? -INFINITY : 0.0f;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads(); // `partial` may still be read from a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : none;
    return MAX ? warp_max(v) : warp_sum(v);
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// Eight consecutive values of x from element `e` (a multiple of 8) as floats; zeros past `cols`.
__device__ __forceinline__ void load8(const float *x, int e, int cols, float v[8]) {
    const float4 a = e < cols ? *reinterpret_cast<const float4 *>(x + e) : make_float4(0, 0, 0, 0);
    const float4 b = e < cols ? *reinterpret_cast<const float4 *>(x + e + 4) : make_float4(0, 0, 0, 0);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(const T *x, int e, int cols, float v[8]) {
    const uint4 raw = e < cols ? *reinterpret_cast<const uint4 *>(x + e) : make_uint4(0, 0, 0, 0);
    const T *h = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = to_f<T>(h[i]);
}

// Stores eight floats as consecutive elements of T from element `e` (16-byte aligned for 16-bit T).
template <typename T>
__device__ __forceinline__ void store8(T *y, int e, const float v[8]) {
    T h[8];
#pragma unroll
    for (int i = 0; i < 8; i++) h[i] = from_f<T>(v[i]);
    if (sizeof(T) == 2) {
        *reinterpret_cast<uint4 *>(y + e) = *reinterpret_cast<const uint4 *>(h);
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) y[e + i] = h[i];
    }
}

// ---- 16-bit dot products (the dense GEMVs) ----------------------------------------------------
// A pair of 16-bit elements and its conversion to two floats.
template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> {
    using type = __nv_bfloat162;
    static __device__ __forceinline__ float2 to_f2(type v) { return __bfloat1622float2(v); }
};
template <> struct Pair<__half> {
    using type = __half2;
    static __device__ __forceinline__ float2 to_f2(type v) { return __half22float2(v); }
};

// Dot product of 8 elements of T held in 16 bytes each.
template <typename T>
__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    using P = Pair<T>;
    const typename P::type *wp = reinterpret_cast<const typename P::type *>(&w);
    const typename P::type *xp = reinterpret_cast<const typename P::type *>(&x);
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 a = P::to_f2(wp[i]), b = P::to_f2(xp[i]);
        acc = fmaf(a.x, b.x, acc);
        acc = fmaf(a.y, b.y, acc);
    }
    return acc;
}

// ---- the residual add and RMSNorm, formed inside the product that takes them ------------------
// A layer's first product (q/k/v, gate/up) takes norm(x + delta) as its input: each of its blocks
// forms that input itself instead of a separate add_rms_norm launch (measured on the H200: the
// 72 such launches of an 8B model's token cost 0.22-0.25 ms, in-stream, of a 2.3-4.6 ms step).
// The arithmetic is add_rms_norm's (kernels/fused.cu): s = x + delta rounded through T,
// scale = 1/sqrt(mean(s²) + eps), input = scale·s·w rounded through T; only the order of the
// sum of squares differs. Requirements: cols a multiple of 8, x, delta, w and sum 16-byte
// aligned.

// s = x + delta rounded through T, the eight elements from e (zeros past cols); adds Σ s² to sq.
template <typename T>
__device__ __forceinline__ void residual8(const T *x, const T *delta, int e, int cols, float s[8],
                                          float &sq) {
    float t[8];
    load8(x, e, cols, s);
    load8(delta, e, cols, t);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        s[i] = rnd<T>(s[i] + t[i]);
        sq += s[i] * s[i];
    }
}

// The scale, to every thread of the block; block 0 also stores the new residual s to `sum`
// (when not null: of a layer's several products, one writes it).
template <typename T>
__device__ float residual_norm_scale(const T *x, const T *delta, T *sum, int cols, float eps) {
    float sq = 0.0f;
    for (int e = 8 * threadIdx.x; e < cols; e += 8 * blockDim.x) {
        float s[8];
        residual8(x, delta, e, cols, s, sq);
        if (sum != nullptr && blockIdx.x == 0) store8(sum, e, s);
    }
    return rsqrtf(block_sum(sq) / cols + eps);
}

// The normed input's elements e0 = 8·threadIdx.x and e1 = e0 + 8·blockDim.x into a and b, when
// they are all of it (cols ≤ 16·blockDim.x, as an 8B model's 4096 over 256 threads): the sums
// stay in registers and the norm weight is requested before the reduction, so forming the
// input costs one round trip to L2 (x and delta), as reading a ready input does, plus the
// block reduction. Same arithmetic as residual_norm_scale and normed8; block 0 stores the new
// residual to `sum` when that is not null.
template <typename T>
__device__ void normed16(const T *x, const T *delta, const T *w, T *sum, int cols, float eps,
                         float a[8], float b[8]) {
    const int e0 = 8 * threadIdx.x, e1 = e0 + 8 * blockDim.x;
    float wa[8], wb[8];
    load8(w, e0, cols, wa);
    load8(w, e1, cols, wb);
    float sq = 0.0f;
    residual8(x, delta, e0, cols, a, sq);
    residual8(x, delta, e1, cols, b, sq);
    if (sum != nullptr && blockIdx.x == 0) {
        if (e0 < cols) store8(sum, e0, a);
        if (e1 < cols) store8(sum, e1, b);
    }
    const float scale = rsqrtf(block_sum(sq) / cols + eps);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        a[i] = rnd<T>(scale * a[i] * wa[i]);
        b[i] = rnd<T>(scale * b[i] * wb[i]);
    }
}

// Elements e..e+7 of the normed input (e < cols, a multiple of 8).
template <typename T>
__device__ __forceinline__ void normed8(const T *x, const T *delta, const T *w, float scale, int e,
                                        int cols, float v[8]) {
    float b[8], c[8];
    load8(x, e, cols, v);
    load8(delta, e, cols, b);
    load8(w, e, cols, c);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = rnd<T>(scale * rnd<T>(v[i] + b[i]) * c[i]);
}

// ---- the SwiGLU gate ------------------------------------------------------------------------------
// silu(gate) · up for one element, from the two products' f32 sums, as silu_mul (fused.cu)
// computes it from their stored (T-rounded) outputs: the silu rounded through T, then the
// product.
template <typename T>
__device__ __forceinline__ T swiglu(float gate, float up) {
    const float g = rnd<T>(gate);
    const float s = rnd<T>(g / (1.0f + expf(-g)));
    return from_f<T>(s * rnd<T>(up));
}

// A barrier for the two warps of pair `pair` (0-3) of a block, by a constant id (1-4; 0 is
// __syncthreads): with an id in a register, ptxas may reserve every named barrier for the
// kernel, which can cost resident blocks.
__device__ __forceinline__ void pair_barrier(int pair) {
    switch (pair) {
    case 0: asm volatile("bar.sync 1, 64;" ::: "memory"); break;
    case 1: asm volatile("bar.sync 2, 64;" ::: "memory"); break;
    case 2: asm volatile("bar.sync 3, 64;" ::: "memory"); break;
    default: asm volatile("bar.sync 4, 64;" ::: "memory"); break;
    }
}

// ---- programmatic dependent launch ---------------------------------------------------------------
// The launcher (src/fused/launch.rs) lets each kernel start while the previous one on the stream
// is finishing (compute 9.0+). So that this is safe, every kernel calls `wait_for_previous_kernel`
// in every block before it reads or writes anything but its weights (activations, caches and
// outputs may still be in use), and then `let_next_kernel_launch`, which lets the next kernel's
// blocks be scheduled as this one's retire: they prefetch their weights while this one's last
// blocks run. Both are no-ops on older GPUs and when a kernel was launched without the attribute.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Asks L2 for `bytes` (a multiple of 16) from `p` (16-byte aligned): one instruction for the
// whole range (sm_90's bulk prefetch) rather than one per 128-byte line. A no-op before
// compute 9.0. (Issued before the wait, by every product, it lost at every size in the ninth
// session; the staged GEMV may issue it after the wait: its prologue.)
__device__ __forceinline__ void prefetch_l2(const void *p, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (bytes > 0)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}
// Both, for a kernel with nothing to prefetch.
__device__ __forceinline__ void follow_previous_kernel() {
    wait_for_previous_kernel();
    let_next_kernel_launch();
}
