// The power-law penalty (eq. 2 of Nassar et al. 2020) and dR/dlam over the descending spectrum,
// in one block. Same semantics and status word as the Triton `sorted_penalty` in
// powerlaw_fast/ops/spectral_penalty.py:
//
//   r_n   = (s_n / s_anchor) * exp(alpha * (log(n + 1) - log(anchor + 1)))    (n 0-based)
//   R     = beta / N * sum_{n > anchor, active} [(r_n - 1)^2 + max(0, r_n - 1)]
//   dR/ds = beta / N * (2 (r_n - 1) + [r_n - 1 > kink_tol]) * rank_ratio_n / s_anchor
//   active: n > anchor, and s_n > 0 when skip_nonpositive
//
// Decided on purpose, as in every backend: the anchor's own term (0 in value and slope by
// definition) is left out, so a rank ratio of 1 +- an ulp cannot give it a relu slope; within
// kink_tol of the kink (the rounding of r) the relu's slope is 0.
//
// grad is scattered back to V's column order through `order` (a stable torch.sort's indices).
// status[0] = number of non-finite values; status[1] = 2 if 0 < s_0 < underflow (the spectrum
// is too small for float32), else 1 if !(s_anchor > tiny * mean(max(s, 0))), else 0.
//
// CuPy compiles with -ftz=true: the arithmetic may flush subnormal values (|v| < 1.2e-38) to
// zero, which moves results by far less than float32 rounding; the decisions that could flip
// on a subnormal (s > 0, the anchor test) are made with IEEE compares.
//
// Launch: exactly one block of kPenaltyThreads threads. Each thread sums its strided share in
// index order, then a fixed tree adds the thread sums: the result is bitwise reproducible.

#include "common.cuh"

namespace plf {
constexpr int kPenaltyThreads = 1024;
}  // namespace plf

extern "C" __global__ void __launch_bounds__(plf::kPenaltyThreads) powerlaw_penalty(
    const float* __restrict__ sorted, const long long* __restrict__ order, long long N,
    long long anchor, float alpha, float beta, float tiny, float kink_tol, float underflow,
    int skip_nonpositive, float* __restrict__ penalty, float* __restrict__ grad, int* __restrict__ status) {
    __shared__ float term_scratch[plf::kPenaltyThreads / 32];
    __shared__ int bad_scratch[plf::kPenaltyThreads / 32];
    __shared__ float mass_scratch[plf::kPenaltyThreads / 32];

    const float s_anchor = sorted[anchor];
    const float s_first = sorted[0];
    const float log_tau = logf(static_cast<float>(anchor + 1));
    const float coef = beta / static_cast<float>(N);

    float total = 0.0f;
    float mass = 0.0f;
    int bad = 0;
    for (long long idx = threadIdx.x; idx < N; idx += plf::kPenaltyThreads) {
        const float s = sorted[idx];
        bad += plf::is_nonfinite(s) ? 1 : 0;
        mass += plf::ieee_gt(s, 0.0f) ? s : 0.0f;
        const float rank_ratio = expf(alpha * (logf(static_cast<float>(idx + 1)) - log_tau));
        const float r = s / s_anchor * rank_ratio;
        bool active = idx > anchor;
        if (skip_nonpositive) {
            active = active && plf::ieee_gt(s, 0.0f);  // a subnormal s is positive
        }
        const float d = r - 1.0f;
        const float term = d * d + (d > 0.0f ? d : 0.0f);
        total += active ? term : 0.0f;
        // 1 / gam_n = rank_ratio / s_anchor
        const float slope = (2.0f * d + (d > kink_tol ? 1.0f : 0.0f)) * rank_ratio / s_anchor;
        grad[order[idx]] = active ? coef * slope : 0.0f;
    }

    // Separate scratch arrays: the two block sums need no barrier between them.
    total = plf::block_sum<plf::kPenaltyThreads>(total, term_scratch);
    bad = plf::block_sum<plf::kPenaltyThreads>(bad, bad_scratch);
    mass = plf::block_sum<plf::kPenaltyThreads>(mass, mass_scratch);
    if (threadIdx.x == 0) {
        penalty[0] = coef * total;
        status[0] = bad;
        const float mean = mass / static_cast<float>(N);
        const bool underflows = plf::ieee_gt(s_first, 0.0f) && plf::ieee_lt(s_first, underflow);
        status[1] = underflows ? 2 : (plf::ieee_gt(s_anchor, plf::ieee_mul(tiny, mean)) ? 0 : 1);
    }
}
