"""The README's training-loop quickstart runs exactly as written and prints what it says."""

import ast
import builtins
import contextlib
import io
import re
import textwrap
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_section() -> str:
    return README.read_text().split("## Quickstart: a training loop", 1)[1].split("\n## ", 1)[0]


def quickstart_code() -> str:
    return re.search(r"```python\n(.*?)```", quickstart_section(), re.S).group(1)


EPOCH_LINE = re.compile(r"beta (\d+), epoch +(\d+): cross-entropy ([\d.]+), penalty R ([\d.]+), "
                        r"test accuracy ([\d.]+)")
TABLE_ROW = re.compile(r"^beta (\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +(\d+)$", re.M)


def parse_quickstart(text: str) -> tuple[dict, dict]:
    """``{(beta, epoch): (cross-entropy, R, test accuracy)}`` and ``{beta: (clean, PGD 0.05,
    PGD 0.1, alpha, 90% dimension)}`` from the quickstart's output."""
    epochs = {(int(b), int(e)): tuple(map(float, rest))
              for b, e, *rest in EPOCH_LINE.findall(text)}
    table = {int(b): tuple(map(float, rest)) for b, *rest in TABLE_ROW.findall(text)}
    return epochs, table


def stated_output() -> tuple[dict, dict]:
    """What the README says the quickstart printed."""
    block = re.findall(r"```text\n(.*?)```", quickstart_section(), re.S)[0]
    return parse_quickstart(block)


def test_quickstart_is_device_agnostic_and_states_its_data():
    code = quickstart_code()
    assert ".cuda()" not in code and ".to(device)" in code
    assert "reg.refresh(x)" in code and "reg.penalty()" in code
    assert "(ce + beta * R).backward()" in code  # cross-entropy and penalty kept apart
    assert "6,000-image MNIST subset shipped" in quickstart_section()
    epochs, table = stated_output()
    assert sorted(epochs) == [(b, e) for b in (0, 1) for e in (5, 10, 15, 20)]
    assert sorted(table) == [0, 1]
    assert len(code.splitlines()) <= 60  # short enough to read


def test_the_stated_output_shows_the_point():
    """What the README's prose says of the output, checked on the output it quotes: two
    trained networks (>= 0.9 clean), the regularised one clearly more robust to PGD, with a
    flatter, higher-dimensional spectrum; R lower for the network trained on it."""
    epochs, table = stated_output()
    check_the_point(epochs, table)


def check_the_point(epochs: dict, table: dict) -> None:
    plain, regularised = table[0], table[1]
    assert plain[0] >= 0.9 and regularised[0] >= 0.9, table  # trained
    assert regularised[1] >= plain[1] + 0.1, table  # PGD at eps 0.05
    assert regularised[2] > plain[2], table  # PGD at eps 0.1
    assert 1.0 < regularised[3] < plain[3], table  # alpha nearer 1, not 1/n
    assert regularised[4] >= 2 * plain[4], table  # 90%-variance dimension
    assert epochs[1, 20][1] < epochs[0, 20][1] / 2, epochs  # R: trained on vs measured


# The largest difference to the README's numbers another CPU, thread count or GPU may print:
# three times the largest spread over seeds 0, 1 and 2 on the recording machine (a different
# rounding amounts to a different seed after 400 Adam steps), per quantity, rounded up. The
# spreads (2026-12-03): cross-entropy 0.011, R 0.076, test accuracy 0.011; clean 0.011, PGD
# 0.012 and 0.015, alpha 0.07, dimension 2.
TOLERANCE_EPOCH = (0.04, 0.25, 0.04)  # cross-entropy, R, test accuracy
TOLERANCE_TABLE = (0.04, 0.04, 0.05, 0.21, 6)  # clean, PGD 0.05, PGD 0.1, alpha, dimension


@pytest.mark.slow
def test_quickstart_runs_as_written_and_prints_the_stated_numbers(monkeypatch):
    monkeypatch.delenv("POWERLAW_FAST_DATA", raising=False)  # the shipped subset, as stated
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(quickstart_code(), str(README), "exec"), namespace)
    epochs, table = parse_quickstart(printed.getvalue())
    want_epochs, want_table = stated_output()
    assert sorted(epochs) == sorted(want_epochs) and sorted(table) == sorted(want_table)
    # seeded: the same digits on the machine the README names (benchmarks/readme_numbers.py
    # recorded them); other CPUs and GPUs round differently along the way
    for got, want, tolerance in [(epochs[k], want_epochs[k], TOLERANCE_EPOCH) for k in epochs] + [
            (table[k], want_table[k], TOLERANCE_TABLE) for k in table]:
        for a, b, tol in zip(got, want, tolerance, strict=True):
            assert abs(a - b) <= tol, (got, want)
    check_the_point(epochs, table)


# --- Issue 25: the first screen, the report in its own file, a runnable robustness snippet ---

REPORT = README.parent / "benchmarks" / "results" / "cpu" / "reproduce" / "REPORT.md"
DEMO_COMMAND = ('pip install torch==2.13.0 && pip install -e ".[plot]" && '
                "python -m powerlaw_fast demo")
