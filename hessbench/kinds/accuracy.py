"""The accuracy kind: estimators against the exact Hessian diagonal (``hessbench run``'s default).

Plans cells (task variant x seed x estimator label) from a suite, runs them in the
worker pool (or a Slurm job array, or one shard), and prints the summary table;
reports are the tables and figures of :mod:`hessbench.report`.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hessbench.errors import HessbenchError
from hessbench.kinds import RunRequest, first_line
from hessbench.kinds.console import progress_bar

__all__ = ["KIND", "AccuracyKind", "add_estimator_facts", "summary_table"]


def stdout() -> Console:
    """Standard output; wide enough for full estimator labels when not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def fmt(value: object, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_table(df, title: str) -> Table:
    """Per estimator label: cells by status, median relative L1, L1/HesScale, cost ratios.

    ``L1 / HesScale`` is per task first (the median L1 over seeds divided by
    HesScale's median over the same seeds), then the geometric mean over tasks,
    with the smallest and largest per-task ratio and the number of tasks; tasks
    where HesScale's error is at rounding level are left out and named in the
    caption (:mod:`hessbench.report.summary`). ``time`` is the median CPU-time
    ratio to one gradient, ``memory`` the median peak-memory ratio to one
    gradient, both over the label's cells.
    """
    from hessbench.report.summary import ratio_summaries, rounding_tasks

    ratios = ratio_summaries(df)
    rounding = rounding_tasks(df)
    caption = (
        "rel. L1: median over cells. L1 / HesScale: per task, median L1 over seeds / "
        "HesScale's median on the same seeds; geometric mean over tasks; range: smallest "
        "and largest per-task ratio; tasks: in the mean / with a ratio. "
        "time, memory: ratio to one gradient (median over cells)."
    )
    if rounding:
        caption += "\nLeft out of L1 / HesScale (HesScale exact to rounding there): " + "; ".join(
            t.describe() for t in rounding.values()
        )
    table = Table(title=title, caption=escape(caption), caption_justify="left")
    columns = (
        "estimator", "ok", "other", "rel. L1", "L1 / HesScale", "range", "tasks", "time",
        "memory",
    )  # fmt: skip
    for col in columns:
        if col == "estimator":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for label, g in df.groupby("label", sort=True):
        ok = g[g["status"] == "ok"]
        other = ", ".join(
            f"{k} {v}" for k, v in g[g["status"] != "ok"]["status"].value_counts().items()
        )
        r = ratios.get(str(label))
        spread = "-" if r is None or r.tasks < 2 else f"{r.low:.2g}–{r.high:.2g}"
        tasks = "-" if r is None else f"{r.tasks}/{r.tasks + len(r.left_out)}"
        table.add_row(
            escape(str(label)),
            str(len(ok)),
            other or "-",
            fmt(ok["rel_l1"].median()),
            fmt(r.geomean if r else None),
            spread,
            tasks,
            fmt(ok["cpu_time_ratio"].median(), ".2f"),
            fmt(ok["memory_ratio"].median(), ".2f"),
        )
    return table


def _count(n: int) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2g}{unit}" if n < 10 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.2g} min"
    return f"{seconds / 3600:.2g} h"


def estimates_table(estimates) -> str:
    """``validate``'s estimates: per task memory of one worker and time of its cells; a total."""
    from hessbench.suite.estimate import format_bytes

    header = ("task", "params", "batch", "activations", "ground truth", "peak", "cells", "time")
    rows = [
        (
            e.task, _count(e.num_params), str(e.batch_size), format_bytes(e.activation_bytes),
            format_bytes(e.truth_bytes), format_bytes(e.peak_bytes), str(e.cells),
            _duration(e.seconds),
        )
        for e in estimates
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)
        ]
        return "  " + "  ".join(cells).rstrip()

    total = sum(e.seconds for e in estimates)
    return "\n".join(
        [
            "estimates (a cost model, not measurements): memory of one worker, "
            "time of the cells on one core",
            line(header),
            *map(line, rows),
            f"about {_duration(total)} for {sum(e.cells for e in estimates)} cells on one worker "
            "(-j N: about 1/N), plus a few seconds per worker to start",
        ]
    )


