"""Matrix-free estimators at equal budgets of Hessian-vector products.

Estimators whose records name ``num_matvecs`` as the field their sweep varies
(``hutchinson[num_matvecs=k]``, ``xdiag``, ``diagpp``) spend exactly that many
Hessian-vector products per call, so they compare at equal cost. Everything here
reads the cell table only: :func:`budget_figure` (error against the budget),
:func:`budget_time_figure` (error against CPU time) and :func:`budget_table`
(per task, the budget at which each one reaches HesScale's error), with
HesScale and every other label that is no sweep as references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hessbench.report.plotting import (
    FigureResult,
    grid,
    handle,
    legend,
    log_axis,
    ok_cells,
    quartiles,
    tasks_of,
)
from hessbench.report.style import LabelInfo, figure_context, label_infos, sweeps
from hessbench.report.summary import reference_cells
from hessbench.report.table import Table, fmt

__all__ = ["BUDGET", "budget_figure", "budget_table", "budget_time_figure"]

BUDGET = "num_matvecs"
_REL_L1 = "relative L1 error"


@dataclass(frozen=True)
class _Sweep:
    """One matrix-free estimator's labels by budget."""

    name: str
    info: LabelInfo  # the full-colour member, for the legend
    labels: dict[int, str]  # budget -> label


def _budget_sweeps(df: pd.DataFrame) -> list[_Sweep]:
    """Sweeps over ``num_matvecs`` with at least two budgets, in display order."""
    infos = label_infos(df)
    if "sample_param" not in df:
        return []
    by_label = df.drop_duplicates("label").set_index("label")
    groups: dict[str, dict[int, str]] = {}
    for label, info in infos.items():
        if by_label.at[label, "sample_param"] != BUDGET or info.num_samples is None:
            continue
        groups.setdefault(info.sweep, {})[info.num_samples] = label
    out = []
    for name, labels in groups.items():
        if len(labels) >= 2:
            top = infos[labels[max(labels)]]
            out.append(_Sweep(name, top, dict(sorted(labels.items()))))
    return out


def _references(df: pd.DataFrame) -> dict[str, LabelInfo]:
    """Labels in no sweep of two or more sizes, with a nonzero error (exact is left out)."""
    infos = label_infos(df)
    swept = {i.label for group in sweeps(infos).values() for i in group}
    ok = ok_cells(df, "rel_l1")
    med = ok.groupby("label")["rel_l1"].median()
    return {
        label: info
        for label, info in infos.items()
        if label not in swept and med.get(label, 0.0) > 1e-6
    }


def _skip(r: FigureResult, df: pd.DataFrame) -> list[_Sweep]:
    found = _budget_sweeps(df)
    if not found:
        r.skipped = f"no estimator ran with two or more values of {BUDGET}"
    return found


def _draw_references(ax, t: pd.DataFrame, refs: dict[str, LabelInfo]) -> list[str]:
    drawn = []
    for label, info in refs.items():
        v = t.loc[t["label"] == label, "rel_l1"]
        if len(v):
            ax.axhline(float(v.median()), color=info.colour, linestyle="--", lw=0.9)
            drawn.append(label)
    return drawn


def budget_figure(df: pd.DataFrame) -> FigureResult:
    """Relative L1 error of each matrix-free estimator against its matvec budget."""
    r = FigureResult(
        "error_vs_matvecs",
        "Error against the matrix-vector budget",
        "Median relative L1 error over seeds (bars: inter-quartile range) of the matrix-free "
        "estimators against their budget of Hessian-vector products, log-log; dashed "
        "horizontal lines are the medians of the estimators that take no budget (HesScale, "
        "the GGN family, the zero estimator's error of 1; AdaHessian's sample sweep is in "
        "the previous figure).",
        read="Where a curve crosses HesScale's dashed line is the budget at which that "
        "estimator becomes as accurate as HesScale; a curve that stays above it never does "
        "within the budgets run.",
    )
    found = _skip(r, df)
    if not found:
        return r
    return _plot(r, df, found, x=None)


def budget_time_figure(df: pd.DataFrame) -> FigureResult:
    """The same error against the CPU-time ratio to one gradient."""
    r = FigureResult(
        "error_vs_matvec_time",
        "Error against CPU time, matrix-free estimators",
        "The points of the previous figure against their median CPU-time ratio to one "
        "gradient instead of the budget; the estimators that take no budget are points "
        "(hollow markers).",
        read="Lower left is better: a matrix-free curve left of and below HesScale's point "
        "would beat it at equal CPU time.",
    )
    found = _skip(r, df)
    if not found:
        return r
    return _plot(r, df.assign(_x=df["cpu_time_ratio"]), found, x="_x")


