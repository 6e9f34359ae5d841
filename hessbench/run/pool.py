"""Run groups of cells in worker processes that a crash or a hang cannot spread from.

Each worker is a separate process (``spawn``) that receives one group at a time
(a task variant, a seed and its cells) and reports ``("start", cell_id)``
before and ``("done", record)`` after each cell. The parent watches the
workers: a worker that dies marks its current cell ``crashed`` (with the exit
code or signal), one that exceeds the per-cell timeout is killed and marks it
``timeout``; either way the rest of its group goes to a fresh worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from hessbench.bench.cell import GroupEvaluator, base_record
from hessbench.estimators import Estimator
from hessbench.suite import Defaults, TaskVariant

__all__ = ["Group", "run_groups"]


@dataclass
class Group:
    """Cells sharing a task variant and a seed (so they share the ground truth)."""

    variant: TaskVariant
    seed: int
    cells: list[tuple[str, Estimator]]


def _worker_main(conn: Connection, defaults: Defaults, log_path: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    # Slurm (through submitit) warns every process of a job with SIGUSR2 before its time
    # limit; that is the parent's business (hessbench.run.slurm), not a reason to die
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if log_path:  # keep the terminal for the parent's progress; keep crash output
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    torch.set_num_threads(defaults.threads)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        group: Group = msg
        evaluator = GroupEvaluator(group.variant, group.seed, defaults)
        for cell_id, est in group.cells:
            conn.send(("start", cell_id))
            conn.send(("done", evaluator.evaluate(est, cell_id)))
        conn.send(("group_done", None))


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    group: Group | None = None
    current: str | None = None
    started: float = 0.0
    done: set[str] = field(default_factory=set)


def _signal_name(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_groups(
    groups: list[Group],
    defaults: Defaults,
    *,
    jobs: int,
    on_start: Callable[[str], None],
    on_record: Callable[[dict], None],
    log_path: Path | None = None,
) -> None:
    """Evaluate every cell of ``groups`` with ``jobs`` worker processes.

    ``on_record`` is called in the parent, in completion order, with every
    cell's record (ok, unsupported, error, timeout or crashed). The workers'
    stdout and stderr go to ``log_path`` when given.
    """
    ctx = mp.get_context("spawn")
    queue: deque[Group] = deque(groups)
    workers: list[_Worker] = []

    def spawn() -> _Worker:
        parent, child = ctx.Pipe()
        log = str(log_path) if log_path else None
        proc = ctx.Process(target=_worker_main, args=(child, defaults, log), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def fail_current(w: _Worker, status: str, message: str) -> None:
        assert w.group is not None
        remaining = [c for c in w.group.cells if c[0] not in w.done]
        if w.current is not None:
            est = dict(remaining)[w.current]
            rec = base_record(w.group.variant.name, est, w.group.seed, w.current)
            on_record({**rec, "status": status, "message": message})
            remaining = [c for c in remaining if c[0] != w.current]
        if remaining:
            queue.appendleft(Group(w.group.variant, w.group.seed, remaining))
        w.process.kill()
        w.process.join()
        w.conn.close()

    try:
        while queue or any(w.group for w in workers):
            while queue and (len(workers) < jobs or any(w.group is None for w in workers)):
                w = next((w for w in workers if w.group is None), None)
                if w is None:
                    w = spawn()
                    workers.append(w)
                w.group, w.current, w.done = queue.popleft(), None, set()
                w.conn.send(w.group)
            busy = [w for w in workers if w.group is not None]
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.2)
            for w in busy:
                alive = True
                try:
                    while w.conn.poll():
                        kind, payload = w.conn.recv()
                        if kind == "start":
                            w.current, w.started = payload, time.monotonic()
                            on_start(payload)
                        elif kind == "done":
                            w.done.add(payload["cell_id"])
                            w.current = None
                            on_record(payload)
                        else:
                            w.group = None
                except (EOFError, OSError):
                    alive = False
                if w.group is None:
                    continue
                if not alive or not w.process.is_alive():
                    w.process.join(timeout=1)
                    fail_current(
                        w, "crashed", f"worker process died ({_signal_name(w.process.exitcode)})"
                    )
                    workers[workers.index(w)] = spawn()
                elif w.current and time.monotonic() - w.started > defaults.timeout_s:
                    fail_current(w, "timeout", f"cell exceeded timeout_s={defaults.timeout_s:g}")
                    workers[workers.index(w)] = spawn()
    finally:
        for w in workers:
            if w.process.is_alive():
                if w.group is None:
                    with contextlib.suppress(OSError):
                        w.conn.send(None)
                    w.process.join(timeout=2)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
