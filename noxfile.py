"""Developer sessions: ``nox`` runs the tests; ``nox -s lint``, ``properties``, ``mutants``,
``bench``, ``gpu_tests``."""

import json
import random
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

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


# --- mutation testing ----------------------------------------------------------------------

# Module (under powerlaw_fast/) -> the tests that cover it, as pytest arguments. Keep these to
# the tests of that module: mutmut runs every covering test per mutant, so a wide selection
# costs minutes per mutant. Tests that go through torch.compile do not see the mutants (the
# trampolines break compilation); tests that spawn worker processes are never selected by
# mutmut (its coverage pass does not see the workers, which are reported untested), although
# the workers do run a mutant when it is given by hand (they inherit MUTANT_UNDER_TEST and the
# mutants' sys.path): leave both out or --deselect them here, and check a survivor of
# process-group code by running the spawning tests with MUTANT_UNDER_TEST set.
# the regulariser's tests without those that compile (torch.compile) or spawn processes
_REGULARISER_TESTS = [
    "tests/training/test_regularizer.py", "tests/training/test_regulariser_guards.py",
    "--deselect",
    "tests/training/test_regularizer.py::test_torch_compile_of_the_model_fires_the_hooks",
    "--deselect",
    "tests/training/test_regularizer.py::test_whole_training_step_under_torch_compile_matches_eager",
]
_TRACKED_TESTS = [
    "tests/training/test_tracked_basis.py", "--deselect",
    "tests/training/test_tracked_basis.py::test_over_a_process_group_every_rank_tracks_the_single_"
    "process_basis",
]
MUTANT_TESTS = {
    "ops/status.py": ["tests/ops/test_status.py"],
    "ops/_autograd.py": ["tests/ops/test_fused_op.py", "tests/ops/test_covariance.py",
                         "tests/ops/test_spec_penalty_host.py", "--deselect",
                         "tests/ops/test_fused_op.py::test_under_torch_compile_too"],
    "ops/block_eigh.py": ["tests/ops/test_block_eigh.py"],
    "ops/grouped_penalty.py": ["tests/ops/test_grouped_penalty.py",
                               "tests/ops/test_fused_op.py::test_the_grouped_op_through_its_custom_ops",
                               "tests/ops/test_fused_op.py::test_the_grouped_op_passes_opcheck"],
    "ops/powerlaw_penalty.py": ["tests/ops/test_powerlaw_penalty.py"],
    "ops/_settings.py": ["tests/ops/test_settings_and_plan.py",
                         "tests/ops/test_powerlaw_penalty.py"],
    "ops/_plan.py": ["tests/ops/test_settings_and_plan.py"],
    "ops/_layout.py": ["tests/ops/test_settings_and_plan.py"],
    "ops/centring.py": ["tests/ops/test_centring.py"],
    "ops/_triton_gemm.py": ["tests/ops/test_spec_penalty_host.py",
                            "tests/ops/test_settings_and_plan.py", "tests/ops/test_covariance.py",
                            "tests/ops/test_powerlaw_penalty.py"],
    # its process-group code runs in spawned workers: checked by hand (see the comment above)
    "ops/_distributed.py": ["tests/ops/test_spec_penalty.py", "tests/ops/test_covariance.py",
                            "--deselect",
                            "tests/ops/test_spec_penalty.py::test_torch_compile_fullgraph_torch_backend"],
    "ops/backends.py": ["tests/ops/test_covariance.py", "tests/ops/test_settings_and_plan.py"],
    "ops/spectral_penalty.py": ["tests/ops/test_spec_penalty.py",
                                "tests/ops/test_spec_penalty_host.py",
                                "tests/ops/test_spec_penalty_adversarial.py",
                                "tests/ops/test_properties.py", "tests/ops/test_kinks.py",
                                "--deselect",
                                "tests/ops/test_spec_penalty.py::test_torch_compile_fullgraph_torch_backend"],
    "ops/attack_step.py": ["tests/attacks/test_attack_step.py"],
    "ops/covariance.py": ["tests/ops/test_covariance.py", "tests/ops/test_fused_op.py",
                          "--deselect", "tests/ops/test_fused_op.py::test_under_torch_compile_too"],
    "training/fits.py": ["tests/training/test_spectra.py", "tests/training/test_fits.py"],
    "attacks/_common.py": ["tests/attacks/test_common.py", "tests/attacks/test_pgd.py",
                           "tests/attacks/test_search.py",
                           "tests/attacks/test_fgsm.py", "tests/attacks/test_noise.py",
                           "tests/attacks/test_curve.py",
                           "tests/attacks/test_labels_and_noise_checks.py"],
    "attacks/_pgd_final.py": ["tests/attacks/test_pgd.py", "tests/attacks/test_search.py",
                              "tests/attacks/test_curve.py"],
    "attacks/_pgd_search.py": ["tests/attacks/test_search.py", "tests/attacks/test_pgd.py"],
    "attacks/pgd.py": ["tests/attacks/test_pgd.py", "tests/attacks/test_search.py"],
    "attacks/fgsm.py": ["tests/attacks/test_fgsm.py", "tests/attacks/test_search.py",
                        "tests/attacks/test_curve.py"],
    "attacks/curve.py": ["tests/attacks/test_curve.py", "tests/attacks/test_search.py",
                         "tests/attacks/test_labels_and_noise_checks.py"],
    "attacks/noise.py": ["tests/attacks/test_noise.py", "tests/attacks/test_curve.py",
                         "tests/attacks/test_labels_and_noise_checks.py"],
    "training/accumulator.py": ["tests/training/test_accumulator.py",
                                "tests/training/test_spectra.py", "--deselect",
                                "tests/training/test_spectra.py::test_all_reduce_over_two_processes"],
    "training/capture.py": ["tests/training/test_capture.py",
                            "tests/training/test_spectra.py", "--deselect",
                            "tests/training/test_spectra.py::test_all_reduce_over_two_processes"],
    "training/_basis_store.py": ["tests/training/test_basis_store.py", *_REGULARISER_TESTS],
    "training/_hooks.py": ["tests/training/test_hooks.py", *_REGULARISER_TESTS],
    "training/_refresh.py": ["tests/training/test_refresh.py", *_REGULARISER_TESTS],
    "training/_running_basis.py": ["tests/training/test_running_basis.py", *_REGULARISER_TESTS],
    "training/regulariser.py": _REGULARISER_TESTS + _TRACKED_TESTS,
    "training/_tracked_basis.py": _TRACKED_TESTS + _REGULARISER_TESTS,
}
MUTANT_SAMPLE = 150  # mutants per module at most; above that a seeded random sample is run
MUTANT_RESULTS = Path("benchmarks/results/cpu/mutants")
MUTANT_WORK = Path(".nox/mutants-work")
# mutmut's exit codes (mutmut/stats.py) -> the status written down
MUTANT_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
                 34: "skipped", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
                 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}  # fmt: skip
