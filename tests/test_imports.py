"""The package's import structure: no import loop (function-local imports count: they are how
the last loop hid), and nothing heavy imported with the package (triton, torch._dynamo,
matplotlib, CuPy load on first use, so ``import powerlaw_fast`` and ``--help`` start at once)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("triton", "torch._dynamo", "matplotlib", "cupy", "scipy")


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports anywhere in its source (also inside
    functions); ``from pkg import sub`` is an edge to ``pkg.sub`` when that is a module."""
    modules = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
                subs = [f"{base}.{alias.name}" for alias in node.names]
                wanted = [s for s in subs if s in modules]
                if len(wanted) < len(subs):
                    wanted.append(base)
            else:
                continue
            for target in wanted:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", ["powerlaw_fast", "benchmarks"])
def test_no_import_loop(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_backend_table_is_a_leaf():
    assert import_graph("powerlaw_fast")["powerlaw_fast.ops.backends"] == set()


@pytest.mark.parametrize(
    "code", ["import powerlaw_fast", "import sys; sys.argv = ['x', '--help']\n"
             "from powerlaw_fast.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass"]
)
def test_nothing_heavy_is_imported_with_the_package(code):
    probe = f"{code}\nimport sys\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_no_module_is_longer_than_a_reader_can_hold():
    """Each module reads top to bottom: none over 600 lines (split by concern instead)."""
    long = {str(path.relative_to(ROOT)): n for path in (ROOT / "powerlaw_fast").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 600}  # fmt: skip
    assert long == {}
