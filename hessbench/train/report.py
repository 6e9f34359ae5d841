"""The report of a train run: learning curves, final-loss tables and ``report.md``.

:func:`render_train_report` reads a train run folder and writes, into the report
folder,

- ``tables/final.{md,csv,tex}``: per optimizer, the chosen learning rate, the
  grid, and the final held-out loss (median and IQR over seeds), accuracy,
  training loss and time at that learning rate;
- ``tables/per_lr.{md,csv,tex}``: the same per optimizer and learning rate, with
  how many seeds diverged and when;
- ``figures/<name>.{png,pdf}``: held-out and training loss against steps, held-out
  loss against training wall-clock time, held-out accuracy against steps
  (classification), and the final held-out loss against the learning rate;
- ``report.md`` and ``index.html``: everything above on one page
  (:mod:`hessbench.report.document`).

**The learning rate is chosen** per optimizer (label) among the grid by
:func:`best_lrs`: fewest seeds that did not end ``ok`` first (so a rate that
diverges on any seed loses to one that never does), then the lowest median over
seeds of the *final* held-out loss (the last evaluation, at ``steps``), then the
smaller rate. Final rather than best-over-time loss, so a rate that overfits or
becomes unstable late pays for it.

The output depends only on the run's records and metadata (no time stamps, no
software versions in the figure files), so the same run gives the same bytes.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from hessbench.errors import HessbenchError
from hessbench.optim.spec import format_lr
from hessbench.report.document import (
    Document,
    Section,
    figures_section,
    pairs,
    tables_section,
    text,
)
from hessbench.report.figures import figure_bytes
from hessbench.report.page import hessbench_provenance, write_files
from hessbench.report.plotting import (
    FigureResult,
    coincide_notes,
    coinciding,
    grid,
    legend,
    log_axis,
    needs_log,
)
from hessbench.report.stats import compare_to_reference
from hessbench.report.style import figure_context, optimizer_style
from hessbench.report.table import Table, fmt
from hessbench.store.provenance import session_commands
from hessbench.train.runner import load_runs

__all__ = [
    "TRAIN_OUTPUTS",
    "TrainReport",
    "best_lrs",
    "lr_table",
    "render_train_report",
]

_FIGURES = ("loss_vs_steps", "loss_vs_time", "accuracy_vs_steps", "lr_sensitivity")
_TABLES = ("final", "per_lr")
TRAIN_OUTPUTS = (
    "report.md",
    "index.html",
    *(f"tables/{t}.{f}" for t in _TABLES for f in ("md", "csv", "tex")),
    *(f"figures/{n}.{f}" for n in _FIGURES for f in ("png", "pdf")),
)
"""Every file a train report can contain (a figure that does not apply is left out)."""


def _order(runs: pd.DataFrame) -> list[str]:
    """Optimizer labels in suite order (``order`` field), else as they appear."""
    first = runs.drop_duplicates("label")
    key = first["order"] if "order" in first else pd.Series(range(len(first)), index=first.index)
    return [
        str(x) for x in first.assign(_k=key.fillna(1e9)).sort_values("_k", kind="stable")["label"]
    ]


def lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, lr): seeds, outcome counts and final-value statistics.

    Statistics are over the seeds that ended ``ok`` (pandas' linear-interpolation
    quantiles).
    """
    rows = []
    for label in _order(runs):
        r = runs[runs["label"] == label]
        for lr in sorted(r["lr"].unique()):
            g = r[r["lr"] == lr]
            ok = g[g["status"] == "ok"]
            loss = ok["final_heldout_loss"].astype(float)
            steps = g.loc[g["status"] == "diverged", "diverged_at"].dropna().astype(int)
            per_step = ok["train_time_s"] / ok["steps_done"].where(ok["steps_done"] > 0)
            rows.append(
                {
                    "optimizer": label,
                    "lr": float(lr),
                    "seeds": len(g),
                    "ok": len(ok),
                    "diverged": int((g["status"] == "diverged").sum()),
                    "failed": int(g["status"].isin(["error", "crashed"]).sum()),
                    "heldout_loss_median": loss.median() if len(ok) else math.nan,
                    "heldout_loss_q25": loss.quantile(0.25) if len(ok) else math.nan,
                    "heldout_loss_q75": loss.quantile(0.75) if len(ok) else math.nan,
                    "heldout_loss_min": loss.min() if len(ok) else math.nan,
                    "heldout_loss_max": loss.max() if len(ok) else math.nan,
                    "heldout_accuracy_median": ok["final_heldout_accuracy"].median()
                    if len(ok)
                    else math.nan,
                    "train_loss_median": ok["final_train_loss"].median() if len(ok) else math.nan,
                    "ms_per_step_median": 1000 * per_step.median() if len(ok) else math.nan,
                    "train_time_s_median": ok["train_time_s"].median() if len(ok) else math.nan,
                    "diverged_at": " ".join(map(str, sorted(steps))),
                }
            )
    return pd.DataFrame(rows)


