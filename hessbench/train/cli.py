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
from rich.table import Table

from hessbench.errors import HessbenchError
from hessbench.kinds import RunRequest, declared_kind, first_line
from hessbench.kinds.console import (
    chosen_lrs_table,
    finish_runs,
    print_plan,
    run_metadata,
    run_with_progress,
)

__all__ = [
    "KIND",
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
    return declared_kind(path) == "train"


def _summary(run_dir: Path) -> Table:
    from hessbench.train.report import best_lrs, lr_table
    from hessbench.train.runner import load_runs

    runs, _ = load_runs(run_dir)
    return chosen_lrs_table(
        run_dir, runs, lr_table, best_lrs, "heldout_loss_median", "final held-out loss (median)"
    )


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
    summary = run_with_progress(
        err, lambda **callbacks: run_train_suite(suite_path, opts, **callbacks), _diverged_at
    )

    def failed() -> int:
        from hessbench.train.runner import load_runs

        runs, _ = load_runs(summary.run_dir)
        return int(runs["status"].isin(["error", "crashed"]).sum())

    return finish_runs(
        err, summary, _summary(summary.run_dir), failed, "--retry-failed re-runs them"
    )


def _diverged_at(rec: dict) -> str:
    return f" at step {rec['diverged_at']}" if rec.get("diverged_at") else ""


def train_validate_command(suite_path: str | Path) -> int:
    """Check a train suite and print how many runs it plans; return 0 (errors raise)."""
    from hessbench.train.schema import load_train_suite, plan_runs

    suite = load_train_suite(suite_path)
    runs = plan_runs(suite)
    print_plan(suite_path, suite, runs, f"{suite.steps} steps")
    return 0


def train_report_command(run_dir: str | Path, output: Path | None = None) -> int:
    """Write the report of a train run folder (default ``<run_dir>/report``); return 0."""
    from hessbench.report.page import default_output
    from hessbench.train.report import render_train_report

    run_dir = Path(run_dir)
    run_metadata(run_dir)  # refuses a folder that is not a run
    out = output or default_output(run_dir)
    report = render_train_report(run_dir, out)
    for f in report.figures:
        if f.figure is None:
            print(f"skipped figure {f.name}: {f.skipped}", file=sys.stderr)
    drawn = sum(f.figure is not None for f in report.figures)
    print(
        f"report: {out / 'report.md'} and {out / 'index.html'} "
        f"({len(report.tables)} tables, {drawn} figures)"
    )
    return 0


class TrainKind:
    """``kind: train``: optimizers x learning rates x seeds on one task (docs/train.md)."""

    name = "train"
    run_options = frozenset(
        ("output", "jobs", "seeds", "retry_failed", "force", "quick", "dry_run")
    )

    def validate(self, suite: Path) -> int:
        """Check a train suite and print how many runs it plans."""
        return train_validate_command(suite)

    def describe(self, suite: Path) -> tuple[str, str]:
        """The number of runs and the description's first line."""
        from hessbench.train.schema import load_train_suite, plan_runs

        s = load_train_suite(suite)
        return f"{len(plan_runs(s))} runs", first_line(s.description)

    def run(self, request: RunRequest) -> int:
        """Run (or resume) a train suite with a progress bar."""
        return train_command(
            request.suite, request.output, request.jobs, seeds=list(request.seeds) or None,
            retry_failed=request.retry_failed, force=request.force, quick=request.quick,
            dry_run=request.dry_run,
        )  # fmt: skip

    def show(self, run_dir: Path) -> int:
        """Print each optimizer's chosen learning rate and its held-out loss."""
        Console().print(_summary(run_dir))
        return 0

    def report(self, run_dir: Path, output: Path | None) -> int:
        """Write the train report (learning curves, chosen learning rates)."""
        return train_report_command(run_dir, output)


KIND = TrainKind()

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
