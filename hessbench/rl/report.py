"""The report of an rl run: return curves, final-return tables and ``report.md``.

:func:`render_rl_report` reads an rl run folder and writes, into the report folder,

- ``figures/returns.{png,pdf}``: the return (mean over the last ``return_window``
  finished training episodes) against environment steps, per optimizer at its
  chosen learning rate: the median over seeds, with the interquartile band;
- ``figures/returns_per_lr.{png,pdf}``: the same medians for every learning rate,
  one panel per optimizer;
- ``tables/final.{md,csv,tex}``: per optimizer and learning rate, the final return
  (median and IQR over seeds), seeds ok/diverged, the chosen rate marked;
- ``report.md`` and ``index.html``: everything above on one page
  (:mod:`hessbench.report.document`).

A run's **final return** is the mean of its curve over the last 20% of the
environment steps (:data:`~hessbench.rl.a2c.FINAL_FRACTION`). **The learning
rate is chosen** per optimizer by :func:`best_lrs`: fewest seeds that did not end
``ok`` first, then the highest *mean* over seeds of the final return, then the
smaller rate. The files depend only on the records and metadata, so the same run
gives the same bytes.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from hessbench.errors import HessbenchError
from hessbench.optim.spec import format_lr
from hessbench.report.document import Document, figures_section, tables_section, text
from hessbench.report.figures import figure_bytes
from hessbench.report.page import hessbench_provenance, write_files
from hessbench.report.plotting import FigureResult, coincide_notes, coinciding, grid, legend
from hessbench.report.stats import compare_to_reference
from hessbench.report.style import figure_context, optimizer_style
from hessbench.report.table import Table, fmt
from hessbench.rl.a2c import FINAL_FRACTION
from hessbench.rl.runner import load_rl_runs
from hessbench.store.provenance import session_commands

__all__ = ["RL_OUTPUTS", "best_lrs", "lr_table", "render_rl_report"]

RL_OUTPUTS = (
    "report.md",
    "index.html",
    *(f"tables/final.{f}" for f in ("md", "csv", "tex")),
    *(f"figures/{n}.{f}" for n in ("returns", "returns_per_lr") for f in ("png", "pdf")),
)
"""Every file an rl report contains."""


def _labels(runs: pd.DataFrame) -> list[str]:
    """Optimizer labels in suite order."""
    first = runs.drop_duplicates("label").sort_values("order", kind="stable")
    return [str(v) for v in first["label"]]


def lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer label and learning rate: seeds, ok, diverged, final-return statistics.

    Statistics are over the runs that ended ``ok`` (a diverged run has no final return).
    """
    rows = []
    for label in _labels(runs):
        g = runs[runs["label"] == label]
        for lr in sorted(g["lr"].unique()):
            r = g[g["lr"] == lr]
            fin = r.loc[r["status"] == "ok", "final_return"].dropna()
            q = fin.quantile([0.25, 0.5, 0.75]) if len(fin) else pd.Series([np.nan] * 3)
            rows.append(
                {
                    "optimizer": label,
                    "lr": float(lr),
                    "seeds": len(r),
                    "ok": int((r["status"] == "ok").sum()),
                    "diverged": int((r["status"] == "diverged").sum()),
                    "final_return_median": float(q.iloc[1]),
                    "final_return_q25": float(q.iloc[0]),
                    "final_return_q75": float(q.iloc[2]),
                    "final_return_mean": float(fin.mean()) if len(fin) else np.nan,
                }
            )
    return pd.DataFrame(rows)


def best_lrs(runs: pd.DataFrame) -> dict[str, float]:
    """The chosen learning rate per optimizer label (see the module docstring)."""
    table = lr_table(runs)
    out = {}
    for label, g in table.groupby("optimizer", sort=False):
        key = g.assign(bad=g["seeds"] - g["ok"], score=-g["final_return_mean"].fillna(-np.inf))
        out[str(label)] = float(key.sort_values(["bad", "score", "lr"]).iloc[0]["lr"])
    return {label: out[label] for label in _labels(runs) if label in out}


