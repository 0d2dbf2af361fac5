"""Test configuration: without CUDA, Triton kernels run under its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test
module imports powerlaw_fast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=[0], autouse=False)
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """CUDA when present, else the CPU (Triton kernels then run under the interpreter)."""
    from tests.devices import DEVICE

    return DEVICE


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a launcher allocates starts as NaN (floats) or -7 (integers): a kernel that
    leaves any element unwritten fails the test."""
    from powerlaw_fast.ops import _alloc

    def nan_empty(shape, *, device, dtype):
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(_alloc, "empty", nan_empty)


@pytest.fixture(autouse=True)
def no_deferred_error_leaks():
    """A deferred validation error left pending by a test would surface in a later, unrelated
    test: each test must raise (or expect) its own."""
    yield
    from powerlaw_fast.ops import status

    if status.pending_count():
        try:
            status.raise_pending_errors()
        except ValueError as err:
            status.discard_pending()
            pytest.fail(f"the test left a deferred validation error unraised: {err}")


@pytest.fixture(params=["device", "deferred"])
def deferral(request):
    """Run the test on the device's own error path and on the GPU's deferred one (simulated on
    a CPU): see tests/devices.py ``deferral_context`` and ``raises_validation``."""
    from tests.devices import deferral_context

    with deferral_context(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --------------------------------------------------------------------------------------------
# Another CPU's libm, and the property tests' example budget (tests/ops/test_properties.py)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def other_libm(monkeypatch):
    """Run the test as on a CPU whose vectorised float32 ``log``/``exp`` is one ulp off (an
    AVX2 libm, where an AVX-512 one rounds correctly; issue 28): every float32 result of
    ``torch.log``/``torch.exp`` (functions and methods) is moved one ulp up with
    ``torch.nextafter``. float64 is left alone, so the oracle is not affected. Undone after the
    test by ``monkeypatch``. The same trick as ``../shared/tools/nudge_libm.py``."""

    def nudged(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel():
                out = torch.nextafter(out, torch.full_like(out, float("inf")))
            return out

        return call

    for owner in (torch, torch.Tensor):
        for name in ("log", "exp"):
            monkeypatch.setattr(owner, name, nudged(getattr(owner, name)))
    return "nudged"


@pytest.fixture(params=["exact", "nudged"])
def libm(request):
    """Parametrise a numeric test of the torch twins over this machine's libm and the
    :func:`other_libm` emulation."""
    if request.param == "nudged":
        request.getfixturevalue("other_libm")
    return request.param


try:
    from hypothesis import HealthCheck, settings

    _common = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                         HealthCheck.too_slow])  # fmt: skip
    # "ci" (default): few examples, derandomised, so a run's verdict is reproducible;
    # "many" (HYPOTHESIS_PROFILE=many, ``nox -s properties``): a real search.
    settings.register_profile("ci", max_examples=30, derandomize=True, **_common)
    settings.register_profile("many", max_examples=400, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; the property tests skip without it
    pass


# --------------------------------------------------------------------------------------------
# An op's two paths (powerlaw_fast/ops/_autograd.py): its eager autograd node, and its custom
# ops with their registered autograd, which torch.compile runs
# --------------------------------------------------------------------------------------------
def as_if_compiling(monkeypatch):
    """Make ``torch.compiler.is_compiling()`` true in eager mode: a call then goes through the
    custom ops and their registered autograd exactly as a compiled graph does, minus the
    tracing (so mutation tests, whose trampolines torch.compile cannot trace, see that path)."""
    import torch._dynamo  # noqa: F401  (first imported under the patch, it would keep it)

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@pytest.fixture(params=["eager", "custom ops"])
def op_path(request, monkeypatch):
    """Run the test on each of an op's two paths."""
    if request.param == "custom ops":
        as_if_compiling(monkeypatch)
    return request.param


def record_launches(monkeypatch, module, names):
    """Replace ``module._kernels()`` by recorders of the kernels ``names``: each launch is
    written down as (kernel, grid, positional arguments, keyword arguments) instead of run.
    Returns the list they are written to."""
    import types

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, grid, args, kwargs))

    kernels = types.SimpleNamespace(**{name: Recorder(name) for name in names})
    monkeypatch.setattr(module, "_kernels", lambda: kernels)
    return calls
