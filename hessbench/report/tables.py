"""Summary tables of a run: accuracy, cost and per-layer error, per task and estimator label.

Each table is a :class:`Table`: the numbers (``data``, written as CSV at full
precision) and their display form (``header``, ``rows``, ``notes``), rendered
as Markdown, LaTeX (booktabs) or HTML. Statistics are over the seeds of a task
and label, taken over its ``ok`` cells. A label with no ``ok`` cell shows a
dash with a numbered footnote giving the reason (status and message); a label
with some failed seeds keeps its value and marks the "seeds ok" count.
Rows are ordered by task (naturally: ``L2`` before ``L16``) and by estimator
in the order of :data:`hessbench.report.style.ESTIMATOR_STYLES`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from hessbench.report.stats import RESAMPLES, Estimate, ratio_of_means_ci
from hessbench.report.style import label_infos, natural_key
from hessbench.report.summary import ROUNDING_EPS, reference_cells, rounding_tasks
from hessbench.report.table import Table, fmt, missing

__all__ = [
    "Table",
    "accuracy_table",
    "cost_table",
    "layer_table",
    "paper_ratios",
    "task_label_groups",
]


class _Notes:
    """Footnotes numbered in order of first use."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


def task_label_groups(df: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """``(task, label, cells)`` in display order, for every pair with a cell."""
    labels = list(label_infos(df))
    for task in sorted(df["task"].unique(), key=natural_key):
        sub = df[df["task"] == task]
        for label in labels:
            g = sub[sub["label"] == label]
            if len(g):
                yield str(task), label, g.sort_values("seed")


def _reasons(g: pd.DataFrame, notes: _Notes) -> tuple[int, ...]:
    bad = g[g["status"] != "ok"]
    texts = sorted(
        {f"{s}: {m}" if m else str(s) for s, m in zip(bad["status"], bad["message"], strict=True)}
    )
    return tuple(notes.mark(t) for t in texts)


@dataclass(frozen=True)
class _Metric:
    column: str
    header: str
    missing: str  # the footnote when ok cells have no value
    iqr: bool = False
    spec: str = ".3g"


def _summary_table(df: pd.DataFrame, metrics: list[_Metric], **meta: str) -> Table:
    notes = _Notes()
    header = ["task", "estimator", "seeds ok"]
    for m in metrics:
        header += [f"{m.header} (median)"] + ([f"{m.header} (IQR)"] if m.iqr else [])
    rows, marks, data = [], [], []
    for task, label, g in task_label_groups(df):
        ok = g[g["status"] == "ok"]
        reasons = _reasons(g, notes)
        rec: dict[str, object] = {"task": task, "estimator": label}
        rec |= {"seeds_ok": len(ok), "seeds": len(g)}
        row, mark = [task, label, f"{len(ok)}/{len(g)}"], [(), (), reasons if len(ok) else ()]
        for m in metrics:
            values = ok[m.column].dropna()
            q = values.quantile([0.25, 0.5, 0.75]) if len(values) else pd.Series([math.nan] * 3)
            rec[f"{m.column}_median"] = float(q.iloc[1])
            if m.iqr:
                rec[f"{m.column}_q25"], rec[f"{m.column}_q75"] = float(q.iloc[0]), float(q.iloc[2])
            if not len(ok):
                cell_marks = reasons
            elif not len(values):
                cell_marks = (notes.mark(m.missing),)
            elif len(values) < len(ok):
                cell_marks = (
                    notes.mark(
                        f"for some seeds: {m.missing}; the statistics are over the other seeds"
                    ),
                )
            else:
                cell_marks = ()
            row.append(fmt(q.iloc[1], m.spec))
            mark.append(cell_marks)
            if m.iqr:
                iqr = "-" if not len(values) else f"{q.iloc[0]:{m.spec}}–{q.iloc[2]:{m.spec}}"
                row.append(iqr)
                mark.append(cell_marks)
        rec["note"] = "; ".join(notes.texts[i - 1] for i in reasons)
        rows.append(row)
        marks.append(mark)
        data.append(rec)
    return Table(
        data=pd.DataFrame(data), header=header, rows=rows, marks=marks, notes=notes.texts, **meta
    )


def paper_ratios(df: pd.DataFrame) -> dict[tuple[str, str], Estimate]:
    """The papers' statistic per (task, label): mean L1 over seeds / HesScale's mean L1.

    Both means are over the seeds where the label's cell and HesScale's cell of
    the same task are ``ok`` with an L1 value (the same seeds); the interval is
    a percentile bootstrap over those seeds (:mod:`hessbench.report.stats`).
    """
    ok = df[(df["status"] == "ok") & df["l1"].notna()]
    out: dict[tuple[str, str], Estimate] = {}
    for task, sub in ok.groupby("task"):
        ref_l1 = reference_cells(sub).groupby("seed")["l1"].first()
        if ref_l1.empty:
            continue
        for label, g in sub.groupby("label"):
            both = (
                g.groupby("seed")["l1"].first().to_frame("e").join(ref_l1.rename("r"), how="inner")
            )
            if len(both):
                out[str(task), str(label)] = ratio_of_means_ci(
                    both["e"].to_numpy(), both["r"].to_numpy()
                )
    return out


def accuracy_table(df: pd.DataFrame) -> Table:
    """Relative L1 (median, IQR), the papers' L1 / HesScale with its CI, and the median ratio."""
    metrics = [
        _Metric("rel_l1", "rel. L1", "no value recorded", iqr=True),
        _Metric(
            "l1_over_hesscale",
            "L1 / HesScale",
            "no ok hesscale cell with the same task and seed to divide by",
        ),
    ]
    caption = (
        "rel. L1: sum |estimate - exact| / sum |exact| over all parameters, averaged over the "
        "evaluated batches, median and inter-quartile range (IQR) over seeds. "
        "L1 / HesScale (paper): the papers' statistic, the mean over seeds of the L1 error "
        "divided by the mean over the same seeds of HesScale's L1 error, with a 95 % "
        f"percentile-bootstrap interval over seeds ({RESAMPLES} resamples, fixed seed). "
        "L1 / HesScale (median): the median over seeds of the per-seed ratio, each cell's "
        "L1 divided by HesScale's on the same seed (what earlier tables showed). "
        "A task where HesScale's error is at rounding level has its ratios marked: they "
        "measure rounding, not accuracy."
    )
    table = _summary_table(df, metrics, name="accuracy", title="accuracy", caption=caption)
    ratios = paper_ratios(df)
    at = table.header.index("L1 / HesScale (median)")
    table.header[at:at] = ["L1 / HesScale (paper)", "L1 / HesScale (95% CI)"]
    est_list = []
    for row, mark, rec in zip(table.rows, table.marks, table.data.to_dict("records"), strict=True):
        e = ratios.get((str(rec["task"]), str(rec["estimator"])))
        est_list.append(e)
        m = mark[at]
        ci = "-" if e is None or math.isnan(e.low) else f"{e.low:.3g}–{e.high:.3g}"
        row[at:at] = [fmt(e.value if e else math.nan), ci]
        mark[at:at] = [m, m]
    rounding = rounding_tasks(df)
    for row, mark, rec in zip(table.rows, table.marks, table.data.to_dict("records"), strict=True):
        task = rounding.get(str(rec["task"]))
        if task is None or row[at + 2] == "-":
            continue
        text = (
            f"HesScale's error on this task is at rounding level: median relative L1 "
            f"{task.rel_l1:.2g} <= {task.bound:.2g} ({ROUNDING_EPS} machine epsilons of "
            f"{task.dtype}); ratios to it measure rounding, not accuracy, and the run summary "
            "leaves the task out"
        )
        if text not in table.notes:
            table.notes.append(text)
        n = table.notes.index(text) + 1
        for i in (at, at + 1, at + 2):
            mark[i] = (*mark[i], n)
    nan = math.nan
    table.data.insert(
        table.data.columns.get_loc("l1_over_hesscale_median"),
        "l1_ratio_of_means",
        [e.value if e else nan for e in est_list],
    )
    for col, key in (("l1_ratio_of_means_ci_low", "low"), ("l1_ratio_of_means_ci_high", "high")):
        table.data.insert(
            table.data.columns.get_loc("l1_over_hesscale_median"),
            col,
            [getattr(e, key) if e else nan for e in est_list],
        )
    table.data.insert(
        table.data.columns.get_loc("note"),
        "hesscale_at_rounding",
        [
            None if missing(v) else str(t) in rounding
            for t, v in zip(table.data["task"], table.data["l1_over_hesscale_median"], strict=True)
        ],
    )
    return table


def cost_table(df: pd.DataFrame) -> Table:
    """Median CPU-time ratio and peak-memory ratio to one gradient, and CPU time per call."""
    not_measured = "not measured (see the suite's defaults.timing and defaults.memory)"
    metrics = [
        _Metric("cpu_time_ratio", "time / gradient", not_measured, iqr=True, spec=".2f"),
        _Metric("memory_ratio", "memory / gradient", not_measured, spec=".2f"),
        _Metric("cpu_time_ms", "CPU time per call [ms]", not_measured, spec=".3g"),
    ]
    caption = (
        "time / gradient: CPU time of one estimator call divided by that of one "
        "forward+backward gradient of the same loss (interleaved, same process); "
        "memory / gradient: peak allocated bytes of a call divided by a gradient's."
    )
    df = df.assign(cpu_time_ms=df["cpu_time_s"] * 1e3)
    return _summary_table(df, metrics, name="cost", title="cost", caption=caption)


def layer_table(df: pd.DataFrame, parts: pd.DataFrame) -> Table:
    """Median over seeds of the relative L1 error of each layer, per task and label.

    Layers are the modules holding parameters, named as in the model
    (``named_modules``), in natural order. An empty entry: the task has no such
    layer.
    """
    notes = _Notes()
    layers = parts[parts["level"] == "layer"]
    ok_ids = set(df.loc[df["status"] == "ok", "cell_id"])
    layers = layers[layers["cell_id"].isin(ok_ids)]
    names = sorted(layers["name"].astype(str).unique(), key=natural_key)
    by_task = {t: set(g["name"].astype(str)) for t, g in layers.groupby("task")}
    medians = layers.groupby(["task", "label", "name"])["rel_l1"].median()
    header = ["task", "estimator", "seeds ok", *(f"layer {n}" for n in names)]
    rows, marks, data = [], [], []
    for task, label, g in task_label_groups(df):
        n_ok = int((g["status"] == "ok").sum())
        reasons = _reasons(g, notes)
        have = by_task.get(task, set()) or set(names)
        row, mark = [task, label, f"{n_ok}/{len(g)}"], [(), (), reasons if n_ok else ()]
        rec: dict[str, object] = {"task": task, "estimator": label, "seeds_ok": n_ok}
        rec["seeds"] = len(g)
        for n in names:
            v = float(medians.get((task, label, n), math.nan)) if n in have else math.nan
            rec[f"layer {n}"] = v if n in have else ""
            row.append(fmt(v) if n in have else "")
            if n not in have:
                mark.append(())
            elif not n_ok:
                mark.append(reasons)
            else:
                mark.append(() if not missing(v) else (notes.mark("no per-layer value recorded"),))
        rec["note"] = "; ".join(notes.texts[i - 1] for i in reasons)
        rows.append(row)
        marks.append(mark)
        data.append(rec)
    caption = (
        "Relative L1 error of each layer's parameters (weights and bias together): "
        "median over seeds. Layers are named as the model's modules."
    )
    return Table(
        name="layers",
        title="per-layer accuracy",
        caption=caption,
        data=pd.DataFrame(data),
        header=header,
        rows=rows,
        marks=marks,
        notes=notes.texts,
    )