def _plot(r: FigureResult, df: pd.DataFrame, budget_sweeps: list[_Sweep], x: str | None):
    ok = ok_cells(df, "rel_l1", *([x] if x else []))
    ok = ok[ok["rel_l1"] > 0]
    refs = _references(df)
    tasks = tasks_of(ok)
    shown: dict[str, object] = {}
    with figure_context():
        fig, axes = grid(len(tasks), 3.6, 3.0)
        for ax, task in zip(axes, tasks, strict=True):
            t = ok[ok["task"] == task]
            xs_all, ys_all = [], []
            for s in budget_sweeps:
                pts = []
                for budget, label in s.labels.items():
                    g = t[t["label"] == label]
                    if len(g):
                        xv = budget if x is None else float(g[x].median())
                        pts.append((xv, quartiles(g["rel_l1"])))
                if not pts:
                    continue
                xs = [p for p, _ in pts]
                ax.errorbar(
                    xs, [q[1] for _, q in pts],
                    yerr=[[q[1] - q[0] for _, q in pts], [q[2] - q[1] for _, q in pts]],
                    color=s.info.style.colour, marker=s.info.style.marker, ms=4, lw=1,
                    linestyle=s.info.linestyle, elinewidth=0.8, capsize=2,
                )  # fmt: skip
                h = handle(s.info)
                h.set_label(s.name)
                shown[s.name] = h
                xs_all += xs
                ys_all += [v for _, q in pts for v in q]
            if x is None:
                for label in _draw_references(ax, t, refs):
                    shown.setdefault(label, handle(refs[label]))
                    shown[label].set_linestyle("--")
                    shown[label].set_marker("")
                ys_all += list(t.loc[t["label"].isin(refs), "rel_l1"])
                ticks = sorted({b for s in budget_sweeps for b in s.labels})
                ax.set_xscale("log")
                ax.set_xticks(ticks, [str(b) for b in ticks])
                ax.minorticks_off()
                ax.set_xlabel("Hessian-vector products per call")
            else:
                for label, info in refs.items():
                    g = t[t["label"] == label]
                    if len(g):
                        ax.plot(
                            float(g[x].median()), float(g["rel_l1"].median()),
                            marker=info.style.marker, color=info.colour, markerfacecolor="white",
                            ms=6, linestyle="none",
                        )  # fmt: skip
                        shown.setdefault(label, handle(info, line=False))
                        shown[label].set_markerfacecolor("white")
                        xs_all.append(float(g[x].median()))
                        ys_all.append(float(g["rel_l1"].median()))
                log_axis(ax, "x", xs_all)
                ax.set_xlabel("CPU time / gradient's CPU time")
            log_axis(ax, "y", ys_all)
            ax.set_title(task)
            ax.set_ylabel(_REL_L1)
        legend(fig, list(shown.values()))
        r.figure = fig
    return r


def _seed_stats(v: pd.Series) -> tuple[float, float, float]:
    a = v.to_numpy(dtype=float)
    return (float(np.median(a)), float(a.min()), float(a.max())) if len(a) else (math.nan,) * 3


def budget_table(df: pd.DataFrame) -> Table | None:
    """Per task and matrix-free estimator: its error at each budget and where it reaches HesScale.

    ``None`` when no estimator swept ``num_matvecs``. A budget *reaches* HesScale when
    its median error over seeds is at most HesScale's; it is marked as no difference
    found when the seed ranges (min to max) of the two overlap.
    """
    found = _budget_sweeps(df)
    if not found:
        return None
    ok = ok_cells(df, "rel_l1")
    budgets = sorted({b for s in found for b in s.labels})
    header = ["task", "estimator", "HesScale", *(f"{b} matvecs" for b in budgets)]
    header.append("reaches HesScale at")
    rows, marks, data = [], [], []
    notes = ["seed ranges overlap with HesScale's: no difference found at this budget"]
    for task in tasks_of(ok):
        t = ok[ok["task"] == task]
        ref = _seed_stats(reference_cells(t)["rel_l1"])
        for s in found:
            row = [task, s.name, _cell(ref)]
            mark: list[tuple[int, ...]] = [(), (), ()]
            reached = None
            rec = {"task": task, "estimator": s.name, "hesscale_median": ref[0]}
            for b in budgets:
                label = s.labels.get(b)
                st = _seed_stats(t.loc[t["label"] == label, "rel_l1"]) if label else (math.nan,) * 3
                known = not (math.isnan(st[0]) or math.isnan(ref[0]))
                m: tuple[int, ...] = (1,) if known and st[1] <= ref[2] and st[2] >= ref[1] else ()
                row.append(_cell(st))
                mark.append(m)
                rec[f"median_{b}"] = st[0]
                if reached is None and st[0] <= ref[0]:
                    reached = b
            row.append(str(reached) if reached is not None else f"> {budgets[-1]}")
            mark.append(())
            rec["reaches_hesscale_at"] = reached if reached is not None else math.nan
            rows.append(row)
            marks.append(mark)
            data.append(rec)
    return Table(
        name="matvec_budget",
        title="matrix-free estimators against HesScale",
        caption=(
            "Relative L1 error, median over seeds with the seed range (min–max) in "
            "brackets, of each matrix-free estimator at each budget of Hessian-vector "
            "products, beside HesScale's (no budget; about one gradient). 'reaches HesScale "
            "at': the smallest budget whose median is at most HesScale's median; '-' where "
            "an estimator did not run at that budget (XDiag needs an even one)."
        ),
        data=pd.DataFrame(data),
        header=header,
        rows=rows,
        marks=marks,
        notes=notes,
    )


def _cell(st: tuple[float, float, float]) -> str:
    if math.isnan(st[0]):
        return "-"
    return f"{fmt(st[0])} ({fmt(st[1])}–{fmt(st[2])})"
