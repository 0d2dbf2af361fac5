// Per-column elementwise passes over a strided [B, N] matrix, written in the input's dtype:
//
//   centre_columns: out[b, n] = x[b, n] - mean[n]            (the GEMM input of the forward)
//   scale_columns:  out[b, n] = z[b, n] * (coef[n] * scale)  (the GEMM input of the backward)
//
// Both compute in float32 and round once, as the plain-torch references do
// ((x.float() - mu).to(dtype) and (z.float() * (coef * scale)).to(dtype)).
//
// Launch: block (bx, by) with bx * by = 256 and bx a multiple of 32 (bx = columns, so a warp
// reads a contiguous row segment), grid (ceil(N / bx), min(ceil(B / by), 65535)); the rows
// loop strides by gridDim.y * by, so any B is covered. No barriers, so out-of-range columns
// return at once. Offsets are 64-bit.

#include "common.cuh"

namespace plf {

constexpr int kColumnThreads = 256;

template <typename T>
__device__ __forceinline__ void centre_columns(
    const T* __restrict__ x, long long x_stride_b, long long x_stride_n,
    const float* __restrict__ mean, long long B, long long N,
    T* __restrict__ out, long long out_stride_b, long long out_stride_n) {
    const long long col = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (col >= N) {
        return;
    }
    const float mu = mean[col];
    const long long row_step = static_cast<long long>(gridDim.y) * blockDim.y;
    for (long long row = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y; row < B;
         row += row_step) {
        const float v = to_float(x[row * x_stride_b + col * x_stride_n]);
        out[row * out_stride_b + col * out_stride_n] = from_float<T>(v - mu);
    }
}

template <typename T>
__device__ __forceinline__ void scale_columns(
    const T* __restrict__ z, long long z_stride_b, long long z_stride_n,
    const float* __restrict__ coef, long long coef_stride, float scale, long long B,
    long long N, T* __restrict__ out, long long out_stride_b, long long out_stride_n) {
    const long long col = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (col >= N) {
        return;
    }
    // Same association as the reference: z * (coef * scale), not (z * coef) * scale.
    const float c = coef[col * coef_stride] * scale;
    const long long row_step = static_cast<long long>(gridDim.y) * blockDim.y;
    for (long long row = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y; row < B;
         row += row_step) {
        const float v = to_float(z[row * z_stride_b + col * z_stride_n]);
        out[row * out_stride_b + col * out_stride_n] = from_float<T>(v * c);
    }
}

}  // namespace plf

#define PLF_CENTRE_COLUMNS(NAME, T)                                                            \
    extern "C" __global__ void __launch_bounds__(plf::kColumnThreads) NAME(                   \
        const T* __restrict__ x, long long x_stride_b, long long x_stride_n,                   \
        const float* __restrict__ mean, long long B, long long N, T* __restrict__ out,         \
        long long out_stride_b, long long out_stride_n) {                                      \
        plf::centre_columns<T>(x, x_stride_b, x_stride_n, mean, B, N, out, out_stride_b,       \
                               out_stride_n);                                                  \
    }

PLF_CENTRE_COLUMNS(centre_columns_f32, float)
PLF_CENTRE_COLUMNS(centre_columns_f16, plf::half_t)
PLF_CENTRE_COLUMNS(centre_columns_bf16, plf::bfloat16_t)

#define PLF_SCALE_COLUMNS(NAME, T)                                                             \
    extern "C" __global__ void __launch_bounds__(plf::kColumnThreads) NAME(                   \
        const T* __restrict__ z, long long z_stride_b, long long z_stride_n,                   \
        const float* __restrict__ coef, long long coef_stride, float scale, long long B,       \
        long long N, T* __restrict__ out, long long out_stride_b, long long out_stride_n) {    \
        plf::scale_columns<T>(z, z_stride_b, z_stride_n, coef, coef_stride, scale, B, N, out,  \
                              out_stride_b, out_stride_n);                                     \
    }

PLF_SCALE_COLUMNS(scale_columns_f32, float)
PLF_SCALE_COLUMNS(scale_columns_f16, plf::half_t)
PLF_SCALE_COLUMNS(scale_columns_bf16, plf::bfloat16_t)
