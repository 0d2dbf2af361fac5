"""How far a finite-precision evaluation of eq. (2) may be from the float64 oracle: bounds
derived from the rounding of each quantity, never tuned to one machine's output.

Standard floating-point model (Higham, "Accuracy and Stability of Numerical Algorithms",
ch. 3): each operation is exact times (1 + d), |d| <= u (the unit roundoff of its dtype), and a
k-term sum or dot product has an error of at most gamma_k = k u / (1 - k u) times the sum of
the absolute values of its terms. Everything below is evaluated in float64 from the *same
rounded inputs* the implementation sees (input rounding is not its error), first order in u;
the callers allow twice each bound for the neglected second-order terms. Like the package
(DESIGN.md section 2 and the module doc of ``powerlaw_fast.ops.spectral_penalty``) it assumes
the projection form ``Z = (x - mu) V``, ``lam = colsum(Z^2) / (B - 1)``; this module imports
nothing from the package either.

1. Spectrum. ``mu`` is rounded (|d mu_k| <= gamma_B mean_b |x_bk|); the shift ``d mu V`` is the
   same in every row, and ``S2 - S1^2 / B`` removes it exactly, so only the per-element rounding
   of ``Z`` counts: the centring subtraction and the casts of both GEMM operands (``u_op``, TF32:
   2^-11, bfloat16: 2^-8) and the N-term dot product (``u_acc``) give
   ``|dZ_bn| <= (2 u_op + gamma_{N+2}(u_acc)) a_bn``, ``a = (|x - mu| + |d mu|) |V|``; the
   backward subtracts Z's computed column means, within ``mean_b |dZ_bn| + gamma_B mean_b
   |Z_bn|`` (relative to the column, so rows near the mean see it most).
   Then ``(B - 1) |d lam_n| <= 2 ||Z_n|| ||dZ_n|| + ||dZ_n||^2`` (Cauchy-Schwarz) plus the
   B-term sums of S1 and S2 and the package's documented floor (a corrected value at or below
   ``16 u log2 B`` of S2 is rounding and taken as 0), both relative to
   ``S2 <= sum_b (|Z_bn| + |dZ_bn| + |d mu . v_n|)^2``. In relative terms this is about
   ``2 N u ||a_n|| / ||Z_n||``: condition-number aware, since ``||a_n|| / ||Z_n||`` is about
   ``sqrt(trace / lam_n)`` in a tail direction and grows with the mean. The oracle's own
   float64 rounding (covariance first) is added, so float64 implementations can be compared.
2. Sorting is monotone, so with ``lam - d <= lam_hat <= lam + d`` the k-th largest of lam_hat
   lies between the k-th largest of ``lam - d`` and of ``lam + d``: a per-rank bound ``ds_k``.
3. Ratio. ``r_n = s_n / s_tau (n / tau)^alpha`` with the rank ratio from ``log``/``exp`` in the
   working precision: each log within 1.5 ulp (one ulp more than correctly rounded, as a
   vectorised libm may be; see the ``other_libm`` fixture), their difference and the product
   with alpha, exp within 1.5 ulp: ``|d rr| / rr <= u (3 + 8 alpha log N)``; the division and
   product: 2u. So ``|d r_n| <= (ds_n + |s_n| (e_tau + e_rr + 2u)) / gam_n / (1 - e_tau)`` with
   ``e_tau = ds_tau / s_tau``.
4. Value: ``f(r) = (r - 1)^2 + max(0, r - 1)``, ``|f'| <= 2 |r - 1| + 1``, so
   ``|dR| <= beta / N sum (|f'(r_n)| dr_n + dr_n^2)`` plus the N-term sum (gamma_N) and the final
   rounding of R.
5. Slope ``dR/dlam_i = beta / N (2 (r - 1) + H) / gam_k`` at column i's rank k, ``H`` the relu's
   slope. Where |r - 1| is within (twice) the rounding of r, an implementation cannot know the
   side of the kink: H may be 0 or 1 (the subgradient). Where columns' intervals from step 1
   overlap (near-ties, exact ties), their order is not known: every rank they can take is
   allowed. Per column this gives an interval [lo, hi] that contains the slope of every
   implementation whose spectrum is within d of lam (and the oracle's).
6. Gradient ``dR/dx = 2 / (B - 1) (Z * g) V^T`` (the mean's part vanishes): with g in
   [lo, hi], centre ``m`` and radius ``rho``, the error from the centre ``G`` is at most
   ``2 / (B - 1) [|dZ| (|m| + rho) + |Z| rho + gamma_{N+2} |Z| (|m| + rho)] |V|^T`` plus the
   rounding of the output dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
     torch.bfloat16: 2.0**-8}  # fmt: skip
U_TF32 = 2.0**-11  # TF32 keeps 10 explicit mantissa bits, like float16
SAFETY = 2.0  # the neglected second-order terms: every bound is used as SAFETY * bound


def gamma(k: int, u: float) -> float:
    return k * u / (1.0 - k * u)


def accumulation_roundoff(dtype: torch.dtype) -> float:
    """Sums are kept in float64 for float64 data, float32 for everything else."""
    return U[torch.float64] if dtype == torch.float64 else U[torch.float32]


def operand_roundoff(dtype: torch.dtype, device: torch.device | str, backend: str) -> float:
    """The GEMM operands' unit roundoff, as the package documents its plan: float16 inputs are
    computed at TF32 by the kernels (the Triton interpreter included; exact float32 in the
    torch twin on a CPU), float32 at TF32 if torch's matmul precision allows it on a GPU,
    bfloat16 at its own."""
    on_gpu = torch.device(device).type == "cuda"
    tf32 = on_gpu and torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float16:
        return U_TF32 if (on_gpu or backend != "torch") else U[torch.float32]
    if dtype == torch.float32:
        return U_TF32 if tf32 else U[torch.float32]
    return U[dtype]


class Spectrum(NamedTuple):
    lam: torch.Tensor  # [N], V's column order, float64
    dlam: torch.Tensor  # [N], bound of |lam_hat - lam|
    z: torch.Tensor  # [B, N], (x - mu) V in float64
    dz: torch.Tensor  # [B, N], bound of the rounding of Z (the common shift excluded)


def spectrum_bound(x, V, *, u_op: float, u_acc: float, route: str = "projection") -> Spectrum:
    """Step 1 of the module doc. ``route="covariance"`` (Sigma first, then v^T Sigma v, as the
    float64 baselines do): a chain of B + 2N term products, each entry's error relative to
    the products of absolute values, ``|d lam_n| <= gamma_{B+2N} ||a_n||^2 / (B - 1)``."""
    x = x.reshape(x.shape[0], -1).double()
    V = V.double()
    B, N = x.shape
    mu = x.mean(0)
    c = x - mu
    z = c @ V
    dmu = gamma(B, u_acc) * x.abs().mean(0)  # the rounded mean's error, per coordinate
    a = (c.abs() + dmu) @ V.abs()
    dz = (2 * u_op + gamma(N + 2, u_acc)) * a
    shift = dmu @ V.abs()  # |d mu . v_n|: the common offset that S1 removes
    # the backward removes that offset by subtracting Z's computed column means (S1 / B): they
    # carry the mean of the rows' errors and the B-term sum's rounding, relative to the column
    # (not to the row: a row near the mean sees it most, e.g. with Z kept in bfloat16)
    dz = dz + dz.mean(0) + gamma(B + 1, u_acc) * ((z.abs() + shift).mean(0) + shift * u_acc)
    s2 = ((z.abs() + dz + shift) ** 2).sum(0)
    sums = (2 * gamma(B, u_acc) + 16 * u_acc * math.log2(max(B, 2)) + u_acc) * s2
    dlam = (2 * z.norm(dim=0) * dz.norm(dim=0) + (dz**2).sum(0) + sums) / (B - 1)
    lam = (z**2).sum(0) / (B - 1)
    if route == "covariance":
        dlam = dlam + gamma(B + 2 * N + 2, u_acc) * (a**2).sum(0) / (B - 1)
    # the oracle's own float64 rounding: covariance first, and no correction for its rounded
    # mean, so relative to |x| (not |x - mu|); its autograd backward subtracts the mean of the
    # rows' gradients (0 in exact arithmetic), within gamma_B of their mean magnitude
    u64 = U[torch.float64]
    a_o = (c.abs() + x.abs().mean(0) + c.abs().mean(0)) @ V.abs()
    dz_o = gamma(2 * B + N + 4, u64) * a_o
    dlam = dlam + (gamma(B + 2 * N + 2, u64) * (a_o**2).sum(0)
                   + 2 * z.norm(dim=0) * dz_o.norm(dim=0)) / (B - 1)  # fmt: skip
    dz = dz + dz_o
    return Spectrum(lam, dlam + 2 * u_acc * lam.abs(), z, dz)


def _sorted_with_bound(lam, dlam):
    """Step 2: s (descending) and the per-rank bound ds."""
    s = torch.sort(lam, descending=True).values
    hi = torch.sort(lam + dlam, descending=True).values
    lo = torch.sort(lam - dlam, descending=True).values
    return s, torch.maximum(hi - s, s - lo)


class _Ratio(NamedTuple):
    s: torch.Tensor
    ds: torch.Tensor
    gam: torch.Tensor  # gam at each rank (1-indexed rank k at position k - 1)
    rel: torch.Tensor  # relative rounding of 1 / gam and of the rank ratio: e_tau + e_rr + 2u
    t: int  # the anchor's 1-indexed rank


def _ratio(lam, dlam, *, alpha, t, u_acc) -> _Ratio:
    N = lam.shape[0]
    s, ds = _sorted_with_bound(lam, dlam)
    n = torch.arange(1, N + 1, dtype=torch.float64)
    gam = s[t - 1] * (t / n) ** alpha
    e_tau = float(ds[t - 1] / s[t - 1]) if s[t - 1] > 0 else math.inf
    e_rr = u_acc * (3 + 8 * alpha * math.log(max(N, 2)))
    rel = torch.tensor((e_tau + e_rr + 2 * u_acc) / max(1 - e_tau, 1e-300), dtype=torch.float64)
    return _Ratio(s, ds, gam, rel, t)


def anchor_rank(tau: int, convention: str) -> int:
    return tau if convention == "paper" else tau + 1


def anchor_is_resolved(spec: Spectrum, tau: int, convention: str) -> bool:
    """Whether the anchor value is positive beyond the rounding of the spectrum (else the batch
    is rank-deficient as far as this precision can tell, and an implementation may refuse it)."""
    s, ds = _sorted_with_bound(spec.lam, spec.dlam)
    t = anchor_rank(tau, convention)
    return bool(s[t - 1] > 2 * SAFETY * ds[t - 1])


def penalty_bound(lam, dlam, *, alpha, tau, beta, convention, u_acc) -> float:
    """Step 4: a bound of |R_hat - R|."""
    N = lam.shape[0]
    q = _ratio(lam.double(), dlam.double(), alpha=alpha, t=anchor_rank(tau, convention),
               u_acc=u_acc)  # fmt: skip
    r = q.s / q.gam
    dr = (q.ds + q.s.abs() * q.rel) / q.gam
    n = torch.arange(1, N + 1)
    f = (r - 1) ** 2 + (r - 1).clamp_min(0)
    err = (2 * (r - 1).abs() + 1) * dr + dr**2
    sure, maybe = n > q.t, torch.zeros(N, dtype=torch.bool)
    if convention == "authors":  # a term is skipped where s_n <= 0: unknown if s_n is near 0
        maybe = sure & (q.s - q.ds <= 0) & (q.s + q.ds > 0)
        sure = sure & (q.s - q.ds > 0)
    total = err[sure].sum() + (f + err)[maybe].sum()
    rounding = gamma(N, u_acc) * f[sure | maybe].sum() + u_acc * f[sure | maybe].sum()
    return float(beta / N * (total + rounding))


def slope_interval(lam, dlam, *, alpha, tau, beta, convention, u_acc):
    """Step 5: ``(lo, hi)``, each ``[N]`` in lam's order, bracketing dR/dlam."""
    lam, dlam = lam.double(), dlam.double()
    N = lam.shape[0]
    q = _ratio(lam, dlam, alpha=alpha, t=anchor_rank(tau, convention), u_acc=u_acc)
    top, bottom = lam + dlam, lam - dlam
    lo, hi = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        first = int((bottom > top[i]).sum()) + 1  # ranks column i can take
        last = int((top >= bottom[i]).sum())
        candidates = []
        for k in range(first, last + 1):
            gk = q.gam[k - 1]
            r = lam[i] / gk
            dr = (dlam[i] + lam[i].abs() * q.rel) / gk
            if k <= q.t:  # the anchor and the values above it: no term
                candidates.append((0.0, 0.0))
                continue
            if convention == "authors" and bottom[i] <= 0:
                candidates.append((0.0, 0.0))
                if top[i] <= 0:
                    continue
            band = 2 * (dr + r.abs() * u_acc * (6 + 8 * alpha * math.log(max(N, 2))))
            sides = [1.0] if r - 1 > band else [0.0] if r - 1 < -band else [0.0, 1.0]
            for h in sides:
                g = beta / N * (2 * (r - 1) + h) / gk
                dg = beta / N * (2 * dr + abs(2 * (r - 1) + h) * q.rel + 3 * u_acc * abs(g)) / gk
                candidates.append((float(g), float(dg)))
        lo[i] = min(g - dg for g, dg in candidates)
        hi[i] = max(g + dg for g, dg in candidates)
    return lo, hi


