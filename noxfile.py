"""Developer sessions: ``nox`` runs the tests; ``nox -s lint``, ``properties``, ``bench``,
``gpu_tests``."""

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

# The CPU wheel of torch must be installed before anything that depends on torch, or pip
# resolves the multi-GB CUDA build.
TORCH = "torch==2.13.0"


@nox.session
def tests(session):
    session.install(TORCH)
    session.install("-e", ".[test,plot]")
    session.install("--no-deps", "torchattacks")  # the PGD cross-check; no torchvision
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@nox.session
def properties(session):
    """The property tests (tests/ops/test_properties.py) with many examples per property
    (hypothesis profile "many"; the default "ci" profile keeps ``nox -s tests`` short)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.env["HYPOTHESIS_PROFILE"] = "many"
    session.run("python", "-m", "pytest", "tests/ops/test_properties.py", "tests/test_oracle.py",
                *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "powerlaw_fast", "tests", "benchmarks", "noxfile.py")


@nox.session
def bench(session):
    """Every benchmark script (needs a CUDA GPU); results land in benchmarks/results/."""
    session.install("-e", ".[bench,plot]")
    for script in ("bench_penalty.py", "bench_training.py", "bench_attacks.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)


@nox.session
def gpu_tests(session):
    """The test suite on a CUDA machine: Triton kernels compiled for real, GPU-only tests on."""
    session.install("-e", ".[test,plot]")
    session.run("python", "-m", "pytest", "tests", "-m", "gpu or not gpu", *session.posargs)
