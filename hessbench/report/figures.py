"""Figures of a run, as matplotlib ``Figure`` objects (nothing is written here).

:func:`make_figures` returns every figure in a fixed order, each a
:class:`FigureResult` holding the figure or the reason it does not apply to
the run. Figures are made with fixed settings
(:func:`hessbench.report.style.figure_context`) and no pyplot state;
:func:`figure_bytes` renders one to PNG or PDF without timestamps or software
versions, so the same results give the same files.

Bars are horizontal and start at a reference value drawn as a dashed line
(1: HesScale's error, a gradient's memory, the zero estimator's relative
error), so each bar shows the ratio to it, to the left below and to the right
above; a bar ends at its value, ``patch.get_x() + patch.get_width()``. Bars
carry their estimator label as the patch's ``gid`` (in the
before/after-training figure ``"<state>|<label>"``, e.g. ``"init|hesscale"``),
so tests and users can read the plotted values back.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

import hessbench.report.figures_lines as lines
from hessbench.report.budget import budget_figure, budget_time_figure
from hessbench.report.plotting import (
    ROUNDING,
    FigureResult,
    grid,
    log_axis,
    needs_log,
    note,
    ok_cells,
    tasks_of,
    text_inches,
)
from hessbench.report.stats import Estimate
from hessbench.report.style import figure_context, label_infos, natural_key
from hessbench.report.tables import paper_ratios

__all__ = [
    "FigureResult",
    "before_after_figure",
    "figure_bytes",
    "headline_figure",
    "make_figures",
    "memory_figure",
]

_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None},
}
_STATE = re.compile(r"^(?P<base>.+)@(?P<state>init|trained(?P<steps>\d+))$")


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure as ``png`` or ``pdf`` bytes: tight bounding box, no metadata that varies."""
    buf = io.BytesIO()
    with figure_context():
        fig.savefig(buf, format=fmt, metadata=_METADATA[fmt], bbox_inches="tight")
    return buf.getvalue()


def _status_text(cells: pd.DataFrame) -> str:
    if cells.empty:
        return "not run"
    return ", ".join(sorted(set(cells["status"]) - {"ok"})) or "no value"


def _rounding_rows(df: pd.DataFrame) -> set[tuple[str, str]]:
    """(task, label) pairs whose median relative L1 error is at rounding level."""
    ok = ok_cells(df, "rel_l1")
    med = ok.groupby(["task", "label"])["rel_l1"].median()
    return {(str(t), str(label)) for (t, label), v in med.items() if v < ROUNDING}


def _off_axis(ax, y: float, text: str) -> None:
    """A label on a white box at the left of a bar row whose bar runs off the axis."""
    ax.text(
        0.01, y, text, transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=7,
        color="#222222", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1},
    )  # fmt: skip


