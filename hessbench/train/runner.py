"""Run a train suite: plan the runs, skip finished ones, train the rest, keep everything.

The run folder defaults to ``results/<suite>/<hash>`` (the first 10 hex digits
of the suite file's SHA-256), so the same command resumes and an edited suite
starts a new folder. Each finished run is appended to ``runs.jsonl`` (flushed
and fsynced) before the next result is taken; ``metadata.json`` says
``kind: train``. Runs go to ``jobs`` worker processes (``spawn``) or, with one
job, run in this process.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import subprocess
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
from hessbench.train.schema import RunSpec, TrainSuite, load_train_suite, plan_runs

__all__ = [
    "RUNS",
    "TrainOptions",
    "TrainSummary",
    "default_run_dir",
    "is_train_run",
    "load_runs",
    "plan_train",
    "read_runs",
    "run_train_suite",
]

RUNS = "runs.jsonl"
SCHEMA_VERSION = 1
DONE = ("ok", "diverged")  # final outcomes; "error" and "crashed" re-run with retry_failed
FAILED = ("error", "crashed")


@dataclass
class TrainOptions:
    """What ``hessbench run`` was asked to do with a train suite."""

    output: Path | None = None
    jobs: int = 1
    seeds: list[int] | None = None
    retry_failed: bool = False
    force: bool = False
    quick: bool = False


@dataclass
class TrainSummary:
    """The outcome of a run (or of a dry run)."""

    run_dir: Path
    planned: list[RunSpec]
    todo: list[RunSpec]
    statuses: Counter = field(default_factory=Counter)
    interrupted: bool = False


def quick_suite(suite: TrainSuite) -> TrainSuite:
    """A cheap variant: the first seed, at most 2 evaluation intervals of steps."""
    steps = min(suite.steps, 2 * suite.eval_every)
    return suite.model_copy(update={"seeds": suite.seed_list[:1], "steps": steps})


def default_run_dir(suite: TrainSuite, text: str, quick: bool = False) -> Path:
    """``results/<suite>/<hash>`` (``<hash>-quick`` for quick runs)."""
    return Path("results") / suite.name / (suite_text_hash(text)[:10] + ("-quick" if quick else ""))


def plan_train(path: str | Path, opts: TrainOptions) -> tuple[TrainSuite, str, Path, list[RunSpec]]:
    """Load the suite, apply the options and plan its runs (cheap, no side effects)."""
    path = Path(path)
    suite = load_train_suite(path)
    text = path.read_text(encoding="utf-8")
    if opts.quick:
        suite = quick_suite(suite)
    if opts.seeds:
        unknown = sorted(set(opts.seeds) - set(suite.seed_list))
        if unknown:
            known = ", ".join(map(str, suite.seed_list))
            raise ConfigError(f"seed {unknown[0]} is not one of the suite's seeds ({known})")
    runs = plan_runs(suite, opts.seeds)
    return suite, text, opts.output or default_run_dir(suite, text, opts.quick), runs


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


def _metadata(suite: TrainSuite, text: str, path: Path, quick: bool) -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "train",
        "suite": suite.name,
        "suite_file": str(path),
        "suite_hash": suite_text_hash(text),
        "suite_text": text,
        "quick": quick,
        "hessbench_version": hessbench.__version__,
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": suite.threads,
        "device": suite.device,
        "sessions": [],
    }


def is_train_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a train suite's results (``kind: train`` in its metadata)."""
    path = Path(run_dir) / "metadata.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == "train"
    except (OSError, ValueError, AttributeError):
        return False


class _RunStore:
    """Appends run records to ``runs.jsonl``, each flushed and fsynced."""

    def __init__(self, run_dir: Path):
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


def _clean(value: object) -> object:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read_runs(run_dir: str | Path) -> dict[str, dict]:
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
        if rec.get("schema_version", 0) > SCHEMA_VERSION:
            raise HessbenchError(f"{path}: written by a newer hessbench; upgrade to read it")
        records[rec["cell_id"]] = rec
    return records


RUN_COLUMNS = [
    "run_id",
    "task",
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
    "final_train_loss",
    "final_heldout_loss",
    "final_heldout_accuracy",
    "train_time_s",
    "eval_time_s",
    "num_params",
]
CURVE_COLUMNS = ["step", "time_s", "train_loss", "heldout_loss", "heldout_accuracy"]


