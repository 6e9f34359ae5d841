"""Command-line entry points for rl suites.

``hessbench run`` hands a suite with ``kind: rl`` (:func:`is_rl_suite`) to
:func:`run_rl_command`; :func:`rl_report_command` writes the report of an rl run
folder (:func:`hessbench.rl.runner.is_rl_run`).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from hessbench.kinds import RunRequest, declared_kind, first_line
from hessbench.kinds.console import (
    chosen_lrs_table,
    finish_runs,
    print_plan,
    run_metadata,
    run_with_progress,
)

__all__ = ["KIND", "is_rl_suite", "rl_report_command", "run_rl_command"]


def is_rl_suite(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` says ``kind: rl`` at its top level.

    Cheap and forgiving: an unreadable or malformed file is not an rl suite.
    """
    return declared_kind(path) == "rl"


def _summary(run_dir: Path) -> Table:
    from hessbench.rl.report import best_lrs, lr_table
    from hessbench.rl.runner import load_rl_runs

    runs, _ = load_rl_runs(run_dir)
    return chosen_lrs_table(
        run_dir, runs, lr_table, best_lrs, "final_return_median", "final return (median)"
    )


def run_rl_command(suite_path: str | Path, output: Path | None = None, jobs: int = 1) -> int:
    """Run (or resume) an rl suite with a progress bar; return the exit code.

    0: every run ended ``ok`` or ``diverged``; 1: some ended ``error`` or
    ``crashed``; 130: interrupted (finished runs are on disk; the same command
    resumes). Raises :class:`~hessbench.errors.HessbenchError` for a bad suite or
    folder or a missing gymnasium (the caller prints it as one line).
    """
    from hessbench.rl.runner import run_rl_suite

    err = Console(stderr=True)
    summary = run_with_progress(
        err, lambda **callbacks: run_rl_suite(suite_path, output, jobs, **callbacks)
    )
    return finish_runs(
        err,
        summary,
        _summary(summary.run_dir),
        lambda: summary.statuses["error"] + summary.statuses["crashed"],
        "re-running retries them",
    )


def rl_validate_command(suite_path: str | Path) -> int:
    """Check an rl suite and print how many runs it plans; return 0 (errors raise)."""
    from hessbench.rl.schema import load_rl_suite, plan_rl_runs

    suite = load_rl_suite(suite_path)
    runs = plan_rl_runs(suite)
    print_plan(suite_path, suite, runs, f"{suite.total_steps} environment steps")
    return 0


def rl_report_command(run_dir: str | Path, output: Path | None = None) -> int:
    """Write the report of an rl run folder (default ``<run_dir>/report``); return 0."""
    from hessbench.report.page import default_output
    from hessbench.rl.report import render_rl_report

    run_dir = Path(run_dir)
    run_metadata(run_dir)  # refuses a folder that is not a run
    out = output or default_output(run_dir)
    render_rl_report(run_dir, out)
    print(f"report: {out / 'report.md'} and {out / 'index.html'}")
    return 0


class RlKind:
    """``kind: rl``: A2C on classic-control environments per optimizer (docs/rl.md)."""

    name = "rl"
    run_options = frozenset(("output", "jobs"))

    def validate(self, suite: Path) -> int:
        """Check an rl suite and print how many runs it plans."""
        return rl_validate_command(suite)

    def describe(self, suite: Path) -> tuple[str, str]:
        """The number of runs and the description's first line."""
        from hessbench.rl.schema import load_rl_suite, plan_rl_runs

        s = load_rl_suite(suite)
        return f"{len(plan_rl_runs(s))} runs", first_line(s.description)

    def run(self, request: RunRequest) -> int:
        """Run (or resume) an rl suite with a progress bar."""
        return run_rl_command(request.suite, request.output, request.jobs)

    def show(self, run_dir: Path) -> int:
        """Print each optimizer's chosen learning rate and its final return."""
        Console().print(_summary(run_dir))
        return 0

    def report(self, run_dir: Path, output: Path | None) -> int:
        """Write the rl report (return curves, chosen learning rates)."""
        return rl_report_command(run_dir, output)


KIND = RlKind()