def final_table(runs: pd.DataFrame) -> Table:
    """Final return per optimizer and learning rate, the chosen rate marked ``*``."""
    data = lr_table(runs)
    best = best_lrs(runs)
    data.insert(
        2,
        "chosen",
        [best.get(o) == lr for o, lr in data[["optimizer", "lr"]].itertuples(index=False)],
    )
    values: dict[str, dict[int, float]] = {}
    for label, lr in best.items():
        g = runs[(runs["label"] == label) & (runs["lr"] == lr) & (runs["status"] == "ok")]
        g = g.dropna(subset=["final_return"])
        pairs = zip(g["seed"], g["final_return"], strict=True)
        values[label] = {int(s): float(v) for s, v in pairs}
    ref = "adam" if "adam" in values else next(iter(values), None)
    cmp = compare_to_reference(values, ref, higher_is_better=True)
    grids = {o: sorted(g["lr"]) for o, g in data.groupby("optimizer")}
    extra: dict[str, list] = {
        k: []
        for k in (
            "mean_ci_low",
            "mean_ci_high",
            "diff",
            "diff_ci_low",
            "diff_ci_high",
            "vs_reference",
        )
    }
    header = ["optimizer", "lr", "final return (median)", "IQR", "mean", "mean 95% CI", "ok/seeds"]
    header += [f"Δ vs {ref} (95% CI, same seeds)" if ref else "Δ vs reference", "vs reference"]
    rows, marks = [], []
    edge = False
    for r in data.itertuples(index=False):
        c = cmp.get(str(r.optimizer)) if r.chosen else None
        mean, diff, verdict = c if c else (None, None, "")
        extra["mean_ci_low"].append(mean.low if mean else np.nan)
        extra["mean_ci_high"].append(mean.high if mean else np.nan)
        extra["diff"].append(diff.value if diff else np.nan)
        extra["diff_ci_low"].append(diff.low if diff else np.nan)
        extra["diff_ci_high"].append(diff.high if diff else np.nan)
        extra["vs_reference"].append(verdict)
        iqr = f"{fmt(r.final_return_q25, '.1f')}–{fmt(r.final_return_q75, '.1f')}"
        lr = format_lr(r.lr) + (" *" if r.chosen else "")
        ok = f"{r.ok}/{r.seeds}" + (f" ({r.diverged} diverged)" if r.diverged else "")
        rows.append(
            [
                str(r.optimizer),
                lr,
                fmt(r.final_return_median, ".1f"),
                iqr,
                fmt(r.final_return_mean, ".1f"),
                "" if mean is None or np.isnan(mean.low) else f"{mean.low:.1f} to {mean.high:.1f}",
                ok,
                ""
                if diff is None
                else fmt(diff.value, ".1f")
                + ("" if np.isnan(diff.low) else f" ({diff.low:.1f} to {diff.high:.1f})"),
                verdict,
            ]
        )
        mark = [()] * len(header)
        grid = grids[r.optimizer]
        if r.chosen and len(grid) > 1 and r.lr in (grid[0], grid[-1]):
            mark[1] = (1,)
            edge = True
        marks.append(mark)
    caption = (
        f"Final return: a run's mean return over the last {FINAL_FRACTION:.0%} of the "
        "environment steps; median, interquartile range and mean over the seeds that "
        "ended ok. * marks the learning rate chosen per optimizer (highest mean final "
        "return among the rates with the fewest failed seeds). On the chosen rows: the "
        "mean's 95 % percentile-bootstrap interval over seeds, and Δ, the final return "
        "minus the reference's on the same seed (each at its chosen rate), averaged over "
        "the seeds both ended ok, with its interval; vs reference says better or worse "
        "only where that interval excludes 0, else no difference detected."
    )
    data = data.assign(chosen=data["chosen"].map({True: "yes", False: "no"}), **extra)
    notes = ["The chosen rate is at the edge of the grid: a wider grid may do better."]
    return Table(
        "final",
        "Final return per optimizer and learning rate",
        caption,
        data,
        header,
        rows,
        marks,
        notes if edge else [],
    )


def _band(curves: pd.DataFrame) -> pd.DataFrame:
    """Per step: median and quartiles of the return over seeds."""
    g = curves.dropna(subset=["return"]).groupby("step")["return"]
    return pd.DataFrame(
        {"median": g.median(), "lo": g.quantile(0.25), "hi": g.quantile(0.75)}
    ).sort_index()


def _style(runs: pd.DataFrame, label: str) -> tuple[str, str]:
    names = runs.drop_duplicates("label").set_index("label")["optimizer"]
    style, ls = optimizer_style(str(names[label]))
    return style.colour, ls


def returns_figure(runs: pd.DataFrame, curves: pd.DataFrame, env: str) -> FigureResult:
    """Median return over seeds (IQR band) against env steps, each optimizer at its chosen lr."""
    r = FigureResult(
        "returns",
        "Return against environment steps",
        f"{env}: mean return of the last finished training episodes against environment "
        "steps, per optimizer at its chosen learning rate; line: median over seeds, band: "
        "interquartile range.",
        read="The higher curve learned the task faster; 500 is CartPole's maximum return."
        if env.startswith("CartPole")
        else "The higher curve learned the task faster.",
    )
    best = best_lrs(runs)
    handles = []
    drawn = []
    with figure_context():
        fig, (ax,) = grid(1, 5.0, 3.4)
        for label, lr in best.items():
            b = _band(curves[(curves["label"] == label) & (curves["lr"] == lr)])
            colour, ls = _style(runs, label)
            name = f"{label} (lr {format_lr(lr)})"
            if not b.empty:
                xs = b.index.to_numpy(float)
                ax.plot(xs, b["median"], color=colour, linestyle=ls, lw=1.5, gid=label)
                ax.fill_between(xs, b["lo"], b["hi"], color=colour, alpha=0.15, lw=0)
                drawn.append((name, xs, b["median"]))
            handles.append(Line2D([], [], color=colour, linestyle=ls, label=name))
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episode return")
        same = coinciding(drawn)
        for hidden, front in same:  # the legend says so too
            h = next(h for h in handles if h.get_label() == front)
            h.set_label(f"{front} = {hidden.split(' (')[0]}")
        legend(fig, handles, title="optimizer (chosen lr)")
    r.figure = fig
    r.notes += coincide_notes({"": same}, 1)
    return r


