"""The ``hessbench`` command line.

Commands catch the project's own errors, and file-system faults (read-only or
full disk, no permission), at the boundary and print them as one line (exit
code 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import errno
import functools
import importlib
import math
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hessbench import __version__
from hessbench.errors import HessbenchError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Benchmark and evaluate Hessian-diagonal estimators in PyTorch.",
)
list_app = typer.Typer(no_args_is_help=True, help="List what hessbench knows about.")
app.add_typer(list_app, name="list")

F = TypeVar("F", bound=Callable[..., object])


_FS_FAULTS = frozenset(
    {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EIO}
)
"""File-system faults (read-only or full disk, no permission): not bugs, so one line."""


def _one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HessbenchError as exc:
            print(f"hessbench: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except OSError as exc:
            # the store and the report name the path themselves; this catches the rest
            if exc.errno not in _FS_FAULTS:
                raise
            where = f"{exc.filename}: " if exc.filename is not None else ""
            print(f"hessbench: error: {where}{exc.strerror or exc}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _load_plugins() -> None:
    """Import the modules named in ``HESSBENCH_PLUGINS`` (comma-separated).

    A plugin module registers extra estimators with
    :func:`hessbench.estimators._base.register`; worker processes import it again
    when they unpickle those estimators. (Suites cannot import code.)
    """
    for name in filter(None, os.environ.get("HESSBENCH_PLUGINS", "").split(",")):
        try:
            importlib.import_module(name.strip())
        except ImportError as exc:
            raise HessbenchError(f"HESSBENCH_PLUGINS: cannot import {name!r}: {exc}") from None


@list_app.command("suites")
@_one_line_errors
def list_suites() -> None:
    """The suites shipped with hessbench: name, kind, size and description (run one by name)."""
    from hessbench.kinds import kind_of_suite
    from hessbench.suite.shipped import shipped_suites

    table = Table(title="hessbench suites (hessbench run NAME)")
    for col in ("name", "kind", "size", "description"):
        table.add_column(col, overflow="fold")
    for name, path in shipped_suites().items():
        kind = kind_of_suite(path)
        size, description = kind.describe(path)
        table.add_row(name, kind.name, size, escape(description))
    Console(width=max(100, Console().width)).print(table)


def _version(value: bool) -> None:
    if value:
        print(f"hessbench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Benchmark and evaluate Hessian-diagonal estimators in PyTorch."""
    try:
        _load_plugins()
    except HessbenchError as exc:
        print(f"hessbench: error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


@list_app.command("estimators")
@_one_line_errors
def list_estimators() -> None:
    """Every registered estimator: name, hyper-parameters, cost and whether it is random."""
    import dataclasses

    from hessbench.estimators import available_estimators, estimator_class

    table = Table(title="hessbench estimators")
    for col in ("name", "hyper-parameters (defaults)", "cost", "stochastic"):
        table.add_column(col)
    for name in available_estimators():
        cls = estimator_class(name)
        est = cls()
        fields = ", ".join(f"{f.name}={getattr(est, f.name)}" for f in dataclasses.fields(cls))
        table.add_row(name, fields or "-", cls.cost, "yes" if est.stochastic else "no")
    Console(width=140).print(table)


@app.command("validate")
@_one_line_errors
def validate(
    suite: Path = typer.Argument(..., help="Suite YAML file, or a shipped suite's name."),
) -> None:
    """Check a suite file and print what it would run (no computation)."""
    from hessbench.kinds import kind_of_suite
    from hessbench.suite.shipped import find_suite

    suite = find_suite(suite)
    raise typer.Exit(kind_of_suite(suite).validate(suite))


@app.command("run")
@_one_line_errors
def run(
    suite: Path = typer.Argument(
        ..., help="Suite YAML file (suites/small_mlp.yaml) or a shipped suite's name (small_mlp)."
    ),
    output: Path = typer.Option(
        None, "-o", "--output", help="Run folder (default: results/<suite>/<suite-hash>)."
    ),
    jobs: int = typer.Option(
        1, "-j", "--jobs", min=1, help="Worker processes (in each array task with slurm)."
    ),
    estimator: list[str] = typer.Option(
        None, "--estimator", help="Only these estimators (names, labels or patterns); repeatable."
    ),
    task: list[str] = typer.Option(None, "--task", help="Only these tasks (names or patterns)."),
    seed: list[int] = typer.Option(None, "--seed", help="Only these seeds; repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
    retry_failed: bool = typer.Option(
        False,
        "--retry-failed",
        help="Also re-run cells that ended in error, timeout, crash or cancellation.",
    ),
    force: bool = typer.Option(False, "--force", help="Discard the folder's finished cells."),
    quick: bool = typer.Option(
        False, "--quick", help="First seed, at most 2 batches per task, no timing repeats."
    ),
    device: str = typer.Option(
        None, "--device", help="cpu or cuda (overrides the suite's defaults.device)."
    ),
    executor: str = typer.Option(
        "local", "--executor", help="local (worker processes here) or slurm (a job array)."
    ),
    shard: str = typer.Option(
        None, "--shard", help="i/n: run only share i of n of the cells (docs/cluster.md)."
    ),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="slurm: submit, print the job id and exit (then collect)."
    ),
    chunks: int = typer.Option(
        None, "--chunks", min=1, help="slurm: array tasks (default: one per task and seed)."
    ),
    partition: str = typer.Option(None, "--partition", help="slurm: partition."),
    time_min: float = typer.Option(
        None, "--time", min=0, help="slurm: time limit per array task, minutes."
    ),
    cpus_per_task: int = typer.Option(
        None, "--cpus-per-task", min=1, help="slurm: CPUs per array task (default: jobs x threads)."
    ),
    mem_gb: float = typer.Option(None, "--mem-gb", min=0, help="slurm: memory per array task."),
    gpus: int = typer.Option(
        None, "--gpus", min=0, help="slurm: GPUs per array task (default: 1 with device cuda)."
    ),
) -> None:
    """Run a suite (resuming its folder), then print where the results are and a summary.

    ``kind: train`` (optimizer benchmark, docs/train.md) and ``kind: rl``
    (docs/rl.md) suites are handed to their own runners.
    """
    from hessbench.kinds import RunRequest, check_request, kind_of_suite, prestart_workers

    if executor == "local" and not dry_run:
        prestart_workers()
    from hessbench.suite.shipped import find_suite

    suite = find_suite(suite)
    request = RunRequest(
        suite, output, jobs, tuple(estimator or ()), tuple(task or ()), tuple(seed or ()),
        dry_run, retry_failed, force, quick, device, executor, shard, no_wait, chunks,
        partition, time_min, cpus_per_task, mem_gb, gpus,
    )  # fmt: skip
    kind = kind_of_suite(suite)
    check_request(kind, request)
    raise typer.Exit(kind.run(request))


@app.command("collect")
@_one_line_errors
def collect(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/smoke/<hash>."),
    wait: bool = typer.Option(False, "--wait", help="First wait until the run's jobs end."),
) -> None:
    """Merge a run folder's shards (Slurm array tasks, --shard runs) into its results."""
    from hessbench.kinds import kind_of_run

    kind = kind_of_run(run_dir)
    if not hasattr(kind, "collect"):
        raise HessbenchError(f"{run_dir}: kind: {kind.name} runs have no shards to collect")
    raise typer.Exit(kind.collect(run_dir, wait))


@app.command("show")
@_one_line_errors
def show(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/smoke/<hash>."),
) -> None:
    """Print a run's summary table."""
    from hessbench.kinds import kind_of_run

    raise typer.Exit(kind_of_run(run_dir).show(run_dir))


@app.command("report")
@_one_line_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/small_mlp/<hash>."),
    output: Path = typer.Option(
        None,
        "-o",
        "--output",
        help="Report folder (default: RUN_DIR/report; the committed reports/<suite> only when given).",
    ),
    index: bool = typer.Option(
        False,
        "--index",
        help="RUN_DIR is a folder of reports (e.g. reports/): write its index.html, linking each.",
    ),
) -> None:
    """Write a run's tables, figures, report.md and index.html (deterministic).

    Run folders of ``kind: train`` and ``kind: rl`` suites get their own reports
    (learning curves, chosen learning rates; docs/train.md, docs/rl.md). With
    ``--index``, write the index page of a folder of reports instead.
    """
    if index:
        from hessbench.report.index import write_index

        if output is not None:
            raise HessbenchError("-o does not apply with --index (the index goes into RUN_DIR)")
        path, count = write_index(run_dir)
        print(f"index: {path} ({count} reports)")
        raise typer.Exit(0)
    from hessbench.kinds import kind_of_run

    raise typer.Exit(kind_of_run(run_dir).report(run_dir, output))


