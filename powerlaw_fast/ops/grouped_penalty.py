"""Every regularised layer's spectral penalty in a fixed number of launches: a grouped op.

A model with L regularised layers would pay L times the host cost and the launches of
:func:`~powerlaw_fast.spec_penalty`. Here the layers' activations ``x_l [B, N_l]`` (one batch,
one dtype, widths that may differ) travel together:

1. ``torch.cat`` packs them into one flat buffer (layer l is a row-major ``[B, N_l]`` block),
2. ``_grouped_column_mean_kernel``: every layer's column means,
3. ``_grouped_projection_kernel``: one grouped GEMM (as in Triton's grouped-GEMM tutorial: each
   program finds its layer from a prefix of tile counts) ``Z_l = (x_l - mu_l) V_l`` with the
   column sums of ``Z_l`` and ``Z_l * Z_l`` in its epilogue,
4. ``_grouped_penalty_kernel``: one program per layer finishes, sorts and penalises its
   spectrum (the helpers of :mod:`powerlaw_fast.ops.spectral_penalty`),
5. one ``sum`` of the per-layer penalties,

and the backward is one grouped GEMM, ``_grouped_backprojection_kernel``. Six launches for any
L (a test counts them for 1, 3 and 6 layers); the per-layer shape tables are uploaded once per
layout and cached. The bases ``V_l`` are read from one flat buffer: pass views of it (the
regulariser keeps its bases so) or separate tensors (then one ``cat`` per call).

The plain-torch twin is the per-layer loop over :func:`~powerlaw_fast.spec_penalty`'s stages
(:func:`grouped_penalty_torch`); the tests compare both with float64.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.grouped_penalty import grouped_penalty_torch
    >>> xs = [torch.randn(300, 40), torch.randn(300, 24)]
    >>> Vs = [torch.linalg.eigh(torch.cov(x.T))[1].flip(1) for x in xs]
    >>> total, lams = grouped_penalty_torch(xs, Vs, alphas=[1.0, 1.0], anchors=[9, 9],
    ...                                     betas=[1.0, 2.0], convention="paper")
    >>> total.shape, [lam.shape for lam in lams]
    (torch.Size([]), [torch.Size([40]), torch.Size([24])])
"""

from __future__ import annotations

import functools

import torch

from powerlaw_fast._backend import triton_available
from powerlaw_fast.ops import _alloc, status
from powerlaw_fast.ops._triton_gemm import dot_in_fp32, size_bucket
from powerlaw_fast.ops.spectral_penalty import (
    MAX_FUSED_N,
    Settings,
    _mean_tolerance,
    _raiser,
    anchor_tolerance,
    kink_tolerance,
    penalty_and_spectrum,
    plan_for,
    refuse_second_order,
)

_BLOCK_M = 128
_HEAD = 4  # per layer: penalty, non-finite count, anchor flag, overflow flag

