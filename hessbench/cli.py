"""The ``hessbench`` command line.

Commands catch the project's own errors at the boundary and print them as one
line (exit code 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hessbench import __version__
from hessbench.errors import HessbenchError
from hessbench.kinds.console import progress_bar

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Benchmark and evaluate Hessian-diagonal estimators in PyTorch.",
)
list_app = typer.Typer(no_args_is_help=True, help="List what hessbench knows about.")
app.add_typer(list_app, name="list")

F = TypeVar("F", bound=Callable[..., object])


def _one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HessbenchError as exc:
            print(f"hessbench: error: {exc}", file=sys.stderr)
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


def _stdout() -> Console:
    """Standard output; wide enough for full estimator labels when not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def _fmt(value: object, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_table(df, title: str) -> Table:
    """Per estimator label: cells by status, median relative L1, L1/HesScale, cost ratios.

    ``time`` is the median CPU-time ratio to one gradient, ``memory`` the median
    peak-memory ratio to one gradient.
    """
    table = Table(title=title, caption="time, memory: ratio to one gradient (median)")
    for col in ("estimator", "ok", "other", "rel. L1", "L1 / HesScale", "time", "memory"):
        if col == "estimator":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for label, g in df.groupby("label", sort=True):
        ok = g[g["status"] == "ok"]
        other = ", ".join(
            f"{k} {v}" for k, v in g[g["status"] != "ok"]["status"].value_counts().items()
        )
        table.add_row(
            escape(str(label)),
            str(len(ok)),
            other or "-",
            _fmt(ok["rel_l1"].median()),
            _fmt(ok["l1_over_hesscale"].median()),
            _fmt(ok["cpu_time_ratio"].median(), ".2f"),
            _fmt(ok["memory_ratio"].median(), ".2f"),
        )
    return table


def _suite_kind(path: Path) -> str:
    """``train``, ``rl`` or ``accuracy`` (the default), from the suite's ``kind:`` field."""
    from hessbench.kinds.console import suite_kind

    kind = suite_kind(path)
    return kind if kind in ("train", "rl") else "accuracy"


@app.command("validate")
@_one_line_errors
def validate(suite: Path = typer.Argument(..., help="Suite YAML file.")) -> None:
    """Check a suite file and print what it would run (no computation)."""
    from hessbench.suite import load_suite, plan_cells, task_variants

    kind = _suite_kind(suite)
    if kind == "train":
        from hessbench.train import train_validate_command

        raise typer.Exit(train_validate_command(suite))
    if kind == "rl":
        from hessbench.rl.cli import rl_validate_command

        raise typer.Exit(rl_validate_command(suite))
    s = load_suite(suite)
    cells = plan_cells(s)
    labels = sorted({c.estimator.label for c in cells})
    print(
        f"{suite}: ok: suite '{s.name}': {len(task_variants(s))} task variants, "
        f"{len(labels)} estimator labels, {len(s.defaults.seed_list)} seeds, {len(cells)} cells"
    )


def _cluster_overrides(**options: object) -> dict:
    """The ``cluster:`` fields given on the command line."""
    return {k: v for k, v in options.items() if v is not None}


@app.command("run")
@_one_line_errors
def run(
    suite: Path = typer.Argument(..., help="Suite YAML file, e.g. suites/small_mlp.yaml."),
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
    from hessbench.run.runner import RunOptions, plan_run, run_suite
    from hessbench.store.records import FAILED, frame, load
    from hessbench.store.shards import parse_shard

    kind = _suite_kind(suite)
    if kind != "accuracy":
        given = {
            "--estimator": estimator, "--task": task, "--device": device, "--shard": shard,
            "--executor": executor != "local", "--no-wait": no_wait, "--chunks": chunks,
            "--partition": partition, "--time": time_min, "--cpus-per-task": cpus_per_task,
            "--mem-gb": mem_gb, "--gpus": gpus,
        }  # fmt: skip
        if kind == "rl":
            given.update({"--seed": seed, "--retry-failed": retry_failed, "--force": force,
                          "--quick": quick, "--dry-run": dry_run})  # fmt: skip
        for flag, value in given.items():
            if value:
                raise HessbenchError(f"{suite}: {flag} does not apply to kind: {kind} suites")
        if kind == "train":
            from hessbench.train import train_command

            code = train_command(
                suite, output, jobs, seeds=seed or None, retry_failed=retry_failed,
                force=force, quick=quick, dry_run=dry_run,
            )  # fmt: skip
        else:
            from hessbench.rl.cli import run_rl_command

            code = run_rl_command(suite, output, jobs)
        raise typer.Exit(code)

    if device is not None and device not in ("cpu", "cuda"):
        raise HessbenchError(f"--device {device!r}: expected cpu or cuda")
    opts = RunOptions(
        output, jobs, task or None, estimator or None, seed or None, retry_failed, force, quick,
        executor=executor, device=device, shard=parse_shard(shard) if shard else None,
        wait=not no_wait,
        cluster=_cluster_overrides(
            chunks=chunks, partition=partition, time_min=time_min, cpus_per_task=cpus_per_task,
            mem_gb=mem_gb, gpus=gpus,
        ),
    )  # fmt: skip
    err = Console(stderr=True)
    if dry_run:
        _, _, run_dir, cells = plan_run(suite, opts)
        for c in cells:
            print(c.id)
        err.print(f"{len(cells)} cells; results would go to {run_dir}")
        return
    progress = progress_bar(err, "cell")
    bar = {}

    def on_plan(summary) -> None:
        skipped = len(summary.planned) - len(summary.todo) - len(summary.in_flight)
        where = summary.shard_file or summary.run_dir
        err.print(f"{len(summary.planned)} cells, {skipped} already done; writing {where}")
        if summary.in_flight:
            jobs_ = ", ".join(sorted(set(summary.in_flight.values())))
            err.print(f"{len(summary.in_flight)} cells still running in earlier jobs ({jobs_})")
        bar["id"] = progress.add_task("cells", total=len(summary.todo), cell="")

    def on_record(rec: dict) -> None:
        progress.update(bar["id"], advance=1)
        if rec["status"] not in ("ok", "unsupported"):
            progress.console.print(
                f"[yellow]{rec['status']}[/]: {escape(rec['cell_id'])}: "
                f"{escape(str(rec.get('message', '')))}"
            )

    def on_submit(manifest: dict) -> None:
        ids = manifest["job_id"] or ", ".join(t["job_id"] for t in manifest["tasks"])
        n = len(manifest["tasks"])
        progress.console.print(
            f"submitted {n} array task{'s' * (n != 1)} ({manifest['executor']} job {ids}); "
            + ("waiting (Ctrl-C stops waiting; the jobs keep running)" if not no_wait else "")
        )
        progress.update(bar["id"], cell=f"job {ids}")

    with progress:
        summary = run_suite(
            suite,
            opts,
            on_plan=on_plan,
            on_start=lambda cid: progress.update(bar["id"], cell=cid),
            on_record=on_record,
            on_submit=on_submit,
        )
    collect_cmd = f"hessbench collect {summary.run_dir}"
    if summary.manifest is not None and no_wait:
        m = summary.manifest
        print(m["job_id"] or " ".join(t["job_id"] for t in m["tasks"]))
        err.print(f"when the jobs have ended: {collect_cmd}")
        return
    if summary.shard_file is not None:
        from hessbench.store.records import iter_records

        df = frame(iter_records(summary.shard_file)[0])
        _stdout().print(summary_table(df, f"{summary.shard_file}"))
        print(f"results: {summary.shard_file} ({len(df)} cells); merge them with: {collect_cmd}")
    else:
        df = load(summary.run_dir)
        _stdout().print(summary_table(df, f"{summary.run_dir}"))
        print(f"results: {summary.run_dir / 'results.csv'} ({len(df)} cells)")
    if summary.interrupted:
        err.print("interrupted: finished cells are on disk; run the same command to resume")
        if summary.manifest is not None:
            err.print(f"the submitted jobs keep running; later: {collect_cmd}")
        raise typer.Exit(130)
    failed = df["status"].isin(FAILED).sum()
    if failed:
        err.print(
            f"{failed} cells failed; see 'message' in results.csv (--retry-failed re-runs them)"
        )
        raise typer.Exit(1)


@app.command("collect")
@_one_line_errors
def collect(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/smoke/<hash>."),
    wait: bool = typer.Option(False, "--wait", help="First wait until the run's jobs end."),
) -> None:
    """Merge a run folder's shards (Slurm array tasks, --shard runs) into its results."""
    from hessbench.run.runner import collect as collect_run
    from hessbench.store.records import FAILED, load

    err = Console(stderr=True)
    new: list[dict] = []
    collector = collect_run(run_dir, wait=wait, on_record=new.append)
    df = load(run_dir)
    _stdout().print(summary_table(df, str(run_dir)))
    print(f"results: {run_dir / 'results.csv'} ({len(df)} cells, {len(new)} new)")
    if collector.in_flight:
        jobs = ", ".join(sorted(set(collector.in_flight.values())))
        err.print(f"{len(collector.in_flight)} cells still running in jobs {jobs}; collect again")
    if collector.unknown:
        err.print(f"job state unknown (sacct?) for {', '.join(sorted(collector.unknown))}")
    if df["status"].isin(FAILED).any():
        raise typer.Exit(1)


@app.command("show")
@_one_line_errors
def show(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/smoke/<hash>."),
) -> None:
    """Print a run's summary table."""
    from hessbench.store.records import load

    df = load(run_dir)
    _stdout().print(summary_table(df, str(run_dir)))


def _read_metadata(run_dir: Path) -> dict:
    import json

    path = run_dir / "metadata.json"
    if not run_dir.is_dir():
        raise HessbenchError(f"{run_dir}: no such run folder")
    if not path.exists():
        raise HessbenchError(f"{run_dir}: not a run folder (no metadata.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HessbenchError(f"{path}: not valid JSON: {exc}") from None


@app.command("report")
@_one_line_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/small_mlp/<hash>."),
    output: Path = typer.Option(
        None, "-o", "--output", help="Report folder (default: reports/<suite>)."
    ),
) -> None:
    """Write a run's tables, figures, report.md and index.html (deterministic).

    Run folders of ``kind: train`` and ``kind: rl`` suites get their own reports
    (learning curves, chosen learning rates; docs/train.md, docs/rl.md).
    """
    import shlex

    from hessbench.report.page import OUTPUTS, default_output, render_report, write_files
    from hessbench.rl.runner import is_rl_run
    from hessbench.store.records import load, load_parts
    from hessbench.train.runner import is_train_run

    if is_train_run(run_dir):
        from hessbench.train import train_report_command

        raise typer.Exit(train_report_command(run_dir, output))
    if is_rl_run(run_dir):
        from hessbench.rl.cli import rl_report_command

        raise typer.Exit(rl_report_command(run_dir, output))
    meta = _read_metadata(run_dir)
    df = load(run_dir)
    if df.empty:
        raise HessbenchError(f"{run_dir}: no finished cells to report")
    out = output if output is not None else default_output(meta)
    command = f"hessbench report {shlex.quote(str(run_dir))} -o {shlex.quote(str(out))}"
    rendered = render_report(df, load_parts(run_dir), meta, command)
    write_files(out, rendered.files, OUTPUTS)
    skipped = [f for f in rendered.figures if f.figure is None]
    for f in skipped:
        print(f"skipped figure {f.name}: {f.skipped}", file=sys.stderr)
    drawn = len(rendered.figures) - len(skipped)
    counts = f"{len(rendered.tables)} tables, {drawn} figures"
    print(f"report: {out / 'report.md'} and {out / 'index.html'} ({counts})")


@app.command("compare")
@_one_line_errors
def compare(
    run_a: Path = typer.Argument(..., help="The reference run folder."),
    run_b: Path = typer.Argument(..., help="The run folder compared with it."),
    factor: float = typer.Option(
        1.2, "--factor", help="Flag ratios B/A above this (worse) or below its inverse (better)."
    ),
) -> None:
    """Per cell, B/A of relative L1, time and memory ratios; exit 1 if something got worse."""
    from hessbench.report.compare import compare as compare_runs
    from hessbench.store.records import load

    if not factor > 1:
        raise HessbenchError(f"--factor must be above 1, got {factor}")
    res = compare_runs(load(run_a), load(run_b), factor)
    table = Table(title=f"changes beyond a factor {factor:g} (B = {run_b}, A = {run_a})")
    for col in ("cell", "what", "A", "B", "B / A", "verdict"):
        table.add_column(
            col, overflow="fold", justify="left" if col in ("cell", "what") else "right"
        )
    colour = {"worse": "red", "better": "green", "changed": "yellow"}

    def show(v: object) -> str:
        return escape(v) if isinstance(v, str) else _fmt(v)

    for c in res.changes:
        table.add_row(
            escape(c.cell_id), c.what, show(c.a), show(c.b), _fmt(c.ratio),
            f"[{colour[c.verdict]}]{c.verdict}[/]",
        )  # fmt: skip
    out = _stdout()
    if res.changes:
        out.print(table)
    for which, ids in (("A", res.only_a), ("B", res.only_b)):
        if ids:
            print(f"only in {which} ({len(ids)} cells):")
            for cid in ids:
                print(f"  {cid}")
    worse = len(res.worse)
    print(
        f"{res.compared} cells in both runs: {worse} worse, "
        f"{sum(c.verdict == 'better' for c in res.changes)} better, "
        f"{sum(c.verdict == 'changed' for c in res.changes)} changed status; "
        f"{len(res.only_a)} only in A, {len(res.only_b)} only in B"
    )
    if worse:
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
