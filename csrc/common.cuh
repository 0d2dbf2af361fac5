// Shared device helpers for the powerlaw_fast CUDA kernels.
//
// Header-free on purpose: the kernels are compiled at run time by NVRTC (through
// cupy.RawModule), and NVRTC 13 has no built-in cuda_fp16.h / cuda_bf16.h (those, and the CCCL
// headers they pull in, would have to be found on disk on every user's machine). The 16-bit
// types below are plain storage, bit-compatible with torch.float16 / torch.bfloat16, and their
// conversions are the same PTX instructions cuda_fp16.hpp / cuda_bf16.hpp emit (round to
// nearest even), so values match torch's own `.to(dtype)` on the GPU.
//
// The loader (powerlaw_fast/cuda/_loader.py) pastes this file in place of its #include line,
// so the source text NVRTC sees (and CuPy's cache key) covers the header too.

#ifndef POWERLAW_FAST_COMMON_CUH
#define POWERLAW_FAST_COMMON_CUH

namespace plf {

struct half_t {
    unsigned short bits;
};

struct bfloat16_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }

__device__ __forceinline__ float to_float(half_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

__device__ __forceinline__ float to_float(bfloat16_t v) {
    // bfloat16 is the top half of a float32: widening is exact.
    return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
    return v;
}

template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}

template <>
__device__ __forceinline__ bfloat16_t from_float<bfloat16_t>(float v) {
    bfloat16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}

// Bit tests, not float compares, so they hold under -ftz=true too.
__device__ __forceinline__ bool is_nan(float v) {
    return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}

__device__ __forceinline__ bool is_nonfinite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// IEEE float32 operations written as PTX without the .ftz modifier. CuPy compiles every
// RawModule with -ftz=true, which would flush subnormal inputs and results to zero and make
// `g > 0.0f` false for a subnormal g; torch's kernels keep subnormals. Where bitwise agreement
// with torch matters (the PGD step, the penalty's sign tests) the kernels use these instead of
// the C operators. Not volatile: they are pure, so the compiler may schedule them freely.
__device__ __forceinline__ float ieee_add(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float ieee_sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float ieee_mul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// fmaxf / fminf as torch's kernels compile them (max.f32 / min.f32: a NaN operand yields the
// other operand; callers deal with NaN first, as torch.clamp does).
__device__ __forceinline__ float ieee_max(float a, float b) {
    float r;
    asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float ieee_min(float a, float b) {
    float r;
    asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ bool ieee_gt(float a, float b) {
    unsigned int r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(r)
        : "f"(a), "f"(b));
    return r != 0u;
}

__device__ __forceinline__ bool ieee_lt(float a, float b) { return ieee_gt(b, a); }

// Tree sum over a full warp; every lane must be active. The order of additions is fixed, so
// the result is bitwise reproducible.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over a 1-D block of kThreads threads (a multiple of 32, at most 1024). Every thread must
// call it; the total is valid in thread 0 only. `scratch` holds at least kThreads / 32 values
// and must not be reused by another block_sum without a __syncthreads() in between (warp 0 may
// still be reading it). Deterministic: warp trees, then warp 0 sums the warp totals in a fixed
// tree.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be 32k <= 1024");
    constexpr int kWarps = kThreads / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    T total = T(0);
    if (warp == 0) {
        total = lane < kWarps ? scratch[lane] : T(0);
        total = warp_sum(total);
    }
    return total;
}

}  // namespace plf

#endif  // POWERLAW_FAST_COMMON_CUH
