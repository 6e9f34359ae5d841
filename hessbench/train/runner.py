"""Run a train suite: plan the runs, skip finished ones, train the rest, keep everything.

The run folder defaults to ``results/<suite>/<hash>`` (the first 10 hex digits
of the suite file's SHA-256), so the same command resumes and an edited suite
starts a new folder. Each finished run is appended to ``runs.jsonl`` (flushed
and fsynced) before the next result is taken; ``metadata.json`` says
``kind: train``. Runs go to ``jobs`` worker processes (:mod:`hessbench.run.pool`) or, with one
job, run in this process.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from hessbench.errors import ConfigError
from hessbench.run.sessions import RUN_FIELDS, RUNS, crashed_record, run_frames, run_session
from hessbench.store.provenance import environment
from hessbench.store.records import ensure_dir, read_last_records, run_kind, run_lock
from hessbench.suite import suite_text_hash
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


def _metadata(suite: TrainSuite, text: str, path: Path, quick: bool) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "train",
        "suite": suite.name,
        "suite_file": str(path),
        "suite_hash": suite_text_hash(text),
        "suite_text": text,
        "quick": quick,
        **environment(),
        "threads": suite.threads,
        "device": suite.device,
        "sessions": [],
    }


def is_train_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a train suite's results (``kind: train`` in its metadata)."""
    return run_kind(run_dir) == "train"


def read_runs(run_dir: str | Path) -> dict[str, dict]:
    """The last record of every run, keyed by run id (a torn last line is ignored)."""
    return read_last_records(Path(run_dir) / RUNS, newest=SCHEMA_VERSION)


RUN_COLUMNS = [
    "run_id",
    "task",
    *RUN_FIELDS,
    "final_train_loss",
    "final_heldout_loss",
    "final_heldout_accuracy",
    "train_time_s",
    "eval_time_s",
    "clock",
    "num_params",
]
CURVE_COLUMNS = ["step", "time_s", "train_loss", "heldout_loss", "heldout_accuracy"]


def load_runs(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy tables of a train run folder: one row per run, and one per curve point.

    Curve rows carry ``run_id``, label, lr, seed, status and :data:`CURVE_COLUMNS`.
    """
    return run_frames(
        run_dir,
        read_runs,
        RUN_COLUMNS,
        CURVE_COLUMNS,
        ("label", "lr", "seed", "status"),
        [c for c in RUN_COLUMNS[RUN_COLUMNS.index("diverged_at") :] if c != "clock"]
        + ["lr", "order"],
        CURVE_COLUMNS[1:],
    )


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
    ensure_dir(run_dir)
    with run_lock(run_dir):
        meta = _prepare(run_dir, suite, text, Path(path), opts)
        done = read_runs(run_dir)
        skip = set(DONE) | (set() if opts.retry_failed else set(FAILED))
        todo = [r for r in runs if done.get(r.id, {}).get("status") not in skip]
        summary = TrainSummary(run_dir, runs, todo)
        on_plan(summary)
        run_session(
            run_dir,
            meta,
            summary,
            opts.jobs,
            suite.threads,
            train_run,
            _crashed,
            schema_version=SCHEMA_VERSION,
            table=lambda d: load_runs(d)[0],
            on_start=on_start,
            on_record=on_record,
        )
    return summary


def _crashed(run: RunSpec, message: str) -> dict:
    return {**crashed_record(run, message, kind="train", task=run.suite.task.name), "curve": {}}
