"""The import rules of docs/architecture.md: which part may import which, and no circles.

Reads every module of the package with ``ast`` (nothing is imported) and collects
its imports of ``hessbench`` modules: at module level and inside functions alike
(a lazy import is still a dependency); only ``if TYPE_CHECKING:`` blocks are left
out. Each module belongs to a *part*: its subpackage (``hessbench.run.pool`` ->
``run``) or, for a top-level module, its own name (``cli``, ``errors``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hessbench"

# part -> the other parts it may import (keep in sync with docs/architecture.md)
ALLOWED: dict[str, set[str]] = {
    "hessbench": {"errors"},
    "errors": set(),
    "estimators": {"errors"},
    "suite": {"errors", "estimators"},
    "bench": {"errors", "estimators", "suite"},
    "store": {"errors", "hessbench"},
    "run": {"errors", "estimators", "suite", "bench", "store"},
    "report": {"errors"},
    "optim": {"errors", "estimators", "suite"},
    "kinds": {"errors", "estimators", "suite", "bench", "store", "run", "report", "optim"},
    "train": {
        "errors",
        "estimators",
        "suite",
        "bench",
        "store",
        "run",
        "report",
        "optim",
        "kinds",
    },
    "rl": {"errors", "estimators", "suite", "store", "run", "report", "optim", "kinds"},
    "cli": {"hessbench", "errors", "estimators", "suite", "store", "report", "kinds"},
    "__main__": {"cli"},
}

# modules held to a narrower rule than their part
PURE: dict[str, set[str]] = {
    # measurement and metrics are pure functions of tensors and callables
    "hessbench.bench.measure": set(),
    "hessbench.bench.metrics": set(),
    # the optimizer's update rule needs estimators only, never a suite
    "hessbench.optim.diagonal": {"hessbench.errors", "hessbench.estimators"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(module: str) -> set[str]:
    """The ``hessbench`` modules that ``module`` imports anywhere (bar TYPE_CHECKING)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            sub = [f"{node.module}.{a.name}" for a in node.names]
            names = [s if s in MODULES else node.module for s in sub]
        out.update(_resolve(n) for n in names if n.split(".")[0] == "hessbench")
    out.discard(module)
    return out


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "hessbench"


GRAPH = {m: imports_of(m) for m in MODULES}


for _deps in ALLOWED.values():
    _deps.add("hessbench")  # the root package: the version and the errors, for everyone


def test_every_part_has_a_rule():
    assert {part(m) for m in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_parts_rules(module):
    own = part(module)
    bad = sorted(
        f"{module} -> {dep}"
        for dep in GRAPH[module]
        if part(dep) != own and part(dep) not in ALLOWED[own]
    )
    assert not bad, f"part {own!r} may import only {sorted(ALLOWED[own])}: {bad}"


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_import_only_their_allowance(module):
    deps = {d for d in GRAPH[module] if d != "hessbench.errors"}
    assert all(any(d == a or d.startswith(a + ".") for a in PURE[module]) for d in deps), deps


def _private(module: str) -> bool:
    return any(p.startswith("_") and p != "__init__" for p in module.split(".")[1:])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_module_is_imported_from_another_part(module):
    bad = sorted(d for d in GRAPH[module] if _private(d) and part(d) != part(module))
    assert not bad, f"{module} imports private modules of another part: {bad}"


def test_no_import_circle():
    """Depth-first search for a back edge over module-level and lazy imports alike."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                circles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not circles, circles


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a report module importing the estimators is flagged."""
    fake = "hessbench.report.fake_check"
    path = tmp_path / "fake_check.py"
    path.write_text("def f():\n    from hessbench.estimators import get_estimator\n")
    MODULES[fake] = path
    try:
        deps = imports_of(fake)
    finally:
        del MODULES[fake]
    assert deps == {"hessbench.estimators"}
    assert "estimators" not in ALLOWED[part(fake)]


def _fresh_modules(code: str) -> set[str]:
    """The modules loaded by a fresh interpreter after running ``code``."""
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_the_estimator_and_measurement_path_imports_no_heavy_library():
    """Worker start-up and a cell's metrics: no pandas, matplotlib or scipy.

    The optional peers (BackPACK, curvlinops, which import scipy) are registered
    only when a lookup needs them, so built-in estimators never load them.
    """
    loaded = _fresh_modules(
        "import torch\n"
        "import hessbench.bench.cell, hessbench.bench.measure, hessbench.bench.metrics\n"
        "import hessbench.run.cells, hessbench.estimators\n"
        "hessbench.estimators.get_estimator('hesscale')\n"
        "t = {'w': torch.arange(5.0)}\n"
        "hessbench.bench.metrics.batch_metrics({'w': t['w'].flip(0)}, t)"
    )
    assert not {"pandas", "matplotlib", "scipy", "backpack", "curvlinops"} & loaded


def test_memory_measurement_does_not_import_the_compiler_stack():
    """The CPU memory profiler must not pull torch._dynamo/_inductor (seconds per worker)."""
    loaded = _fresh_modules(
        "import torch\nfrom hessbench.bench.measure import peak_memory\n"
        "peak_memory(lambda: torch.ones(10), torch.device('cpu'))"
    )
    assert "torch._dynamo" not in loaded
    assert "torch._inductor" not in loaded