def load_runs(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy tables of a train run folder: one row per run, and one per curve point.

    Curve rows carry ``run_id``, label, lr, seed, status and :data:`CURVE_COLUMNS`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HessbenchError(f"{run_dir}: no such run folder")
    rows, points = [], []
    for run_id, rec in read_runs(run_dir).items():
        row = {k: rec.get(k) for k in RUN_COLUMNS}
        row["run_id"] = run_id
        row["params"] = json.dumps(rec.get("params", {}), sort_keys=True)
        rows.append(row)
        curve = rec.get("curve") or {}
        for i in range(len(curve.get("step", []))):
            point = {k: rec.get(k) for k in ("label", "lr", "seed", "status")}
            point["run_id"] = run_id
            point.update({k: curve[k][i] for k in CURVE_COLUMNS})
            points.append(point)
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    curves = pd.DataFrame(
        points, columns=["run_id", "label", "lr", "seed", "status", *CURVE_COLUMNS]
    )
    for c in [*RUN_COLUMNS[RUN_COLUMNS.index("diverged_at") :], "lr", "order"]:
        runs[c] = pd.to_numeric(runs[c], errors="coerce").astype(float)
    for c in CURVE_COLUMNS[1:]:
        curves[c] = pd.to_numeric(curves[c], errors="coerce").astype(float)
    return runs, curves


def _prepare(run_dir: Path, suite: TrainSuite, text: str, path: Path, opts: TrainOptions) -> dict:
    meta_path = run_dir / "metadata.json"
    if opts.force:
        for name in (RUNS, "runs.csv", "metadata.json"):
            (run_dir / name).unlink(missing_ok=True)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("kind") != "train" or meta.get("suite_hash") != suite_text_hash(text):
            raise ConfigError(
                f"{run_dir} holds results of another suite or version of it; "
                "use --force to discard them or -o for another folder"
            )
        return meta
    return _metadata(suite, text, path, opts.quick)


def _worker_init(threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(threads)


def _train_in_worker(run: RunSpec) -> dict:
    from hessbench.train.loop import train_run

    return train_run(run)


def run_train_suite(
    path: str | Path,
    opts: TrainOptions,
    *,
    on_plan: Callable[[TrainSummary], None] = lambda s: None,
    on_start: Callable[[str], None] = lambda run_id: None,
    on_record: Callable[[dict], None] = lambda rec: None,
) -> TrainSummary:
    """Run (or resume) a train suite; every finished run is on disk before the next is taken.

    Ctrl-C stops the run: finished runs stay in ``runs.jsonl`` and the same
    command resumes. Runs that ended ``ok`` or ``diverged`` are never re-run;
    ``error`` and ``crashed`` ones only with ``retry_failed``.
    """
    from hessbench.train.loop import train_run

    suite, text, run_dir, runs = plan_train(path, opts)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        meta = _prepare(run_dir, suite, text, Path(path), opts)
        done = read_runs(run_dir)
        skip = set(DONE) | (set() if opts.retry_failed else set(FAILED))
        todo = [r for r in runs if done.get(r.id, {}).get("status") not in skip]
        summary = TrainSummary(run_dir, runs, todo)
        on_plan(summary)
        session = {"started": _now(), "jobs": opts.jobs, "command": sys.argv, "runs": len(todo)}
        meta["sessions"].append(session)
        atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))
        store = _RunStore(run_dir)

        def record(rec: dict) -> None:
            store.append(rec)
            summary.statuses[rec["status"]] += 1
            on_record(rec)

        try:
            if opts.jobs <= 1 or len(todo) <= 1:
                threads = torch.get_num_threads()
                torch.set_num_threads(suite.threads)
                try:
                    for run in todo:
                        on_start(run.id)
                        record(train_run(run))
                finally:
                    torch.set_num_threads(threads)
            else:
                _run_pool(todo, opts.jobs, suite.threads, on_start, record)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            store.close()
            session["finished"] = _now()
            session["interrupted"] = summary.interrupted
            atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))
            runs_df, _ = load_runs(run_dir)
            atomic_write(run_dir / "runs.csv", runs_df.to_csv(index=False))
    return summary


def _run_pool(
    todo: list[RunSpec],
    jobs: int,
    threads: int,
    on_start: Callable[[str], None],
    record: Callable[[dict], None],
) -> None:
    """Train ``todo`` in ``jobs`` spawned processes, recording results as they finish."""
    ctx = mp.get_context("spawn")
    pending: dict[Future, RunSpec] = {}
    queue = list(reversed(todo))
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
    ) as pool:
        try:
            while queue or pending:
                while queue and len(pending) < jobs:
                    run = queue.pop()
                    on_start(run.id)
                    pending[pool.submit(_train_in_worker, run)] = run
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: todo.index(pending[f])):
                    run = pending.pop(fut)
                    try:
                        record(fut.result())
                    except BrokenProcessPool:
                        record(_crashed(run, "its worker process died"))
                        raise
        except BrokenProcessPool:  # a worker died: the runs in progress are recorded
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


def _crashed(run: RunSpec, message: str) -> dict:
    return {
        "cell_id": run.id,
        "kind": "train",
        "task": run.suite.task.name,
        "optimizer": run.optimizer.name,
        "label": run.optimizer.display,
        "order": run.suite.optimizers.index(run.optimizer),
        "params": dict(run.optimizer.params),
        "lr": run.lr,
        "seed": run.seed,
        "status": "crashed",
        "message": message,
        "curve": {},
    }
