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

// Sum (or max) over the block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result.
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
__device__ float block_sum(float v) { return block_reduce<false>(v); }

// ---- inputs formed inside a product's kernel ---------------------------------------------------------
// At one token the matrix products form their own input x in their prologue instead of reading
// what a separate kernel wrote (one launch fewer per fold, src/fused.rs `Staged`):
#define X_PLAIN 0    // x = a
#define X_ADD_NORM 1 // s = a + b (or a, when b is null); x = s / rms(s) * w, as add_rms_norm
#define X_SILU_MUL 2 // x = silu(a) * b, as silu_mul
// `sum`, when not null, receives s from block 0 (the new residual stream, for later layers).
template <typename T> struct XSource {
    int mode;
    const T *a, *b, *w;
    float eps;
    T *sum;
};

// Eight consecutive values from element `e` (a multiple of 8, the pointer 16-byte aligned) as
// floats, in one or two 16-byte loads; zeros past `cols`.
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

// Forms x (`cols` values, a multiple of 8; operands 16-byte aligned) into shared memory `xs`
// with the rounding of the unfused kernels (add_rms_norm, silu_mul), so results match them up to
// the order of the norm's sum. Each thread takes eight consecutive values per step, and two
// steps' loads are issued before either is used: a block of 256 threads forms 4096 values in
// one round trip to L2 per operand pass (a loop of dependent loads measured ~16 µs per
// product). Called by every thread of the block; ends with a barrier.
template <typename T>
__device__ void stage_x(const XSource<T> &src, T *xs, int cols) {
    const int step = blockDim.x * 8;
    if (src.mode == X_ADD_NORM) {
        float sq = 0.0f;
        auto add = [&](int e, const float *a, const float *b) {
            if (e >= cols) return;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float s = src.b ? rnd<T>(a[i] + b[i]) : a[i];
                sq += s * s;
                xs[e + i] = from_f<T>(s); // exact: s is already a T value
                if (src.sum != nullptr && blockIdx.x == 0) src.sum[e + i] = from_f<T>(s);
            }
        };
        for (int base = 0; base < cols; base += 2 * step) { // uniform over the block
            const int e0 = base + 8 * threadIdx.x, e1 = e0 + step;
            float a0[8], a1[8], b0[8] = {}, b1[8] = {};
            load8(src.a, e0, cols, a0);
            load8(src.a, e1, cols, a1);
            if (src.b) {
                load8(src.b, e0, cols, b0);
                load8(src.b, e1, cols, b1);
            }
            add(e0, a0, b0);
            add(e1, a1, b1);
        }
        const float scale = rsqrtf(block_sum(sq) / cols + src.eps);
        for (int base = 0; base < cols; base += 2 * step) {
            const int e0 = base + 8 * threadIdx.x, e1 = e0 + step;
            float w0[8], w1[8];
            load8(src.w, e0, cols, w0);
            load8(src.w, e1, cols, w1);
#pragma unroll
            for (int i = 0; i < 8; i++) { // each thread rescales only what it stored
                if (e0 < cols) xs[e0 + i] = from_f<T>(scale * to_f(xs[e0 + i]) * w0[i]);
                if (e1 < cols) xs[e1 + i] = from_f<T>(scale * to_f(xs[e1 + i]) * w1[i]);
            }
        }
    } else {
        for (int base = 0; base < cols; base += 2 * step) {
            const int e0 = base + 8 * threadIdx.x, e1 = e0 + step;
            float a0[8], a1[8], b0[8], b1[8];
            load8(src.a, e0, cols, a0);
            load8(src.a, e1, cols, a1);
            if (src.mode == X_SILU_MUL) {
                load8(src.b, e0, cols, b0);
                load8(src.b, e1, cols, b1);
            }
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float g0 = a0[i], g1 = a1[i];
                const float x0 = src.mode == X_SILU_MUL ? rnd<T>(g0 / (1.0f + expf(-g0))) * b0[i] : g0;
                const float x1 = src.mode == X_SILU_MUL ? rnd<T>(g1 / (1.0f + expf(-g1))) * b1[i] : g1;
                if (e0 < cols) xs[e0 + i] = from_f<T>(x0);
                if (e1 < cols) xs[e1 + i] = from_f<T>(x1);
            }
        }
    }
    __syncthreads();
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
// Both, for a kernel with nothing to prefetch.
__device__ __forceinline__ void follow_previous_kernel() {
    wait_for_previous_kernel();
    let_next_kernel_launch();
}
