// Causal attention for a prefill chunk without materialising the scores (flash attention, as in
// FlashAttention-2): queries offset..offset+len against cached keys 0..offset+len, the output
// written straight in the (len, heads·hd) layout the o projection reads.
//
// Why: with the scores materialised, a prefill chunk writes and reads kv_heads × 4·len × context
// values three times (the product, the softmax, the second product) and allocates them; at 2048
// tokens in chunks of 512 the softmax alone was 12% of the GPU time (docs/benchmarks.md), and
// larger chunks (faster: 29.3k vs 27.2k tok/s at 2048) cost memory proportional to the context.
//
// One block of four warps per (64 queries, query head). Per 64-key tile: S = Q·Kᵀ on the tensor
// cores (WMMA 16×16×16, f32 accumulators), each warp its 16 query rows; the online softmax in
// f32 (two lanes per row: scale, causal mask by position, running max and sum, the output rows
// rescaled); P rounded to the element type and O += P·V on the tensor cores, O kept in shared
// memory in f32. Rounding differs from the materialised path (there the scores are rounded to
// the element type before the softmax) as fused attention in transformers does.
//
// Shared memory (HD = 128): Q, K, V tiles 16 KB each, S 16 KB (f32), P 8 KB, O 32 KB = 104 KB.
//
// Compiled to PTX by build.rs when the `cuda` feature is on; launched from src/fused/cuda.rs.
// NOT YET RUN ON A GPU when written: off unless HELEXA_ENGINE_FLASH_PREFILL=1 (see README).

#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

#define FP_ROWS 64 // queries per block, and keys per tile
#define FP_WARPS 4 // each warp 16 query rows

// Copies `rows` valid rows (of HD elements of T) from `src` (row stride `stride` elements) into
// the tile `dst` (FP_ROWS × HD), zeros past them; 16 bytes per thread per step.
template <typename T, int HD>
__device__ void load_tile(T *dst, const T *src, size_t stride, int rows) {
    constexpr int PER_ROW = HD * sizeof(T) / 16;
    for (int i = threadIdx.x; i < FP_ROWS * PER_ROW; i += blockDim.x) {
        const int r = i / PER_ROW, c = i % PER_ROW;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows) v = reinterpret_cast<const uint4 *>(src + (size_t)r * stride)[c];
        reinterpret_cast<uint4 *>(dst + r * HD)[c] = v;
    }
}