# Generates the mutants (the steps `mutmut run` takes before testing) without testing them, so
# that the session can choose the sample first.
_GENERATE = (
    "import mutmut.__main__ as m; m.makedirs('mutants', exist_ok=True); m.copy_src_dir(); "
    "m.copy_also_copy_files(); m.setup_source_paths(); m.create_mutants(1)"
)


@nox.session
def mutants(session):
    """mutmut, one module at a time with only the tests that cover it (MUTANT_TESTS).

    ``nox -s mutants -- [MODULE ...] [--tests T1,T2] [--sample N] [--seed S] [--jobs J]``:
    MODULE is a path under powerlaw_fast/ (default: every module of MUTANT_TESTS), --tests
    overrides its tests, --sample caps the mutants run (default MUTANT_SAMPLE, 0 = all; the
    sample drawn is written down), --jobs the parallel workers (default 1, one torch thread
    each). Writes benchmarks/results/cpu/mutants/<module>.txt: the score and every mutant not
    killed with its diff. A survivor that cannot change behaviour is recorded by adding a
    line ``equivalent <name>: <reason>`` under it there, one that changes only what a CUDA
    device runs by ``cuda-only <name>: <reason>`` (also a "no tests" mutant, in code that only
    runs on a CUDA device); later runs keep those lines while the mutant survives (or stays
    untested) and score the module without them (the cuda-only ones are for a GPU run to kill).
    """
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.install("mutmut>=3.8,<4")
    args = list(session.posargs)
    options = {"--tests": None, "--sample": str(MUTANT_SAMPLE), "--seed": "0", "--jobs": "1"}
    modules = []
    while args:
        arg = args.pop(0)
        key, eq, value = arg.partition("=")
        if key in options:
            options[key] = value if eq else args.pop(0)
        else:
            modules.append(arg.removeprefix("powerlaw_fast/"))
    modules = modules or list(MUTANT_TESTS)
    session.env.setdefault("OMP_NUM_THREADS", "1")
    root = Path.cwd()
    for module in modules:
        tests = options["--tests"].split(",") if options["--tests"] else MUTANT_TESTS.get(module)
        if not tests:
            session.error(f"{module}: no tests known for it; pass --tests")
        _mutate_module(session, root, module, tests, sample=int(options["--sample"]),
                       seed=int(options["--seed"]), jobs=int(options["--jobs"]))  # fmt: skip