def best_lrs(runs: pd.DataFrame) -> dict[str, float]:
    """The chosen learning rate per optimizer label (see the module docstring)."""
    table = lr_table(runs)
    out = {}
    for label, g in table.groupby("optimizer", sort=False):
        key = g.assign(
            _bad=g["seeds"] - g["ok"], _loss=g["heldout_loss_median"].fillna(math.inf)
        ).sort_values(["_bad", "_loss", "lr"], kind="stable")
        out[str(label)] = float(key["lr"].iloc[0])
    return out


def _grid_text(lrs: list[float], chosen: float) -> str:
    return " ".join(f"[{format_lr(v)}]" if v == chosen else format_lr(v) for v in sorted(lrs))


def _table(name: str, title: str, caption: str, data: pd.DataFrame, header, rows) -> Table:
    return Table(
        name,
        title,
        caption,
        data.reset_index(drop=True),
        header,
        rows,
        [[()] * len(header) for _ in rows],
        [],
        keys=2,
    )


def final_table(runs: pd.DataFrame, classification: bool) -> Table:
    """Per optimizer, the values at its chosen learning rate, with the grid."""
    table, best = lr_table(runs), best_lrs(runs)
    data = []
    for label, lr in best.items():
        row = table[(table["optimizer"] == label) & (table["lr"] == lr)].iloc[0].to_dict()
        grid_lrs = table.loc[table["optimizer"] == label, "lr"].tolist()
        row["lr_grid"] = " ".join(format_lr(v) for v in sorted(grid_lrs))
        data.append(row)
    df = pd.DataFrame(data)
    columns = ["optimizer", "lr", "lr_grid", "seeds", "ok", "diverged", "failed"]
    columns += ["heldout_loss_median", "heldout_loss_q25", "heldout_loss_q75"]
    columns += ["heldout_accuracy_median"] if classification else []
    columns += ["train_loss_median", "ms_per_step_median", "train_time_s_median"]
    df = df[columns].copy()
    ref, cmp = _seed_comparison(runs, best)
    df["heldout_loss_mean"] = [cmp[o][0].value for o in df["optimizer"]]
    df["heldout_loss_mean_ci_low"] = [cmp[o][0].low for o in df["optimizer"]]
    df["heldout_loss_mean_ci_high"] = [cmp[o][0].high for o in df["optimizer"]]
    nan = math.nan
    df["diff_to_reference"] = [cmp[o][1].value if cmp[o][1] else nan for o in df["optimizer"]]
    df["diff_ci_low"] = [cmp[o][1].low if cmp[o][1] else nan for o in df["optimizer"]]
    df["diff_ci_high"] = [cmp[o][1].high if cmp[o][1] else nan for o in df["optimizer"]]
    df["vs_reference"] = [cmp[o][2] for o in df["optimizer"]]
    header = ["optimizer", "lr (grid)", "seeds ok", "held-out loss", "IQR"]
    header += ["held-out acc."] if classification else []
    header += ["train loss", "ms / step", "mean loss (95% CI)"]
    header += [f"Δ vs {ref} (95% CI, same seeds)" if ref else "Δ vs reference", "vs reference"]
    rows: list[list[str]] = []
    marks: list[list[tuple[int, ...]]] = []
    for r in df.to_dict("records"):
        cells = [
            r["optimizer"],
            _grid_text([float(v) for v in r["lr_grid"].split()], r["lr"]),
            f"{r['ok']}/{r['seeds']}",
            fmt(r["heldout_loss_median"], ".4g"),
            f"{fmt(r['heldout_loss_q25'], '.3g')}–{fmt(r['heldout_loss_q75'], '.3g')}",
        ]
        cells += [fmt(r["heldout_accuracy_median"], ".3f")] if classification else []
        cells += [fmt(r["train_loss_median"], ".3g"), fmt(r["ms_per_step_median"], ".3g")]
        cells += [
            _ci_text(
                r["heldout_loss_mean"],
                r["heldout_loss_mean_ci_low"],
                r["heldout_loss_mean_ci_high"],
            ),
            _ci_text(r["diff_to_reference"], r["diff_ci_low"], r["diff_ci_high"]),
            r["vs_reference"],
        ]
        rows.append(cells)
        marks.append([()] * len(cells))
        grid_lrs = sorted(float(v) for v in r["lr_grid"].split())
        if len(grid_lrs) > 1 and r["lr"] in (grid_lrs[0], grid_lrs[-1]):
            marks[-1][1] = (1,)
    caption = (
        "Final held-out loss (last evaluation) at each optimizer's chosen learning rate "
        "(in brackets among the grid): the rate with the fewest seeds not ending ok, then "
        "the lowest median final held-out loss. Median and inter-quartile range over the "
        "seeds that ended ok; train loss: mean minibatch loss over the last evaluation "
        f"interval; ms / step: training {clock_name(runs)} per step (evaluation excluded). "
        "mean loss: mean final held-out loss over the ok seeds with a 95 % percentile-"
        "bootstrap interval over seeds; Δ: the optimizer's final held-out loss minus the "
        "reference's on the same seed, averaged over the seeds both ended ok, with its "
        "interval; vs reference says better or worse only where that interval excludes 0, "
        "else no difference detected."
    )
    table = _table("final", "Final loss at the chosen learning rate", caption, df, header, rows)
    if any(m[1] for m in marks):
        table.marks = marks
        table.notes = ["The chosen rate is at the edge of the grid: a wider grid may do better."]
    return table


