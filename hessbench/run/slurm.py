"""Run cells as a Slurm job array through ``submitit`` (``hessbench run --executor slurm``).

The pending cells' groups (a task variant and a seed: they share the ground
truth) are dealt round-robin into chunks, one array task per chunk. An array
task runs :func:`run_chunk`: the local machinery (:func:`~hessbench.run.cells.run_groups`,
worker processes with crash and per-cell timeout isolation) writing to its own
shard file (:mod:`hessbench.store.shards`). The submission's manifest
``shards/<session>.json`` names every array task's job id and cells, so that a
later ``hessbench collect`` can tell, from the job's state, which cells a
cancelled or timed-out job left unfinished.

``submitit`` is an optional dependency (``pip install 'hessbench[slurm]'``).
The executor ``submitit-local`` runs the same array tasks as local processes
through submitit's ``local`` cluster (for tests and machines without Slurm).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hessbench.bench.cell import base_record
from hessbench.errors import ConfigError
from hessbench.run.cells import Group, run_groups
from hessbench.store.records import CellStore, atomic_write, ensure_dir
from hessbench.store.shards import SHARDS
from hessbench.suite import Cluster, Defaults

__all__ = [
    "EXECUTORS",
    "Chunk",
    "JobStates",
    "chunk_groups",
    "require_submitit",
    "run_chunk",
    "submit",
]

EXECUTORS = ("local", "slurm", "submitit-local")
"""``local``: worker processes here; ``slurm``: a Slurm job array; ``submitit-local``:
the same array tasks as local processes (submitit's ``local`` cluster; for tests)."""


def require_submitit():
    """The ``submitit`` module, or a one-line error saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "--executor slurm needs submitit, which is not installed: pip install 'hessbench[slurm]'"
        ) from None
    return submitit


def chunk_groups(groups: list[Group], chunks: int | None) -> list[list[Group]]:
    """Deal whole groups round-robin into ``chunks`` lists (default: one group each).

    >>> chunk_groups(list("abcde"), 2)
    [['a', 'c', 'e'], ['b', 'd']]
    """
    n = len(groups) if chunks is None else max(1, min(chunks, len(groups)))
    return [groups[k::n] for k in range(n)]


@dataclass
class Chunk:
    """What one array task evaluates, and where it writes."""

    groups: list[Group]
    defaults: Defaults
    shard: Path
    jobs: int = 1

    @property
    def signals(self) -> Path:
        """Signals the task received (``NAME UNIX-TIME`` a line): how a local job ended."""
        return self.shard.with_suffix(".signals")


class _Stop(Exception):
    pass


def run_chunk(chunk: Chunk) -> dict:
    """The body of an array task: evaluate the chunk's cells into its shard file.

    SIGTERM and SIGINT (Slurm's cancel or time limit; submitit-local's cancel or
    timeout) stop it cleanly: the worker processes are killed and finished cells
    stay in the shard. SIGUSR2 (submitit's early time-limit warning) is noted
    and otherwise ignored: the task runs until the scheduler stops it.
    """

    def note(signum: int) -> None:
        with open(chunk.signals, "a", encoding="utf-8") as fh:
            fh.write(f"{signal.Signals(signum).name} {time.time():.3f}\n")

    def stop(signum: int, frame: object) -> None:
        note(signum)
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR2, lambda signum, frame: note(signum))
    store = CellStore(path=chunk.shard)
    count, stopped = 0, None

    def record(rec: dict) -> None:
        nonlocal count
        guarded = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, guarded)  # never a torn record
        try:
            store.append(rec)
            count += 1
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, guarded)

    try:
        if chunk.defaults.device == "cuda" and not torch.cuda.is_available():
            message = f"device cuda requested, but torch.cuda.is_available() is false on {os.uname().nodename}"
            for g in chunk.groups:
                for cell_id, est in g.cells:
                    rec = base_record(g.variant.name, est, g.seed, cell_id)
                    record({**rec, "status": "error", "message": message})
        else:
            run_groups(
                chunk.groups,
                chunk.defaults,
                jobs=chunk.jobs,
                on_start=lambda cid: None,
                on_record=record,
                log_path=chunk.shard.with_suffix(".log"),
            )
    except _Stop as exc:
        stopped = str(exc)
    finally:
        store.close()
    return {"cells": count, "stopped_by": stopped}


def _local_signal_delay_s(cluster: Cluster) -> int:
    """How long before its time limit submitit's local cluster warns a task (SIGUSR2)."""
    return max(1, min(30, int(cluster.time_min * 60) // 4))


def _executor(kind: str, folder: Path, cluster: Cluster, defaults: Defaults, jobs: int, name: str):
    submitit = require_submitit()
    cpus = cluster.cpus_per_task or jobs * defaults.threads
    if kind == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder / "%j")
        ex.update_parameters(
            timeout_min=cluster.time_min, signal_delay_s=_local_signal_delay_s(cluster)
        )
        return ex
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    gpus = cluster.gpus if cluster.gpus is not None else (1 if defaults.device == "cuda" else 0)
    params = {
        "name": name,
        "timeout_min": math.ceil(cluster.time_min),
        "cpus_per_task": cpus,
        "mem_gb": cluster.mem_gb,
        "gpus_per_node": gpus or None,
        "slurm_partition": cluster.partition,
        "slurm_array_parallelism": cluster.array_parallelism,
        "slurm_account": cluster.account,
        "slurm_qos": cluster.qos,
        "slurm_constraint": cluster.constraint,
        "slurm_setup": list(cluster.setup) or None,
        # submitit asks Slurm for SIGUSR2 this long before the time limit (default 90 s,
        # which with a short limit comes before Python has started, and kills the task)
        "slurm_signal_delay_s": max(10, min(90, int(math.ceil(cluster.time_min) * 60) // 4)),
    }
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def submit(
    run_dir: Path,
    session: str,
    groups: list[Group],
    defaults: Defaults,
    cluster: Cluster,
    *,
    executor: str,
    jobs: int,
    name: str,
) -> dict:
    """Submit one array task per chunk of ``groups``; write and return the manifest."""
    shards = run_dir / SHARDS
    ensure_dir(shards)
    folder = run_dir / "submitit"
    ex = _executor(executor, folder, cluster, defaults, jobs, name)
    parts = chunk_groups(groups, cluster.chunks)
    chunks = [
        Chunk(part, defaults, shards / f"{session}-{k}.jsonl", jobs) for k, part in enumerate(parts)
    ]
    submitted = ex.map_array(run_chunk, chunks)
    manifest = {
        "session": session,
        "executor": executor,
        "folder": str(folder / "%j"),
        "job_id": submitted[0].job_id.split("_")[0] if executor == "slurm" else None,
        "signal_delay_s": _local_signal_delay_s(cluster) if executor != "slurm" else None,
        "tasks": [
            {
                "task": k,
                "job_id": job.job_id,
                "shard": chunk.shard.name,
                "cells": [
                    base_record(g.variant.name, est, g.seed, cell_id)
                    for g in chunk.groups
                    for cell_id, est in g.cells
                ],
            }
            for k, (chunk, job) in enumerate(zip(chunks, submitted, strict=True))
        ],
    }
    atomic_write(shards / f"{session}.json", json.dumps(manifest, indent=1))
    return manifest


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class JobStates:
    """Job states for :class:`hessbench.store.shards.Collector`.

    Slurm's come through submitit (``sacct``, asked at most every
    ``min_interval_s`` growing to ``max_interval_s`` as the wait goes on); a
    submitit-local job's from its process and the signals its task received.
    """

    min_interval_s: float = 1.0
    max_interval_s: float = 15.0
    _jobs: dict = field(default_factory=dict)
    _last: float = 0.0
    _start: float = field(default_factory=time.monotonic)

    def __call__(self, manifest: dict, task: dict) -> str:
        """The state of ``task``'s job: an upper-case Slurm state name."""
        if manifest["executor"] == "slurm":
            return self._slurm(manifest, task["job_id"])
        return self._local(manifest, task)

    def _slurm(self, manifest: dict, job_id: str) -> str:
        submitit = require_submitit()
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = submitit.SlurmJob(folder=manifest["folder"], job_id=job_id)
        now = time.monotonic()
        interval = min(self.max_interval_s, max(self.min_interval_s, (now - self._start) / 8))
        if now - self._last >= interval:
            job.watcher.update()
            self._last = now
        state = job.watcher.get_state(job_id, mode="cache")
        return (state.split() or ["UNKNOWN"])[0].upper()

    def _local(self, manifest: dict, task: dict) -> str:
        submitit = require_submitit()
        if _running(int(task["job_id"])):
            return "RUNNING"
        run_dir = Path(manifest["folder"]).parent.parent  # RUN_DIR/submitit/%j
        signals_file = (run_dir / SHARDS / task["shard"]).with_suffix(".signals")
        first: dict[str, float] = {}
        if signals_file.exists():
            for line in signals_file.read_text().splitlines():
                name, _, at = line.partition(" ")
                first.setdefault(name, float(at or 0))
        stop = min((first[s] for s in ("SIGINT", "SIGTERM") if s in first), default=None)
        if stop is not None:
            # submitit's local cluster warns (SIGUSR2) signal_delay_s before its time
            # limit, and stops the task (SIGINT) at it; a cancel sends SIGINT alone
            warned = first.get("SIGUSR2")
            late = warned is not None and stop - warned >= manifest["signal_delay_s"] - 0.5
            return "TIMEOUT" if late else "CANCELLED"
        job = submitit.LocalJob(folder=manifest["folder"], job_id=task["job_id"])
        if not job.paths.result_pickle.exists():
            return "FAILED"
        try:
            job.result()
        except Exception:
            return "FAILED"
        return "COMPLETED"