def _mutate_module(session, root, module, tests, *, sample, seed, jobs):
    source = f"powerlaw_fast/{module}"
    if not (root / source).is_file():
        session.error(f"{source}: no such file")
    slug = module.removesuffix(".py").replace("/", ".")
    work = root / MUTANT_WORK / slug
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for tree in ("powerlaw_fast", "tests", "csrc"):  # csrc: powerlaw_fast/cuda/csrc links to it
        if (root / tree).is_dir():
            shutil.copytree(root / tree, work / tree, symlinks=True, ignore=ignore)
    # the repository's [tool.mutmut] with this module's paths and tests added
    pyproject = (root / "pyproject.toml").read_text()
    added = (f"source_paths = [\"powerlaw_fast\"]\nonly_mutate = [{json.dumps(source)}]\n"
             f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n")  # fmt: skip
    if "\n[tool.mutmut]\n" in pyproject:
        pyproject = pyproject.replace("\n[tool.mutmut]\n", "\n[tool.mutmut]\n" + added, 1)
    else:
        pyproject += "\n[tool.mutmut]\n" + added
    (work / "pyproject.toml").write_text(pyproject)

    session.chdir(work)
    try:
        session.run("python", "-c", _GENERATE, silent=True)
        meta_path = work / "mutants" / (source + ".meta")
        every = sorted(json.loads(meta_path.read_text())["exit_code_by_key"], key=_mutant_order)
        chosen = every
        if sample and len(every) > sample:
            chosen = sorted(random.Random(seed).sample(every, sample), key=_mutant_order)
        names = chosen if chosen is not every else []
        session.log(f"{source}: {len(chosen)} of {len(every)} mutants, tests {' '.join(tests)}")
        session.run("mutmut", "run", "--max-children", str(jobs), *names, silent=True)
        codes = json.loads(meta_path.read_text())["exit_code_by_key"]
        version = session.run("mutmut", "--version", silent=True).strip().rpartition(" ")[2]
        diffs = {}
        for name in chosen:
            if MUTANT_STATUS.get(codes.get(name), "suspicious") != "killed":
                shown = session.run("mutmut", "show", name, silent=True)
                diffs[name] = [line for line in shown.splitlines()
                               if line[:1] in "-+" and line[:3] not in ("---", "+++")]  # fmt: skip
    finally:
        session.chdir(root)

    out = root / MUTANT_RESULTS / f"{slug}.txt"
    equivalent = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            found = re.match(r"(equivalent|cuda-only) (\S+): (.*)", line.strip())
            if found:
                equivalent[found[2]] = (found[1], found[3])
    status = {name: MUTANT_STATUS.get(codes.get(name), "suspicious") for name in chosen}
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    # a "no tests" mutant is in code no CPU test reaches (e.g. the CUDA-graph capture): it may
    # be written down as cuda-only (or equivalent) like a survivor
    kept = {n: r for n, r in equivalent.items() if status.get(n) in ("survived", "no tests")}
    tags = [tag for tag, _ in kept.values()]
    # a mutant that crashes the test process (a segfault in a kernel launch) failed its tests
    killed = counts.get("killed", 0) + counts.get("segfault", 0)
    changing = len(chosen) - len(kept)
    score = killed / changing if changing else 1.0
    lines = [
        f"# mutmut {version} on {source} (nox -s mutants, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {sys.platform})",
        f"tests: {' '.join(tests)}",
        f"mutants: {len(chosen)} run of {len(every)} generated"
        + (f" (random sample, seed {seed}; the sample is the list below)" if names else " (all)"),
        "counts: " + ", ".join(f"{s} {n}" for s, n in counts.items())
        + f"; of the survivors written down as equivalent {tags.count('equivalent')}, "
        f"as cuda-only {tags.count('cuda-only')}",
        f"score: {killed} killed (segfaults included) / {changing} behaviour-changing on a CPU = "
        f"{100 * score:.1f}%",
        "",
    ]
    if names:
        lines += ["sample:", *(f"  {n}" for n in chosen), ""]
    lines.append("not killed (status, name, diff); an equivalent one is marked by a line "
                 "'equivalent <name>: <reason>' or 'cuda-only <name>: <reason>':")  # fmt: skip
    for name in chosen:
        if status[name] == "killed":
            continue
        lines.append(f"{status[name]} {name}")
        lines += [f"    {d}" for d in diffs.get(name, [])]
        if name in kept:
            lines.append(f"{kept[name][0]} {name}: {kept[name][1]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    session.log(f"{source}: {lines[3]}; {lines[4]} -> {out.relative_to(root)}")


def _mutant_order(name):
    head, _, number = name.rpartition("__mutmut_")
    return head, int(number) if number.isdigit() else 0