template <typename T, int HD>
__device__ void flash_prefill(const T *q, const T *k_cache, const T *v_cache, T *out, int heads,
                              int kv_heads, int len, int cap, int offset, float scale) {
    extern __shared__ __align__(128) uint8_t fp_smem[];
    T *sQ = reinterpret_cast<T *>(fp_smem);
    T *sK = sQ + FP_ROWS * HD;
    T *sV = sK + FP_ROWS * HD;
    float *sS = reinterpret_cast<float *>(sV + FP_ROWS * HD);
    T *sP = reinterpret_cast<T *>(sS + FP_ROWS * FP_ROWS);
    float *sO = reinterpret_cast<float *>(sP + FP_ROWS * FP_ROWS);

    const int q0 = blockIdx.x * FP_ROWS, head = blockIdx.y, kvh = head / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int total = offset + len;
    const int q_rows = min(FP_ROWS, len - q0);
    // Keys the block's last query sees: 0 ..= offset + q0 + q_rows - 1.
    const int k_end = offset + q0 + q_rows;

    follow_previous_kernel();
    load_tile<T, HD>(sQ, q + ((size_t)head * len + q0) * HD, HD, q_rows);
    for (int i = threadIdx.x; i < FP_ROWS * HD; i += blockDim.x) sO[i] = 0.0f;

    // Lane pair (2r', 2r'+1) owns row r = 16·warp + lane/2: its running max and sum, and half of
    // each row's columns (32 of S's 64, HD/2 of O's).
    const int row = 16 * warp + lane / 2, half = lane % 2;
    const int q_pos = offset + q0 + row; // this row's position: it sees keys 0..=q_pos
    float m = -INFINITY, l = 0.0f;

    const T *kb = k_cache + (size_t)kvh * cap * HD, *vb = v_cache + (size_t)kvh * cap * HD;
    for (int k0 = 0; k0 < k_end; k0 += FP_ROWS) {
        const int k_rows = min(FP_ROWS, k_end - k0);
        __syncthreads(); // the previous tile's K, V and P are no longer read
        load_tile<T, HD>(sK, kb + (size_t)k0 * HD, HD, k_rows);
        load_tile<T, HD>(sV, vb + (size_t)k0 * HD, HD, k_rows);
        __syncthreads();

        // S rows of this warp = Q rows · Kᵀ.
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s[FP_ROWS / 16];
#pragma unroll
            for (int n = 0; n < FP_ROWS / 16; n++) wmma::fill_fragment(s[n], 0.0f);
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::load_matrix_sync(a, sQ + 16 * warp * HD + 16 * kk, HD);
#pragma unroll
                for (int n = 0; n < FP_ROWS / 16; n++) {
                    // Kᵀ as a column-major (HD × keys) matrix is K's rows as stored.
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                    wmma::load_matrix_sync(b, sK + 16 * n * HD + 16 * kk, HD);
                    wmma::mma_sync(s[n], a, b, s[n]);
                }
            }
#pragma unroll
            for (int n = 0; n < FP_ROWS / 16; n++)
                wmma::store_matrix_sync(sS + 16 * warp * FP_ROWS + 16 * n, s[n], FP_ROWS,
                                        wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax over this tile for row `row`, columns half·32 .. half·32+31.
        float *srow = sS + row * FP_ROWS + 32 * half;
        float tile_max = -INFINITY;
#pragma unroll 8
        for (int c = 0; c < 32; c++) {
            const int key = k0 + 32 * half + c;
            const float v = key <= q_pos && key < total ? srow[c] * scale : -INFINITY;
            srow[c] = v;
            tile_max = fmaxf(tile_max, v);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);
        // m_new is finite: key 0 is visible to every row, and it is in the first tile.
        const float corr = __expf(m - m_new);
        float sum = 0.0f;
        T *prow = sP + row * FP_ROWS + 32 * half;
#pragma unroll 8
        for (int c = 0; c < 32; c++) {
            const float p = __expf(srow[c] - m_new);
            const T pt = from_f<T>(p);
            prow[c] = pt;
            sum += to_f(pt); // the sum of what P·V multiplies
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * corr + sum;
        m = m_new;
        float *orow = sO + row * HD + (HD / 2) * half;
#pragma unroll 8
        for (int d = 0; d < HD / 2; d++) orow[d] *= corr;
        __syncwarp();

        // O rows of this warp += P rows · V.
#pragma unroll
        for (int n = 0; n < HD / 16; n++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
            wmma::load_matrix_sync(o, sO + 16 * warp * HD + 16 * n, HD, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < FP_ROWS / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(a, sP + 16 * warp * FP_ROWS + 16 * kk, FP_ROWS);
                wmma::load_matrix_sync(b, sV + 16 * kk * HD + 16 * n, HD);
                wmma::mma_sync(o, a, b, o);
            }
            wmma::store_matrix_sync(sO + 16 * warp * HD + 16 * n, o, HD, wmma::mem_row_major);
        }
        __syncwarp();
    }

    // out[q0 + row][head·HD + d] = O / l, rows of this chunk only.
    if (row < q_rows) {
        const float inv = 1.0f / l;
        const float *orow = sO + row * HD + (HD / 2) * half;
        T *dst = out + (size_t)(q0 + row) * heads * HD + (size_t)head * HD + (HD / 2) * half;
        for (int d = 0; d < HD / 2; d++) dst[d] = from_f<T>(orow[d] * inv);
    }
}

// flash_prefill_<type>_hd<head dim>
#define FLASH_PREFILL(T, SUF, HD)                                                                   \
    extern "C" __global__ void __launch_bounds__(FP_WARPS * 32)                                    \
        flash_prefill_##SUF##_hd##HD(const T *q, const T *k_cache, const T *v_cache, T *out,       \
                                     int heads, int kv_heads, int len, int cap, int offset,         \
                                     float scale) {                                                 \
        flash_prefill<T, HD>(q, k_cache, v_cache, out, heads, kv_heads, len, cap, offset, scale);  \
    }
FLASH_PREFILL(__nv_bfloat16, bf16, 64)
FLASH_PREFILL(__nv_bfloat16, bf16, 128)
FLASH_PREFILL(__half, f16, 64)
FLASH_PREFILL(__half, f16, 128)
