"""benchmarks/tables.py (tables, ratios, the plot), targets.py (verdicts) and readme_block.py
(the README block), from small synthetic results files written to tmp_path only.

Every number below is made-up test data, chosen so that each verdict is known in advance; none
of it is a measurement and none of it is written under benchmarks/results.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks import readme_block, targets
from benchmarks import tables as report

FAKE_GPU = "FakeGPU (synthetic test data)"
ENV = {"device": FAKE_GPU, "torch": "0.0-test", "triton": "0.0-test",
       "date": "2000-01-01T00:00:00+00:00", "commit": "0123456789abcdef"}


def penalty_row(N, impl, ms, dtype="float32", precision="highest"):
    B = 3 * N // 2
    return dict(op="spec_penalty", mode="fwd+bwd", B=B, N=N, dtype=dtype, precision=precision,
                impl=impl, median_ms=ms, peak_mem_mb=1.0, tflops=4 * B * N * N / ms / 1e9)


# fake times (ms) per N: triton, torch_projection, torch_covariance, authors_loop, gemm_floor
PENALTY_MS = {
    1024: (1.0, 2.5, 4.0, 150.0, 0.8),
    2048: (2.0, 3.0, 7.0, 100.0, 1.8),
    4096: (4.0, 5.2, 20.0, None, 3.5),
    8192: (10.0, 11.0, 50.0, None, 7.0),
}
IMPLS = ("triton", "torch_projection", "torch_covariance", "authors_loop", "gemm_floor")


def penalty_rows():
    rows = [penalty_row(N, impl, ms) for N, times in PENALTY_MS.items()
            for impl, ms in zip(IMPLS, times, strict=True) if ms is not None]
    rows += [penalty_row(1024, "triton", 0.5, "bfloat16", "high"),
             penalty_row(1024, "torch_projection", 1.5, "bfloat16", "high")]
    return rows


def training_rows():
    step = dict(op="train_step", B=1500, N=1000, precision="highest", peak_mem_mb=1.0)
    return [
        {**step, "mode": "vanilla", "dtype": "float32", "impl": "no penalty", "median_ms": 10.0},
        {**step, "mode": "specreg", "dtype": "float32", "impl": "x", "median_ms": 12.0},
        {**step, "mode": "authors", "dtype": "float32", "impl": "y", "median_ms": 500.0},
        {**step, "mode": "vanilla", "dtype": "bfloat16", "impl": "no penalty", "median_ms": 5.0},
        {**step, "mode": "specreg", "dtype": "bfloat16", "impl": "x", "median_ms": 8.0},
        dict(op="refresh", mode="mlp", B=60000, N=1000, widths=[1000, 1000, 1000],
             dtype="float32", precision="float64", impl="r", median_ms=800.0, peak_mem_mb=2.0),
        dict(op="refresh", mode="cnn", B=60000, N=2704, widths=[2704, 800, 1000],
             dtype="float32", precision="float64", impl="r", median_ms=1500.0, peak_mem_mb=2.0),
    ]


def attack_row(model, attack, impl, ms, accuracy):
    return dict(model=model, attack=attack, impl=impl, n=10000, eps=[0.0, 0.1, 0.2],
                steps=40 if attack == "pgd" else 1, step_size=0.01, dtype="float32",
                matmul_precision="highest", median_ms=ms, accuracy=accuracy)


def attack_rows():
    acc = [0.9, 0.5, 0.1]
    return [
        attack_row("mlp", "pgd", "ours_graph", 100.0, acc),
        attack_row("mlp", "pgd", "ours_eager", 200.0, acc),
        attack_row("mlp", "pgd", "plain_loop", 1000.0, acc),
        attack_row("mlp", "pgd", "torchattacks", 450.0, acc),
        attack_row("cnn", "pgd", "ours_graph", 100.0, acc),
        attack_row("cnn", "pgd", "ours_eager", 150.0, acc),
        attack_row("cnn", "pgd", "plain_loop", 900.0, acc),
        # ours 0.2 pp above torchattacks at one eps (a weaker attack there)
        attack_row("cnn", "pgd", "torchattacks", 1000.0, [0.9, 0.498, 0.1]),
        attack_row("mlp", "fgsm", "ours", 10.0, acc),
        attack_row("mlp", "fgsm", "plain_loop", 30.0, acc),
        dict(model="mlp", attack="fgsm", impl="torchattacks",
             note="torchattacks not installed: skipped"),
    ]


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "results" / "FakeGPU_synthetic_test_data"
    folder.mkdir(parents=True)
    for name, rows in (("penalty", penalty_rows()), ("training", training_rows()),
                       ("attacks", attack_rows())):
        (folder / f"{name}.json").write_text(json.dumps({**ENV, "rows": rows}))
    return tmp_path / "results"


@pytest.fixture
def files(results_dir):
    return report.load_results(results_dir)


def by_name(files, name):
    return [f for f in files if f.benchmark == name]


def verdict_map(verdicts):
    return {(v.scope.split(", ")[-1], v.target): v for v in verdicts}


def test_load_results_reads_every_file(files):
    assert sorted(f.benchmark for f in files) == ["attacks", "penalty", "training"]
    assert all(f.device == FAKE_GPU and f.commit == ENV["commit"] for f in files)


def test_load_results_rejects_bad_json(tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "penalty.json").write_text("{not json")
    with pytest.raises(ValueError, match="penalty.json"):
        report.load_results(tmp_path)
    (tmp_path / "gpu" / "penalty.json").write_text(json.dumps({"rows": "nope"}))
    with pytest.raises(ValueError, match="'rows' list"):
        report.load_results(tmp_path)


def test_penalty_table_has_times_ratios_and_tflops(files):
    table = report.penalty_table(by_name(files, "penalty"))
    lines = table.splitlines()
    assert lines[0] == ("| GPU | N | B | dtype / precision | ours | ours ms | ours TFLOP/s | "
                        "torch_projection ms (ratio) | torch_covariance ms (ratio) | "
                        "authors_loop ms (ratio) | gemm_floor ms (ratio) |")
    tflops = 4 * 1536 * 1024 * 1024 / 1.0 / 1e9
    assert (f"| {FAKE_GPU} | 1024 | 1536 | float32 / highest | triton | 1.00 | {tflops:.1f} | "
            "2.50 (2.50x) | 4.00 (4.00x) | 150 (150x) | 0.800 (0.80x) |") in lines
    assert (f"| {FAKE_GPU} | 8192 | 12288 | float32 / highest | triton | 10.0 | "
            in table)
    assert "11.0 (1.10x) | 50.0 (5.00x) | – | 7.00 (0.70x) |" in table
    assert f"| {FAKE_GPU} | 1024 | 1536 | bfloat16 / high | triton | 0.500 |" in table
    assert len(lines) == 2 + 4 + 1  # header, rule, four float32 widths, one bfloat16


def test_penalty_verdicts(files):
    verdicts = verdict_map(targets.penalty_verdicts(by_name(files, "penalty")))
    t = [target.text for target in targets.PENALTY_TARGETS]
    first = verdicts[("triton", t[0])]
    assert first.status == "NOT met"  # the worst width counts in each setting
    assert "float32/highest: 1.50x at N=2048, target >= 3.00x" in first.line()
    assert any(c.ok and "bfloat16/high" in repr(c) for c in first.checks)  # met there
    assert verdicts[("triton", t[1])].status == "not measured"  # no compiled_projection rows
    assert verdicts[("triton", t[2])].line().endswith(
        "NOT met (float32/highest: 1.30x at N=4096, target >= 1.50x)")
    assert verdicts[("triton", t[3])].line().endswith(
        "NOT met (float32/highest: 1.43x the floor at N=8192, target <= 1.10x)")
    assert verdicts[("triton", t[4])].status == "met"
    assert "float32/highest: 1.10x at N=8192" in verdicts[("triton", t[4])].line()


def test_penalty_target_not_measured_without_the_width(files):
    f = by_name(files, "penalty")[0]
    f.rows = [r for r in f.rows if r["N"] != 4096]
    verdicts = verdict_map(targets.penalty_verdicts([f]))
    assert verdicts[("triton", targets.PENALTY_TARGETS[2].text)].status == "not measured"


def test_training_tables_and_verdicts(files):
    training = by_name(files, "training")
    text = report.training_tables(training)
    # files without model/execution/penalty_dtype fields: the eager MLP, penalty in the model's
    # dtype; each row against vanilla in the same model, execution and dtype
    assert (f"| {FAKE_GPU} | mlp | B=1500, N=1000 | eager | float32 / highest | specreg | model "
            "| 12.0 (1.20x) |") in text
    assert (f"| {FAKE_GPU} | mlp | B=1500, N=1000 | eager | bfloat16 / highest | specreg | "
            "model | 8.00 (1.60x) |") in text
    assert (f"| {FAKE_GPU} | mlp | B=1500, N=1000 | eager | float32 / highest | authors | model "
            "| 500 (50.0x) |") in text
    assert f"| {FAKE_GPU} | cnn | 60000 | 2704, 800, 1000 | 1500 | 2.00 |" in text
    step, refresh = targets.training_verdicts(training)
    assert step.status == "NOT met"
    assert step.line().endswith(
        "NOT met (eager bfloat16, penalty model: 1.60x vanilla, target <= 1.30x)"
    )
    assert refresh.line().endswith("NOT met (cnn: 1.50 s, target < 1 s)")


def test_attack_table_and_verdicts(files):
    attacks = by_name(files, "attacks")
    text = report.attacks_table(attacks)
    assert (f"| {FAKE_GPU} | mlp | pgd | n=10000 x 3 eps, 40 steps | float32 / highest | "
            "ours_graph | 100 | 1000 (10.0x) | 450 (4.50x) | 0.00 |") in text
    assert "| cnn | pgd | n=10000 x 3 eps, 40 steps | float32 / highest | ours_graph | 100 | " \
        "900 (9.00x) | 1000 (10.0x) | 0.20 |" in text
    assert "| mlp | fgsm | n=10000 x 3 eps, 1 step | float32 / highest | ours | 10.0 | " \
        "30.0 (3.00x) | skipped | – |" in text
    # one-sided: ours 2 pp below torchattacks (a stronger attack) counts as no gap at all
    stronger = [dict(r, accuracy=[0.9, 0.52, 0.1]) if "accuracy" in r and
                r["impl"] == "torchattacks" else r for r in attacks[0].rows]  # fmt: skip
    assert "| 100 | 900 (9.00x) | 1000 (10.0x) | 0.00 |" in report.attacks_table(
        [dataclasses.replace(attacks[0], rows=stronger)])
    verdicts = verdict_map(targets.attack_verdicts(attacks))
    graph = verdicts[("ours_graph", targets.ATTACK_TARGET)]
    assert graph.line().endswith("NOT met (cnn/pgd: 10.0x, 0.20 pp)")
    eager = verdicts[("ours_eager", targets.ATTACK_TARGET)]
    assert eager.line().endswith("NOT met (mlp/pgd: 2.25x, 0.00 pp; cnn/pgd: 6.67x, 0.20 pp)")
    fgsm = verdicts[("ours", targets.ATTACK_TARGET)]
    assert fgsm.status == "not measured"
    assert "torchattacks not installed" in fgsm.line()


def test_attack_target_met_when_fast_and_accurate(files):
    f = by_name(files, "attacks")[0]
    f.rows = [r for r in f.rows if r["model"] == "mlp" and r["attack"] == "pgd"]
    verdicts = verdict_map(targets.attack_verdicts([f]))
    assert verdicts[("ours_graph", targets.ATTACK_TARGET)].line().endswith(
        "met (mlp/pgd: 4.50x, 0.00 pp)")


def test_every_target_listed_as_not_measured_without_results():
    lines = [v.line() for v in targets.all_verdicts([])]
    assert len(lines) == (len(targets.PENALTY_TARGETS) + len(targets.TRAINING_TARGETS) + 1
                          + len(targets.BASIS_TARGETS))
    assert all(line.split(": ")[-1].startswith("not measured") for line in lines)


def test_plot_is_written_next_to_the_json(files):
    f = by_name(files, "penalty")[0]
    path = report.plot_penalty_speedup(f)
    assert path == f.path.with_name("penalty_speedup.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


README_TEXT = "# Title\n\nintro\n\n{block}\n## Next\n\ntail\n"
MARKED = f"{readme_block.START_MARKER}\nold numbers typed by hand\n{readme_block.END_MARKER}"


def test_replace_marked_block():
    text = README_TEXT.format(block=MARKED)
    new = readme_block.replace_marked_block(text, "| new | table |\n")
    assert new == README_TEXT.format(
        block=f"{readme_block.START_MARKER}\n| new | table |\n{readme_block.END_MARKER}")
    assert readme_block.replace_marked_block(new, "| new | table |") == new
    assert readme_block.replace_marked_block("no markers here\n", "x") is None
    with pytest.raises(ValueError, match="expected one"):
        readme_block.replace_marked_block(f"{readme_block.START_MARKER}\nno end\n", "x")
    with pytest.raises(ValueError, match="comes before"):
        reversed_markers = f"{readme_block.END_MARKER}\n{readme_block.START_MARKER}\n"
        readme_block.replace_marked_block(reversed_markers, "x")


def test_main_rewrites_the_readme_block_and_plots(results_dir, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT.format(block=MARKED))
    assert readme_block.main(["--results", str(results_dir), "--readme", str(readme),
                        "--write-readme"]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith("\n## Next\n\ntail\n")
    block = text.split(readme_block.START_MARKER)[1].split(readme_block.END_MARKER)[0]
    assert "old numbers typed by hand" not in block
    assert "2.50 (2.50x)" in block and "### Targets" in block
    assert "`results/FakeGPU_synthetic_test_data/penalty.json`: " + FAKE_GPU in block
    assert "commit `0123456789`" in block
    assert "](results/FakeGPU_synthetic_test_data/penalty_speedup.png)" in block
    assert (results_dir / "FakeGPU_synthetic_test_data" / "penalty_speedup.png").is_file()
    assert "speed block rewritten" in capsys.readouterr().out
    readme_block.main(["--results", str(results_dir), "--readme", str(readme), "--write-readme",
                 "--no-plot"])
    assert "](results/" not in readme.read_text()


def test_main_leaves_a_readme_without_markers_alone(results_dir, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert readme_block.main(["--results", str(results_dir), "--readme", str(readme),
                        "--write-readme", "--no-plot"]) == 0
    assert readme.read_text() == "# no markers\n"
    out = capsys.readouterr().out
    assert "README not changed" in out and "| triton | 1.00 |" in out


def test_main_without_results_writes_nothing(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT.format(block=MARKED))
    (tmp_path / "results").mkdir()
    assert readme_block.main(["--results", str(tmp_path / "results"), "--readme", str(readme),
                        "--write-readme"]) == 0
    assert "nothing to report" in capsys.readouterr().out
    assert readme.read_text() == README_TEXT.format(block=MARKED)
    assert list((tmp_path / "results").iterdir()) == []


def test_basis_verdicts_compare_tracked_with_the_per_epoch_step(tmp_path):
    """Issue 26's targets from a basis.json: each width's tracked step over its epoch step."""
    rows = [{"kind": "step", "N": n, "mode": mode, "median_ms": ms}
            for n, times in {500: (10.0, 12.5), 2000: (10.0, 14.0), 8192: (10.0, 14.0)}.items()
            for mode, ms in zip(("epoch", "tracked"), times, strict=True)]
    rows.append({"kind": "quality", "N": 500, "mode": "tracked_sweeps", "spectrum_error": 0.0})
    folder = tmp_path / "FakeGPU"
    folder.mkdir()
    (folder / "basis.json").write_text(json.dumps({**ENV, "rows": rows}))
    verdicts = targets.basis_verdicts(report.load_results(tmp_path))
    small, wide = verdicts
    assert small.status == "NOT met" and "N = 2000: 1.40x" in small.line()
    assert "N = 500:" not in small.line()  # 1.25x meets it; only the misses are listed
    assert wide.status == "met" and "N = 8192: 1.40x" in wide.line()
    assert [v.status for v in targets.basis_verdicts([])] == ["not measured"] * 2