def _ci_text(value: float, low: float, high: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isnan(low):
        return fmt(value, ".4g")
    return f"{fmt(value, '.4g')} ({fmt(low, '.3g')} to {fmt(high, '.3g')})"


def _seed_comparison(runs: pd.DataFrame, best: dict[str, float]):
    """The reference (``adam`` if compared, else the first optimizer) and the comparison.

    Per label: the mean final held-out loss, its paired difference to the
    reference on the same seeds and the verdict (:func:`compare_to_reference`).
    """
    values: dict[str, dict[int, float]] = {}
    for label, lr in best.items():
        g = runs[(runs["label"] == label) & (runs["lr"] == lr) & (runs["status"] == "ok")]
        pairs = zip(g["seed"], g["final_heldout_loss"], strict=True)
        values[label] = {int(s): float(v) for s, v in pairs}
    ref = "adam" if "adam" in values else next(iter(values), None)
    return ref, compare_to_reference(values, ref, higher_is_better=False)


def per_lr_table(runs: pd.DataFrame, classification: bool) -> Table:
    """Per optimizer and learning rate: outcomes and the final values."""
    df = lr_table(runs)
    best = best_lrs(runs)
    columns = ["optimizer", "lr", "seeds", "ok", "diverged", "failed", "diverged_at"]
    columns += ["heldout_loss_median", "heldout_loss_q25", "heldout_loss_q75"]
    columns += ["heldout_accuracy_median"] if classification else []
    columns += ["train_loss_median", "ms_per_step_median"]
    df = df[columns]
    header = ["optimizer", "lr", "ok / diverged / failed", "held-out loss", "IQR"]
    header += ["held-out acc."] if classification else []
    header += ["diverged at step"]
    rows = []
    for r in df.to_dict("records"):
        chosen = " (chosen)" if best.get(r["optimizer"]) == r["lr"] else ""
        cells = [
            r["optimizer"],
            format_lr(r["lr"]) + chosen,
            f"{r['ok']} / {r['diverged']} / {r['failed']}",
            fmt(r["heldout_loss_median"], ".4g"),
            f"{fmt(r['heldout_loss_q25'], '.3g')}–{fmt(r['heldout_loss_q75'], '.3g')}",
        ]
        cells += [fmt(r["heldout_accuracy_median"], ".3f")] if classification else []
        cells += [r["diverged_at"] or "-"]
        rows.append(cells)
    caption = (
        "Every learning rate of the grid: seeds that ended ok, diverged (non-finite loss or "
        "gradient; the steps where they did) or failed, and the final held-out loss (median "
        "and IQR over the seeds that ended ok)."
    )
    return _table("per_lr", "Every learning rate", caption, df, header, rows)


def _band(curves: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per step: median, min and max of ``value`` over seeds, and the median time."""
    g = curves.dropna(subset=[value]).groupby("step")
    out = pd.DataFrame(
        {
            "median": g[value].median(),
            "lo": g[value].min(),
            "hi": g[value].max(),
            "time_s": g["time_s"].median(),
            "n": g[value].count(),
        }
    )
    return out.sort_index()


def _best_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    for label, lr in best_lrs(runs).items():
        out[label] = curves[(curves["label"] == label) & (curves["lr"] == lr)]
    return out


def _handles(runs: pd.DataFrame, best: dict[str, float], marker: bool = False) -> list[Line2D]:
    names = runs.drop_duplicates("label").set_index("label")["optimizer"]
    out = []
    for label, lr in best.items():
        style, ls = optimizer_style(str(names[label]))
        out.append(
            Line2D(
                [], [], color=style.colour, linestyle=ls, marker=style.marker if marker else None,
                label=f"{label} (lr {format_lr(lr)})",
            )
        )  # fmt: skip
    return out


_UNITS = {
    "cross_entropy": "cross-entropy, nats",
    "mse": "mean squared error",
}


def _curve_figure(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    panels: list[tuple[str, str]],
    x: str,
    r: FigureResult,
) -> FigureResult:
    best = best_lrs(runs)
    chosen = _best_curves(runs, curves)
    names = runs.drop_duplicates("label").set_index("label")["optimizer"]
    hidden: dict[str, list[tuple[str, str]]] = {}
    with figure_context():
        fig, axes = grid(len(panels), 4.2, 3.0)
        for ax, (value, ylabel) in zip(axes, panels, strict=True):
            everything = []
            drawn = []
            for label, c in chosen.items():
                b = _band(c, value)
                if b.empty:
                    continue
                style, ls = optimizer_style(str(names[label]))
                xs = b.index.to_numpy(float) if x == "step" else b["time_s"].to_numpy(float)
                ax.plot(xs, b["median"], color=style.colour, linestyle=ls, lw=1.4, gid=label)
                drawn.append((f"{label} (lr {format_lr(best[label])})", xs, b["median"]))
                ax.fill_between(xs, b["lo"], b["hi"], color=style.colour, alpha=0.15, lw=0)
                everything += [*b["lo"], *b["hi"]]
            positive = [v for v in everything if v > 0 and math.isfinite(v)]
            if value != "heldout_accuracy" and positive and max(positive) > 5 * min(positive):
                log_axis(ax, "y", positive)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("optimizer steps" if x == "step" else f"training {clock_name(runs)} (s)")
            hidden[ylabel] = coinciding(drawn)
        handles = _handles(runs, best)
        everywhere = set.intersection(*(set(p) for p in hidden.values())) if hidden else set()
        for gone, front in sorted(everywhere):  # the legend says so too
            h = next(h for h in handles if h.get_label() == front)
            h.set_label(f"{front} = {gone.split(' (')[0]}")
        legend(fig, handles, title="optimizer (chosen lr)")
    r.figure = fig
    r.notes += coincide_notes(hidden, len(panels))
    return r


def clock_name(runs: pd.DataFrame) -> str:
    """What the runs' training times measure (``CPU time`` on CPU; see ``training_clock``)."""
    names = sorted(set(runs["clock"].dropna())) if "clock" in runs else []
    return " / ".join(names) if names else "wall-clock time"


def _lr_figure(runs: pd.DataFrame, loss_label: str) -> FigureResult:
    r = FigureResult(
        "lr_sensitivity",
        "Final held-out loss against the learning rate",
        "Final held-out loss per learning rate of the grid: median over the seeds that ended "
        "ok, bars from the minimum to the maximum; a cross at the top marks a rate where "
        "every seed diverged or failed. Filled markers: the chosen rate.",
        read="A wide, flat valley is an optimizer that forgives the choice of learning "
        "rate; a chosen (filled) point at either end of its curve may be beaten by a rate "
        "outside the grid.",
    )
    table, best = lr_table(runs), best_lrs(runs)
    names = runs.drop_duplicates("label").set_index("label")["optimizer"]
    with figure_context():
        fig, axes = grid(1, 5.0, 3.4)
        ax = axes[0]
        values = table[["heldout_loss_min", "heldout_loss_max"]].to_numpy(float).ravel()
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if len(finite) else 1.0
        drawn = []
        for label, g in table.groupby("optimizer", sort=False):
            style, ls = optimizer_style(str(names[label]))
            ok = g[g["ok"] > 0]
            drawn.append((str(label), ok["lr"], ok["heldout_loss_median"]))
            ax.errorbar(
                ok["lr"],
                ok["heldout_loss_median"],
                yerr=[
                    ok["heldout_loss_median"] - ok["heldout_loss_min"],
                    ok["heldout_loss_max"] - ok["heldout_loss_median"],
                ],
                color=style.colour,
                linestyle=ls,
                marker=style.marker,
                markerfacecolor="white",
                capsize=2,
                lw=1.2,
                gid=str(label),
            )
            chosen = ok[ok["lr"] == best[str(label)]]
            ax.plot(
                chosen["lr"],
                chosen["heldout_loss_median"],
                style.marker,
                color=style.colour,
                zorder=3,
            )
            dead = g[g["ok"] == 0]
            ax.plot(dead["lr"], [top] * len(dead), "x", color=style.colour, ms=7)
        log_axis(ax, "x", table["lr"])
        if needs_log(finite):
            log_axis(ax, "y", finite)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final held-out loss ({loss_label})")
        legend(fig, _handles(runs, best, marker=True), title="optimizer (chosen lr)")
    r.figure = fig
    r.notes += coincide_notes({"": coinciding(drawn)}, 1)
    return r


def make_train_figures(
    runs: pd.DataFrame, curves: pd.DataFrame, loss_kind: str
) -> list[FigureResult]:
    """Every figure of a train report, in a fixed order (inapplicable ones skipped)."""
    unit = _UNITS.get(loss_kind, "loss")
    classification = loss_kind == "cross_entropy"
    if not (runs["status"] == "ok").any() and curves.empty:
        reason = "no run has a curve"
        return [FigureResult(n, n, "", skipped=reason) for n in _FIGURES]
    band = "line: median over seeds; band: minimum to maximum"
    out = [
        _curve_figure(
            runs,
            curves,
            [("heldout_loss", f"held-out loss ({unit})"), ("train_loss", f"train loss ({unit})")],
            "step",
            FigureResult(
                "loss_vs_steps",
                "Loss against steps",
                "Held-out loss (left) and mean minibatch training loss over each evaluation "
                f"interval (right) at each optimizer's chosen learning rate; {band}.",
                read="The lower curve at a given step trained better with as many updates; "
                "a held-out curve that turns up while the training curve keeps falling is "
                "overfitting.",
            ),
        ),
        _curve_figure(
            runs,
            curves,
            [("heldout_loss", f"held-out loss ({unit})")],
            "time",
            FigureResult(
                "loss_vs_time",
                "Held-out loss against training time",
                f"Held-out loss against cumulative training {clock_name(runs)} (evaluation "
                f"excluded; x: median over seeds at each evaluation) at the chosen rates; {band}. "
                "On CPU the time is the worker process's CPU time with a fixed number of "
                "threads, which other processes on the machine do not inflate.",
                read="The lower curve at a given time trained better for the same compute: "
                "a cheaper optimizer can win here and lose against steps.",
            ),
        ),
    ]
    acc = FigureResult(
        "accuracy_vs_steps",
        "Held-out accuracy against steps",
        f"Held-out classification accuracy (fraction correct) at the chosen rates; {band}.",
        read="The higher curve classifies more held-out examples correctly after as many steps.",
    )
    if classification:
        out.append(
            _curve_figure(runs, curves, [("heldout_accuracy", "held-out accuracy")], "step", acc)
        )
    else:
        acc.skipped = "not a classification task"
        out.append(acc)
    out.append(_lr_figure(runs, unit))
    return out


def _loss_kind(meta: dict) -> str:
    import yaml

    try:
        suite = yaml.safe_load(meta.get("suite_text") or "") or {}
        return str(suite["task"]["loss"]["kind"])
    except (yaml.YAMLError, KeyError, TypeError):
        return "loss"


def _description(meta: dict) -> str:
    import yaml

    try:
        suite = yaml.safe_load(meta.get("suite_text") or "") or {}
    except yaml.YAMLError:
        return ""
    return " ".join(str(suite.get("description", "")).split()) if isinstance(suite, dict) else ""


def _document(meta, command, runs, tables, figures) -> Document:
    suite = meta.get("suite", "?")
    counts = runs["status"].value_counts()
    order = ["ok", "diverged", "error", "crashed"]
    status = ", ".join(f"{counts[s]} {s}" for s in order if s in counts)
    intro = [text(f"Made by `{command}`. {len(runs)} runs: {status}.")]
    if cmds := session_commands(meta):
        intro.append(text("The run: " + "; ".join(f"`{c}`" for c in cmds) + "."))
    sessions = meta.get("sessions") or [{}]
    env = [
        ("suite file", f"{meta.get('suite_file', '?')} (SHA-256 {str(meta.get('suite_hash'))[:12]})"),
        ("hessbench", hessbench_provenance(meta)),
        ("Python, torch, numpy", f"{meta.get('python')}, {meta.get('torch')}, {meta.get('numpy')}"),
        ("platform", str(meta.get("platform"))),
        ("CPU", f"{meta.get('cpu')}, {meta.get('cpu_count')} cores"),
        ("device, threads", f"{meta.get('device')}, {meta.get('threads')} torch thread(s) per run"),
        ("worker processes", str(sessions[-1].get("jobs", "?"))),
    ]  # fmt: skip
    clock = text(
        f"Training times are {clock_name(runs)}"
        + (
            " of the worker process (fixed threads), which other work on the machine does "
            "not inflate; still, compare them within one run."
            if clock_name(runs) == "CPU time"
            else ", measured on this machine: compare them within one run only."
        )
    )
    return Document(
        title=f"hessbench training report: {suite}",
        kind="train",
        description=_description(meta),
        intro=intro,
        sections=[
            Section("Environment", [pairs(env), clock]),
            figures_section(figures),
            tables_section([(t.title, t) for t in tables]),
        ],
    )


@dataclass
class TrainReport:
    """A rendered train report: files by relative path, and what they were made from."""

    files: dict[str, bytes]
    tables: list[Table]
    figures: list[FigureResult]


def render_train_files(run_dir: str | Path, command: str) -> TrainReport:
    """Every file of the report of a train run folder, by path (nothing is written)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "metadata.json"
    if not meta_path.exists():
        raise HessbenchError(f"{run_dir}: not a run folder (no metadata.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    runs, curves = load_runs(run_dir)
    if runs.empty:
        raise HessbenchError(f"{run_dir}: no finished runs to report")
    loss_kind = _loss_kind(meta)
    classification = loss_kind == "cross_entropy"
    tables = [final_table(runs, classification), per_lr_table(runs, classification)]
    figures = make_train_figures(runs, curves, loss_kind)
    files: dict[str, bytes] = {}
    for t in tables:
        files[f"tables/{t.name}.md"] = t.markdown().encode()
        files[f"tables/{t.name}.csv"] = t.csv().encode()
        files[f"tables/{t.name}.tex"] = t.latex().encode()
    for f in figures:
        if f.figure is not None:
            for fmt_ in ("png", "pdf"):
                files[f"figures/{f.name}.{fmt_}"] = figure_bytes(f.figure, fmt_)
    page = _document(meta, command, runs, tables, figures)
    files["report.md"] = page.markdown().encode()
    files["index.html"] = page.html().encode()
    return TrainReport(files, tables, figures)


def render_train_report(
    run_dir: str | Path, out_dir: str | Path, command: str | None = None
) -> TrainReport:
    """Write the report of a train run folder into ``out_dir`` (see the module docstring).

    Files it writes are replaced (through a temporary file and a rename); a figure
    of an earlier report that no longer applies is deleted; other files are left.
    ``command`` is shown as the report's maker (default: ``hessbench report RUN -o OUT``).
    """
    out = Path(out_dir)
    if command is None:
        command = f"hessbench report {shlex.quote(str(run_dir))} -o {shlex.quote(str(out))}"
    report = render_train_files(run_dir, command)
    write_files(out, report.files, TRAIN_OUTPUTS)
    return report
