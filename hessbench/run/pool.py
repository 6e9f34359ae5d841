"""The one worker pool: units of work in processes that a crash or a hang cannot spread from.

Every suite kind runs through :func:`run_batches`. Work comes in *batches* (units
that share set-up in a worker: an accuracy group of cells sharing one ground
truth, or a single train or rl run). Each worker is a separate process that
receives one batch at a time and reports ``("start", unit_id)`` before and
``("done", record)`` after each unit. The parent watches the workers: a worker
that dies marks its current unit ``crashed`` (with the exit code or signal), one
that exceeds the per-unit timeout is killed and marks it ``timeout``; either way
the rest of its batch goes to a fresh worker, and the other workers go on.

What a worker does is a picklable :class:`Work` object, sent once to each worker.

Workers start from a *fork server* where the platform has one (Linux, macOS;
``spawn`` elsewhere): a clean single-threaded process that imported torch and
the work's module once, and forks a worker per request, so a worker costs
milliseconds instead of the second and a half of importing torch. The server
starts with the first pool, or earlier with :func:`start_server` (``hessbench
run`` calls it first thing, so the server imports while the parent does).
Workers take the parent's ``sys.path`` and working directory but the
environment variables of the moment the server started.
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
from typing import Any, Protocol

from hessbench.errors import HessbenchError

__all__ = ["Batch", "Work", "run_batches", "start_server"]


def _start_method() -> str:
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def start_server(*modules: str) -> None:
    """Start the workers' fork server now, importing ``modules`` (and torch) in it.

    Returns at once; the server imports in the background. Does nothing where
    workers are spawned, or when this process's server already runs.
    """
    if _start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", *modules])
    # Slurm warns every process of a job with SIGUSR2 before its time limit (the parent's
    # business: hessbench.run.slurm); by default it would kill the server, and a dead
    # server looks to the parent like the death of every worker. The server starts with
    # it ignored (an ignored signal stays ignored across exec), and so do its workers.
    usr2 = getattr(signal, "SIGUSR2", None)
    previous = None
    if usr2 is not None and signal.getsignal(usr2) is not None:
        with contextlib.suppress(ValueError):  # not the main thread: leave it be
            previous = signal.signal(usr2, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        if previous is not None:
            signal.signal(usr2, previous)


@dataclass
class Batch:
    """Units of work evaluated together in one worker: ``(unit_id, unit)`` pairs and their key."""

    key: Any
    units: list[tuple[str, Any]]


class Work(Protocol):
    """What a worker does with a batch (picklable: it is sent to each worker process)."""

    def open(self, batch: Batch) -> Callable[[str, Any], dict]:
        """Set up for ``batch`` (e.g. its ground truth); the function records one unit."""
        ...

    def failed(self, batch: Batch, unit_id: str, unit: Any, status: str, message: str) -> dict:
        """The record of a unit whose worker crashed (``status`` crashed) or hung (timeout)."""
        ...


def _worker_main(conn: Connection, work: Work, threads: int, log_path: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    # Slurm (through submitit) warns every process of a job with SIGUSR2 before its time
    # limit; that is the parent's business (hessbench.run.slurm), not a reason to die
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if log_path:  # keep the terminal for the parent's progress; keep crash output
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    import torch

    torch.set_num_threads(threads)
    while True:
        batch: Batch | None = conn.recv()
        if batch is None:
            return
        evaluate = work.open(batch)
        for unit_id, unit in batch.units:
            conn.send(("start", unit_id))
            conn.send(("done", evaluate(unit_id, unit)))
        conn.send(("batch_done", None))


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    batch: Batch | None = None
    current: str | None = None
    started: float = 0.0
    done: set[str] = field(default_factory=set)
    ever_started: bool = False  # any unit in this process's life


_GRACE_S = 1.0
"""How long the parent waits before blaming a cell for a worker that looks stopped from outside."""


def _stopped_from_outside(code: int | None) -> bool:
    """A worker killed by SIGTERM or SIGHUP, or whose fork server died (exit code 255)."""
    outside = [getattr(signal, name, None) for name in ("SIGTERM", "SIGHUP")]
    return code == 255 or (code is not None and code < 0 and -code in outside)


def _signal_name(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_batches(
    batches: list[Batch],
    work: Work,
    *,
    jobs: int,
    threads: int,
    timeout_s: float | None,
    on_start: Callable[[str], None],
    on_record: Callable[[dict], None],
    log_path: Path | None = None,
) -> None:
    """Evaluate every unit of ``batches`` with ``jobs`` worker processes.

    ``on_record`` is called in the parent, in completion order, with every unit's
    record (whatever ``work`` records, or ``work.failed(...)`` for a crashed or
    timed-out unit). ``timeout_s`` (None: no limit) bounds one unit. The workers
    run ``threads`` torch threads; their stdout and stderr go to ``log_path`` when
    given. Ctrl-C (KeyboardInterrupt) kills the workers and propagates.

    Raises:
        HessbenchError: when three workers in a row die before starting any unit
            (they cannot start here; their output is in ``log_path``).
    """
    start_server(type(work).__module__)
    ctx = mp.get_context(_start_method())
    queue: deque[Batch] = deque(batches)
    workers: list[_Worker] = []
    stillborn = 0  # workers in a row that died before their first unit

    def spawn() -> _Worker:
        parent, child = ctx.Pipe()
        log = str(log_path) if log_path else None
        proc = ctx.Process(target=_worker_main, args=(child, work, threads, log), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def fail_current(w: _Worker, status: str, message: str) -> None:
        assert w.batch is not None
        remaining = [u for u in w.batch.units if u[0] not in w.done]
        if w.current is not None:
            unit = dict(remaining)[w.current]
            on_record(work.failed(w.batch, w.current, unit, status, message))
            remaining = [u for u in remaining if u[0] != w.current]
        if remaining:
            queue.appendleft(Batch(w.batch.key, remaining))
        w.process.kill()
        w.process.join()
        w.conn.close()

    try:
        while queue or any(w.batch for w in workers):
            while queue and (len(workers) < jobs or any(w.batch is None for w in workers)):
                w = next((w for w in workers if w.batch is None), None)
                if w is None:
                    w = spawn()
                    workers.append(w)
                w.batch, w.current, w.done = queue.popleft(), None, set()
                w.conn.send(w.batch)
            busy = [w for w in workers if w.batch is not None]
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.2)
            for w in busy:
                alive = True
                while True:
                    try:  # only the pipe: a failing callback is the caller's error
                        if not w.conn.poll():
                            break
                        kind, payload = w.conn.recv()
                    except (EOFError, OSError):
                        alive = False
                        break
                    if kind == "start":
                        w.current, w.started = payload, time.monotonic()
                        w.ever_started, stillborn = True, 0
                        on_start(payload)
                    elif kind == "done":
                        w.done.add(w.current or "")
                        w.current = None
                        on_record(payload)
                    else:
                        w.batch = None
                if w.batch is None:
                    continue
                if not alive or not w.process.is_alive():
                    w.process.join(timeout=1)
                    if _stopped_from_outside(w.process.exitcode):
                        # a job-level stop (Slurm's time limit, scancel) signals every
                        # process of the job at once: let this process's own SIGTERM
                        # stop the run before the cell is blamed for a crash
                        time.sleep(_GRACE_S)
                    code = _signal_name(w.process.exitcode)
                    fail_current(w, "crashed", f"worker process died ({code})")
                    stillborn = 0 if w.ever_started else stillborn + 1
                    if stillborn >= 3:
                        where = f"; their output is in {log_path}" if log_path else ""
                        raise HessbenchError(
                            f"worker processes die before their first unit ({code}, 3 in a row)"
                            + where
                        )
                    workers[workers.index(w)] = spawn()
                elif (
                    timeout_s is not None and w.current and time.monotonic() - w.started > timeout_s
                ):
                    fail_current(w, "timeout", f"cell exceeded timeout_s={timeout_s:g}")
                    workers[workers.index(w)] = spawn()
    finally:
        for w in workers:
            if w.process.is_alive():
                if w.batch is None:
                    with contextlib.suppress(OSError):
                        w.conn.send(None)
                    w.process.join(timeout=2)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
