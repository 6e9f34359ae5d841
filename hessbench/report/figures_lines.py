"""The line and scatter figures of a report.

Per-layer error, accuracy against cost, error against the number of samples,
cost against the number of parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from hessbench.report.plotting import (
    FigureResult,
    grid,
    handle,
    legend,
    log_axis,
    ok_cells,
    quartiles,
    set_log,
    tasks_of,
)
from hessbench.report.style import figure_context, label_infos, natural_key, sweeps

__all__ = ["accuracy_cost_figure", "layer_figure", "samples_figure", "scaling_figure"]

_REL_L1 = "relative L1 error"
_TIME_RATIO = "CPU time / gradient's CPU time"


def layer_figure(df: pd.DataFrame, parts: pd.DataFrame) -> FigureResult:
    """2. Relative L1 error of each layer, a line per estimator label."""
    r = FigureResult(
        "layer_error",
        "Error per layer",
        "Relative L1 error of each layer's parameters (median over seeds), layers in "
        "forward order, named as the model's modules.",
    )
    ok_ids = set(df.loc[df["status"] == "ok", "cell_id"])
    layers = parts[(parts["level"] == "layer") & parts["cell_id"].isin(ok_ids)]
    if layers.empty:
        r.skipped = "no ok cell has per-layer values"
        return r
    infos = label_infos(df)
    tasks = tasks_of(layers)
    shown = set()
    with figure_context():
        fig, axes = grid(len(tasks), 3.6, 2.8)
        for ax, task in zip(axes, tasks, strict=True):
            t = layers[layers["task"] == task]
            names = sorted(t["name"].astype(str).unique(), key=natural_key)
            med = t.groupby(["label", "name"])["rel_l1"].median()
            for label, info in infos.items():
                ys = [float(med.get((label, n), math.nan)) for n in names]
                if all(math.isnan(y) for y in ys):
                    continue
                shown.add(label)
                ax.plot(
                    range(len(names)), ys, color=info.colour, marker=info.style.marker,
                    markerfacecolor=info.facecolour, linestyle=info.linestyle, ms=4, lw=1,
                )  # fmt: skip
            ax.set_xticks(range(len(names)), names)
            ax.set_xlim(-0.3, len(names) - 0.7)
            set_log(ax, "y", med)
            ax.set_title(task)
            ax.set_xlabel("layer (module name)")
            ax.set_ylabel(f"{_REL_L1} of the layer")
        legend(fig, [handle(i) for label, i in infos.items() if label in shown])
        r.figure = fig
    return r


def _bars(q: tuple[float, float, float]) -> list[list[float]]:
    return [[q[1] - q[0]], [q[2] - q[1]]]


def accuracy_cost_figure(df: pd.DataFrame) -> FigureResult:
    """3. Relative L1 error against time ratio; lines join Monte-Carlo sample-size sweeps."""
    r = FigureResult(
        "accuracy_vs_cost",
        "Accuracy against cost",
        "Per task, each estimator's median relative L1 error against its median CPU-time "
        "ratio to one gradient; bars span the inter-quartile range over seeds. Lines join "
        "the sample sizes k of a Monte-Carlo estimator. Log-log; lower left is better.",
    )
    ok = ok_cells(df, "rel_l1", "cpu_time_ratio")
    if ok.empty:
        r.skipped = "no ok cell has both a relative L1 error and a time ratio"
        return r
    infos = label_infos(df)
    shown = set()
    with figure_context():
        fig, axes = grid(len(tasks_of(ok)), 3.6, 3.0)
        for ax, task in zip(axes, tasks_of(ok), strict=True):
            t = ok[ok["task"] == task]
            points = {}
            for label, info in infos.items():
                g = t[t["label"] == label]
                if g.empty:
                    continue
                qx, qy = quartiles(g["cpu_time_ratio"]), quartiles(g["rel_l1"])
                points[label] = (qx[1], qy[1])
                shown.add(label)
                ax.errorbar(
                    qx[1], qy[1], xerr=_bars(qx), yerr=_bars(qy), color=info.colour,
                    marker=info.style.marker, markerfacecolor=info.facecolour, ms=5,
                    elinewidth=0.8, capsize=0, linestyle="none",
                )  # fmt: skip
            for members in sweeps(infos).values():
                pts = [(points[m.label], m) for m in members if m.label in points]
                if len(pts) < 2:
                    continue
                xs, ys = zip(*(p for p, _ in pts), strict=True)
                info = members[0]
                ax.plot(xs, ys, color=info.style.colour, linestyle=info.linestyle, lw=0.9)
                for (x, y), m in pts:
                    ax.annotate(
                        f"k={m.num_samples}", (x, y), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, color=info.style.colour,
                    )  # fmt: skip
            log_axis(ax, "x", t["cpu_time_ratio"])
            log_axis(ax, "y", t["rel_l1"])
            ax.margins(x=0.15, y=0.08)  # room for the k= marks
            ax.set_title(task)
            ax.set_xlabel(_TIME_RATIO)
            ax.set_ylabel(_REL_L1)
        legend(fig, [handle(i, line=False) for label, i in infos.items() if label in shown])
        r.figure = fig
    return r


def samples_figure(df: pd.DataFrame) -> FigureResult:
    """4. Error against the number of samples of the Monte-Carlo estimators, with 1/sqrt(k)."""
    r = FigureResult(
        "error_vs_samples",
        "Error against the number of samples",
        "Median relative L1 error (bars: inter-quartile range over seeds) of the Monte-Carlo "
        "estimators against their number of samples k, log-log; the dotted guide falls as "
        "1/sqrt(k), the rate of an unbiased estimator's standard error.",
    )
    infos = label_infos(df)
    ok = ok_cells(df, "rel_l1")
    ok = ok[ok["rel_l1"] > 0]
    sw = sweeps(infos)
    panels = []
    for task in tasks_of(ok):
        t = ok[ok["task"] == task]
        curves = {}
        for name, members in sw.items():
            pts = []
            for m in members:
                v = t.loc[t["label"] == m.label, "rel_l1"]
                if len(v):
                    pts.append((m.num_samples, quartiles(v)))
            if len({k for k, _ in pts}) >= 2:
                curves[name] = (members[-1], pts)  # the full-colour member
        if curves:
            panels.append((task, curves))
    if not panels:
        r.skipped = "no Monte-Carlo estimator ran with two or more values of num_samples"
        return r
    shown: dict[str, Line2D] = {}
    with figure_context():
        fig, axes = grid(len(panels), 3.6, 3.0)
        for ax, (task, curves) in zip(axes, panels, strict=True):
            for name, (info, pts) in curves.items():
                ks = [k for k, _ in pts]
                ax.errorbar(
                    ks, [q[1] for _, q in pts],
                    yerr=[[q[1] - q[0] for _, q in pts], [q[2] - q[1] for _, q in pts]],
                    color=info.style.colour, marker=info.style.marker, linestyle=info.linestyle,
                    markerfacecolor=info.facecolour, ms=5, lw=1, elinewidth=0.8, capsize=2,
                )  # fmt: skip
                shown[name] = handle(info)
                shown[name].set_label(name)
            k0 = min(pts[0][0] for _, pts in curves.values())
            k1 = max(pts[-1][0] for _, pts in curves.values())
            # the guide runs above every curve, parallel to where an unbiased one would go
            y0 = 2 * max(pts[0][1][1] for _, pts in curves.values() if pts[0][0] == k0)
            ks = np.geomspace(k0, k1, 20)
            ax.plot(ks, y0 * np.sqrt(k0 / ks), color="black", linestyle=":", lw=1)
            ax.set_xscale("log")
            log_axis(ax, "y", [y for _, pts in curves.values() for _, q in pts for y in q])
            ticks = sorted({k for _, pts in curves.values() for k, _ in pts})
            ax.set_xticks(ticks, [str(k) for k in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(task)
            ax.set_xlabel("number of samples k")
            ax.set_ylabel(_REL_L1)
        guide = Line2D([], [], color="black", linestyle=":", lw=1, label="∝ 1/√k")
        legend(fig, [*shown.values(), guide])
        r.figure = fig
    return r


def _count(n: float) -> str:
    """A parameter count, short: 43, 350k, 4.3M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def scaling_figure(df: pd.DataFrame) -> FigureResult:
    """5. CPU time per call and time ratio against the number of parameters, log-log."""
    r = FigureResult(
        "cost_vs_params",
        "Cost against the number of parameters",
        "Median CPU time of one call (left; the dashed black line is one gradient, forward "
        "and backward) and its ratio to the gradient's (right) against the model's number "
        "of parameters, over tasks of each size and seeds; log-log.",
    )
    ok = ok_cells(df, "cpu_time_s", "num_params")
    sizes = sorted(ok["num_params"].unique())
    if len(sizes) < 2:
        n = f" ({int(sizes[0])})" if sizes else ""
        r.skipped = (
            f"every task has the same number of parameters{n}; the figure needs tasks of "
            "several sizes, as in suites/scaling.yaml"
        )
        return r
    infos = label_infos(df)
    med = ok.groupby(["label", "num_params"])[["cpu_time_s", "cpu_time_ratio"]].median()
    grad = ok.groupby("num_params")["grad_cpu_time_s"].median()
    shown = []
    with figure_context():
        fig, (left, right) = grid(2, 4.0, 3.2)
        left.plot(grad.index, grad.to_numpy(), color="black", linestyle="--", lw=1.2)
        for label, info in infos.items():
            if label not in med.index.get_level_values(0):
                continue
            m = med.loc[label].sort_index()
            style = {
                "color": info.style.colour, "marker": info.style.marker, "ms": 4, "lw": 1,
                "linestyle": info.linestyle, "markerfacecolor": info.facecolour,
            }  # fmt: skip
            left.plot(m.index, m["cpu_time_s"], **style)
            right.plot(m.index, m["cpu_time_ratio"], **style)
            shown.append(handle(info))
        for ax in (left, right):
            ax.set_xscale("log")
            if len(sizes) <= 8:  # label the sizes themselves
                ax.set_xticks(sizes, [_count(n) for n in sizes])
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("number of parameters")
        log_axis(left, "y", [*med["cpu_time_s"], *grad])
        log_axis(right, "y", med["cpu_time_ratio"])
        left.set_ylabel("CPU time per call [s]")
        right.set_ylabel(_TIME_RATIO)
        left.set_title("time per call")
        right.set_title("relative to one gradient")
        grad_line = Line2D([], [], color="black", linestyle="--", label="gradient (fwd + bwd)")
        legend(fig, [*shown, grad_line])
        r.figure = fig
    return r
