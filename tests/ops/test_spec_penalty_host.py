"""The host path of spec_penalty, measured without a GPU: launches, dispatches, allocations,
syncs and autograd nodes per forward + backward (issue: the paper's widths are host-bound, so
these counts are the cost), deferred validation, and the bfloat16 compute option."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from powerlaw_fast import projected_spectrum, raise_pending_errors, spec_penalty
from powerlaw_fast.ops import spectral_penalty as sp_module
from powerlaw_fast.ops import status
from tests.devices import DEVICE
from tests.ops.test_spec_penalty import make_batch

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="counts under the CPU interpreter")

# aten ops that neither launch a kernel nor touch memory (metadata only)
VIEW_OPS = {"select", "slice", "alias", "detach", "view", "as_strided", "t", "transpose",
            "expand", "unsqueeze", "squeeze"}  # fmt: skip


class CountingMode(TorchDispatchMode):
    """Counts aten ops, except those the Triton interpreter itself runs inside a launch (it
    copies tensors to numpy and back: that is the simulated GPU, not the host path)."""

    inside_launch = 0

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not CountingMode.inside_launch:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts every Triton kernel launch (the interpreter's entry point)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = collections.Counter()
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        CountingMode.inside_launch += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            CountingMode.inside_launch -= 1

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return launches


def test_forward_backward_budget_at_a_paper_like_shape(triton_launches):
    # B = 1.5 N, as the paper's batch rule: 4 kernels, 5 allocations, no fill, no copy, no sync
    x, V = make_batch(192, 128, seed=1)
    leaf = x.clone().requires_grad_()
    spec_penalty(leaf, V, backend="triton", validate="off").backward()  # warm (autotune)
    triton_launches.clear()
    leaf.grad = None
    with CountingMode() as mode:
        R = spec_penalty(leaf, V, backend="triton", validate="off")
        R.backward()
    assert sum(triton_launches.values()) == 4, triton_launches
    assert set(triton_launches) == {
        "_column_mean_kernel",
        "_centred_projection_kernel",
        "_spectrum_penalty_kernel",
        "_scaled_backprojection_kernel",
    }
    work = {op: n for op, n in mode.ops.items() if op not in VIEW_OPS}
    # the only aten work: the buffers (mean, Z, moments, scratch, grad_x), nothing filled,
    # copied or read back; autograd's own grad-of-output is a 0-dim ones_like
    assert work.pop("empty", 0) <= 5, mode.ops
    assert work.pop("ones_like", 0) <= 1, mode.ops
    assert work == {}, mode.ops


def test_one_autograd_node_per_call():
    x, V = make_batch(50, 20, seed=2)
    leaf = x.clone().requires_grad_()
    R = spec_penalty(leaf, V, tau=5, backend="triton")
    (edge,) = [e for e in R.grad_fn.next_functions if e[0] is not None]
    assert type(edge[0]).__name__ == "AccumulateGrad"  # straight from the node to x


def test_default_validation_does_not_synchronise_but_still_raises(triton_launches):
    x, V = make_batch(50, 20, seed=3)
    with CountingMode() as mode:
        spec_penalty(x, V, tau=5, backend="triton")
    assert "_local_scalar_dense" not in mode.ops and "item" not in mode.ops
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: expected finite activations"):
        spec_penalty(x, V, tau=5, backend="triton")  # CPU: the status is ready at once


def test_deferred_errors_surface_on_a_later_call_or_on_request():
    x, V = make_batch(20, 8, seed=4)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with status.simulate_deferral(delay=1):  # the copy reports "done" to the second query
        spec_penalty(bad, V, tau=2)  # returns: the check is in flight
        assert status.pending_count() == 1
        projected_spectrum(x, V)  # the first query: not finished yet, nothing raised
        with pytest.raises(ValueError, match="non-finite.*deferred check of call #"):
            projected_spectrum(x, V)  # any later call reports it
        assert status.pending_count() == 1  # the good call before it is still in flight
        raise_pending_errors()  # waits for it: nothing wrong, nothing raised
        spec_penalty(bad, V, tau=2)
        with pytest.raises(ValueError, match="non-finite"):
            raise_pending_errors()  # waits for the copy, then raises
    assert status.pending_count() == 0


@pytest.mark.parametrize("validate", ["no", 1, None])
def test_validate_must_be_a_known_mode(validate):
    x, V = make_batch(20, 8, seed=5)
    with pytest.raises(TypeError, match="validate: expected True, False or one of"):
        spec_penalty(x, V, tau=2, validate=validate)


def test_autotune_keys_bucket_the_batch():
    from powerlaw_fast.ops._triton_gemm import size_bucket

    # a partial last batch (1000 of 1500 rows) reuses the 1500-row config
    assert size_bucket(1500) == size_bucket(1025) == 2048
    assert "B_BUCKET" in sp_module._kernels()._centred_projection_kernel.keys
    assert "B" not in sp_module._kernels()._centred_projection_kernel.keys


def test_bfloat16_compute_error_is_a_small_fraction_of_the_sampling_error():
    """The penalty's GEMMs in bfloat16 for float32 activations: on tanh activations of real
    digits (the shipped MNIST subset), the spectrum moves by far less than the batch's own
    sampling error per eigenvalue, about sqrt(2 / B)."""
    from powerlaw_fast import load_mnist

    images = load_mnist("shipped", limit=1536)[0].reshape(1536, -1).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(784, 256, generator=g) / 784**0.5 * 3).to(DEVICE)
    h = torch.tanh(images @ W)
    V = torch.linalg.eigh(torch.cov(h.T.double()))[1].flip(1).float()
    for backend in ("torch", "triton"):
        exact = projected_spectrum(h, V, backend=backend)
        fast = projected_spectrum(h, V, backend=backend, compute_dtype=torch.bfloat16)
        rel = ((fast - exact).abs() / exact).double()
        sampling = (2.0 / h.shape[0]) ** 0.5
        # bfloat16 keeps 8 bits: V's rounding alone moves each value by about 2^-8
        assert float(rel.median()) < 0.2 * sampling, float(rel.median())
        assert float(rel[:100].max()) < 0.5 * sampling, float(rel[:100].max())
        R32 = spec_penalty(h, V, backend=backend)
        R16 = spec_penalty(h, V, backend=backend, compute_dtype=torch.bfloat16)
        assert abs(float(R16) / float(R32) - 1) < 0.05


def test_compute_dtype_is_checked():
    x, V = make_batch(20, 8, seed=6)
    with pytest.raises(TypeError, match="compute_dtype: expected None, torch.float32 or"):
        spec_penalty(x, V, tau=2, compute_dtype=torch.float16)
    # V may already be in the compute dtype (the regulariser keeps it so: no cast per call)
    a = spec_penalty(x, V.bfloat16(), tau=2, compute_dtype=torch.bfloat16)
    b = spec_penalty(x, V, tau=2, compute_dtype=torch.bfloat16)
    assert torch.equal(a, b)
