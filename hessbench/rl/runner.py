"""Run an rl suite: plan the runs, skip finished ones, train the rest, keep everything.

The run folder defaults to ``results/<suite>/<hash>`` (the first 10 hex digits of
the suite file's SHA-256), so the same command resumes and an edited suite starts
a new folder. Each finished run is appended to ``runs.jsonl`` (flushed and
fsynced) before the next one is recorded; ``metadata.json`` says ``kind: rl``.
Runs that ended ``ok`` or ``diverged`` are never re-run; ``error`` and ``crashed``
ones are re-run by the next invocation. With ``jobs > 1`` runs go to worker
processes (:mod:`hessbench.run.pool`).
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hessbench.errors import ConfigError
from hessbench.rl.a2c import require_gymnasium, run_a2c
from hessbench.rl.schema import RLRunSpec, RLSuite, load_rl_suite, plan_rl_runs
from hessbench.run.sessions import RUN_FIELDS, RUNS, crashed_record, run_frames, run_session
from hessbench.store.provenance import source
from hessbench.store.records import ensure_dir, read_last_records, run_kind, run_lock
from hessbench.suite import suite_text_hash

__all__ = [
    "RUNS",
    "RLSummary",
    "default_run_dir",
    "is_rl_run",
    "load_rl_runs",
    "read_rl_runs",
    "run_rl_suite",
]

SCHEMA_VERSION = 1
DONE = ("ok", "diverged")


@dataclass
class RLSummary:
    """The outcome of :func:`run_rl_suite`."""

    run_dir: Path
    planned: list[RLRunSpec]
    todo: list[RLRunSpec]
    statuses: Counter = field(default_factory=Counter)
    interrupted: bool = False


def default_run_dir(suite: RLSuite, text: str) -> Path:
    """``results/<suite>/<hash>``."""
    return Path("results") / suite.name / suite_text_hash(text)[:10]


def is_rl_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds an rl suite's results (``kind: rl`` in its metadata)."""
    return run_kind(run_dir) == "rl"


def read_rl_runs(run_dir: str | Path) -> dict[str, dict]:
    """The last record of every run, keyed by run id (a torn last line is ignored)."""
    return read_last_records(Path(run_dir) / RUNS)


RUN_COLUMNS = [
    "run_id",
    "env",
    *RUN_FIELDS,
    "final_return",
    "train_time_s",
]
CURVE_COLUMNS = ["step", "return", "episodes", "time_s"]


def load_rl_runs(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run, and one per curve point (with the run's label, lr, seed, status)."""
    return run_frames(
        run_dir,
        read_rl_runs,
        RUN_COLUMNS,
        CURVE_COLUMNS,
        ("label", "optimizer", "lr", "seed", "status"),
        ["order", "lr", "seed", "diverged_at", "steps_done", "final_return", "train_time_s"],
        ["lr", *CURVE_COLUMNS],
    )


def _metadata(suite: RLSuite, text: str, path: Path) -> dict:
    gym = require_gymnasium()
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "rl",
        "suite": suite.name,
        "suite_file": str(path),
        "suite_hash": suite_text_hash(text),
        "suite_text": text,
        **source(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gymnasium": gym.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": suite.threads,
        "sessions": [],
    }


def _crashed(run: RLRunSpec, message: str) -> dict:
    return crashed_record(run, message, kind="rl", env=run.suite.env)


def run_rl_suite(
    path: str | Path,
    output: Path | None = None,
    jobs: int = 1,
    *,
    on_plan: Callable[[RLSummary], None] = lambda s: None,
    on_start: Callable[[str], None] = lambda run_id: None,
    on_record: Callable[[dict], None] = lambda rec: None,
) -> RLSummary:
    """Run (or resume) an rl suite; every finished run is on disk before the next is recorded.

    Ctrl-C stops it: finished runs stay in ``runs.jsonl`` and the same command
    resumes. Raises :class:`~hessbench.errors.HessbenchError` for a bad suite, a
    folder holding another suite's results, or a missing gymnasium.
    """
    path = Path(path)
    suite = load_rl_suite(path)
    require_gymnasium()
    text = path.read_text(encoding="utf-8")
    run_dir = Path(output) if output is not None else default_run_dir(suite, text)
    runs = plan_rl_runs(suite)
    ensure_dir(run_dir)
    with run_lock(run_dir):
        meta_path = run_dir / "metadata.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("kind") != "rl" or meta.get("suite_hash") != suite_text_hash(text):
                raise ConfigError(
                    f"{run_dir} holds results of another suite or version of it; "
                    "use another output folder"
                )
        else:
            meta = _metadata(suite, text, path)
        done = read_rl_runs(run_dir)
        todo = [r for r in runs if done.get(r.id, {}).get("status") not in DONE]
        summary = RLSummary(run_dir, runs, todo)
        on_plan(summary)
        run_session(
            run_dir,
            meta,
            summary,
            jobs,
            suite.threads,
            run_a2c,
            _crashed,
            schema_version=SCHEMA_VERSION,
            table=lambda d: load_rl_runs(d)[0],
            on_start=on_start,
            on_record=on_record,
        )
    return summary
