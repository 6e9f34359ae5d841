"""Run an rl suite: plan the runs, skip finished ones, train the rest, keep everything.

The run folder defaults to ``results/<suite>/<hash>`` (the first 10 hex digits of
the suite file's SHA-256), so the same command resumes and an edited suite starts
a new folder. Each finished run is appended to ``runs.jsonl`` (flushed and
fsynced) before the next one is recorded; ``metadata.json`` says ``kind: rl``.
Runs that ended ``ok`` or ``diverged`` are never re-run; ``error`` and ``crashed``
ones are re-run by the next invocation. With ``jobs > 1`` runs go to spawned
worker processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import hessbench
from hessbench.config import suite_text_hash
from hessbench.errors import ConfigError, HessbenchError
from hessbench.results import atomic_write, run_lock
from hessbench.rl.a2c import require_gymnasium, run_a2c
from hessbench.rl.schema import RLRunSpec, RLSuite, load_rl_suite, plan_rl_runs

__all__ = [
    "RUNS",
    "RLSummary",
    "default_run_dir",
    "is_rl_run",
    "load_rl_runs",
    "read_rl_runs",
    "run_rl_suite",
]

RUNS = "runs.jsonl"
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
    try:
        meta = json.loads((Path(run_dir) / "metadata.json").read_text(encoding="utf-8"))
        return meta.get("kind") == "rl"
    except (OSError, ValueError, AttributeError):
        return False


def _clean(value: object) -> object:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class _Store:
    """Appends records to ``runs.jsonl``, each flushed and fsynced."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RUNS
        if self.path.exists():  # drop a half-written last line left by a killed run
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run

    def append(self, record: dict) -> None:
        line = json.dumps(_clean({"schema_version": SCHEMA_VERSION, **record}), sort_keys=True)
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def read_rl_runs(run_dir: str | Path) -> dict[str, dict]:
    """The last record of every run, keyed by run id (a torn last line is ignored)."""
    path = Path(run_dir) / RUNS
    if not path.exists():
        return {}
    records: dict[str, dict] = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise HessbenchError(f"{path}:{i + 1}: not a JSON record") from None
        records[rec["cell_id"]] = rec
    return records


RUN_COLUMNS = [
    "run_id",
    "env",
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
    "final_return",
    "train_time_s",
]
CURVE_COLUMNS = ["step", "return", "episodes", "time_s"]


def load_rl_runs(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run, and one per curve point (with the run's label, lr, seed, status)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HessbenchError(f"{run_dir}: no such run folder")
    rows, points = [], []
    for run_id, rec in read_rl_runs(run_dir).items():
        row = {k: rec.get(k) for k in RUN_COLUMNS}
        row["run_id"] = run_id
        row["params"] = json.dumps(rec.get("params", {}), sort_keys=True)
        rows.append(row)
        curve = rec.get("curve") or {}
        for i in range(len(curve.get("step", []))):
            point = {k: rec.get(k) for k in ("label", "optimizer", "lr", "seed", "status")}
            point["run_id"] = run_id
            point.update({k: curve[k][i] for k in CURVE_COLUMNS})
            points.append(point)
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    keys = ["run_id", "label", "optimizer", "lr", "seed", "status"]
    curves = pd.DataFrame(points, columns=[*keys, *CURVE_COLUMNS])
    for c in ("order", "lr", "seed", "diverged_at", "steps_done", "final_return", "train_time_s"):
        runs[c] = pd.to_numeric(runs[c], errors="coerce").astype(float)
    for c in ("lr", *CURVE_COLUMNS):
        curves[c] = pd.to_numeric(curves[c], errors="coerce").astype(float)
    return runs, curves


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _metadata(suite: RLSuite, text: str, path: Path) -> dict:
    gym = require_gymnasium()
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "rl",
        "suite": suite.name,
        "suite_file": str(path),
        "suite_hash": suite_text_hash(text),
        "suite_text": text,
        "hessbench_version": hessbench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gymnasium": gym.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": suite.threads,
        "sessions": [],
    }


def _worker_init(threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(threads)


def _crashed(run: RLRunSpec, message: str) -> dict:
    return {
        "cell_id": run.id,
        "kind": "rl",
        "env": run.suite.env,
        "optimizer": run.optimizer.name,
        "label": run.optimizer.display,
        "order": run.suite.optimizers.index(run.optimizer),
        "params": dict(run.optimizer.params),
        "lr": run.lr,
        "seed": run.seed,
        "status": "crashed",
        "message": message,
    }


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
    run_dir.mkdir(parents=True, exist_ok=True)
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
        session = {"started": _now(), "jobs": jobs, "command": sys.argv, "runs": len(todo)}
        meta["sessions"].append(session)
        atomic_write(meta_path, json.dumps(meta, indent=2))
        store = _Store(run_dir)

        def record(rec: dict) -> None:
            store.append(rec)
            summary.statuses[rec["status"]] += 1
            on_record(rec)

        try:
            if jobs <= 1 or len(todo) <= 1:
                threads = torch.get_num_threads()
                torch.set_num_threads(suite.threads)
                try:
                    for run in todo:
                        on_start(run.id)
                        record(run_a2c(run))
                finally:
                    torch.set_num_threads(threads)
            else:
                _run_pool(todo, jobs, suite.threads, on_start, record)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            store.close()
            session["finished"] = _now()
            session["interrupted"] = summary.interrupted
            atomic_write(meta_path, json.dumps(meta, indent=2))
            runs_df, _ = load_rl_runs(run_dir)
            atomic_write(run_dir / "runs.csv", runs_df.to_csv(index=False))
    return summary


def _run_pool(
    todo: list[RLRunSpec],
    jobs: int,
    threads: int,
    on_start: Callable[[str], None],
    record: Callable[[dict], None],
) -> None:
    """Train ``todo`` in ``jobs`` spawned processes, recording results in plan order."""
    ctx = mp.get_context("spawn")
    pending: dict[Future, RLRunSpec] = {}
    queue = list(reversed(todo))
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
    ) as pool:
        try:
            while queue or pending:
                while queue and len(pending) < jobs:
                    run = queue.pop()
                    on_start(run.id)
                    pending[pool.submit(run_a2c, run)] = run
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: todo.index(pending[f])):
                    run = pending.pop(fut)
                    try:
                        record(fut.result())
                    except BrokenProcessPool:
                        record(_crashed(run, "its worker process died"))
                        raise
        except BrokenProcessPool:
            for run in pending.values():
                record(_crashed(run, "the worker pool broke while this run was in progress"))
            pending.clear()
            raise HessbenchError(
                "a worker process died; finished runs are on disk, re-run to resume"
            ) from None
        except BaseException:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            raise