if triton_available():
    import triton
    import triton.language as tl

    from powerlaw_fast.ops._triton_gemm import gemm_configs, grouped_tile
    from powerlaw_fast.ops.spectral_penalty import (
        backprojection_tile,
        finish_moments,
        projection_tile,
        sorted_penalty,
    )

    @triton.jit
    def _find_layer(pid, widths_ptr, L, num_m, BLOCK_N: tl.constexpr):
        """(layer, its first program id) for program ``pid``; layer l owns
        ``num_m * cdiv(N_l, BLOCK_N)`` consecutive programs."""
        layer = tl.full((), 0, tl.int32)
        end = tl.full((), 0, tl.int32)
        for i in range(0, L):
            end += num_m * tl.cdiv(tl.load(widths_ptr + i), BLOCK_N)
            layer += (pid >= end).to(tl.int32)
        start = tl.full((), 0, tl.int32)
        for i in range(0, L):
            tiles = num_m * tl.cdiv(tl.load(widths_ptr + i), BLOCK_N)
            start += tl.where(i < layer, tiles, 0)
        return layer, start

    @triton.jit
    def _grouped_column_mean_kernel(
        x_ptr, mean_ptr, widths_ptr, col_off_ptr, B, L,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        layer, start = _find_layer(tl.program_id(0), widths_ptr, L, 1, BLOCK_N)
        N = tl.load(widths_ptr + layer)
        col0 = tl.load(col_off_ptr + layer)
        x_layer = x_ptr + col0 * B
        cols = (tl.program_id(0) - start) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            mask = (rows[:, None] < B) & col_ok[None, :]
            acc += tl.load(x_layer + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(mean_ptr + col0 + cols, tl.sum(acc, axis=0) / B, mask=col_ok)

    @triton.autotune(
        configs=gemm_configs(), key=["TOTAL", "L", "B_BUCKET", "IN_PRECISION", "OPERAND_FP32"]
    )
    @triton.jit
    def _grouped_projection_kernel(
        x_ptr, mean_ptr, v_ptr, z_ptr, moments_ptr, widths_ptr, col_off_ptr, v_off_ptr,
        B, L, TOTAL, B_BUCKET,
        OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """Per layer: Z = (x - mean) V and the row-block column sums of Z and Z * Z
        (``moments [2, num_m, TOTAL]``, layer l's columns at its column offset)."""
        num_m = tl.cdiv(B, BLOCK_M)
        layer, start = _find_layer(tl.program_id(0), widths_ptr, L, num_m, BLOCK_N)
        N = tl.load(widths_ptr + layer)
        col0 = tl.load(col_off_ptr + layer)
        x_layer = x_ptr + col0 * B
        z_layer = z_ptr + col0 * B
        v_layer = v_ptr + tl.load(v_off_ptr + layer)
        pid_m, pid_n = grouped_tile(tl.program_id(0) - start, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < B
        col_ok = cols < N
        acc = projection_tile(
            x_layer, mean_ptr + col0, v_layer, rows, cols, B, N, N, 1, N, 1,
            OPERAND_FP32, IN_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        tl.store(
            z_layer + rows[:, None] * N + cols[None, :],
            acc.to(z_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )
        tl.store(moments_ptr + pid_m * TOTAL + col0 + cols, tl.sum(acc, axis=0), mask=col_ok)
        tl.store(
            moments_ptr + (num_m + pid_m) * TOTAL + col0 + cols,
            tl.sum(acc * acc, axis=0),
            mask=col_ok,
        )

    @triton.jit(do_not_specialize=["num_m"])
    def _grouped_penalty_kernel(
        moments_ptr, parts_ptr, heads_ptr, widths_ptr, col_off_ptr, anchors_ptr, alphas_ptr,
        betas_ptr, tinies_ptr, kinks_ptr, num_m, TOTAL, count, mean_tol,
        SKIP_NONPOSITIVE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program l: layer l's spectrum, sort, eq. (2) with its own settings; dR/dlam, lam and
        Z's column means into ``parts [3, TOTAL]``, [R, status] into ``heads [L, 4]``."""
        layer = tl.program_id(0)
        N = tl.load(widths_ptr + layer)
        col0 = tl.load(col_off_ptr + layer)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        lam, zbar = finish_moments(moments_ptr + col0, TOTAL, num_m, cols, ok, count, mean_tol,
                                   BLOCK)  # fmt: skip
        penalty, grad, order, nonfinite, anchor_code, overflow = sorted_penalty(
            lam, cols, ok, N, tl.load(anchors_ptr + layer), tl.load(alphas_ptr + layer),
            tl.load(betas_ptr + layer), tl.load(tinies_ptr + layer), tl.load(kinks_ptr + layer),
            SKIP_NONPOSITIVE,
        )  # fmt: skip
        tl.store(parts_ptr + col0 + order, grad, mask=ok)
        tl.store(parts_ptr + TOTAL + col0 + cols, lam, mask=ok)
        tl.store(parts_ptr + 2 * TOTAL + col0 + cols, zbar, mask=ok)
        head = heads_ptr + layer * 4
        tl.store(head, penalty)
        tl.store(head + 1, nonfinite)
        tl.store(head + 2, anchor_code)
        tl.store(head + 3, overflow)

    @triton.autotune(
        configs=gemm_configs(), key=["TOTAL", "L", "B_BUCKET", "IN_PRECISION", "OPERAND_FP32"]
    )
    @triton.jit
    def _grouped_backprojection_kernel(
        z_ptr, parts_ptr, grad_out_ptr, v_ptr, out_ptr, widths_ptr, col_off_ptr, v_off_ptr,
        B, L, TOTAL, B_BUCKET, scale,
        OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """Per layer: grad_x = scale * grad_out * ((Z - zbar) * dR/dlam) V^T."""
        num_m = tl.cdiv(B, BLOCK_M)
        layer, start = _find_layer(tl.program_id(0), widths_ptr, L, num_m, BLOCK_N)
        N = tl.load(widths_ptr + layer)
        col0 = tl.load(col_off_ptr + layer)
        z_layer = z_ptr + col0 * B
        out_layer = out_ptr + col0 * B
        v_layer = v_ptr + tl.load(v_off_ptr + layer)
        pid_m, pid_k = grouped_tile(tl.program_id(0) - start, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        outs = pid_k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < B
        out_ok = outs < N
        scale = scale * tl.load(grad_out_ptr).to(tl.float32)
        acc = backprojection_tile(
            z_layer, parts_ptr + 2 * TOTAL + col0, parts_ptr + col0, v_layer, rows, outs, B, N,
            scale, N, 1, N, 1, OPERAND_FP32, IN_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        tl.store(
            out_layer + rows[:, None] * N + outs[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & out_ok[None, :],
        )


# --------------------------------------------------------------------------------------------
# Layout: per-layer offsets, uploaded once per (device, widths, settings)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _tables(device: torch.device, widths: tuple, anchors: tuple, alphas: tuple, betas: tuple,
            plan):  # fmt: skip
    col_off, v_off, c, v = [], [], 0, 0
    for n in widths:
        col_off.append(c)
        v_off.append(v)
        c, v = c + n, v + n * n
    ints = dict(dtype=torch.int64, device=device)
    return dict(
        widths=torch.tensor(widths, dtype=torch.int32, device=device),
        col_off=torch.tensor(col_off, **ints),
        v_off=torch.tensor(v_off, **ints),
        anchors=torch.tensor(anchors, dtype=torch.int32, device=device),
        alphas=torch.tensor(alphas, dtype=torch.float32, device=device),
        betas=torch.tensor(betas, dtype=torch.float32, device=device),
        tinies=torch.tensor([anchor_tolerance(plan, n) for n in widths], dtype=torch.float32,
                            device=device),
        kinks=torch.tensor(
            [kink_tolerance(n, a, torch.float32) for n, a in zip(widths, alphas, strict=True)],
            dtype=torch.float32, device=device,
        ),
        total=c,
        v_offsets=tuple(v_off),
    )


def flat_bases(Vs) -> torch.Tensor:
    """The bases as one flat buffer in layer order: the buffer itself when ``Vs`` are already
    consecutive contiguous views of one (no copy), else one ``cat``. Their dtype is kept: the
    kernels widen float16 bases to the float32 operands themselves."""
    first = Vs[0]
    offset = 0
    shared = True
    for V in Vs:
        shared = shared and V.dtype == first.dtype and V.is_contiguous() and (
            V.data_ptr() == first.data_ptr() + offset * V.element_size()
        )
        offset += V.numel()
    if shared and first.untyped_storage().nbytes() >= (
        first.storage_offset() + offset
    ) * first.element_size():
        return torch.as_strided(first, (offset,), (1,))
    return torch.cat([V.reshape(-1).to(first.dtype) for V in Vs])


# --------------------------------------------------------------------------------------------
# Forward / backward (Triton) and the plain-torch twin
# --------------------------------------------------------------------------------------------
def _launch_forward(xs, Vs, anchors, alphas, betas, skip, plan):
    B = xs[0].shape[0]
    widths = tuple(x.shape[1] for x in xs)
    device = xs[0].device
    tables = _tables(device, widths, tuple(anchors), tuple(alphas), tuple(betas), plan)
    total, L = tables["total"], len(xs)
    x_flat = torch.cat([x.reshape(-1) for x in xs])
    v_flat = flat_bases(Vs)
    mean = _alloc.empty((total,), device=device, dtype=torch.float32)
    block_n = 32
    mean_programs = sum(triton.cdiv(n, block_n) for n in widths)
    _grouped_column_mean_kernel[(mean_programs,)](
        x_flat, mean, tables["widths"], tables["col_off"], B, L, BLOCK_B=32, BLOCK_N=block_n
    )
    z = _alloc.empty((B * total,), device=device, dtype=plan.z_dtype)
    num_m = triton.cdiv(B, _BLOCK_M)
    moments = _alloc.empty((2, num_m, total), device=device, dtype=torch.float32)

    def grid(meta):
        return (sum(num_m * triton.cdiv(n, meta["BLOCK_N"]) for n in widths),)

    operand_fp32 = plan.operand == torch.float32 and v_flat.dtype != torch.float32
    _grouped_projection_kernel[grid](
        x_flat, mean, v_flat, z, moments, tables["widths"], tables["col_off"], tables["v_off"],
        B, L, total, size_bucket(B),
        OPERAND_FP32=operand_fp32, IN_PRECISION=plan.precision,
        DOT_IN_FP32=dot_in_fp32(plan.operand), BLOCK_M=_BLOCK_M,
    )  # fmt: skip
    parts = _alloc.empty((3 * total,), device=device, dtype=torch.float32)
    heads = _alloc.empty((L, _HEAD), device=device, dtype=torch.float32)
    block = max(16, triton.next_power_of_2(max(widths)))
    _grouped_penalty_kernel[(L,)](
        moments, parts, heads, tables["widths"], tables["col_off"], tables["anchors"],
        tables["alphas"], tables["betas"], tables["tinies"], tables["kinks"], num_m, total,
        float(B), _mean_tolerance(B, torch.float32),
        SKIP_NONPOSITIVE=skip, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return heads, parts, z, v_flat, tables


def _launch_backward(grad_out, z, parts, v_flat, tables, B, x_dtype, plan):
    widths = tuple(int(n) for n in tables["widths_host"])
    total, L = tables["total"], len(widths)
    out = _alloc.empty((B * total,), device=z.device, dtype=x_dtype)
    num_m = triton.cdiv(B, _BLOCK_M)

    def grid(meta):
        return (sum(num_m * triton.cdiv(n, meta["BLOCK_N"]) for n in widths),)

    _grouped_backprojection_kernel[grid](
        z, parts, grad_out, v_flat, out, tables["widths"], tables["col_off"], tables["v_off"],
        B, L, total, size_bucket(B), 2.0 / (B - 1),
        OPERAND_FP32=plan.operand == torch.float32 and v_flat.dtype != torch.float32,
        IN_PRECISION=plan.precision, DOT_IN_FP32=dot_in_fp32(plan.operand), BLOCK_M=_BLOCK_M,
    )  # fmt: skip
    return out


class _GroupedPenalty(torch.autograd.Function):
    """One autograd node for all layers: (total R, lam of every layer, flat and detached)."""

    @staticmethod
    def forward(ctx, config, *xs):
        Vs, anchors, alphas, betas, skip, plan, validate, names, taus = config
        heads, parts, z, v_flat, tables = _launch_forward(xs, Vs, anchors, alphas, betas, skip,
                                                          plan)  # fmt: skip
        status.check(heads[:, 1:].reshape(-1), validate, _group_raiser(names, config),
                     op="grouped penalty")  # fmt: skip
        ctx.save_for_backward(z, parts, v_flat)
        widths = tuple(x.shape[1] for x in xs)
        ctx.tables = dict(tables, widths_host=widths)
        ctx.shapes = [x.shape for x in xs]
        ctx.xs = xs  # inputs as attributes: no cycle, not version-checked (refuse_second_order)
        ctx.plan, ctx.x_dtype = plan, xs[0].dtype
        ctx.set_materialize_grads(False)
        total = tables["total"]
        lams = parts[total : 2 * total]
        ctx.mark_non_differentiable(lams)
        return heads[:, 0].sum(), lams

    @staticmethod
    def backward(ctx, grad_out, grad_lams):
        if grad_out is None:
            return (None,) * (1 + len(ctx.shapes))
        z, parts, v_flat = ctx.saved_tensors
        B = ctx.shapes[0][0]
        flat = _launch_backward(grad_out, z, parts, v_flat, ctx.tables, B, ctx.x_dtype, ctx.plan)
        grads, offset = [], 0
        for shape, x in zip(ctx.shapes, ctx.xs, strict=True):
            n = B * (shape.numel() // B)
            grads.append(refuse_second_order(flat[offset : offset + n].view(shape), x,
                                             "SpectralRegularizer.penalty"))  # fmt: skip
            offset += n
        return (None, *grads)


def _group_raiser(names, config):
    _, anchors, alphas, betas, skip, _, validate, _, taus = config

    def raise_for(values):
        for i, name in enumerate(names):
            settings = Settings("triton", anchors[i], alphas[i], betas[i], skip, validate, "",
                                "x", taus[i], "")  # fmt: skip
            try:
                _raiser(settings)(values[3 * i : 3 * i + 3])
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None

    return raise_for


def grouped_penalty_triton(xs, Vs, *, alphas, anchors, betas, convention, validate="deferred",
                           compute_dtype=None, names=None, taus=None):  # fmt: skip
    """All layers at once on the Triton backend -> (sum of the layers' penalties, [lam_l]).

    ``xs``: ``[B, N_l]`` activations, one batch size and dtype (float32/16-bit), N_l <= 4096;
    ``Vs``: ``[N_l, N_l]`` in x's dtype or ``compute_dtype``; per-layer ``alphas``, ``anchors``
    (0-based), ``betas``. Differentiable in every x.
    """
    status.poll()
    plan = plan_for(xs[0].dtype, max(x.shape[1] for x in xs), compute_dtype)
    if compute_dtype is not None:  # the bases in the compute dtype (no copy when they are)
        Vs = [V if V.dtype == plan.operand else V.to(plan.operand) for V in Vs]
    names = names or [str(i) for i in range(len(xs))]
    taus = taus or [a + 1 for a in anchors]
    config = (Vs, tuple(anchors), tuple(float(a) for a in alphas),
              tuple(float(b) for b in betas), convention == "authors", plan,
              status.validation_mode(validate), tuple(names), tuple(taus))  # fmt: skip
    total, lams = _GroupedPenalty.apply(config, *[x.contiguous() for x in xs])
    out, offset = [], 0
    for x in xs:
        out.append(lams[offset : offset + x.shape[1]])
        offset += x.shape[1]
    return total, out


def grouped_penalty_torch(xs, Vs, *, alphas, anchors, betas, convention, validate="deferred",
                          compute_dtype=None, names=None, taus=None, backend="torch"):  # fmt: skip
    """Twin of :func:`grouped_penalty_triton`: the per-layer loop over spec_penalty."""
    names = names or [str(i) for i in range(len(xs))]
    total, lams = None, []
    for i, (x, V) in enumerate(zip(xs, Vs, strict=True)):
        tau = anchors[i] + 1 if convention == "paper" else anchors[i]
        try:
            value, lam = penalty_and_spectrum(
                x, V, alpha=alphas[i], tau=tau, beta=betas[i], convention=convention,
                backend=backend, validate=validate, compute_dtype=compute_dtype,
            )  # fmt: skip
        except status.DeferredValidationError:
            raise  # about an earlier call: it names its own layer
        except ValueError as err:
            raise ValueError(f"layer {names[i]!r}: {err}") from None
        lams.append(lam)
        total = value if total is None else total + value.to(total.dtype)
    return total, lams


def can_group(xs, backend: str) -> bool:
    """The grouped kernels apply: Triton, one batch size and dtype (not float64), N <= 4096."""
    first = xs[0]
    return (
        backend == "triton"
        and first.dtype != torch.float64
        and all(x.dtype == first.dtype and x.shape[0] == first.shape[0] for x in xs)
        and max(x.shape[1] for x in xs) <= MAX_FUSED_N
    )
