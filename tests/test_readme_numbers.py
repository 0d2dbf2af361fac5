"""The README's measured numbers come from the current code (issue 25).

How: ``benchmarks/readme_numbers.py`` runs the demo and the quickstart and records, beside the
README, what they printed, where and how long they ran, and a digest of the code they ran
(``benchmarks/results/cpu/readme/record.json``, with the demo's ``summary.json``). These tests
check, without running anything heavy,

- that the README's marked blocks are exactly what the record renders, and that the demo's
  claims table in it is re-derived from the recorded per-seed numbers (means and standard
  deviations recomputed seed by seed, the yes/no verdicts from those) and is what the demo
  printed;
- that the digest of today's code (the package's modules without comments and docstrings,
  its shipped data, and the quickstart's code as the README shows it) equals the recorded
  one: any change to code the numbers come from fails here, naming the files, until the
  script is rerun.

Why not rerun the demo and compare floats: it takes minutes, and its floats depend on the CPU
and on the thread count, not only on the code (libm and the BLAS's reduction order; over 96
Adam steps an ulp reaches the third digit: on the recording machine one and two threads print
PGD accuracy 0.275 and 0.298 for the same code). A comparison that passes on every correct
machine must allow the spread between seeds, and that would let a stale number through; the
digest does not depend on the machine and catches every change of the code. The quickstart,
which runs in seconds, is also rerun by ``tests/test_readme.py`` and compared within the seed
spread.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from benchmarks import readme_numbers as rn

FIX = "rerun `python benchmarks/readme_numbers.py` (minutes; see its docstring)"


@pytest.fixture(scope="module")
def record():
    return rn.load_record()


def test_every_block_is_recorded_and_marked_once(record):
    rec, summary = record
    assert set(rec["blocks"]) == set(rn.BLOCKS)
    assert summary is not None
    text = rn.README.read_text()
    for name in rn.BLOCKS:
        start, end = rn.markers(name)
        assert text.count(start) == 1 and text.count(end) == 1, name
    assert all(text.count(m) == 1 for m in rn.DEMO_TIME)


def test_the_readme_blocks_are_what_the_record_renders(record):
    rec, summary = record
    current = rn.readme_blocks(rn.README.read_text())
    for name, body in rn.rendered(rec, summary).items():
        assert current[name] == body, f"README block {name!r} was edited by hand: {FIX}"
        if name in rec["blocks"]:
            assert rec["blocks"][name]["readme"] == body


def test_the_code_has_not_changed_since_the_recorded_runs(record):
    rec, _ = record
    text = rn.README.read_text()
    for name, entry in rec["blocks"].items():
        changed = rn.changed_files(entry["code"], rn.block_digest(name, text))
        assert not changed, (f"the README's {name} numbers were made by other code: "
                             f"{', '.join(changed)} changed since; {FIX}")


def test_the_demo_table_is_rederived_from_the_per_seed_numbers_and_was_printed(record):
    from powerlaw_fast.paper.experiments.demo import claims_table_from_summary

    rec, summary = record
    (figure,) = summary["figures"]
    for curve in figure["curves"]:  # the means and stds the table prints, recomputed
        for key in ("test_accuracy", "alpha_tau_to_n", "effective_dimension"):
            seeds = curve["per_seed"][key]
            assert curve[key]["n"] == len(seeds) == 3
            assert curve[key]["mean"] == pytest.approx(np.mean(seeds), abs=1e-12)
            assert curve[key]["std"] == pytest.approx(np.std(seeds), abs=1e-12)
    table = claims_table_from_summary(figure)
    block = rn.readme_blocks(rn.README.read_text())["demo"]
    assert f"```\n{table}\n```" in block
    assert table in rec["blocks"]["demo"]["stdout"]  # what the demo itself printed
    rows = {}
    for line in table.splitlines()[2:5]:  # label, then "mean +- std" three times
        label, *cells = re.split(r"\s{2,}", line.strip())
        rows[label] = [float(cell.split()[0]) for cell in cells]
    for label in ("specreg (beta=5)", "specreg fresh-basis (beta=5)"):
        robust = rows[label][0] > rows["vanilla"][0]
        near = abs(rows[label][1] - 1.0) <= 0.15
        higher = rows[label][2] > rows["vanilla"][2]
        verdict = (f"  {label}: more robust than vanilla: {'yes' if robust else 'no'}, "
                   f"spectrum within 0.15 of 1/n: {'yes' if near else 'no'}, "
                   f"higher dimension than vanilla: {'yes' if higher else 'no'}")
        assert verdict in table.splitlines()


def test_the_record_names_the_machine_and_the_time_the_readme_states(record):
    rec, _ = record
    text = rn.README.read_text()
    for name, entry in rec["blocks"].items():
        m = entry["machine"]
        assert m["cpu"] and m["logical_cpus"] and m["torch"] and entry["date"]
        assert entry["cpu_seconds"] > 0 and entry["wall_seconds"] > 0
        block = rn.readme_blocks(text)[name]
        assert f"{entry['cpu_seconds']:.0f} s of CPU time" in block
        assert f"{m['logical_cpus']}-core {m['cpu']}" in block and m["torch"] in block
    demo = rec["blocks"]["demo"]
    first_screen = text.split("\n## Install\n", 1)[0]
    assert f"{demo['cpu_seconds']:.0f} s of CPU time" in first_screen
    # the quickstart's claim "well under a minute on one CPU core": its CPU time
    assert rec["blocks"]["quickstart"]["cpu_seconds"] < 60


# --- the checks can fail -------------------------------------------------------------------


def test_a_changed_number_in_the_readme_fails(record):
    rec, summary = record
    text = rn.README.read_text()
    body = rn.readme_blocks(text)["demo"]
    line = body.split("```\n", 1)[1].splitlines()[3]  # specreg (beta=5)
    number = line.split()[2]  # its PGD accuracy
    changed = line.replace(number, f"{float(number) + 0.001:.3f}", 1)
    edited = text.replace(body, body.replace(line, changed))
    assert edited != text
    assert any("'demo' differs" in p for p in rn.stale(rec, summary, edited))
    assert not any("'demo' differs" in p for p in rn.stale(rec, summary, text))


def test_a_changed_recorded_number_fails(record):
    rec, summary = record
    summary = copy.deepcopy(summary)
    curve = summary["figures"][0]["curves"][1]
    curve["robustness"]["pgd"]["mean"] = [v + 0.01 for v in curve["robustness"]["pgd"]["mean"]]
    assert any("'demo' differs" in p for p in rn.stale(rec, summary, rn.README.read_text()))


def test_a_code_change_fails_but_a_comment_or_docstring_does_not(record, monkeypatch):
    rec, summary = record
    real = rn.normalised_code

    def edited(code: bool):
        def normalise(text):
            if "def claims_table_from_summary" in text:  # demo.py
                text = (text.replace("ALPHA_TOLERANCE = 0.15", "ALPHA_TOLERANCE = 0.2") if code
                        else text.replace('"""The demo', '"""The edited demo') + "# a comment\n")
            return real(text)
        return normalise

    text = rn.README.read_text()
    before = rn.stale(rec, summary, text)  # whatever else differs today stays as it is
    monkeypatch.setattr(rn, "normalised_code", edited(code=False))
    assert rn.stale(rec, summary, text) == before
    monkeypatch.setattr(rn, "normalised_code", edited(code=True))
    problems = rn.stale(rec, summary, text)
    assert problems != before
    assert any("powerlaw_fast/paper/experiments/demo.py" in p for p in problems), problems


def test_an_edited_quickstart_fails(record):
    rec, summary = record
    text = rn.README.read_text()
    edited = text.replace("epochs=20", "epochs=21", 1)
    assert edited != text
    problems = rn.stale(rec, summary, edited)
    assert any("README.md#quickstart" in p for p in problems), problems


def test_normalised_code_drops_comments_docstrings_and_blank_lines_only():
    source = ('"""Module doc."""\n\nimport math  # why\n\n\ndef f(x):\n    """Doc."""\n'
              '    # note\n    return math.sqrt(x)  # é\n')
    assert rn.normalised_code(source) == "import math\ndef f(x):\n    return math.sqrt(x)\n"
    assert rn.normalised_code(source.replace("sqrt", "exp")) != rn.normalised_code(source)
    assert json.dumps(rn.code_digest()["files"])  # every package file digested
    assert "powerlaw_fast/paper/data/mnist_subset.npz" in rn.code_digest()["files"]
