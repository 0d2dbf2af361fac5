"""basis_update="tracked": the running covariance's eigenbasis followed by rotations built from
GEMMs (powerlaw_fast/training/_tracked_basis.py), against the exact per-step eigendecomposition
("running") and against the true eigenbasis of a covariance that rotates at a known rate."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from powerlaw_fast import SpectralRegularizer, spec_penalty
from powerlaw_fast.training import _tracked_basis
from powerlaw_fast.training._tracked_basis import track_eigenbasis
from tests.devices import DEVICE
from tests.distributed_utils import run_on_processes, shard_bounds


def _principal_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """The largest principal angle (radians) between the column spans of A and B [N, k]."""
    qa = torch.linalg.qr(A.double())[0]
    qb = torch.linalg.qr(B.double())[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.acos(cosines.min()))


def _exact(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, V = torch.linalg.eigh(C)
    return lam.flip(0), V.flip(1)


def _rotating_stream(steps, *, N, B, omega, seed):
    """Batches [B, N] drawn from C_t = Q_t diag(1/n) Q_t^T, Q_t = Q_0 exp(t Omega) with
    ||Omega||_2 = omega (radians per step); yields (x, Q_t)."""
    g = torch.Generator().manual_seed(seed)
    Q0 = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0]
    A = torch.randn(N, N, generator=g, dtype=torch.float64)
    Omega = A - A.T
    Omega *= omega / torch.linalg.matrix_norm(Omega, ord=2)
    scales = torch.arange(1, N + 1, dtype=torch.float64).rsqrt()
    for t in range(steps):
        Q = Q0 @ torch.linalg.matrix_exp(t * Omega)
        x = (torch.randn(B, N, generator=g, dtype=torch.float64) * scales) @ Q.T
        yield x, Q


@pytest.mark.parametrize("method", ["sweeps", "eigh"])
def test_tracked_basis_follows_a_rotating_eigenbasis_as_closely_as_the_exact_running_basis(
    method,
):
    """The bound. The exact running average of a covariance rotating at omega rad/step has its
    eigenvectors behind the true ones by the average age of its terms, (1 - m) / m steps, so by
    up to omega (1 - m) / m; its sampling noise moves the span of the top k eigenvectors by
    about sqrt(m / (2 - m)) sqrt(lam_k lam_k+1 / B) / (lam_k - lam_k+1) (the off-diagonal of an
    average of m-weighted batch covariances over the gap that resolves it). Both are checked
    for the exact mode first (so that the bound is a property of the running average, not of
    the tracker), and the tracker must meet the same bound, and stay within a third of it of
    the exact basis: its own error is of the second order in its per-step angles."""
    N, B, m, omega = 100, 800, 0.1, 0.004  # N > BLOCK: the first-order rotations run
    lag = omega * (1 - m) / m
    lam = 1.0 / torch.arange(1, N + 1, dtype=torch.float64)
    noise = [math.sqrt(m / (2 - m)) * math.sqrt(lam[k - 1] * lam[k] / B) / (lam[k - 1] - lam[k])
             for k in range(1, N)]  # fmt: skip
    C = V = values = None
    worst = {"exact": 0.0, "tracked": 0.0, "apart": 0.0}
    for t, (x, Q) in enumerate(_rotating_stream(240, N=N, B=B, omega=omega, seed=1)):
        S = torch.cov(x.T)
        C = S if C is None else (1 - m) * C + m * S
        if V is None:
            values, V = _exact(C)
            V = V.float()
            continue
        V, values = track_eigenbasis(V, values, x.float(), momentum=m, step=t, method=method)
        if t < 60:  # the running average's own warm-up: ~1 / m steps, a few times over
            continue
        exact = _exact(C)[1]
        for k in (1, 2, 3, 5, 8):
            bound = lag + 4 * noise[k - 1] + 1e-3
            for label, basis in (("exact", exact), ("tracked", V)):
                angle = _principal_angle(basis[:, :k], Q[:, :k])
                assert angle < bound, (label, t, k, angle, bound)
                worst[label] = max(worst[label], angle / bound)
            apart = _principal_angle(V[:, :k], exact[:, :k])
            assert apart < bound / 3, (t, k, apart, bound)
            worst["apart"] = max(worst["apart"], apart / bound)
    # the bound is not vacuous: the exact basis comes within a factor 3 of it
    assert worst["exact"] > 1 / 3, worst
    assert torch.allclose(V.T.double() @ V.double(), torch.eye(N, dtype=torch.float64),
                          atol=1e-4)  # fmt: skip


def test_a_basis_that_stops_following_fails_the_rotation_bound(monkeypatch):
    """The test above can fail: a tracker that keeps its first basis is left behind by the
    rotating eigenbasis."""
    import sys

    def stale(V, lam, x, **kwargs):
        return V, lam

    monkeypatch.setattr(sys.modules[__name__], "track_eigenbasis", stale)
    with pytest.raises(AssertionError):
        test_tracked_basis_follows_a_rotating_eigenbasis_as_closely_as_the_exact_running_basis(
            "sweeps")


def test_one_sweep_is_first_order_and_two_sweeps_are_second_order():
    """On one step from an exactly diagonal start, the off-diagonal left in the new basis falls
    from about theta * offdiag (first order) to about theta^2 * offdiag."""
    torch.manual_seed(0)
    N, B, m = 96, 400, 0.3
    lam = 1.0 / torch.arange(1, N + 1, dtype=torch.float64)
    x = torch.randn(B, N, dtype=torch.float64) * lam.sqrt()
    C_prev = torch.diag(lam)
    C = (1 - m) * C_prev + m * torch.cov(x.T)
    left = {}
    for sweeps in (1, 2):
        _tracked_basis.SWEEPS = sweeps
        try:
            V, _ = track_eigenbasis(torch.eye(N, dtype=torch.float64), lam, x, momentum=m,
                                    step=1, method="sweeps")  # fmt: skip
        finally:
            _tracked_basis.SWEEPS = 2
        M = V.T @ C @ V
        left[sweeps] = float(torch.linalg.norm(M - torch.diag(M.diagonal())))
    before = float(torch.linalg.norm(C - torch.diag(C.diagonal())))
    assert left[1] < 0.3 * before, (left, before)
    assert left[2] < 0.1 * left[1], (left, before)


def test_the_tracking_steps_own_code_reads_no_value_back(monkeypatch):
    """The tracker's Python never reads a tensor's value (every way a tensor reaches Python is
    made to fail), so on a GPU it does not wait for the device except inside
    torch.linalg.eigh, whose check of its info flags synchronises once per sweep (see the GPU
    test below)."""
    torch.manual_seed(0)
    V = torch.linalg.qr(torch.randn(70, 70))[0]
    lam = torch.linspace(2.0, 0.1, 70, dtype=torch.float64)
    x = torch.randn(100, 70)

    def forbidden(*args, **kwargs):
        raise AssertionError("a host synchronisation in the tracking step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(5):  # every branch: both block offsets and the Newton-Schulz step
        V, lam = track_eigenbasis(V, lam, x, momentum=0.2, step=step, method="sweeps")
    monkeypatch.undo()
    assert torch.isfinite(V).all() and torch.isfinite(lam).all()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's kernel; the GPU test below")
def test_the_sweeps_with_the_jacobi_kernel_follow_the_ones_with_lapack(monkeypatch):
    """The GPU's block eigendecompositions (the Triton Jacobi kernel, here under the
    interpreter) give the same tracked basis as LAPACK's: several blocks (BLOCK made 8 so that
    the interpreter is quick), both offsets, a ragged last block and the Newton-Schulz step."""
    pytest.importorskip("triton")
    monkeypatch.setattr(_tracked_basis, "BLOCK", 8)
    monkeypatch.setattr(_tracked_basis._Blocks, "_cache", {})
    torch.manual_seed(3)
    N = 21
    V0 = torch.linalg.qr(torch.randn(N, N))[0]
    lam0 = torch.linspace(2.0, 0.05, N, dtype=torch.float64)
    results = {}
    for backend in ("torch", "triton"):
        V, lam = V0, lam0
        for step in range(4):
            x = torch.randn(60, N, generator=torch.Generator().manual_seed(step))
            V, lam = track_eigenbasis(V, lam, x * torch.linspace(1.5, 0.2, N), momentum=0.2,
                                      step=step, method="sweeps", backend=backend)  # fmt: skip
        results[backend] = V, lam
    (V, lam), (Vk, lamk) = results["torch"], results["triton"]
    # float32 Jacobi against float64 LAPACK blocks: the bases agree to float32's rounding of
    # the few-step iteration (a wrong rotation in the kernel moves columns by O(1))
    overlap = (Vk.T @ V).diagonal().abs()
    torch.testing.assert_close(overlap, torch.ones(N), rtol=0, atol=1e-4)
    torch.testing.assert_close(lamk, lam, rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
def test_sweeps_on_a_gpu_match_the_cpu_without_a_synchronisation_and_capture_in_a_graph():
    """The sweeps on CUDA tensors (method "auto" there, the Jacobi kernel for the blocks) give
    the CPU's sweeps with no host synchronisation (torch.cuda's sync debug mode warns at
    each), and a tracking step replays from a CUDA graph."""
    import warnings

    torch.manual_seed(0)
    N = 150  # above one block, ragged
    V0 = torch.linalg.qr(torch.randn(N, N))[0]
    lam0 = torch.linspace(2.0, 0.05, N, dtype=torch.float64)
    xs = [torch.randn(220, N) * torch.linspace(1.5, 0.2, N) for _ in range(6)]
    V, lam = V0, lam0
    for step, x in enumerate(xs):
        V, lam = track_eigenbasis(V, lam, x, momentum=0.2, step=step, method="sweeps")
    Vg, lamg = V0.cuda(), lam0.cuda()
    for step in range(2):  # block layouts cached and the kernel compiled, both offsets
        track_eigenbasis(Vg, lamg, xs[0].cuda(), momentum=0.2, step=step)
    xs_gpu = [x.cuda() for x in xs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step, x in enumerate(xs_gpu):
                Vg, lamg = track_eigenbasis(Vg, lamg, x, momentum=0.2, step=step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == []
    overlap = (Vg.cpu().T @ V).diagonal().abs()  # block eigenvectors' signs may differ
    torch.testing.assert_close(overlap, torch.ones(N), rtol=0, atol=1e-3)
    torch.testing.assert_close(lamg.cpu(), lam, rtol=1e-4, atol=1e-7)
    # one step captured and replayed: the same basis as the eager step
    x, V_in, lam_in = xs_gpu[0].clone(), Vg.clone(), lamg.clone()
    eager = track_eigenbasis(V_in, lam_in, x, momentum=0.2, step=7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = track_eigenbasis(V_in, lam_in, x, momentum=0.2, step=7)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured[0], eager[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(captured[1], eager[1], rtol=1e-6, atol=0)


def test_widths_below_one_block_and_not_multiples_of_it_are_exact_where_they_can_be():
    """N <= BLOCK: the block sweep is a whole eigendecomposition, so one step gives the running
    average's eigenbasis exactly; N = 3 BLOCK / 2 + 1 (a ragged last block, both offsets)."""
    torch.manual_seed(0)
    for N in (1, 2, 5, _tracked_basis.BLOCK):
        x = torch.randn(50, N, dtype=torch.float64) * torch.linspace(3, 1, N, dtype=torch.float64)
        lam = torch.linspace(2, 1, N, dtype=torch.float64)
        V, values = track_eigenbasis(torch.eye(N, dtype=torch.float64), lam, x, momentum=0.5,
                                     method="sweeps")  # fmt: skip
        C = 0.5 * torch.diag(lam) + 0.5 * torch.cov(x.T).reshape(N, N)
        ref_values, _ = _exact(C)
        torch.testing.assert_close(values, ref_values, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(V.T @ C @ V, torch.diag(ref_values), rtol=0, atol=1e-10)
    N = 3 * _tracked_basis.BLOCK // 2 + 1
    lam = 1.0 / torch.arange(1, N + 1, dtype=torch.float64)
    V, values = torch.eye(N), lam
    C = torch.diag(lam)
    for step in range(40):
        x = torch.randn(400, N, dtype=torch.float64) * lam.sqrt()
        C = 0.8 * C + 0.2 * torch.cov(x.T)
        V, values = track_eigenbasis(V, values, x.float(), momentum=0.2, step=step,
                                     method="sweeps")  # fmt: skip
    Vd = V.double()
    spectrum = torch.sort((Vd.T @ C @ Vd).diagonal(), descending=True).values
    torch.testing.assert_close(spectrum, _exact(C)[0], rtol=2e-3, atol=0)


# ------------------------------------------------------------------------------------------------
# the regulariser in tracked mode


@pytest.fixture(params=["eigh", "sweeps"])
def cpu_method(request, monkeypatch):
    """The regulariser-level tests run with both of the tracker's methods on the CPU (a GPU
    uses the sweeps), so that the GPU's path is what these tests check too."""
    monkeypatch.setattr(_tracked_basis, "CPU_METHOD", request.param)
    return request.param


def _setup(basis_update, **kwargs):
    torch.manual_seed(0)  # 80 > BLOCK features: the sweeps' first-order rotations run too
    model = nn.Sequential(nn.Linear(12, 80), nn.Tanh(), nn.Linear(80, 3))
    reg = SpectralRegularizer(model, ["1"], tau=3, progress=False, basis_update=basis_update,
                              backend="torch", **kwargs)  # fmt: skip
    return model, reg


@pytest.mark.usefixtures("cpu_method")
def test_first_step_without_a_refresh_is_the_exact_basis_and_later_steps_update_in_place():
    model, reg = _setup("tracked", basis_momentum=0.25)
    running_model, running = _setup("running", basis_momentum=0.25)
    g = torch.Generator().manual_seed(3)
    buffer = None
    for step in range(6):
        x = torch.randn(160, 12, generator=g) * 2
        model(x)
        running_model(x)
        value, reference = reg.penalty(), running.penalty()
        value.backward()
        reference.backward()
        if step == 0:  # an exact eigendecomposition of the first batch, as in running mode
            torch.testing.assert_close(reg.basis("1"), running.basis("1"))
            buffer = reg.basis("1")
        # the same tensor, updated in place (a CUDA graph around the penalty keeps reading it)
        assert reg.basis("1") is buffer
        torch.testing.assert_close(value, reference, rtol=1e-3, atol=0)
        lam = torch.linalg.eigvalsh(running.running_covariance("1")).flip(0)
        # float32 moments in the tracked basis: each eigenvalue within a few rounding errors
        # of a B-term float32 sum at the largest eigenvalue's scale (Weyl's bound)
        rounding = 32 * torch.finfo(torch.float32).eps * float(lam[0]) * x.shape[0] ** 0.5
        torch.testing.assert_close(torch.sort(reg.eigenvalues("1"), descending=True).values,
                                   lam, rtol=0, atol=rounding)  # fmt: skip
    assert reg.running_covariance("1") is None  # tracked mode keeps no N x N average
    reg.remove()
    running.remove()


def _tracked_run(steps, *, resume_at=None, penalty_dtype=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
    kwargs = dict(tau=3, progress=False, backend="torch", basis_update="tracked",
                  basis_momentum=0.3, penalty_dtype=penalty_dtype)  # fmt: skip
    reg = SpectralRegularizer(model, ["1"], **kwargs)
    g = torch.Generator().manual_seed(3)
    values = []
    for i in range(steps):
        if i == resume_at:
            state = reg.state_dict()
            model_state = {k: v.clone() for k, v in model.state_dict().items()}
            model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
            model.load_state_dict(model_state)
            reg = SpectralRegularizer(model, ["1"], **kwargs)
            reg.load_state_dict(state)
        model(torch.randn(40, 20, generator=g))
        values.append(float(reg.penalty()))
    return values


@pytest.mark.usefixtures("cpu_method")
def test_a_tracked_basis_resumes_from_a_checkpoint_exactly():
    uninterrupted = _tracked_run(9)
    for resume_at in (1, 3, 4, 7):  # either block offset, before and after a Newton-Schulz step
        assert _tracked_run(9, resume_at=resume_at) == uninterrupted


def test_a_checkpoint_with_a_bad_step_count_is_refused():
    model, reg = _setup("tracked")
    model(torch.randn(30, 12))
    reg.penalty()
    state = reg.state_dict()
    assert state["tracked_steps"] == 1
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="tracked_steps"):
            reg.load_state_dict({**state, "tracked_steps": bad})
    reg.remove()


@pytest.mark.usefixtures("cpu_method")
def test_tracked_mode_with_bfloat16_penalty_gemms_stays_close_to_float32():
    full = _tracked_run(6)
    half = _tracked_run(6, penalty_dtype=torch.bfloat16)
    torch.testing.assert_close(torch.tensor(half), torch.tensor(full), rtol=3e-2, atol=0)


# ------------------------------------------------------------------------------------------------
# on real activations: the shipped MNIST subset


@pytest.mark.parametrize("method", ["sweeps", "eigh"])
def test_on_mnist_the_tracked_basis_gives_the_exact_modes_spectrum_and_gradient(method):
    """A shallow tanh net trained with the exact per-step basis ("running"); a tracker fed the
    same batches. Over the last steps, the spectrum the penalty sees in the tracked basis
    (diag V^T C V, sorted) matches the running covariance's eigenvalues, and the penalty's
    gradient in the tracked basis points the same way as in the exact one. Bounds: the
    tracker's own error is second order in its per-step angles (see the module); one sweep,
    first order, misses them (the next test)."""
    worst = _mnist_shadow(method=method)
    assert worst["spectrum"] < 0.01, worst
    assert worst["cosine"] > 0.97, worst
    assert worst["mean_cosine"] > 0.99, worst


def _mnist_shadow(steps=48, width=160, method="sweeps", behind=False):
    """The worst spectrum error and gradient cosines of the tracked basis over the last half
    of ``steps``; ``behind``: of the basis before this batch's update (one batch behind)."""
    from powerlaw_fast import load_mnist
    from powerlaw_fast.paper.models import ShallowNet

    torch.manual_seed(0)
    images, labels = load_mnist("shipped", train=True)
    B = 3 * width // 2
    model = ShallowNet(width=width, activation="tanh", batch_norm=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    reg = SpectralRegularizer(model, ["hidden1"], tau=10, beta=5.0, basis_update="running",
                              progress=False, backend="torch")  # fmt: skip
    kept = {}
    model.blocks["hidden1"].register_forward_hook(lambda m, a, o: kept.update(x=o.detach()))
    V = values = None
    worst = {"spectrum": 0.0, "cosine": 1.0, "mean_cosine": 0.0}
    cosines = []
    for step in range(steps):
        rows = slice(step * B % (images.shape[0] - B), step * B % (images.shape[0] - B) + B)
        loss = nn.functional.cross_entropy(model(images[rows]), labels[rows]) + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        x, C = kept["x"], reg.running_covariance("hidden1")
        if V is None:
            V, values = reg.basis("hidden1").clone(), reg.eigenvalues("hidden1").clone()
            continue
        previous = V
        V, values = track_eigenbasis(V, values, x, momentum=0.1, step=step, method=method)
        if step < steps // 2:
            continue
        used = previous if behind else V
        Vd = used.double()
        spectrum = torch.sort((Vd.T @ C @ Vd).diagonal(), descending=True).values
        exact = torch.linalg.eigvalsh(C).flip(0)
        worst["spectrum"] = max(worst["spectrum"],
                                float(((spectrum / exact - 1).abs()[: width // 2]).max()))
        grads = []
        for basis in (used, reg.basis("hidden1")):
            xg = x.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(spec_penalty(xg, basis, tau=10, backend="torch"),
                                             xg)[0].flatten())  # fmt: skip
        cosine = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
        cosines.append(cosine)
        worst["cosine"] = min(worst["cosine"], cosine)
    worst["mean_cosine"] = sum(cosines) / len(cosines)
    reg.remove()
    return worst


def test_on_mnist_one_sweep_misses_the_bounds(monkeypatch):
    monkeypatch.setattr(_tracked_basis, "SWEEPS", 1)
    worst = _mnist_shadow(method="sweeps")
    assert worst["spectrum"] > 0.01 or worst["mean_cosine"] < 0.99, worst


def test_on_mnist_a_basis_one_batch_behind_misses_the_bounds():
    """Why the tracker sees the batch before the penalty does (and so cannot reuse the
    penalty's projection Z): the exact eigenbasis of the running covariance before this batch
    (2026-12-03: worst spectrum error 3.0%, gradient cosine down to -0.68, mean 0.34 at width
    160; 3.4%, 0.63 and 0.95 at width 500) is further from the basis with it than two sweeps
    are, and further than one sweep."""
    worst = _mnist_shadow(method="eigh", behind=True)
    assert worst["spectrum"] > 0.01, worst
    assert worst["cosine"] < 0.97 and worst["mean_cosine"] < 0.99, worst


# ------------------------------------------------------------------------------------------------
# over a process group


def _distributed_body(rank, world, method):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(4)
    N = 100  # above one block: the first-order rotations run too
    V = torch.linalg.qr(torch.randn(N, N, generator=g))[0]
    lam = torch.linspace(3, 0.1, N, dtype=torch.float64)
    single_V, single_lam = V, lam
    V_r, lam_r = V.clone(), lam.clone()
    for step in range(5):
        x = torch.randn(97, N, generator=g) * torch.linspace(2, 0.2, N) + 3.0
        single_V, single_lam = track_eigenbasis(single_V, single_lam, x, momentum=0.3,
                                                step=step, method=method)  # fmt: skip
        lo, hi = shard_bounds(x.shape[0], world, rank)
        V_r, lam_r = track_eigenbasis(V_r, lam_r, x[lo:hi], momentum=0.3, step=step,
                                      group=dist.group.WORLD, method=method)  # fmt: skip
        # the same eigenvectors up to their signs (the block eigendecompositions choose them)
        overlap = (V_r.T @ single_V).diagonal().abs()
        torch.testing.assert_close(overlap, torch.ones(N), rtol=0, atol=1e-4)
        torch.testing.assert_close(lam_r, single_lam, rtol=2e-5, atol=0)
        gathered = [torch.empty_like(V_r) for _ in range(world)]
        dist.all_gather(gathered, V_r)
        for other in gathered:
            assert torch.equal(other, gathered[0])  # identical on every rank


@pytest.mark.parametrize(("world", "method"), [(2, "sweeps"), (3, "sweeps"), (2, "eigh")])
def test_over_a_process_group_every_rank_tracks_the_single_process_basis(tmp_path, world,
                                                                         method):  # fmt: skip
    run_on_processes(_distributed_body, world, tmp_path, method)


def test_an_unknown_method_is_refused_before_any_work(monkeypatch):
    def no_gemm(*args, **kwargs):
        raise AssertionError("work done before the argument was checked")

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_gemm)
    with pytest.raises(ValueError, match=r"method: expected one of \('auto', 'sweeps', "
                                         r"'eigh'\), got 'qr'"):  # fmt: skip
        track_eigenbasis(torch.eye(3), torch.ones(3, dtype=torch.float64), torch.randn(5, 3),
                         momentum=0.1, method="qr")  # fmt: skip


# --- found by `nox -s mutants -- training/_tracked_basis.py` (issue 28): each test below fails
# for a one-line change of _tracked_basis.py that the tests above let through


def _tracking_problem(N=100, B=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    V0 = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0].float()
    lam0 = torch.linspace(5.0, 0.1, N, dtype=torch.float64)
    x = torch.randn(B, N, generator=g) * torch.linspace(3.0, 0.2, N)
    return V0, lam0, x


def test_on_a_cpu_the_default_method_is_the_exact_eigendecomposition_of_m():
    V0, lam0, x = _tracking_problem()
    C = 0.7 * V0.double() @ torch.diag(lam0) @ V0.double().T + 0.3 * torch.cov(x.double().T)
    ref = torch.linalg.eigvalsh(C).flip(0)
    V, lam = track_eigenbasis(V0, lam0, x, momentum=0.3)
    # float32 moments: within 1e-5 of the largest eigenvalue (the sweeps are ~1e-2 off here)
    assert float((lam - ref).abs().max()) <= 1e-5 * float(ref[0])
    V_eigh, lam_eigh = track_eigenbasis(V0, lam0, x, momentum=0.3, method="eigh")
    assert torch.equal(V, V_eigh) and torch.equal(lam, lam_eigh)


def test_the_sweeps_return_unit_columns():
    V0, lam0, x = _tracking_problem()
    V, _ = track_eigenbasis(V0, lam0, x, momentum=0.3, method="sweeps")
    # the rows of V are off unit length by ~2e-3 here; its columns are normalised
    assert float((V.double().norm(dim=0) - 1.0).abs().max()) <= 1e-5


def test_bfloat16_operands_round_the_centred_batch_and_the_basis():
    V0, lam0, x = _tracking_problem(N=40, B=120, seed=1)
    _, lam = track_eigenbasis(V0, lam0, x, momentum=0.3, method="eigh",
                              operand_dtype=torch.bfloat16)
    # the reference: M = 0.7 diag(lam0) + 0.3 Z^T Z / (B - 1), Z from bfloat16 operands
    centred = (x - x.sum(0) / x.shape[0]).to(torch.bfloat16)
    Z = centred @ V0.to(torch.bfloat16)
    M = (Z.T @ Z).float() * (0.3 / (x.shape[0] - 1)) + torch.diag(0.7 * lam0.float())
    ref = torch.linalg.eigvalsh(M).flip(0).double()
    torch.testing.assert_close(lam, ref, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_a_step_count_starts_at_step_0():
    tracked = _tracked_basis.TrackedBasis(0.1)
    tracked.load({})
    assert tracked.steps == 0
    tracked.load({"tracked_steps": 7})
    assert tracked.steps == 7


def test_the_basis_is_re_orthonormalised_every_4_steps(monkeypatch):
    calls = []
    original = _tracked_basis.newton_schulz_step
    monkeypatch.setattr(_tracked_basis, "newton_schulz_step",
                        lambda V: calls.append(V.shape) or original(V))
    V0, lam0, x = _tracking_problem(N=70, B=100)
    per_step = []
    for step in range(8):
        calls.clear()
        track_eigenbasis(V0, lam0, x, momentum=0.3, step=step, method="sweeps")
        per_step.append(len(calls))
    # one step on the first sweep's rotation each step, one on V after steps 3 and 7
    assert per_step == [1, 1, 1, 2, 1, 1, 1, 2]


def test_over_a_thread_group_each_rank_tracks_the_whole_batch(monkeypatch):
    from tests.distributed_utils import ThreadGroup

    V0, lam0, x = _tracking_problem(N=70, B=100)
    shards = [x[:37], x[37:]]
    token = object()
    for step, broadcasts in ((0, 0), (3, 2)):
        group = ThreadGroup([0, 1]).patch(monkeypatch)
        results = group.run(lambda rank, step=step: track_eigenbasis(
            V0, lam0, shards[rank], momentum=0.3, step=step, group=token, method="sweeps"))
        whole = track_eigenbasis(V0, lam0, x, momentum=0.3, step=step, method="sweeps")
        for V, lam in results:
            torch.testing.assert_close(V, whole[0], rtol=0, atol=1e-4)
            torch.testing.assert_close(lam, whole[1], rtol=1e-5, atol=1e-6)
        # the batch's sum and count, M; after a Newton-Schulz step rank 0's V and lam
        assert group.collectives == ([("all_reduce", None)] * 2
                                     + [("broadcast", 0)] * broadcasts)
        assert all(g is token for g in group.groups)
    # the first step (no basis yet): the covariance of the whole batch, over the group
    group = ThreadGroup([0, 1]).patch(monkeypatch)
    tracked = [_tracked_basis.TrackedBasis(0.3), _tracked_basis.TrackedBasis(0.3)]
    results = group.run(lambda rank: tracked[rank].step({"a": shards[rank]}, {}, {}, token))
    lam_ref = torch.linalg.eigvalsh(torch.cov(x.double().T)).flip(0)
    for _, values in results:
        torch.testing.assert_close(values["a"], lam_ref, rtol=1e-9, atol=1e-12)
    assert all(g is token for g in group.groups)
    # rank 0's vectors and values, broadcast: other devices' eigensolvers may choose other signs
    assert group.collectives[-2:] == [("broadcast", 0)] * 2


@pytest.mark.parametrize("N", [40, 64])
def test_below_one_block_the_sweeps_are_the_exact_eigendecomposition_of_m(N):
    V0, lam0, x = _tracking_problem(N=N, B=200, seed=2)
    C = 0.7 * V0.double() @ torch.diag(lam0) @ V0.double().T + 0.3 * torch.cov(x.double().T)
    ref = torch.linalg.eigvalsh(C).flip(0)
    for step in range(2):  # both block offsets' steps: one block of N columns either way
        _, lam = track_eigenbasis(V0, lam0, x, momentum=0.3, step=step, method="sweeps")
        assert float((lam - ref).abs().max()) <= 1e-5 * float(ref[0])


# --- the work a tracking step does: what its GPU cost follows, checked on a CPU ---


def _matmul_flops(fn) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return {str(op).removeprefix("aten."): n for op, n in counts.items()}


@pytest.mark.parametrize("step", [0, 3])
def test_a_tracking_step_does_the_projection_the_gram_and_the_rotations_and_nothing_more(step):
    """The matrix products of one step, counted (2 flops per multiply-add): the projection
    ``Z = x_c V`` (``2 B N^2``) and ``Z^T Z`` (its upper block triangle: ``1.25 B N^2``),
    then with ``"eigh"`` one ``V Q`` (``2 N^3``); with ``"sweeps"`` eight ``N x N`` GEMMs
    (``16 N^3``: sweep 1 ``Theta^2``, a Newton-Schulz step of R, ``V R``, ``R^T M R``;
    sweep 2 ``Theta^2``, ``V R``), two more every ``ORTHONORMALISE_EVERY`` steps (``V``'s
    Newton-Schulz step), and per sweep three block-diagonal products (M from both sides, V:
    ``2 N K b^2`` each)."""
    N, B, b = 96, 144, _tracked_basis.BLOCK
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0].float()
    lam = torch.linspace(2.0, 0.1, N, dtype=torch.float64)
    x = torch.randn(B, N, generator=g)
    run = {method: (lambda method=method: track_eigenbasis(V, lam, x, momentum=0.1, step=step,
                                                           method=method, backend="torch"))
           for method in ("eigh", "sweeps")}  # fmt: skip
    # Z^T Z from its upper block triangle: 4 blocks of 24 columns, each times the columns
    # from it on (96, 72, 48, 24 of them)
    k, width = _tracked_basis.GRAM_BLOCKS, N // _tracked_basis.GRAM_BLOCKS
    gram = sum(2 * B * width * (N - i * width) for i in range(k))
    assert gram == 2 * B * N * N * (k + 1) // (2 * k)
    projection_and_gram = 2 * B * N * N + gram
    assert _matmul_flops(run["eigh"]) == {"mm": projection_and_gram + 2 * N**3}
    newton_schulz = 4 * N**3 if (step + 1) % _tracked_basis.ORTHONORMALISE_EVERY == 0 else 0
    blocks = 2  # N = 96 in blocks of 64: [64, 32] in one sweep, [32, 64] in the other
    assert _matmul_flops(run["sweeps"]) == {
        "mm": projection_and_gram + 12 * N**3 + newton_schulz,  # V R x2, NS(R), R^T M R
        "addmm": 2 * (2 * N**3),  # Theta + Theta^2 / 2, each sweep
        "bmm": 2 * 3 * (2 * N * blocks * b * b),
    }


@pytest.mark.parametrize("N", [1, 3, 4, 5, 97])
def test_the_gram_from_its_upper_block_triangle_is_z_transpose_z_exactly_symmetric(N):
    """Every entry is one of the full product's dot products (within the float32 rounding of
    a sum of B products), each written once above the diagonal and mirrored; widths that
    do not split into GRAM_BLOCKS equal blocks, and fewer columns than blocks, included."""
    from tests.bounds import accumulation_roundoff, gamma

    B = 41
    Z = torch.randn(B, N, generator=torch.Generator().manual_seed(N)) + 2.0
    G = _tracked_basis.symmetric_gram(Z)
    assert torch.equal(G, G.T)
    exact = Z.double().T @ Z.double()
    # a float32 sum of B products, in any order: gamma_B * sum |z_bi z_bj|
    bound = gamma(B, accumulation_roundoff(torch.float32)) * (Z.double().abs().T @ Z.double().abs())
    assert bool(((G.double() - exact).abs() <= bound).all())