def _bar_panels(
    df: pd.DataFrame,
    column: str,
    how: str,
    xlabel: str,
    ref: float,
    ref_label: str,
    estimates: dict[tuple[str, str], Estimate] | None = None,
    rounding: set[tuple[str, str]] = frozenset(),
    clipped: set[str] | None = None,
) -> Figure:
    """Per task a panel, per label a horizontal bar (``how`` over seeds) and a dot per seed.

    With ``estimates`` the bar is ``estimates[task, label].value`` with its interval
    drawn as a whisker, and ``how`` names that statistic in the legend. Rows in
    ``rounding`` (task, label) have an error at rounding level: a log axis stops at a
    third of the other rows' smallest value, and such a bar that ends left of that
    runs off the axis, labelled with its value (its label is added to ``clipped``).
    """
    infos = label_infos(df)
    labels = list(infos)
    tasks = tasks_of(df)
    fig, axes = grid(
        len(tasks), 3.2, 0.6 + 0.24 * len(labels), left=0.3 + text_inches(labels), sharey=True
    )
    ok = ok_cells(df, column)
    for ax, task in zip(axes, tasks, strict=True):
        values = ok[ok["task"] == task]
        shown = values[[(task, lab) not in rounding for lab in values["label"]]]
        log = needs_log([ref, *shown[column]])
        off_axis = []
        for i, label in enumerate(labels):
            v = values.loc[values["label"] == label, column].astype(float).sort_values()
            if v.empty:
                note(ax, i, _status_text(df[(df["task"] == task) & (df["label"] == label)]))
                continue
            est = (estimates or {}).get((task, label))
            if estimates is not None and est is None:
                note(ax, i, "no value")
                continue
            height = est.value if est else float(v.mean() if how == "mean" else v.median())
            info = infos[label]
            (bar,) = ax.barh(
                i,
                height - ref,
                left=ref,
                height=0.7,
                color=info.colour,
                hatch=info.hatch,
                edgecolor="white" if not info.hatch else "#333333",
                linewidth=0.4,
            )
            bar.set_gid(label)
            bar.sticky_edges.x.clear()  # else autoscaling may clip a bar that goes left of ref
            ax.plot(v, np.full(len(v), i), "o", ms=2.5, color="black", alpha=0.7, zorder=3)
            if est is not None and not np.isnan(est.low):
                ax.plot([est.low, est.high], [i, i], "-", color="black", lw=1.2, zorder=4)
            if (task, label) in rounding:
                off_axis.append((i, height, label))
            elif log and height <= 0:
                note(ax, i, "= 0")
        if log:
            log_axis(ax, "x", [ref, *shown[column]])
            if off_axis:
                lows = [ref, *shown[column]]
                if estimates is not None:
                    lows += [
                        e.low
                        for (t, lab), e in estimates.items()
                        if t == task and (t, lab) not in rounding and e.low > 0
                    ]
                lo = min(x for x in lows if x > 0) / 3
                ax.set_xlim(left=lo)
                for i, height, label in off_axis:
                    if height < lo:
                        _off_axis(ax, i, f"◂ {height:.1e} (rounding level)")
                        if clipped is not None:
                            clipped.add(label)
        ax.axvline(ref, color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", visible=False)
    fig.legend(
        handles=[
            Line2D([], [], color="black", linestyle="--", linewidth=0.8, label=ref_label),
            Line2D([], [], color="black", marker="o", ms=3, linestyle="none", label="a seed"),
            Patch(facecolor="#999999", label=f"bar: {how} over seeds"),
            *(
                [Line2D([], [], color="black", lw=1.2, label="95% bootstrap CI over seeds")]
                if estimates is not None
                else []
            ),
        ],
        loc="outside lower center",
        ncols=2,
        frameon=False,
    )
    return fig


def headline_figure(df: pd.DataFrame) -> FigureResult:
    """1. The papers' headline: L1 error divided by HesScale's, per task and estimator."""
    r = FigureResult(
        "l1_over_hesscale",
        "L1 error relative to HesScale",
        "Per task, the papers' statistic: each estimator's mean L1 error over seeds (L1: sum "
        "over parameters of |estimate - exact|) divided by HesScale's mean L1 error over the "
        "same seeds (bars), with a 95 % percentile-bootstrap interval over seeds (whiskers); "
        "dots: each seed's L1 divided by HesScale's on the same seed. Bars start at 1 "
        "(HesScale): to the left, more accurate than HesScale.",
        read="A bar left of the dashed line is an estimator more accurate than HesScale on "
        "that task, by the factor on the axis; a whisker that crosses the line means the "
        "seeds do not tell the two apart.",
    )
    if ok_cells(df, "l1_over_hesscale").empty:
        r.skipped = "no cell has an L1 / HesScale value (no ok hesscale cell in the run)"
        return r
    with figure_context():
        rounding, clipped = _rounding_rows(df), set()
        r.figure = _bar_panels(
            df,
            "l1_over_hesscale",
            "mean L1 / HesScale's mean L1",
            "L1 error / HesScale's L1 error",
            1.0,
            "HesScale (= 1)",
            estimates=paper_ratios(df),
            rounding=rounding,
            clipped=clipped,
        )
    r.notes += _rounding_notes(df, clipped)
    return r


def _rounding_notes(df: pd.DataFrame, clipped: set[str]) -> list[str]:
    """A sentence naming the labels whose bars run off the axis, at rounding level."""
    labels = sorted(clipped, key=list(label_infos(df)).index)
    if not labels:
        return []
    bars = "its bar runs" if len(labels) == 1 else "their bars run"
    return [
        f"{', '.join(labels)}: relative L1 error below {ROUNDING:g}, float rounding of an "
        f"exact computation; {bars} off the axis's left end, labelled with the value, so "
        "that the other bars keep the axis."
    ]


def memory_figure(df: pd.DataFrame) -> FigureResult:
    """6. Peak memory of a call relative to a gradient's, per task and estimator."""
    r = FigureResult(
        "memory",
        "Peak memory relative to a gradient",
        "Peak bytes allocated during one estimator call divided by those of one gradient "
        "(forward and backward) on the same batch: bars are the median over seeds, dots "
        "the seeds. Bars start at 1 (a gradient's peak).",
        read="The bar's end is how many gradients' worth of memory one call of the "
        "estimator needs at its peak.",
    )
    if ok_cells(df, "memory_ratio").empty:
        r.skipped = "memory was not measured (the suite's defaults.memory.enabled is false)"
        return r
    with figure_context():
        r.figure = _bar_panels(
            df, "memory_ratio", "median", "peak memory / a gradient's", 1.0, "one gradient (= 1)"
        )
    return r


def _state_pairs(df: pd.DataFrame) -> dict[str, list[str]]:
    """Base task -> its variants (``@init`` first, then by steps) where both kinds exist."""
    groups: dict[str, list[str]] = {}
    for task in tasks_of(df):
        m = _STATE.match(task)
        if m:
            groups.setdefault(m["base"], []).append(task)
    return {
        base: sorted(v, key=natural_key)
        for base, v in groups.items()
        if any(t.endswith("@init") for t in v) and any("@trained" in t for t in v)
    }


def before_after_figure(df: pd.DataFrame) -> FigureResult:
    """7. Accuracy before and after training: paired bars per estimator."""
    r = FigureResult(
        "before_after_training",
        "Accuracy before and after training",
        "Median over seeds of the relative L1 error at initialization (light) and after "
        "training (full colour), per estimator; dots are the seeds. Bars start at 1, the "
        "error of the all-zero estimate.",
        read="Compare each estimator's light and full bar: further left after training "
        "means training made its estimate more accurate, relative to the diagonal's size.",
    )
    pairs = _state_pairs(df)
    if not pairs:
        r.skipped = "the suite evaluates no task both at init and after training"
        return r
    infos = label_infos(df)
    labels = list(infos)
    ok = ok_cells(df, "rel_l1")
    rounding, clipped = _rounding_rows(df), set()
    with figure_context():
        fig, axes = grid(
            len(pairs), 3.2, 0.6 + 0.3 * len(labels), left=0.3 + text_inches(labels), sharey=True
        )
        for ax, (base, variants) in zip(axes, pairs.items(), strict=True):
            width = 0.8 / len(variants)
            off_axis = []
            for i, label in enumerate(labels):
                cells = df[df["task"].isin(variants) & (df["label"] == label)]
                if ok[ok["task"].isin(variants) & (ok["label"] == label)].empty:
                    note(ax, i, _status_text(cells))
            for j, task in enumerate(variants):
                alpha = 0.35 if task.endswith("@init") else 1.0
                for i, label in enumerate(labels):
                    y = i - 0.4 + width * (j + 0.5)
                    v = ok.loc[(ok["task"] == task) & (ok["label"] == label), "rel_l1"]
                    if v.empty:
                        continue
                    info = infos[label]
                    (bar,) = ax.barh(
                        y, float(v.median()) - 1.0, left=1.0, height=width * 0.9,
                        color=info.colour,
                        alpha=alpha, hatch=info.hatch, edgecolor="#333333", linewidth=0.3,
                    )  # fmt: skip
                    bar.set_gid(f"{task.split('@')[1]}|{label}")
                    bar.sticky_edges.x.clear()
                    ax.plot(v, np.full(len(v), y), "o", ms=2, color="black", alpha=0.7, zorder=3)
                    if (task, label) in rounding:
                        off_axis.append((y, float(v.median()), label))
            here = ok[ok["task"].isin(variants)]
            keep = [p not in rounding for p in zip(here["task"], here["label"], strict=True)]
            shown = here[keep]
            if needs_log([1.0, *shown["rel_l1"]]):
                log_axis(ax, "x", [1.0, *shown["rel_l1"]])
                lo = min(1.0, *shown["rel_l1"]) / 3
                if off_axis:
                    ax.set_xlim(left=lo)
                for y, value, label in off_axis:
                    if value < lo:
                        _off_axis(ax, y, f"◂ {value:.1e} (rounding level)")
                        clipped.add(label)
            ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.set_title(base)
            ax.set_xlabel("relative L1 error")
            ax.grid(axis="y", visible=False)
        states = sorted({t.split("@")[1] for v in pairs.values() for t in v}, key=natural_key)
        handles = [
            Patch(facecolor="#777777", alpha=0.35 if s == "init" else 1.0, label=_state_name(s))
            for s in states
        ]
        handles.append(
            Line2D([], [], color="black", linestyle="--", lw=0.8, label="zero estimator (= 1)")
        )
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        r.figure = fig
    r.notes += _rounding_notes(df, clipped)
    return r


def _state_name(state: str) -> str:
    return "at initialization" if state == "init" else f"after {state[7:]} training steps"


def make_figures(df: pd.DataFrame, parts: pd.DataFrame) -> list[FigureResult]:
    """Every figure of the report, in order (skipped ones carry the reason)."""
    return [
        headline_figure(df),
        lines.layer_figure(df, parts),
        lines.accuracy_cost_figure(df),
        lines.samples_figure(df),
        budget_figure(df),
        budget_time_figure(df),
        lines.scaling_figure(df),
        memory_figure(df),
        before_after_figure(df),
    ]
