// The fused PGD / FGSM step over [R, D] rows, one read of each input and one write:
//
//   x_new = clamp(clamp(x_adv + step * sign(grad), x_nat - eps_r, x_nat + eps_r), lo, hi)
//
// Row r reads row (r % S) of an input with S rows (S divides R), so an epsilon grid reuses the
// natural images and a shared FGSM gradient without copies.
//
// Bit-for-bit the plain-torch reference (pgd_update_reference in powerlaw_fast/ops/attack_step.py)
// run by torch on the GPU, in float32: the same float32 operations in the same order, written
// as IEEE PTX (common.cuh: no FMA contraction of step * sign + x, no flush of subnormals under
// CuPy's -ftz=true), and torch.clamp's CUDA rules: v NaN -> v; else a NaN bound -> that bound;
// else fminf(fmaxf(v, lower), upper). sign(NaN) = sign(0) = 0 as torch.sign. lo / hi are never
// NaN (checked on the host). float16 / bfloat16 are computed in float32 and rounded once at
// the end, as the reference.
//
// Launch: block (bx, by) with bx * by = 256, bx a multiple of 32 over columns; grid
// (ceil(D / bx), min(ceil(R / by), 65535)), rows strided by gridDim.y * by. Offsets are 64-bit;
// row indices are 32-bit (R < 2^31 is checked on the host) to keep the modulo cheap.

#include "common.cuh"

namespace plf {

constexpr int kPgdThreads = 256;

// torch.clamp(v, lower, upper) as ATen's CUDA kernel computes it.
__device__ __forceinline__ float torch_clamp(float v, float lower, float upper) {
    if (is_nan(v)) {
        return v;
    }
    if (is_nan(lower)) {
        return lower;
    }
    if (is_nan(upper)) {
        return upper;
    }
    return ieee_min(ieee_max(v, lower), upper);
}

__device__ __forceinline__ unsigned int cycled_row(unsigned int row, unsigned int rows,
                                                   unsigned int source_rows) {
    return source_rows == rows ? row : row % source_rows;
}

template <typename T>
__device__ __forceinline__ void pgd_update(
    const T* x_adv, long long xa_stride_r, long long xa_stride_d, long long xa_rows,
    const T* __restrict__ x_nat, long long xn_stride_r, long long xn_stride_d, long long xn_rows,
    const T* __restrict__ grad, long long g_stride_r, long long g_stride_d, long long g_rows,
    const float* __restrict__ eps, long long eps_stride,
    T* out, long long out_stride_r, long long out_stride_d,
    long long R, long long D, float step, float lo, float hi) {
    // x_adv and out are not __restrict__: out = x_adv is the in-place update (each element is
    // read and then written by the same thread, so aliasing is safe).
    const long long col = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (col >= D) {
        return;
    }
    const unsigned int rows = static_cast<unsigned int>(R);
    const unsigned int row_step = gridDim.y * blockDim.y;
    for (unsigned int row = blockIdx.y * blockDim.y + threadIdx.y; row < rows; row += row_step) {
        const long long ra = cycled_row(row, rows, static_cast<unsigned int>(xa_rows));
        const long long rn = cycled_row(row, rows, static_cast<unsigned int>(xn_rows));
        const long long rg = cycled_row(row, rows, static_cast<unsigned int>(g_rows));
        float x = to_float(x_adv[ra * xa_stride_r + col * xa_stride_d]);
        const float xn = to_float(x_nat[rn * xn_stride_r + col * xn_stride_d]);
        const float g = to_float(grad[rg * g_stride_r + col * g_stride_d]);
        const float e = eps[static_cast<long long>(row) * eps_stride];

        const float sign = ieee_gt(g, 0.0f) ? 1.0f : (ieee_lt(g, 0.0f) ? -1.0f : 0.0f);
        x = ieee_add(x, ieee_mul(step, sign));
        x = torch_clamp(x, ieee_sub(xn, e), ieee_add(xn, e));
        x = torch_clamp(x, lo, hi);
        out[static_cast<long long>(row) * out_stride_r + col * out_stride_d] = from_float<T>(x);
    }
}

}  // namespace plf

#define PLF_PGD_UPDATE(NAME, T)                                                                \
    extern "C" __global__ void __launch_bounds__(plf::kPgdThreads) NAME(                      \
        const T* x_adv, long long xa_stride_r, long long xa_stride_d, long long xa_rows,       \
        const T* __restrict__ x_nat, long long xn_stride_r, long long xn_stride_d,             \
        long long xn_rows, const T* __restrict__ grad, long long g_stride_r,                   \
        long long g_stride_d, long long g_rows, const float* __restrict__ eps,                 \
        long long eps_stride, T* out, long long out_stride_r, long long out_stride_d,          \
        long long R, long long D, float step, float lo, float hi) {                            \
        plf::pgd_update<T>(x_adv, xa_stride_r, xa_stride_d, xa_rows, x_nat, xn_stride_r,       \
                           xn_stride_d, xn_rows, grad, g_stride_r, g_stride_d, g_rows, eps,    \
                           eps_stride, out, out_stride_r, out_stride_d, R, D, step, lo, hi);   \
    }

PLF_PGD_UPDATE(pgd_update_f32, float)
PLF_PGD_UPDATE(pgd_update_f16, plf::half_t)
PLF_PGD_UPDATE(pgd_update_bf16, plf::bfloat16_t)
