"""Command-line entry points for rl suites.

``hessbench run`` hands a suite with ``kind: rl`` (:func:`is_rl_suite`) to
:func:`run_rl_command`; :func:`rl_report_command` writes the report of an rl run
folder (:func:`hessbench.rl.runner.is_rl_run`).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["is_rl_suite", "rl_report_command", "run_rl_command"]


def is_rl_suite(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` says ``kind: rl`` at its top level.

    Cheap and forgiving: an unreadable or malformed file is not an rl suite.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "rl"


def _summary(run_dir: Path) -> Table:
    from hessbench.report._table import fmt
    from hessbench.rl.report import best_lrs, lr_table
    from hessbench.rl.runner import load_rl_runs
    from hessbench.train.schema import format_lr

    runs, _ = load_rl_runs(run_dir)
    table = Table(title=str(run_dir))
    for col in ("optimizer", "chosen lr", "ok/seeds", "final return (median)"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    if runs.empty:
        return table
    per_lr = lr_table(runs)
    for label, lr in best_lrs(runs).items():
        r = per_lr[(per_lr["optimizer"] == label) & (per_lr["lr"] == lr)].iloc[0]
        table.add_row(
            label, format_lr(lr), f"{r['ok']}/{r['seeds']}", fmt(r["final_return_median"], ".4g")
        )
    return table


def run_rl_command(suite_path: str | Path, output: Path | None = None, jobs: int = 1) -> int:
    """Run (or resume) an rl suite with a progress bar; return the exit code.

    0: every run ended ``ok`` or ``diverged``; 1: some ended ``error`` or
    ``crashed``; 130: interrupted (finished runs are on disk; the same command
    resumes). Raises :class:`~hessbench.errors.HessbenchError` for a bad suite or
    folder or a missing gymnasium (the caller prints it as one line).
    """
    from hessbench.rl.runner import run_rl_suite

    err = Console(stderr=True)
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
            progress.console.print(
                f"[yellow]{rec['status']}[/]: {escape(rec['cell_id'])}: "
                f"{escape(str(rec.get('message', '')))}"
            )

    with progress:
        summary = run_rl_suite(
            suite_path,
            output,
            jobs,
            on_plan=on_plan,
            on_start=lambda rid: progress.update(bar["id"], run=rid),
            on_record=on_record,
        )
    Console().print(_summary(summary.run_dir))
    print(f"results: {summary.run_dir / 'runs.csv'} ({len(summary.planned)} runs)")
    if summary.interrupted:
        err.print("interrupted: finished runs are on disk; run the same command to resume")
        return 130
    failed = summary.statuses["error"] + summary.statuses["crashed"]
    if failed:
        err.print(f"{failed} runs failed; see 'message' in runs.csv (re-running retries them)")
        return 1
    return 0


def rl_validate_command(suite_path: str | Path) -> int:
    """Check an rl suite and print how many runs it plans; return 0 (errors raise)."""
    from hessbench.rl.schema import load_rl_suite, plan_rl_runs

    suite = load_rl_suite(suite_path)
    runs = plan_rl_runs(suite)
    print(
        f"{suite_path}: ok: {len(suite.optimizers)} optimizers, "
        f"{sum(len(o.lrs) for o in suite.optimizers)} learning rates, "
        f"{len(suite.seed_list)} seeds, "
        f"{len(runs)} runs of {suite.total_steps} environment steps"
    )
    return 0


def rl_report_command(run_dir: str | Path, output: Path | None = None) -> int:
    """Write the report of an rl run folder (default ``reports/<suite>``); return 0."""
    import json

    from hessbench.errors import HessbenchError
    from hessbench.rl.report import render_rl_report

    run_dir = Path(run_dir)
    meta_path = run_dir / "metadata.json"
    if not meta_path.exists():
        raise HessbenchError(f"{run_dir}: not a run folder (no metadata.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    out = output or Path("reports") / str(meta.get("suite", "rl"))
    render_rl_report(run_dir, out)
    print(f"report: {out / 'report.md'}")
    return 0