def per_lr_figure(runs: pd.DataFrame, curves: pd.DataFrame) -> FigureResult:
    """One panel per optimizer: median return over seeds for every learning rate."""
    r = FigureResult(
        "returns_per_lr",
        "Return for every learning rate",
        "Median return over seeds against environment steps, one panel per optimizer, "
        "one line per learning rate (darker: larger; the marker tells the rates apart).",
        read="An optimizer whose curves stay close together forgives the choice of learning "
        "rate; one whose curves fan out needs its rate tuned.",
    )
    labels = _labels(runs)
    hidden: dict[str, list[tuple[str, str]]] = {}
    with figure_context():
        fig, axes = grid(len(labels), 3.6, 2.8, sharey=True)
        for ax, label in zip(axes, labels, strict=True):
            colour, ls = _style(runs, label)
            lrs = sorted(runs.loc[runs["label"] == label, "lr"].unique())
            drawn = []
            for i, lr in enumerate(lrs):
                b = _band(curves[(curves["label"] == label) & (curves["lr"] == lr)])
                if b.empty:
                    continue
                alpha = 0.35 + 0.65 * (i + 1) / len(lrs)
                ax.plot(
                    b.index, b["median"], color=colour, linestyle=ls, alpha=alpha, lw=1.3,
                    marker=_LR_MARKERS[i % len(_LR_MARKERS)], ms=3.5,
                    markevery=max(1, len(b) // 6), label=f"lr {format_lr(lr)}",
                )  # fmt: skip
                drawn.append((f"lr {format_lr(lr)}", b.index, b["median"]))
            hidden[label] = coinciding(drawn)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("environment steps")
            ax.set_ylabel("episode return")
            ax.legend(
                fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.28),
                ncols=2 if len(lrs) == 4 else min(len(lrs), 3),
            )  # fmt: skip
    r.figure = fig
    r.notes += [
        f"{label}: {n}"
        for label, found in hidden.items()
        for n in coincide_notes({label: found}, 1)
    ]
    return r


_LR_MARKERS = ("o", "s", "^", "D", "v", "P")


def _document(meta: dict, command: str, runs: pd.DataFrame, table: Table, figures) -> Document:
    counts = runs["status"].value_counts()
    status = ", ".join(
        f"{counts[s]} {s}" for s in ("ok", "diverged", "error", "crashed") if s in counts
    )
    import yaml

    suite = yaml.safe_load(meta.get("suite_text") or "") or {}
    desc = " ".join(str(suite.get("description", "")).split()) if isinstance(suite, dict) else ""
    intro = [
        text(f"Made by `{command}`. {len(runs)} runs: {status}."),
        text(
            "A2C (`hessbench/rl`, docs/rl.md): the actor is trained by the optimizer named, on "
            "the advantage-weighted cross-entropy; the critic by Adam in every run."
        ),
        text(
            f"Environment: Python {meta.get('python')}, torch {meta.get('torch')}, gymnasium "
            f"{meta.get('gymnasium')}, {meta.get('cpu_count')} CPU cores; hessbench "
            f"{hessbench_provenance(meta)}."
        ),
        *(text(f"The run: `{cmd}`.") for cmd in session_commands(meta)),
    ]
    return Document(
        title=f"hessbench RL report: {meta.get('suite', '?')}",
        kind="rl",
        description=desc,
        intro=intro,
        sections=[figures_section(figures), tables_section([(table.title, table)], "Table")],
    )


def render_rl_report(
    run_dir: str | Path, out_dir: str | Path, command: str | None = None
) -> dict[str, bytes]:
    """Write the report of an rl run folder into ``out_dir``; return its files by path.

    Files are replaced through a temporary file and a rename; other files are left.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    meta_path = run_dir / "metadata.json"
    if not meta_path.exists():
        raise HessbenchError(f"{run_dir}: not a run folder (no metadata.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    runs, curves = load_rl_runs(run_dir)
    if runs.empty:
        raise HessbenchError(f"{run_dir}: no finished runs to report")
    if command is None:
        command = f"hessbench report {shlex.quote(str(run_dir))} -o {shlex.quote(str(out))}"
    env = str(runs["env"].iloc[0])
    table = final_table(runs)
    figures = [returns_figure(runs, curves, env), per_lr_figure(runs, curves)]
    files: dict[str, bytes] = {
        "tables/final.md": table.markdown().encode(),
        "tables/final.csv": table.csv().encode(),
        "tables/final.tex": table.latex().encode(),
    }
    for f in figures:
        for ext in ("png", "pdf"):
            files[f"figures/{f.name}.{ext}"] = figure_bytes(f.figure, ext)
    page = _document(meta, command, runs, table, figures)
    files["report.md"] = page.markdown().encode()
    files["index.html"] = page.html().encode()
    write_files(out, files)
    return files
