"""Suite kinds: one interface for accuracy, train and rl suites.

A *kind* plans, runs, records and reports one sort of suite: ``accuracy``
(estimators against the exact diagonal, :mod:`hessbench.kinds.accuracy`),
``train`` (optimizer benchmarks, :mod:`hessbench.train.cli`) and ``rl``
(:mod:`hessbench.rl.cli`). The command line is option parsing and dispatch: it
reads a suite's top-level ``kind:`` field (or a run folder's metadata), finds the
kind here and calls it. Each kind declares which ``hessbench run`` options apply
to it; any other given option is refused with one line naming the flag.

A fourth kind is one new module with a ``KIND`` object (see :class:`SuiteKind`)
and one line in :data:`KINDS`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hessbench.errors import HessbenchError

__all__ = [
    "KINDS",
    "RunRequest",
    "SuiteKind",
    "check_request",
    "declared_kind",
    "first_line",
    "get_kind",
    "kind_of_run",
    "kind_of_suite",
    "prestart_workers",
]

KINDS: dict[str, str] = {
    "accuracy": "hessbench.kinds.accuracy",
    "train": "hessbench.train.cli",
    "rl": "hessbench.rl.cli",
}
"""Kind name -> module holding its ``KIND`` (imported on first use: ``--help`` stays fast)."""


def prestart_workers() -> None:
    """Start the local workers' fork server now (:func:`hessbench.run.pool.start_server`).

    It imports torch and the accuracy cells' modules in the background, while
    this process imports its own and reads the suite.
    """
    from hessbench.run.pool import start_server

    start_server("hessbench.run.cells")


@dataclass(frozen=True)
class RunRequest:
    """Every option of ``hessbench run``, as given (defaults mean "not given")."""

    suite: Path
    output: Path | None = None
    jobs: int = 1
    estimators: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    dry_run: bool = False
    retry_failed: bool = False
    force: bool = False
    quick: bool = False
    device: str | None = None
    executor: str = "local"
    shard: str | None = None
    no_wait: bool = False
    chunks: int | None = None
    partition: str | None = None
    time_min: float | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    gpus: int | None = None

    def given(self) -> list[str]:
        """The options that differ from their defaults (``suite`` excluded)."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name != "suite" and getattr(self, f.name) != f.default
        ]


FLAGS: dict[str, str] = {
    "output": "--output",
    "jobs": "--jobs",
    "estimators": "--estimator",
    "tasks": "--task",
    "seeds": "--seed",
    "dry_run": "--dry-run",
    "retry_failed": "--retry-failed",
    "force": "--force",
    "quick": "--quick",
    "device": "--device",
    "executor": "--executor",
    "shard": "--shard",
    "no_wait": "--no-wait",
    "chunks": "--chunks",
    "partition": "--partition",
    "time_min": "--time",
    "cpus_per_task": "--cpus-per-task",
    "mem_gb": "--mem-gb",
    "gpus": "--gpus",
}
"""The command-line flag of each :class:`RunRequest` field, for error messages."""


class SuiteKind(Protocol):
    """What the command line needs from a suite kind.

    Every method returns the command's exit code (0 ok, 1 some unit failed, 130
    interrupted) and raises :class:`~hessbench.errors.HessbenchError` for bad
    input (printed as one line, exit 2).
    """

    name: str
    run_options: frozenset[str]
    """The :class:`RunRequest` fields this kind uses; other given options are refused."""

    def validate(self, suite: Path) -> int:
        """Check a suite file and print what it would run."""
        ...

    def describe(self, suite: Path) -> tuple[str, str]:
        """The suite's size (``"285 cells"``) and its one-line description."""
        ...

    def run(self, request: RunRequest) -> int:
        """Run (or resume) a suite with progress, then print a summary."""
        ...

    def show(self, run_dir: Path) -> int:
        """Print a run folder's summary table."""
        ...

    def report(self, run_dir: Path, output: Path | None) -> int:
        """Write a run folder's report (tables, figures, report.md)."""
        ...


def first_line(text: str) -> str:
    """The first sentence-ish line of a suite's description (folded YAML text)."""
    text = " ".join(text.split())
    return text.split(". ")[0].rstrip(".") if text else ""


def get_kind(name: str) -> SuiteKind:
    """The kind called ``name``."""
    if name not in KINDS:
        raise HessbenchError(f"unknown suite kind {name!r}; known: {', '.join(KINDS)}")
    return importlib.import_module(KINDS[name]).KIND


def declared_kind(path: Path) -> object:
    """The top-level ``kind:`` of the YAML file at ``path`` (None if unreadable or absent)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def kind_of_suite(path: Path) -> SuiteKind:
    """The kind of the suite file at ``path``: its ``kind:`` field, ``accuracy`` by default.

    Cheap and forgiving: an unreadable or malformed file is an accuracy suite, whose
    parser then reports its problems.
    """
    kind = declared_kind(path)
    return get_kind(kind if kind in KINDS and kind != "accuracy" else "accuracy")


def kind_of_run(run_dir: Path) -> SuiteKind:
    """The kind that wrote the run folder ``run_dir`` (its metadata's ``kind``; accuracy)."""
    from hessbench.store.records import run_kind

    kind = run_kind(run_dir)
    return get_kind(kind if kind in KINDS else "accuracy")


def check_request(kind: SuiteKind, request: RunRequest) -> None:
    """Refuse, naming the flag, a given option that does not apply to ``kind``."""
    for name in request.given():
        if name not in kind.run_options:
            raise HessbenchError(
                f"{request.suite}: {FLAGS[name]} does not apply to kind: {kind.name} suites"
            )
