"""Run a suite: plan the cells, skip finished ones, evaluate the rest, keep everything.

``run_suite`` is what ``hessbench run`` calls. The run folder defaults to
``results/<suite>/<hash>`` where ``<hash>`` is the first 10 hex digits of the
suite file's SHA-256, so running the same suite again resumes it, and an
edited suite starts a new folder. ``--force`` discards a folder's cells.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import hessbench
from hessbench.config import CellSpec, Suite, load_suite, plan_cells, suite_text_hash
from hessbench.errors import ConfigError
from hessbench.results import FAILED, CellStore, atomic_write, load, read_records, run_lock
from hessbench.scheduler import Group, run_groups

__all__ = ["RunOptions", "RunSummary", "default_run_dir", "plan_run", "quick_suite", "run_suite"]


@dataclass
class RunOptions:
    """What ``hessbench run`` was asked to do."""

    output: Path | None = None
    jobs: int = 1
    tasks: list[str] | None = None
    estimators: list[str] | None = None
    seeds: list[int] | None = None
    retry_failed: bool = False
    force: bool = False
    quick: bool = False


@dataclass
class RunSummary:
    """The outcome of a run (or of a dry run)."""

    run_dir: Path
    planned: list[CellSpec]
    todo: list[CellSpec]
    statuses: Counter = field(default_factory=Counter)
    interrupted: bool = False


def quick_suite(suite: Suite) -> Suite:
    """A cheap variant: first seed, at most 2 evaluated batches, minimal timing repeats."""
    tasks = [
        t.model_copy(
            update={"eval": t.eval.model_copy(update={"num_batches": min(2, t.eval.num_batches)})}
        )
        for t in suite.tasks
    ]
    timing = suite.defaults.timing.model_copy(
        update={"warmup": 0, "min_repeats": 1, "max_repeats": 1, "min_time_s": 0.001}
    )
    defaults = suite.defaults.model_copy(
        update={"seeds": suite.defaults.seed_list[:1], "timing": timing}
    )
    return suite.model_copy(update={"tasks": tasks, "defaults": defaults})


def default_run_dir(suite: Suite, text: str, quick: bool) -> Path:
    """``results/<suite>/<hash>`` (``<hash>-quick`` for quick runs)."""
    return Path("results") / suite.name / (suite_text_hash(text)[:10] + ("-quick" if quick else ""))


def plan_run(path: str | Path, opts: RunOptions) -> tuple[Suite, str, Path, list[CellSpec]]:
    """Load the suite, apply the options and plan its cells (cheap, no side effects)."""
    path = Path(path)
    suite = load_suite(path)
    text = path.read_text(encoding="utf-8")
    if opts.quick:
        suite = quick_suite(suite)
    cells = plan_cells(suite, tasks=opts.tasks, estimators=opts.estimators, seeds=opts.seeds)
    run_dir = opts.output or default_run_dir(suite, text, opts.quick)
    return suite, text, run_dir, cells


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(hessbench.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether the hessbench checkout has uncommitted changes (None outside git)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _metadata(suite: Suite, text: str, path: Path, opts: RunOptions) -> dict:
    return {
        "schema_version": 1,
        "suite": suite.name,
        "suite_file": str(path),
        "suite_hash": suite_text_hash(text),
        "suite_text": text,
        "quick": opts.quick,
        "hessbench_version": hessbench.__version__,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": suite.defaults.threads,
        "device": suite.defaults.device,
        "sessions": [],
    }


def _prepare(run_dir: Path, suite: Suite, text: str, path: Path, opts: RunOptions) -> dict:
    meta_path = run_dir / "metadata.json"
    if opts.force:
        for name in ("cells.jsonl", "results.csv", "metadata.json"):
            (run_dir / name).unlink(missing_ok=True)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("suite_hash") != suite_text_hash(text):
            raise ConfigError(
                f"{run_dir} holds results of a different version of the suite; "
                "use --force to discard them or -o for another folder"
            )
        return meta
    return _metadata(suite, text, path, opts)


def run_suite(
    path: str | Path,
    opts: RunOptions,
    *,
    on_plan: Callable[[RunSummary], None] = lambda s: None,
    on_start: Callable[[str], None] = lambda cid: None,
    on_record: Callable[[dict], None] = lambda rec: None,
) -> RunSummary:
    """Run (or resume) a suite; every finished cell is on disk before the next starts.

    Ctrl-C and SIGTERM stop the run cleanly: the workers are killed, finished
    cells stay in ``cells.jsonl``, and the same command resumes.
    """
    suite, text, run_dir, cells = plan_run(path, opts)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        meta = _prepare(run_dir, suite, text, Path(path), opts)
        done = read_records(run_dir)
        skip = {"ok", "unsupported"} | (set() if opts.retry_failed else set(FAILED))
        todo = [c for c in cells if done.get(c.id, {}).get("status") not in skip]
        summary = RunSummary(run_dir, cells, todo)
        on_plan(summary)
        session = {"started": _now(), "jobs": opts.jobs, "command": sys.argv, "cells": len(todo)}
        meta["sessions"].append(session)
        atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))
        store = CellStore(run_dir)

        def record(rec: dict) -> None:
            store.append(rec)
            summary.statuses[rec["status"]] += 1
            on_record(rec)

        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            run_groups(
                _groups(todo),
                suite.defaults,
                jobs=opts.jobs,
                on_start=on_start,
                on_record=record,
                log_path=run_dir / "workers.log",
            )
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous)
            store.close()
            session["finished"] = _now()
            session["interrupted"] = summary.interrupted
            atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))
            atomic_write(run_dir / "results.csv", load(run_dir).to_csv(index=False))
    return summary


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _groups(cells: list[CellSpec]) -> list[Group]:
    groups: dict[tuple[str, int], Group] = {}
    for c in cells:
        key = (c.task.name, c.seed)
        if key not in groups:
            groups[key] = Group(c.task, c.seed, [])
        groups[key].cells.append((c.id, c.estimator))
    return list(groups.values())