TEST_COMMAND = ('pip install torch==2.13.0 && pip install -e ".[test,plot]" && '
                "python -m pytest tests")


def section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_first_screen_says_what_for_whom_where_it_stands_then_the_two_commands():
    text = README.read_text()
    first = text.split("\n## Install\n", 1)[0]  # everything before the install details
    # a screen: both commands within the first 50 lines
    assert TEST_COMMAND in "\n".join(text.splitlines()[:50]), "past the first screen"
    intro = first.split("\n## Two commands\n", 1)[0]
    assert "PyTorch library for the 1/n spectral regulariser" in intro
    assert "**For** researchers" in intro
    assert "No GPU\n  numbers exist yet" in intro and '"not measured"' in intro
    for verdict in ("**holds**", "**does not hold**", "**contradicted**", "**not measured**"):
        assert verdict in intro, verdict
    assert "](benchmarks/results/cpu/reproduce/REPORT.md)" in intro  # one click to the report
    # the two commands, exactly as before, right after the introduction
    commands = re.findall(r"```bash\n(.*?)\n```", first.split("\n## Two commands\n", 1)[1], re.S)
    assert commands == [DEMO_COMMAND, TEST_COMMAND]


def test_the_research_report_lives_in_its_own_file_with_the_same_verdicts():
    report = REPORT.read_text()
    summary = section("Does it reproduce?")
    assert "](benchmarks/results/cpu/reproduce/REPORT.md)" in summary
    # the long report moved: its reasoning and evidence are in REPORT.md, not the README
    for moved in ("Why the spectrum does not follow 1/n as the paper trains it",
                  "Where the robustness comes from, as far as the CPU runs show",
                  "**Full scale, NVIDIA H200**"):
        assert moved in report and moved not in README.read_text(), moved
    row = re.compile(r"^\| (.+?) \| (\*\*.+?\*\*[^|]*?) \|", re.M)
    full = {claim: verdict.strip() for claim, verdict in row.findall(report)}
    short = {claim: verdict.strip() for claim, verdict in row.findall(summary)}
    assert len(short) == 10 and short == full
    # the report's relative links resolve from its folder
    for target in re.findall(r"\]\((\.[^)#]*)", report):
        assert (REPORT.parent / target).exists(), target


def robustness_code() -> str:
    return re.search(r"```python\n(.*?)```", section("Robustness evaluation"), re.S).group(1)


def test_robustness_snippet_defines_what_it_uses():
    code = robustness_code()
    for name in ("model", "x_test", "y_test"):
        assert re.search(rf"^{name}\b.*=|^{name}, |, {name} =", code, re.M), name
    assert 'load_mnist("shipped"' in code


@pytest.mark.slow
def test_robustness_snippet_runs_as_written(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(robustness_code(), str(README), "exec"), namespace)
    curve = namespace["curve"]
    assert curve.n_samples == 1000 and len(curve.eps) == 11
    acc = [float(a) for a in curve.accuracy]
    assert acc[0] > 0.8, acc  # a trained network
    assert all(b <= a for a, b in zip(acc, acc[1:], strict=False)), acc
    assert (tmp_path / "pgd.json").is_file()
    assert "RobustnessCurve(attack='pgd'" in printed.getvalue()


# --- Every snippet stands on its own: a newcomer can paste any of them ---


def python_blocks() -> list[str]:
    """Every ```python block of the README, its indentation (inside a list item) removed."""
    return [textwrap.dedent(block)
            for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)]


def undefined_names(code: str) -> set[str]:
    """Names the code reads but never binds (imports, assignments, loop and ``with``
    targets, definitions, arguments): what a pasted fragment would raise NameError on."""
    tree = ast.parse(code)
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


def test_undefined_names_finds_a_fragment():
    assert undefined_names("R = spec_penalty(h, V)") == {"spec_penalty", "h", "V"}
    assert undefined_names("import torch as t\nfor i in t.arange(3):\n    f = lambda a: a + i\n"
                           "print(f(1), len([j for j in range(2)]))") == set()


def test_every_python_snippet_defines_what_it_uses():
    blocks = python_blocks()
    assert len(blocks) >= 4  # quickstart, the op, whole-step capture, robustness
    for code in blocks:
        assert undefined_names(code) == set(), code


def snippet(marker: str) -> str:
    (code,) = [code for code in python_blocks() if marker in code]
    return code


def test_the_op_snippet_runs_as_written():
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(snippet("projected_spectrum(h, V)"), str(README), "exec"), namespace)
    R, lam, h = namespace["R"], namespace["lam"], namespace["h"]
    assert R.dim() == 0 and lam.shape == (200,) and h.grad.shape == (300, 200)
    assert torch.isfinite(h.grad).all() and bool(h.grad.abs().sum() > 0)
    assert printed.getvalue().startswith("R = ")


@pytest.mark.gpu  # the snippet captures a CUDA graph
def test_the_whole_step_capture_snippet_trains_on_a_gpu(monkeypatch):
    monkeypatch.delenv("POWERLAW_FAST_DATA", raising=False)
    namespace: dict = {}
    exec(compile(snippet("torch.cuda.CUDAGraph()"), str(README), "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5, accuracy  # replaying the graph trained the network
