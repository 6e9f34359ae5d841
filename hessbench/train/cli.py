"""Command-line entry points for train suites.

``hessbench run`` hands a suite with ``kind: train`` (:func:`is_train_suite`) to
:func:`train_command`, and ``hessbench report`` a train run folder
(:func:`hessbench.train.runner.is_train_run`) to :func:`train_report_command`.
``python -m hessbench.train run|report`` runs them without the main CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from hessbench.errors import HessbenchError

__all__ = [
    "app",
    "is_train_suite",
    "train_command",
    "train_report_command",
    "train_validate_command",
]


def is_train_suite(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` says ``kind: train`` at its top level.

    Cheap and forgiving: an unreadable or malformed file is not a train suite (the
    accuracy-suite parser then reports its problems).
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "train"


def _summary(run_dir: Path) -> Table:
    from hessbench.report._table import fmt
    from hessbench.train.report import lr_table
    from hessbench.train.runner import load_runs
    from hessbench.train.schema import format_lr

    runs, _ = load_runs(run_dir)
    table = Table(title=str(run_dir))
    for col in ("optimizer", "chosen lr", "ok/seeds", "final held-out loss (median)"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    if runs.empty:
        return table
    from hessbench.train.report import best_lrs

    per_lr = lr_table(runs)
    for label, lr in best_lrs(runs).items():
        r = per_lr[(per_lr["optimizer"] == label) & (per_lr["lr"] == lr)].iloc[0]
        table.add_row(
            label, format_lr(lr), f"{r['ok']}/{r['seeds']}", fmt(r["heldout_loss_median"], ".4g")
        )
    return table


def train_command(
    suite_path: str | Path,
    output: Path | None = None,
    jobs: int = 1,
    *,
    seeds: list[int] | None = None,
    retry_failed: bool = False,
    force: bool = False,
    quick: bool = False,
    dry_run: bool = False,
) -> int:
    """Run (or resume) a train suite with a progress bar; return the exit code.

    0: every run ended ``ok`` or ``diverged``; 1: some ended ``error`` or
    ``crashed``; 130: interrupted (finished runs are on disk; the same command
    resumes). Raises :class:`~hessbench.errors.HessbenchError` for a bad suite or
    folder (the caller prints it as one line).
    """
    from hessbench.train.runner import TrainOptions, plan_train, run_train_suite

    opts = TrainOptions(output, jobs, seeds or None, retry_failed, force, quick)
    err = Console(stderr=True)
    if dry_run:
        _, _, run_dir, runs = plan_train(suite_path, opts)
        for r in runs:
            print(r.id)
        err.print(f"{len(runs)} runs; results would go to {run_dir}")
        return 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[run]}", markup=False),
        console=err,
    )
    bar: dict = {}

    def on_plan(summary) -> None:
        skipped = len(summary.planned) - len(summary.todo)
        err.print(f"{len(summary.planned)} runs, {skipped} already done; writing {summary.run_dir}")
        bar["id"] = progress.add_task("runs", total=len(summary.todo), run="")

    def on_record(rec: dict) -> None:
        progress.update(bar["id"], advance=1)
        if rec["status"] != "ok":
            where = f" at step {rec['diverged_at']}" if rec.get("diverged_at") else ""
            progress.console.print(
                f"[yellow]{rec['status']}[/]{where}: {escape(rec['cell_id'])}: "
                f"{escape(str(rec.get('message', '')))}"
            )

    with progress:
        summary = run_train_suite(
            suite_path,
            opts,
            on_plan=on_plan,
            on_start=lambda rid: progress.update(bar["id"], run=rid),
            on_record=on_record,
        )
    Console().print(_summary(summary.run_dir))
    print(f"results: {summary.run_dir / 'runs.csv'} ({len(summary.planned)} runs)")
    if summary.interrupted:
        err.print("interrupted: finished runs are on disk; run the same command to resume")
        return 130
    from hessbench.train.runner import load_runs

    runs, _ = load_runs(summary.run_dir)
    failed = int(runs["status"].isin(["error", "crashed"]).sum())
    if failed:
        err.print(f"{failed} runs failed; see 'message' in runs.csv (--retry-failed re-runs them)")
        return 1
    return 0


def train_validate_command(suite_path: str | Path) -> int:
    """Check a train suite and print how many runs it plans; return 0 (errors raise)."""
    from hessbench.train.schema import load_train_suite, plan_runs

    suite = load_train_suite(suite_path)
    runs = plan_runs(suite)
    print(
        f"{suite_path}: ok: {len(suite.optimizers)} optimizers, "
        f"{sum(len(o.lrs) for o in suite.optimizers)} learning rates, "
        f"{len(suite.seed_list)} seeds, {len(runs)} runs of {suite.steps} steps"
    )
    return 0


def train_report_command(run_dir: str | Path, output: Path | None = None) -> int:
    """Write the report of a train run folder (default ``reports/<suite>``); return 0."""
    import json

    from hessbench.train.report import render_train_report

    run_dir = Path(run_dir)
    meta_path = run_dir / "metadata.json"
    if not meta_path.exists():
        raise HessbenchError(f"{run_dir}: not a run folder (no metadata.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    out = output or Path("reports") / (
        str(meta.get("suite", "run")) + ("-quick" if meta.get("quick") else "")
    )
    report = render_train_report(run_dir, out)
    for f in report.figures:
        if f.figure is None:
            print(f"skipped figure {f.name}: {f.skipped}", file=sys.stderr)
    drawn = sum(f.figure is not None for f in report.figures)
    print(f"report: {out / 'report.md'} ({len(report.tables)} tables, {drawn} figures)")
    return 0


app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train suites.")


def _exit(fn, *args, **kwargs) -> None:
    try:
        code = fn(*args, **kwargs)
    except HessbenchError as exc:
        print(f"hessbench: error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command("run")
def _run(
    suite: Path = typer.Argument(..., help="A train suite YAML file."),
    output: Path = typer.Option(None, "-o", "--output", help="Run folder."),
    jobs: int = typer.Option(1, "-j", "--jobs", min=1, help="Worker processes."),
    seed: list[int] = typer.Option(None, "--seed", help="Only these seeds; repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Re-run failed runs."),
    force: bool = typer.Option(False, "--force", help="Discard the folder's finished runs."),
    quick: bool = typer.Option(False, "--quick", help="First seed, two evaluation intervals."),
) -> None:
    """Run (or resume) a train suite."""
    if not is_train_suite(suite):
        print(f"hessbench: error: {suite}: not a train suite (no 'kind: train')", file=sys.stderr)
        raise typer.Exit(2)
    _exit(
        train_command,
        suite,
        output,
        jobs,
        seeds=seed,
        retry_failed=retry_failed,
        force=force,
        quick=quick,
        dry_run=dry_run,
    )


@app.command("validate")
def _validate(suite: Path = typer.Argument(..., help="A train suite YAML file.")) -> None:
    """Check a train suite without running it."""
    _exit(train_validate_command, suite)


@app.command("report")
def _report(
    run_dir: Path = typer.Argument(..., help="A train run folder."),
    output: Path = typer.Option(None, "-o", "--output", help="Report folder."),
) -> None:
    """Write a train run's tables, figures and report.md."""
    _exit(train_report_command, run_dir, output)