def backprojection(spec: Spectrum, lo, hi, V, *, u_acc: float, u_out: float):
    """Step 6: ``(G, err)``, the gradient at the interval's centre and the bound around it."""
    V = V.double()
    B, N = spec.z.shape
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    Va = V.abs().T
    G = 2 / (B - 1) * (spec.z * mid) @ V.T
    big = mid.abs() + rad
    err = 2 / (B - 1) * (
        (spec.dz * big) @ Va
        + (spec.z.abs() * rad) @ Va
        + gamma(N + 2, u_acc) * (spec.z.abs() * big) @ Va
    )
    return G, err + u_out * (G.abs() + err)


def assert_within(actual, expected, bound, what: str, floor: float = 0.0) -> None:
    """``|actual - expected| <= SAFETY * bound + floor`` elementwise, with a useful message."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    excess = (actual - expected).abs() - (SAFETY * bound + floor)
    if bool((excess > 0).any()) or not bool(torch.isfinite(actual).all()):
        i = int(torch.argmax(excess.reshape(-1)))
        a, e = actual.reshape(-1)[i], expected.reshape(-1)[i]
        b = bound.expand_as(actual).reshape(-1)[i] if bound.dim() else bound
        raise AssertionError(
            f"{what}: {float(a)!r} vs oracle {float(e)!r} (|diff| {float((a - e).abs()):.3g} > "
            f"{SAFETY} x bound {float(b):.3g} + {floor:.3g}) at flat index {i} of "
            f"{tuple(actual.shape)}; non-finite entries: {int((~torch.isfinite(actual)).sum())}"
        )


def expected_penalty(x, V, *, u_op: float, u_acc: float, u_out: float, **kw):
    """The oracle's ``(R, dR/dx)`` on the same rounded inputs, with the bounds an
    implementation computing at ``u_op`` (GEMM operands) / ``u_acc`` (sums) with its gradient
    returned at ``u_out`` must meet: ``(R, dR, G, dG)``, to be used as
    ``assert_within(value, R, dR)`` and ``assert_within(grad, G, dG)``. ``kw``: alpha, tau,
    beta, convention (all required). The oracle's own gradient is checked to lie in the bound.
    None where the anchor is zero to the rounding of the spectrum (see
    :func:`anchor_is_resolved`)."""
    from tests import oracle

    x64, V64 = x.detach().double().cpu(), V.detach().double().cpu()
    x64 = x64.reshape(x64.shape[0], -1)
    spec = spectrum_bound(x64, V64, u_op=u_op, u_acc=u_acc)
    if not anchor_is_resolved(spec, kw["tau"], kw["convention"]):
        return None  # no value to compare with: the caller expects the rank-deficiency error
    R, grad_ref = oracle.penalty_and_grad(x64, V64, **kw)
    dR = penalty_bound(spec.lam, spec.dlam, u_acc=u_acc, **kw) + u_acc * abs(float(R))
    lo, hi = slope_interval(spec.lam, spec.dlam, u_acc=u_acc, **kw)
    G, dG = backprojection(spec, lo, hi, V64, u_acc=u_acc, u_out=u_out)
    assert_within(grad_ref, G, dG, "the oracle's gradient in its own bound")
    return R, dR, G, dG


def subnormal_spacing(dtype: torch.dtype) -> float:
    """The smallest subnormal of ``dtype`` (``tiny * eps``): below the normal range a value is
    rounded to a multiple of it, an absolute error of at most half of it."""
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def mean_bound(x, *, u_acc: float) -> torch.Tensor:
    """``|mu_hat - mu|`` per column of ``x [B, N]`` (float64): a B-term sum and one division,
    ``gamma_{B+1} mean_b |x_b|``."""
    x = x.reshape(x.shape[0], -1).double()
    return gamma(x.shape[0] + 1, u_acc) * x.abs().mean(0)


def covariance_bound(x, *, u_op: float, u_acc: float):
    """``(Sigma, dSigma)`` for ``Sigma = (x - mu)^T (x - mu) / (B - 1)`` computed with the mean
    and the centring in ``u_acc``, the centred values rounded to the GEMM operands (``u_op``,
    and once more for a TF32 dot's own rounding), a B-term dot in ``u_acc``, then the scale.

    The rounded mean shifts every row by the same ``e``: since the exact centred columns sum to
    zero, ``sum_b (c_b + e)(c_b + e)^T = C + B e e^T`` (no first-order term). Each centred
    element ``c'`` is within ``(u_acc + 2 u_op) a`` of ``c + e``, ``a = |c| + |e|``; the
    products and the dot add ``gamma_B(u_acc) a^T a``. The oracle's own float64 rounding (the
    same formula) is added, so float64 implementations can be compared too."""
    x = x.reshape(x.shape[0], -1).double()
    B = x.shape[0]
    c = x - x.mean(0)
    e = mean_bound(x, u_acc=u_acc)
    a = c.abs() + e
    d = (u_acc + 2 * u_op) * a
    sigma = c.T @ c / (B - 1)
    products = d.T @ c.abs() + c.abs().T @ d + d.T @ d + B * torch.outer(e, e)
    dots = (gamma(B, u_acc) + gamma(2 * B + 4, U[torch.float64])) * (a.T @ a)
    return sigma, (products + dots) / (B - 1) + 2 * u_acc * sigma.abs()


def covariance_gradient_bound(x, w, *, u_acc: float, u_out: float):
    """``(G, dG)`` for ``dL/dx = (x - mu) (W + W^T) / (B - 1)``, ``W = dL/dSigma`` as the
    backward receives it (each entry and their sum rounded to ``u_acc``): each centred element
    within ``e + u_acc a`` (the rounded mean's shift does not cancel here), an N-term product
    in ``u_acc``, the result rounded to ``u_out``."""
    x = x.reshape(x.shape[0], -1).double()
    B, N = x.shape
    c = x - x.mean(0)
    s = (w + w.T).double()
    e = mean_bound(x, u_acc=u_acc)
    a = c.abs() + e
    G = c @ s / (B - 1)
    dc = e + u_acc * a
    err = (dc @ s.abs() + gamma(N + 2, u_acc) * a @ s.abs() + a @ (2 * u_acc * s.abs())) / (B - 1)
    return G, err + u_out * (G.abs() + err)