@app.command("compare")
@_one_line_errors
def compare(
    run_a: Path = typer.Argument(..., help="The reference run folder."),
    run_b: Path = typer.Argument(..., help="The run folder compared with it."),
    factor: float = typer.Option(
        1.2,
        "--factor",
        help="Per estimator label, flag time and memory ratios B/A above this (worse) or "
        "below its inverse (better); time only when also beyond both runs' noise.",
    ),
    tol: float = typer.Option(
        1e-9, "--tol", help="Relative difference of an accuracy metric that counts as a change."
    ),
) -> None:
    """Status and accuracy per cell, time and memory per estimator label; exit 1 if worse."""
    from hessbench.kinds.accuracy import fmt, stdout
    from hessbench.report.compare import MIN_REPEATS
    from hessbench.report.compare import compare as compare_runs
    from hessbench.store.records import load

    if not factor > 1:
        raise HessbenchError(f"--factor must be above 1, got {factor}")
    if not tol >= 0:
        raise HessbenchError(f"--tol must be at least 0, got {tol}")
    res = compare_runs(load(run_a), load(run_b), factor, tol=tol)
    colour = {"worse": "red", "better": "green", "changed": "yellow"}

    def verdict(v: str) -> str:
        return f"[{colour[v]}]{v}[/]" if v in colour else v

    def show(v: object) -> str:
        return escape(v) if isinstance(v, str) else fmt(v, ".10g")

    out = stdout()
    if res.changes:
        table = Table(
            title=f"per cell: status, and accuracy beyond a relative {tol:g} (B = {run_b}, A = {run_a})"
        )
        for col in ("cell", "what", "A", "B", "B / A", "verdict"):
            table.add_column(
                col, overflow="fold", justify="left" if col in ("cell", "what") else "right"
            )
        for c in res.changes:
            table.add_row(
                escape(c.cell_id), c.what, show(c.a), show(c.b), fmt(c.ratio), verdict(c.verdict)
            )
        out.print(table)
    if res.cost:
        table = Table(
            title=f"per estimator label: CPU time and memory ratios to a gradient (medians), "
            f"factor {factor:g}",
            caption="time: median +- half the relative IQR; worse/better only beyond the factor "
            "and outside both runs' spread",
        )
        for col in (
            "label",
            "cells",
            "time A",
            "time B",
            "B / A",
            "time",
            "memory B / A",
            "memory",
        ):
            table.add_column(col, overflow="fold", justify="left" if col == "label" else "right")

        def interval(v: float, s: float) -> str:
            return "-" if math.isnan(v) else f"{fmt(v)} +- {s:.0%}"

        for c in res.cost:
            table.add_row(
                escape(c.label), f"{c.timed}/{c.cells}", interval(c.time_a, c.spread_a),
                interval(c.time_b, c.spread_b), fmt(c.time_ratio), verdict(c.time_verdict),
                fmt(c.memory_ratio), verdict(c.memory_verdict),
            )  # fmt: skip
        out.print(table)
    for which, ids in (("A", res.only_a), ("B", res.only_b)):
        if ids:
            print(f"only in {which} ({len(ids)} cells):")
            for cid in ids:
                print(f"  {cid}")
    unjudged = sum(c.time_verdict == "not judged" for c in res.cost)
    if unjudged:
        print(
            f"{unjudged} estimator labels not judged on time: no cell timed at least "
            f"{MIN_REPEATS} times with a recorded IQR in both runs"
        )

    def counts(changes) -> str:
        return f"{sum(v == 'worse' for v in changes)} worse, {sum(v == 'better' for v in changes)} better"

    print(
        f"{res.compared} cells in both runs: {res.worse} worse, {res.count('better')} better "
        f"(status {counts([c.verdict for c in res.status])}, "
        f"{sum(c.verdict == 'changed' for c in res.status)} changed; "
        f"accuracy {counts([c.verdict for c in res.accuracy])}; "
        f"time {counts([c.time_verdict for c in res.cost])}; "
        f"memory {counts([c.memory_verdict for c in res.cost])}); "
        f"{len(res.only_a)} only in A, {len(res.only_b)} only in B"
    )
    if res.worse:
        raise typer.Exit(1)


def _code(value: object) -> int:
    """The exit status of ``SystemExit(value)``, as Python computes it."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)  # sys.exit("message"): printed, status 1
    return 1


def console() -> None:
    """The ``hessbench`` command: :data:`app`, then an exit without interpreter teardown.

    Tearing down an interpreter that imported torch, pandas and rich takes
    0.4-0.8 s on a 2-core machine (module by module, object by object) after every
    result is already on disk: more than a tenth of ``hessbench run
    suites/small_mlp.yaml -j 2``. This does what Python's own shutdown does that
    can matter, in the same order, then leaves with ``os._exit``:

    1. wait for the non-daemon threads;
    2. run the ``atexit`` handlers (``logging``'s flush, ``multiprocessing``'s
       joins of its children, ``weakref.finalize`` callbacks such as temporary
       directories' removal);
    3. flush stdout and stderr (exit code 120 when that fails with a code of 0,
       as Python does).

    Any exception other than ``SystemExit`` propagates unchanged, with the normal
    shutdown. ``python -m hessbench`` runs the same.
    """
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = _code(exc.code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``) or stream
            code = code or 120
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
