"""The run folders of train and rl suites: running their runs, recording them, their tables.

A run is a picklable spec with an ``id``, a ``suite`` (with ``optimizers``), an
``optimizer`` entry, an ``lr`` and a ``seed``. Runs go one after the other in this
process or to the worker pool (:func:`run_all`); each finished run is
appended to ``runs.jsonl`` (:func:`run_session`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hessbench.errors import HessbenchError, StorageError
from hessbench.run.pool import Batch, run_batches
from hessbench.store.provenance import now
from hessbench.store.records import RecordStore, atomic_write

__all__ = ["RUNS", "RUN_FIELDS", "crashed_record", "run_all", "run_frames", "run_session"]

RUNS = "runs.jsonl"
RUN_FIELDS = [
    "optimizer",
    "label",
    "order",
    "params",
    "lr",
    "seed",
    "status",
    "message",
    "diverged_at",
    "steps_done",
]
"""Columns of every kind's run table after ``run_id`` and the task (or environment)."""


def run_session(
    run_dir: Path,
    meta: dict,
    summary: Any,
    jobs: int,
    threads: int,
    fn: Callable[[Any], dict],
    crashed: Callable[[Any, str], dict],
    *,
    schema_version: int,
    table: Callable[[Path], pd.DataFrame],
    on_start: Callable[[str], None],
    on_record: Callable[[dict], None],
) -> None:
    """Run ``summary.todo`` (see :func:`run_all`) as a session of the run folder ``run_dir``.

    The session (start and end time, jobs, command, number of runs) goes into
    ``meta["sessions"]`` and ``metadata.json``; every record is appended to
    ``runs.jsonl`` (flushed and fsynced) before ``summary.statuses`` counts it
    and ``on_record`` sees it. Ctrl-C sets ``summary.interrupted``. At the end
    ``runs.csv`` is rewritten from ``table(run_dir)``.
    """
    meta_path = run_dir / "metadata.json"
    session = {"started": now(), "jobs": jobs, "command": sys.argv, "runs": len(summary.todo)}
    meta["sessions"].append(session)
    atomic_write(meta_path, json.dumps(meta, indent=2))
    store = RecordStore(run_dir / RUNS, schema_version=schema_version)

    def record(rec: dict) -> None:
        store.append(rec)
        summary.statuses[rec["status"]] += 1
        on_record(rec)

    storage_failed = False
    try:
        run_all(summary.todo, jobs, threads, fn, on_start, record, crashed)
    except KeyboardInterrupt:
        summary.interrupted = True
    except StorageError:
        storage_failed = True  # report the first failure, not the summary files'
        raise
    finally:
        store.close()
        session["finished"] = now()
        session["interrupted"] = summary.interrupted
        with contextlib.suppress(StorageError) if storage_failed else contextlib.nullcontext():
            atomic_write(meta_path, json.dumps(meta, indent=2))
            atomic_write(run_dir / "runs.csv", table(run_dir).to_csv(index=False))


def crashed_record(run: Any, message: str, **fields: object) -> dict:
    """The record of a run whose worker died: ``status: crashed``, ``message`` and ``fields``."""
    return {
        "cell_id": run.id,
        **fields,
        "optimizer": run.optimizer.name,
        "label": run.optimizer.display,
        "order": run.suite.optimizers.index(run.optimizer),
        "params": dict(run.optimizer.params),
        "lr": run.lr,
        "seed": run.seed,
        "status": "crashed",
        "message": message,
    }


@dataclass(frozen=True)
class _RunWork:
    """Train and rl runs on the worker pool: one run per batch."""

    fn: Callable[[Any], dict]
    crashed: Callable[[Any, str], dict]

    def open(self, batch: Batch) -> Callable[[str, Any], dict]:
        return lambda run_id, run: self.fn(run)

    def failed(self, batch: Batch, unit_id: str, unit: Any, status: str, message: str) -> dict:
        return {**self.crashed(unit, message), "status": status}


def run_all(
    todo: Sequence[Any],
    jobs: int,
    threads: int,
    fn: Callable[[Any], dict],
    on_start: Callable[[str], None],
    record: Callable[[dict], None],
    crashed: Callable[[Any, str], dict],
) -> None:
    """Record ``fn(run)`` for every run of ``todo`` with ``threads`` torch threads.

    With one job (or one run) the runs go one after the other in this process;
    else to ``jobs`` worker processes of :func:`~hessbench.run.pool.run_batches`
    (the pool every suite kind uses), where Ctrl-C is left to this one: it kills
    the workers. ``crashed(run, message)`` is the record of a run whose worker
    died; the other runs go on in a fresh worker.
    """
    if jobs <= 1 or len(todo) <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for run in todo:
                on_start(run.id)
                record(fn(run))
        finally:
            torch.set_num_threads(before)
        return
    run_batches(
        [Batch(run.id, [(run.id, run)]) for run in todo],
        _RunWork(fn, crashed),
        jobs=jobs,
        threads=threads,
        timeout_s=None,
        on_start=on_start,
        on_record=record,
    )


def run_frames(
    run_dir: str | Path,
    read: Callable[[Path], dict[str, dict]],
    run_columns: list[str],
    curve_columns: list[str],
    point_keys: tuple[str, ...],
    run_numeric: list[str],
    curve_numeric: list[str],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy tables of a run folder: one row per run, and one per curve point.

    ``read(run_dir)`` gives the last record of every run. Run rows have
    ``run_columns`` (``params`` as sorted JSON); curve rows ``run_id``,
    ``point_keys`` of their run and ``curve_columns``. The ``*_numeric`` columns
    become floats (NaN where missing).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HessbenchError(f"{run_dir}: no such run folder")
    rows, points = [], []
    for run_id, rec in read(run_dir).items():
        row = {k: rec.get(k) for k in run_columns}
        row["run_id"] = run_id
        row["params"] = json.dumps(rec.get("params", {}), sort_keys=True)
        rows.append(row)
        curve = rec.get("curve") or {}
        for i in range(len(curve.get("step", []))):
            point = {k: rec.get(k) for k in point_keys}
            point["run_id"] = run_id
            point.update({k: curve[k][i] for k in curve_columns})
            points.append(point)
    runs = pd.DataFrame(rows, columns=run_columns)
    curves = pd.DataFrame(points, columns=["run_id", *point_keys, *curve_columns])
    for c in run_numeric:
        runs[c] = pd.to_numeric(runs[c], errors="coerce").astype(float)
    for c in curve_numeric:
        curves[c] = pd.to_numeric(curves[c], errors="coerce").astype(float)
    return runs, curves
