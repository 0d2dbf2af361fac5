// Deterministic column reductions of a strided [B, N] matrix: the column means of x (before
// centring) and the column sums of squares of Z = (x - mu) V (the projected spectrum).
//
// Layout: a block of 32 x 8 threads owns 32 adjacent columns (one per lane, so a warp reads a
// contiguous segment of a row-major row) and one chunk of `rows_per_chunk` rows; its 8 row-lanes
// stride through the chunk, then lane sums are added in a fixed order through shared memory.
// With gridDim.y == 1 the block writes `scale * sum` straight to out[N]; otherwise it writes the
// raw chunk sum to partial[chunk, N] and column_finalize adds the chunks in order. No atomics,
// and the chunking depends only on (B, rows_per_chunk), so results are bitwise reproducible.
//
// Index math: rows and columns are 64-bit, so row * stride never overflows for B * N >= 2^31.

#include "common.cuh"

namespace plf {

constexpr int kReduceCols = 32;
constexpr int kReduceRowLanes = 8;
constexpr int kReduceThreads = kReduceCols * kReduceRowLanes;

template <typename In, typename Copy, bool kSquare, bool kCopy>
__device__ __forceinline__ void column_reduce(
    const In* __restrict__ x, long long stride_b, long long stride_n,
    long long B, long long N, long long rows_per_chunk, float scale,
    float* __restrict__ out,
    Copy* __restrict__ copy, long long copy_stride_b, long long copy_stride_n) {
    __shared__ float lane_sums[kReduceRowLanes][kReduceCols];
    const int lane = static_cast<int>(threadIdx.x);
    const int row_lane = static_cast<int>(threadIdx.y);
    const long long col = static_cast<long long>(blockIdx.x) * kReduceCols + lane;
    const long long chunk = blockIdx.y;
    const long long row_begin = chunk * rows_per_chunk;
    const long long row_end = min(B, row_begin + rows_per_chunk);

    float acc = 0.0f;
    if (col < N) {
        for (long long row = row_begin + row_lane; row < row_end; row += kReduceRowLanes) {
            const float v = to_float(x[row * stride_b + col * stride_n]);
            if constexpr (kCopy) {
                copy[row * copy_stride_b + col * copy_stride_n] = from_float<Copy>(v);
            }
            if constexpr (kSquare) {
                acc += v * v;
            } else {
                acc += v;
            }
        }
    }
    // Every thread reaches the barrier: the tail mask above only skips the loads.
    lane_sums[row_lane][lane] = acc;
    __syncthreads();
    if (row_lane == 0 && col < N) {
        float total = lane_sums[0][lane];
#pragma unroll
        for (int i = 1; i < kReduceRowLanes; ++i) {
            total += lane_sums[i][lane];
        }
        out[chunk * N + col] = total * scale;
    }
}

}  // namespace plf

// out[n] = scale * sum_c partial[c, n] for c = 0 .. chunks - 1 in order. 1-D launch, N threads.
extern "C" __global__ void __launch_bounds__(256) column_finalize(
    const float* __restrict__ partial, long long chunks, long long N, float scale,
    float* __restrict__ out) {
    const long long col = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (col >= N) {
        return;
    }
    float total = 0.0f;
    for (long long c = 0; c < chunks; ++c) {
        total += partial[c * N + col];
    }
    out[col] = total * scale;
}

// Column sums (the mean, with scale = 1 / B) and column sums of squares (the spectrum, with
// scale = 1 / (B - 1)). Launch: block (32, 8, 1), grid (ceil(N / 32), chunks, 1).
#define PLF_COLUMN_REDUCE(NAME, IN, SQUARE)                                                    \
    extern "C" __global__ void __launch_bounds__(plf::kReduceThreads) NAME(                   \
        const IN* __restrict__ x, long long stride_b, long long stride_n, long long B,          \
        long long N, long long rows_per_chunk, float scale, float* __restrict__ out) {          \
        plf::column_reduce<IN, IN, SQUARE, false>(x, stride_b, stride_n, B, N, rows_per_chunk, \
                                                  scale, out, nullptr, 0, 0);                  \
    }

PLF_COLUMN_REDUCE(column_sum_f32, float, false)
PLF_COLUMN_REDUCE(column_sum_f16, plf::half_t, false)
PLF_COLUMN_REDUCE(column_sum_bf16, plf::bfloat16_t, false)
PLF_COLUMN_REDUCE(column_sumsq_f32, float, true)
PLF_COLUMN_REDUCE(column_sumsq_f16, plf::half_t, true)
PLF_COLUMN_REDUCE(column_sumsq_bf16, plf::bfloat16_t, true)

// Sum of squares of a float32 Z that also writes Z rounded to a 16-bit dtype: the spectrum is
// taken from the unrounded GEMM output while the rounded copy is what the backward keeps.
#define PLF_COLUMN_SUMSQ_COPY(NAME, COPY)                                                      \
    extern "C" __global__ void __launch_bounds__(plf::kReduceThreads) NAME(                   \
        const float* __restrict__ x, long long stride_b, long long stride_n, long long B,       \
        long long N, long long rows_per_chunk, float scale, float* __restrict__ out,            \
        COPY* __restrict__ copy, long long copy_stride_b, long long copy_stride_n) {           \
        plf::column_reduce<float, COPY, true, true>(x, stride_b, stride_n, B, N,               \
                                                    rows_per_chunk, scale, out, copy,          \
                                                    copy_stride_b, copy_stride_n);             \
    }

PLF_COLUMN_SUMSQ_COPY(column_sumsq_f32_copy_f16, plf::half_t)
PLF_COLUMN_SUMSQ_COPY(column_sumsq_f32_copy_bf16, plf::bfloat16_t)
