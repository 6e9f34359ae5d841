"""Run a suite: plan the cells, skip finished ones, evaluate the rest, keep everything.

``run_suite`` is what ``hessbench run`` calls. The run folder defaults to
``results/<suite>/<hash>`` where ``<hash>`` is the first 10 hex digits of the
suite file's SHA-256, so running the same suite again resumes it, and an
edited suite starts a new folder. ``--force`` discards a folder's cells.

Executors (``RunOptions.executor``): ``local`` evaluates the pending cells here
(:func:`~hessbench.run.cells.run_groups`); ``slurm`` submits them as a job array
and waits for it (:mod:`hessbench.run.slurm`), merging the array tasks' result
shards as they arrive (:mod:`hessbench.store.shards`). ``RunOptions.shard`` runs a
deterministic share of the cells into its own shard file.
"""

from __future__ import annotations

import contextlib
import json
import platform
import secrets
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from hessbench.errors import ConfigError, StorageError
from hessbench.run.cells import Group, run_groups
from hessbench.store.provenance import environment, now
from hessbench.store.records import (
    DONE,
    FAILED,
    CellStore,
    atomic_write,
    ensure_dir,
    load,
    run_lock,
)
from hessbench.store.shards import SHARDS, Collector, Shard, merged_records, shard_path
from hessbench.suite import CellSpec, Cluster, Suite, load_suite, plan_cells, suite_text_hash
from hessbench.suite.parsing import validate

__all__ = [
    "RunOptions",
    "RunSummary",
    "check_options",
    "collect",
    "default_run_dir",
    "plan_run",
    "quick_suite",
    "run_suite",
]


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
    executor: str = "local"
    device: str | None = None
    shard: Shard | None = None
    wait: bool = True
    cluster: dict = field(default_factory=dict)
    """Overrides of the suite's ``cluster:`` section (field name -> value)."""


@dataclass
class RunSummary:
    """The outcome of a run (or of a dry run)."""

    run_dir: Path
    planned: list[CellSpec]
    todo: list[CellSpec]
    statuses: Counter = field(default_factory=Counter)
    interrupted: bool = False
    manifest: dict | None = None
    """The submission's manifest (cluster executors)."""
    in_flight: dict[str, str] = field(default_factory=dict)
    """Cells left to jobs of earlier submissions that are still running: cell id -> job id."""
    shard_file: Path | None = None
    """Where a ``--shard i/n`` run (n > 1) wrote its cells."""


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
    """Load the suite, apply the options and plan its cells (cheap, no side effects).

    ``--device`` overrides ``defaults.device``; where it changes the device the
    default run folder gets a ``-<device>`` suffix, so results on different
    devices never mix.
    """
    path = Path(path)
    suite = load_suite(path)
    text = path.read_text(encoding="utf-8")
    if opts.quick:
        suite = quick_suite(suite)
    run_dir = opts.output or default_run_dir(suite, text, opts.quick)
    if opts.device is not None and opts.device != suite.defaults.device:
        if opts.output is None:
            run_dir = run_dir.with_name(f"{run_dir.name}-{opts.device}")
        defaults = suite.defaults.model_copy(update={"device": opts.device})
        suite = suite.model_copy(update={"defaults": defaults})
    if opts.cluster:
        data = {**suite.cluster.model_dump(exclude_unset=True), **opts.cluster}
        cluster = validate(Cluster, data, "command line: cluster")
        suite = suite.model_copy(update={"cluster": cluster})
    cells = plan_cells(suite, tasks=opts.tasks, estimators=opts.estimators, seeds=opts.seeds)
    return suite, text, run_dir, cells


def check_options(suite: Suite, opts: RunOptions) -> None:
    """Refuse contradictory options and an unavailable device, before any work."""
    from hessbench.run.slurm import EXECUTORS, require_submitit

    if opts.executor not in EXECUTORS:
        raise ConfigError(f"--executor {opts.executor!r}: expected local or slurm")
    if opts.shard is not None and opts.executor != "local":
        raise ConfigError("--shard runs here: it cannot be combined with --executor slurm")
    if opts.shard is not None and opts.shard.n > 1 and opts.force:
        raise ConfigError("--force with --shard would discard the other shares' cells")
    if not opts.wait and opts.executor == "local":
        raise ConfigError("--no-wait needs --executor slurm")
    if opts.executor != "local":
        require_submitit()
    elif suite.defaults.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device cuda (--device or defaults.device) but torch.cuda.is_available() is false "
            f"(torch {torch.__version__}); use --device cpu"
        )


