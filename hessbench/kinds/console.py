"""Command-line pieces shared by the suite kinds: progress, summaries, exit codes.

``train`` and ``rl`` suites (:mod:`hessbench.train.cli`, :mod:`hessbench.rl.cli`)
run with the same progress bar and end with the same summary and exit codes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from hessbench.errors import HessbenchError

__all__ = [
    "chosen_lrs_table",
    "finish_runs",
    "print_plan",
    "progress_bar",
    "run_metadata",
    "run_with_progress",
]

S = TypeVar("S")


class RateColumn(ProgressColumn):
    """How fast units finish: ``12.3 s/it`` (or ``4.5 it/s`` when faster than one a second)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("- s/it", style="progress.data.speed")
        text = f"{1 / speed:.1f} s/it" if speed < 1 else f"{speed:.1f} it/s"
        return Text(text, style="progress.data.speed")


def progress_bar(console: Console, item: str) -> Progress:
    """A bar with a count, the rate, the time left and the current cell or run (``item``).

    The count, rate and time left keep their full width at any terminal width; a
    long ``item`` is cut with an ellipsis instead.
    """
    fixed = {"no_wrap": True}
    return Progress(
        TextColumn("{task.description}", table_column=Column(**fixed)),
        BarColumn(bar_width=10, table_column=Column(**fixed)),
        MofNCompleteColumn(table_column=Column(**fixed)),
        RateColumn(table_column=Column(**fixed)),
        TimeRemainingColumn(table_column=Column(**fixed)),
        TextColumn(
            f"{{task.fields[{item}]}}",
            markup=False,
            table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=1),
        ),
        console=console,
        expand=True,
    )


def run_with_progress(
    err: Console, start: Callable[..., S], note: Callable[[dict], str] = lambda rec: ""
) -> S:
    """``start(on_plan=, on_start=, on_record=)`` of a train or rl suite, with a progress bar.

    Says on ``err`` how many runs are already done, and every run that did not
    end ``ok`` (with ``note(record)`` after its status).
    """
    progress = progress_bar(err, "run")
    bar: dict = {}

    def on_plan(summary: Any) -> None:
        skipped = len(summary.planned) - len(summary.todo)
        err.print(f"{len(summary.planned)} runs, {skipped} already done; writing {summary.run_dir}")
        bar["id"] = progress.add_task("runs", total=len(summary.todo), run="")
        progress.start()  # only now: an error before the plan prints no empty bar line

    def on_record(rec: dict) -> None:
        progress.update(bar["id"], advance=1)
        if rec["status"] != "ok":
            progress.console.print(
                f"[yellow]{rec['status']}[/]{note(rec)}: {escape(rec['cell_id'])}: "
                f"{escape(str(rec.get('message', '')))}"
            )

    try:
        return start(
            on_plan=on_plan,
            on_start=lambda rid: progress.update(bar["id"], run=rid),
            on_record=on_record,
        )
    finally:
        if progress.live.is_started:  # stop() itself prints a line break
            progress.stop()


def finish_runs(
    err: Console, summary: Any, table: Table, failed: Callable[[], int], retry: str
) -> int:
    """Print ``table`` and where the results are; the exit code of a train or rl run.

    0: every run ended ``ok`` or ``diverged``; 1: ``failed()`` runs failed (``retry``
    says how to re-run them); 130: interrupted.
    """
    Console().print(table)
    print(f"results: {summary.run_dir / 'runs.csv'} ({len(summary.planned)} runs)")
    if summary.interrupted:
        err.print("interrupted: finished runs are on disk; run the same command to resume")
        return 130
    n = failed()
    if n:
        err.print(f"{n} runs failed; see 'message' in runs.csv ({retry})")
        return 1
    return 0


def chosen_lrs_table(
    run_dir: Path,
    runs: Any,
    lr_table: Callable[[Any], Any],
    best_lrs: Callable[[Any], dict],
    metric: str,
    title: str,
) -> Table:
    """Each optimizer's chosen learning rate, its ok/seeds and ``metric`` (column ``title``)."""
    from hessbench.optim.spec import format_lr
    from hessbench.report.table import fmt

    table = Table(title=str(run_dir))
    for col in ("optimizer", "chosen lr", "ok/seeds", title):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    if runs.empty:
        return table
    per_lr = lr_table(runs)
    for label, lr in best_lrs(runs).items():
        r = per_lr[(per_lr["optimizer"] == label) & (per_lr["lr"] == lr)].iloc[0]
        table.add_row(label, format_lr(lr), f"{r['ok']}/{r['seeds']}", fmt(r[metric], ".4g"))
    return table


def print_plan(suite_path: str | Path, suite: Any, runs: list, length: str) -> None:
    """The line of ``hessbench validate``: optimizers, learning rates, seeds, runs of ``length``."""
    print(
        f"{suite_path}: ok: {len(suite.optimizers)} optimizers, "
        f"{sum(len(o.lrs) for o in suite.optimizers)} learning rates, "
        f"{len(suite.seed_list)} seeds, {len(runs)} runs of {length}"
    )


def run_metadata(run_dir: Path) -> dict:
    """A run folder's ``metadata.json`` (HessbenchError if it has none)."""
    meta_path = run_dir / "metadata.json"
    if not meta_path.exists():
        raise HessbenchError(f"{run_dir}: not a run folder (no metadata.json)")
    return json.loads(meta_path.read_text(encoding="utf-8"))