def add_estimator_facts(df):
    """Fill in the estimator facts that records written before they carried them lack.

    ``stochastic``, ``sample_param`` and ``default_params`` come from the estimator
    registry, so old run folders report as before.

    Reports read these columns and never consult the registry themselves.
    """
    import json

    from hessbench.estimators import estimator_class

    missing = df["stochastic"].isna()
    if not missing.any():
        return df
    df = df.copy()
    for i in df.index[missing]:
        try:
            est = estimator_class(df.at[i, "estimator"])(**json.loads(df.at[i, "params"] or "{}"))
        except (HessbenchError, TypeError, ValueError):
            continue  # an estimator this process does not know (a plugin): left unknown
        df.at[i, "stochastic"] = est.stochastic
        df.at[i, "sample_param"] = est.sample_param
        df.at[i, "default_params"] = est.default_params
    return df


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


class AccuracyKind:
    """``kind: accuracy`` (the default): cells of estimators x tasks x seeds."""

    name = "accuracy"
    run_options = frozenset(
        (
            "output", "jobs", "estimators", "tasks", "seeds", "dry_run", "retry_failed",
            "force", "quick", "device", "executor", "shard", "no_wait", "chunks",
            "partition", "time_min", "cpus_per_task", "mem_gb", "gpus",
        )
    )  # fmt: skip

    def validate(self, suite: Path) -> int:
        """Check a suite file and print its task variants, labels, seeds and cells."""
        from hessbench.suite import load_suite, plan_cells, task_variants
        from hessbench.suite.estimate import estimate_suite, memory_warnings

        s = load_suite(suite)
        cells = plan_cells(s)
        labels = sorted({c.estimator.label for c in cells})
        print(
            f"{suite}: ok: suite '{s.name}': {len(task_variants(s))} task variants, "
            f"{len(labels)} estimator labels, {len(s.defaults.seed_list)} seeds, {len(cells)} cells"
        )
        estimates = estimate_suite(s, cells)
        print(estimates_table(estimates))
        for line in memory_warnings(estimates):
            print(f"hessbench: warning: {line}", file=sys.stderr)
        return 0

    def describe(self, suite: Path) -> tuple[str, str]:
        """The number of cells and the description's first line."""
        from hessbench.suite import load_suite, plan_cells

        s = load_suite(suite)
        return f"{len(plan_cells(s))} cells", first_line(s.description)

    def run(self, request: RunRequest) -> int:
        """Run (or resume) the suite's cells with a progress bar, then print the summary."""
        from hessbench.run.runner import RunOptions, plan_run, run_suite
        from hessbench.store.records import FAILED, frame, load
        from hessbench.store.shards import parse_shard

        suite, output, jobs, device = request.suite, request.output, request.jobs, request.device
        no_wait = request.no_wait
        if device is not None and device not in ("cpu", "cuda"):
            raise HessbenchError(f"--device {device!r}: expected cpu or cuda")
        cluster = {
            k: getattr(request, k)
            for k in ("chunks", "partition", "time_min", "cpus_per_task", "mem_gb", "gpus")
            if getattr(request, k) is not None
        }
        opts = RunOptions(
            output, jobs, list(request.tasks) or None, list(request.estimators) or None,
            list(request.seeds) or None, request.retry_failed, request.force, request.quick,
            executor=request.executor, device=device,
            shard=parse_shard(request.shard) if request.shard else None,
            wait=not no_wait, cluster=cluster,
        )  # fmt: skip
        err = Console(stderr=True)
        if request.dry_run:
            _, _, run_dir, cells = plan_run(suite, opts)
            for c in cells:
                print(c.id)
            err.print(f"{len(cells)} cells; results would go to {run_dir}")
            return 0
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
            progress.start()  # only now: an error before the plan prints no empty bar line

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

        try:
            summary = run_suite(
                suite,
                opts,
                on_plan=on_plan,
                on_start=lambda cid: progress.update(bar["id"], cell=cid),
                on_record=on_record,
                on_submit=on_submit,
            )
        finally:
            if progress.live.is_started:  # stop() itself prints a line break
                progress.stop()
        collect_cmd = f"hessbench collect {summary.run_dir}"
        if summary.manifest is not None and no_wait:
            m = summary.manifest
            print(m["job_id"] or " ".join(t["job_id"] for t in m["tasks"]))
            err.print(f"when the jobs have ended: {collect_cmd}")
            return 0
        if summary.shard_file is not None:
            from hessbench.store.records import iter_records

            df = frame(iter_records(summary.shard_file)[0])
            stdout().print(summary_table(df, f"{summary.shard_file}"))
            print(
                f"results: {summary.shard_file} ({len(df)} cells); merge them with: {collect_cmd}"
            )
        else:
            df = load(summary.run_dir)
            stdout().print(summary_table(df, f"{summary.run_dir}"))
            print(f"results: {summary.run_dir / 'results.csv'} ({len(df)} cells)")
        if summary.interrupted:
            err.print("interrupted: finished cells are on disk; run the same command to resume")
            if summary.manifest is not None:
                err.print(f"the submitted jobs keep running; later: {collect_cmd}")
            return 130
        failed = df["status"].isin(FAILED).sum()
        if failed:
            err.print(
                f"{failed} cells failed; see 'message' in results.csv (--retry-failed re-runs them)"
            )
            return 1

        return 0

    def collect(self, run_dir: Path, wait: bool) -> int:
        """Merge the run folder's shards into its results and print the summary."""
        from hessbench.run.runner import collect as collect_run
        from hessbench.store.records import FAILED, load

        err = Console(stderr=True)
        new: list[dict] = []
        collector = collect_run(run_dir, wait=wait, on_record=new.append)
        df = load(run_dir)
        stdout().print(summary_table(df, str(run_dir)))
        print(f"results: {run_dir / 'results.csv'} ({len(df)} cells, {len(new)} new)")
        if collector.in_flight:
            jobs = ", ".join(sorted(set(collector.in_flight.values())))
            err.print(
                f"{len(collector.in_flight)} cells still running in jobs {jobs}; collect again"
            )
        if collector.unknown:
            err.print(f"job state unknown (sacct?) for {', '.join(sorted(collector.unknown))}")
        if df["status"].isin(FAILED).any():
            return 1

        return 0

    def show(self, run_dir: Path) -> int:
        """Print the run's summary table."""
        from hessbench.store.records import load

        stdout().print(summary_table(load(run_dir), str(run_dir)))
        return 0

    def report(self, run_dir: Path, output: Path | None) -> int:
        """Write the run's tables, figures, report.md and index.html."""
        from hessbench.report.page import OUTPUTS, default_output, render_report, write_files
        from hessbench.report.results import is_results, read_results
        from hessbench.store.records import load, load_parts

        if is_results(run_dir):  # a report folder's results.csv in place of a run folder
            df, parts, meta = read_results(run_dir)
            df = add_estimator_facts(df)
        else:
            meta = _read_metadata(run_dir)
            df = add_estimator_facts(load(run_dir))
            parts = load_parts(run_dir)
        if df.empty:
            raise HessbenchError(f"{run_dir}: no finished cells to report")
        out = output if output is not None else default_output(run_dir)
        command = f"hessbench report {shlex.quote(str(run_dir))} -o {shlex.quote(str(out))}"
        rendered = render_report(df, parts, meta, command)
        write_files(out, rendered.files, OUTPUTS)
        skipped = [f for f in rendered.figures if f.figure is None]
        for f in skipped:
            print(f"skipped figure {f.name}: {f.skipped}", file=sys.stderr)
        drawn = len(rendered.figures) - len(skipped)
        counts = f"{len(rendered.tables)} tables, {drawn} figures"
        print(f"report: {out / 'report.md'} and {out / 'index.html'} ({counts})")
        return 0


KIND = AccuracyKind()