def _gpu_name(device: str) -> str | None:
    """The GPU's name when the run uses CUDA here (None otherwise, e.g. a Slurm submission)."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def _metadata(suite: Suite, text: str, path: Path, opts: RunOptions) -> dict:
    return {
        "schema_version": 1,
        "suite": suite.name,
        "suite_file": str(path),
        "suite_hash": suite_text_hash(text),
        "suite_text": text,
        "quick": opts.quick,
        **environment(),
        "threads": suite.defaults.threads,
        "device": suite.defaults.device,
        "gpu": _gpu_name(suite.defaults.device),
        "sessions": [],
    }


def _prepare(run_dir: Path, suite: Suite, text: str, path: Path, opts: RunOptions) -> dict:
    meta_path = run_dir / "metadata.json"
    if opts.force:
        for name in ("cells.jsonl", "results.csv", "metadata.json"):
            (run_dir / name).unlink(missing_ok=True)
        for name in (SHARDS, "submitit"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("suite_hash") != suite_text_hash(text):
            raise ConfigError(
                f"{run_dir} holds results of a different version of the suite; "
                "use --force to discard them or -o for another folder"
            )
        if meta.get("device", "cpu") != suite.defaults.device:
            raise ConfigError(
                f"{run_dir} holds results on device {meta.get('device', 'cpu')}, not "
                f"{suite.defaults.device}; use -o for another folder (or --force)"
            )
        return meta
    return _metadata(suite, text, path, opts)


def _session_id() -> str:
    """Sortable and unique: UTC time and 4 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)


def _pending(cells: list[CellSpec], done: dict[str, dict], opts: RunOptions) -> list[CellSpec]:
    """Cells to run: missing, stopped with their job (``job_state``), or failed if retried."""
    skip = set(DONE) | (set() if opts.retry_failed else set(FAILED))
    return [
        c
        for c in cells
        if done.get(c.id, {}).get("status") not in skip or done[c.id].get("job_state")
    ]


def run_suite(
    path: str | Path,
    opts: RunOptions,
    *,
    on_plan: Callable[[RunSummary], None] = lambda s: None,
    on_start: Callable[[str], None] = lambda cid: None,
    on_record: Callable[[dict], None] = lambda rec: None,
    on_submit: Callable[[dict], None] = lambda manifest: None,
) -> RunSummary:
    """Run (or resume) a suite; every finished cell is on disk before the next starts.

    Ctrl-C and SIGTERM stop the run cleanly: the workers are killed (Slurm jobs
    keep running), finished cells stay on disk, and the same command resumes.
    """
    suite, text, run_dir, cells = plan_run(path, opts)
    check_options(suite, opts)
    if opts.shard is not None and opts.shard.n > 1:
        return _run_share(path, opts, suite, text, run_dir, cells, on_plan, on_start, on_record)
    ensure_dir(run_dir)
    with run_lock(run_dir):
        meta = _prepare(run_dir, suite, text, Path(path), opts)
        collector = Collector(run_dir)
        states = _job_states(collector)
        collector.step(states)
        todo = [
            c for c in _pending(cells, collector.current, opts) if c.id not in collector.in_flight
        ]
        summary = RunSummary(run_dir, cells, todo, in_flight=dict(collector.in_flight))
        on_plan(summary)
        session = {
            "started": now(),
            "executor": opts.executor,
            "jobs": opts.jobs,
            "command": sys.argv,
            "cells": len(todo),
        }
        meta["sessions"].append(session)
        atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))

        def record(rec: dict) -> None:
            summary.statuses[rec["status"]] += 1
            on_record(rec)

        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        storage_failed = False
        try:
            if opts.executor == "local":
                _run_here(run_dir, suite, todo, opts, on_start, record, store_path=None)
            elif todo:
                _run_cluster(run_dir, suite, todo, opts, session, summary, on_submit, record)
        except KeyboardInterrupt:
            summary.interrupted = True
        except StorageError:
            storage_failed = True  # report the first failure, not the summary files'
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            session["finished"] = now()
            session["interrupted"] = summary.interrupted
            with contextlib.suppress(StorageError) if storage_failed else contextlib.nullcontext():
                atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))
                atomic_write(run_dir / "results.csv", load(run_dir).to_csv(index=False))
    return summary


def _job_states(collector: Collector):
    """A job-state function when the folder has unsettled array tasks (None otherwise)."""
    if not collector.pending_tasks():
        return None
    from hessbench.run.slurm import JobStates

    return JobStates()


def _run_here(
    run_dir: Path,
    suite: Suite,
    todo: list[CellSpec],
    opts: RunOptions,
    on_start: Callable[[str], None],
    record: Callable[[dict], None],
    store_path: Path | None,
) -> None:
    """Evaluate ``todo`` with local worker processes into ``cells.jsonl`` or ``store_path``."""
    store = CellStore(run_dir, path=store_path)

    def append(rec: dict) -> None:
        store.append(rec)
        record(rec)

    try:
        run_groups(
            _groups(todo),
            suite.defaults,
            jobs=opts.jobs,
            on_start=on_start,
            on_record=append,
            log_path=run_dir / "workers.log",
        )
    finally:
        store.close()


def _run_cluster(
    run_dir: Path,
    suite: Suite,
    todo: list[CellSpec],
    opts: RunOptions,
    session: dict,
    summary: RunSummary,
    on_submit: Callable[[dict], None],
    record: Callable[[dict], None],
) -> None:
    """Submit ``todo`` as a job array; unless ``--no-wait``, wait and merge the shards."""
    from hessbench.run.slurm import JobStates, submit

    session["id"] = _session_id()
    manifest = submit(
        run_dir,
        session["id"],
        _groups(todo),
        suite.defaults,
        suite.cluster,
        executor=opts.executor,
        jobs=opts.jobs,
        name=f"hessbench-{suite.name}",
    )
    session["job_ids"] = sorted({t["job_id"] for t in manifest["tasks"]})
    summary.manifest = manifest
    on_submit(manifest)
    if not opts.wait:
        return
    mine = {c.id for c in todo}
    _wait(Collector(run_dir), JobStates(), lambda rec: rec["cell_id"] in mine and record(rec))


UNKNOWN_GIVE_UP_S = 600.0
"""Stop waiting when every remaining job's state has been unknown this long (no sacct?)."""


def _wait(collector: Collector, states, on_record: Callable[[dict], object]) -> None:
    """Merge shards until every array task has settled (or only unknown states are left)."""
    unknown_since = None
    while True:
        for rec in collector.step(states):
            on_record(rec)
        if not collector.pending_tasks():
            return
        if collector.in_flight or not collector.unknown:
            unknown_since = None
        elif unknown_since is None:
            unknown_since = time.monotonic()
        elif time.monotonic() - unknown_since > UNKNOWN_GIVE_UP_S:
            return  # the caller reports collector.unknown
        time.sleep(0.5)


def _run_share(
    path: str | Path,
    opts: RunOptions,
    suite: Suite,
    text: str,
    run_dir: Path,
    cells: list[CellSpec],
    on_plan: Callable[[RunSummary], None],
    on_start: Callable[[str], None],
    on_record: Callable[[dict], None],
) -> RunSummary:
    """``--shard i/n`` with n > 1: this machine's share, into its own shard file.

    Groups are dealt round-robin in plan order (stable while the suite and the
    filters are), share ``i`` takes every n-th; the pending cells of those groups
    run. The run folder's lock is held only to record the session; the share's
    file has a lock of its own, so n machines can share a folder.
    """
    assert opts.shard is not None
    out = shard_path(run_dir, opts.shard)
    groups = _groups(cells)
    mine = {cid for g in groups[opts.shard.i - 1 :: opts.shard.n] for cid, _ in g.cells}
    ensure_dir(run_dir)
    with run_lock(run_dir, wait_s=60):
        meta = _prepare(run_dir, suite, text, Path(path), opts)
        meta["sessions"].append(
            {
                "started": now(),
                "shard": str(opts.shard),
                "command": sys.argv,
                "host": platform.node(),
            }
        )
        atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))
    ensure_dir(out.parent)
    with run_lock(run_dir, lock_file=out.with_suffix(".lock")):
        todo = [c for c in _pending(cells, merged_records(run_dir), opts) if c.id in mine]
        summary = RunSummary(run_dir, [c for c in cells if c.id in mine], todo, shard_file=out)
        on_plan(summary)

        def record(rec: dict) -> None:
            summary.statuses[rec["status"]] += 1
            on_record(rec)

        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            _run_here(run_dir, suite, todo, opts, on_start, record, store_path=out)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous)
    return summary


def collect(run_dir: Path, *, wait: bool = False, on_record=lambda rec: None) -> Collector:
    """Merge a run folder's shards into ``cells.jsonl`` and rewrite ``results.csv``.

    With ``wait``, first wait until the folder's array jobs have ended.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metadata.json").exists():
        raise ConfigError(f"{run_dir}: not a run folder (no metadata.json)")
    with run_lock(run_dir):
        collector = Collector(run_dir)
        states = _job_states(collector)
        if wait and states is not None:
            _wait(collector, states, on_record)
        else:
            for rec in collector.step(states):
                on_record(rec)
        atomic_write(run_dir / "results.csv", load(run_dir).to_csv(index=False))
    return collector


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
