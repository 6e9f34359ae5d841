"""The line and scatter figures of a report.

Per-layer error, accuracy against cost, error against the number of samples,
cost against the number of parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps as mpl_colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from hessbench.report.plotting import (
    MAX_WIDTH,
    ROUNDING,
    FigureResult,
    coincide_notes,
    coinciding,
    grid,
    handle,
    legend,
    log_axis,
    ok_cells,
    quartiles,
    rounding_floor,
    short,
    tasks_of,
    text_inches,
)
from hessbench.report.style import figure_context, label_infos, natural_key, sweeps

__all__ = ["accuracy_cost_figure", "layer_figure", "samples_figure", "scaling_figure"]

_REL_L1 = "relative L1 error"
_TIME_RATIO = "CPU time / gradient's CPU time"


def layer_figure(df: pd.DataFrame, parts: pd.DataFrame) -> FigureResult:
    """2. Relative L1 error of each layer: a heatmap per task, a row per estimator label."""
    r = FigureResult(
        "layer_error",
        "Error per layer",
        "Relative L1 error of each layer's parameters (median over seeds), a panel per task: "
        "a row per estimator, a column per layer in forward order, named as the model's "
        "modules; one logarithmic colour scale for every panel, the value written in the cell "
        "where it fits.",
        read="Read along a row to see where in the network an estimator loses accuracy (a "
        "lighter cell is a larger error); read down a column to rank the estimators on "
        "that layer.",
    )
    ok_ids = set(df.loc[df["status"] == "ok", "cell_id"])
    layers = parts[(parts["level"] == "layer") & parts["cell_id"].isin(ok_ids)]
    if layers.empty:
        r.skipped = "no ok cell has per-layer values"
        return r
    infos = label_infos(df)
    tasks = tasks_of(layers)
    have = set(layers["label"].astype(str))
    rows = [label for label in infos if label in have]  # every panel has every row
    panels = []
    for task in tasks:
        t = layers[layers["task"] == task]
        names = sorted(t["name"].astype(str).unique(), key=natural_key)
        med = t.groupby(["label", "name"])["rel_l1"].median()
        values = np.array([[float(med.get((lab, n), math.nan)) for n in names] for lab in rows])
        panels.append((task, names, values))
    everything = np.concatenate([v.ravel() for *_, v in panels])
    positive = everything[np.isfinite(everything) & (everything > 0)]
    floor = rounding_floor(positive)
    vmax = float(positive.max()) if len(positive) else 1.0
    vmin = floor if floor is not None else (float(positive.min()) if len(positive) else 0.1)
    norm = LogNorm(vmin=min(vmin, vmax / 10), vmax=vmax, clip=True)
    cmap = mpl_colormaps["viridis"].with_extremes(bad="#dddddd")
    left, bar_width = 0.4 + text_inches(rows), 1.3
    most = max(len(names) for _, names, _ in panels)
    ncols = next(
        c for c in (3, 2, 1)
        if c == 1 or (len(panels) >= c and left + c * (0.45 * most + 0.3) + bar_width <= MAX_WIDTH)
    )  # fmt: skip
    nrows = math.ceil(len(panels) / ncols)
    cell = min(0.55, (MAX_WIDTH - left - bar_width - 0.3 * ncols) / (ncols * most))
    rounded = missing = written = False
    with figure_context():
        fig = Figure(
            figsize=(
                left + ncols * (cell * most + 0.3) + bar_width,
                nrows * (0.8 + 0.2 * len(rows)),
            ),
            layout="constrained",
        )
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        for ax, (task, names, values) in zip(axes, panels, strict=False):
            shown = np.where(np.isfinite(values), np.maximum(values, norm.vmin), np.nan)
            image = ax.imshow(
                np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto",
                interpolation="nearest",
            )  # fmt: skip
            image.set_gid(task)
            numbers = cell * most / len(names) >= 0.38  # room to write the value in the cell
            written |= numbers
            for (i, j), v in np.ndenumerate(values):
                missing |= not math.isfinite(v)
                rounded |= bool(v < ROUNDING)
                if numbers and math.isfinite(v):
                    ax.text(
                        j, i, "≈0" if v < ROUNDING else short(v), ha="center", va="center",
                        fontsize=7, color="white" if norm(max(v, norm.vmin)) < 0.6 else "black",
                    )  # fmt: skip
            ax.set_xticks(range(len(names)), names)
            ax.set_yticks(range(len(rows)), rows)
            ax.tick_params(length=0)
            ax.grid(False)
            ax.set_title(task)
            ax.set_xlabel("layer (module name)")
        bar = fig.colorbar(
            image,
            ax=list(axes[: len(panels)]),
            shrink=min(1.0, 4.0 / (nrows * 0.2 * len(rows) + 0.8)),
        )
        bar.set_label(f"{_REL_L1} of the layer")
        r.figure = fig
    if rounded:
        r.notes.append(
            f"Cells below {ROUNDING:g} (float rounding of an exact computation) take the "
            "scale's lowest colour" + (" and read ≈0." if written else ".")
        )
    if missing:
        r.notes.append("A grey cell: the estimator has no value for that layer on that task.")
    return r


def _bars(q: tuple[float, float, float]) -> list[list[float]]:
    return [[q[1] - q[0]], [q[2] - q[1]]]


def _overlaps(
    ax, points: dict[str, tuple[float, float]], size: float = 0.01
) -> list[tuple[str, str]]:
    """Pairs of labels whose points lie within ``size`` of the axes of each other (drawn on top)."""
    to_axes = ax.transScale + ax.transLimits
    where = {label: to_axes.transform(p) for label, p in points.items()}
    names = list(where)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if np.all(np.abs(where[a] - where[b]) < size):
                out.append((a, b))
    return out


_ROUNDING_LINE = {"color": "#888888", "lw": 0.8, "linestyle": ":"}


def accuracy_cost_figure(df: pd.DataFrame) -> FigureResult:
    """3. Relative L1 error against time ratio; lines join Monte-Carlo sample-size sweeps."""
    r = FigureResult(
        "accuracy_vs_cost",
        "Accuracy against cost",
        "Per task, each estimator's median relative L1 error against its median CPU-time "
        "ratio to one gradient; bars span the inter-quartile range over seeds. Lines join "
        "the sample sizes k of a Monte-Carlo estimator (lightest: fewest samples). Log-log.",
        read="Lower left is better: an estimator that another one beats on both axes "
        "(below and to the left of it) is never the better choice on that task.",
    )
    ok = ok_cells(df, "rel_l1", "cpu_time_ratio")
    if ok.empty:
        r.skipped = "no ok cell has both a relative L1 error and a time ratio"
        return r
    infos = label_infos(df)
    shown = set()
    overlaps: dict[str, list[tuple[str, str]]] = {}
    rounded: dict[str, float] = {}
    with figure_context():
        fig, axes = grid(len(tasks_of(ok)), 3.6, 3.0)
        for ax, task in zip(axes, tasks_of(ok), strict=True):
            t = ok[ok["task"] == task]
            med = t.groupby("label")["rel_l1"].median()
            floor = rounding_floor(med)
            if floor is not None:
                low_q = t.loc[t["label"].map(med) >= ROUNDING, "rel_l1"]
                floor = min(floor, float(low_q.min()) / 2)
            points = {}
            for label, info in infos.items():
                g = t[t["label"] == label]
                if g.empty:
                    continue
                qx, qy = quartiles(g["cpu_time_ratio"]), quartiles(g["rel_l1"])
                shown.add(label)
                style = {
                    "color": info.colour, "marker": info.style.marker, "ms": 5,
                    "markerfacecolor": info.facecolour, "linestyle": "none",
                }  # fmt: skip
                if floor is not None and qy[1] < ROUNDING:  # at the floor, labelled
                    rounded[label] = qy[1]
                    (dot,) = ax.plot([qx[1]], [floor * 1.6], clip_on=False, **style)
                    dot.set_gid(label)
                    points[label] = (qx[1], floor * 1.6)
                    continue
                points[label] = (qx[1], qy[1])
                ax.errorbar(
                    qx[1], qy[1], xerr=_bars(qx), yerr=_bars(qy), elinewidth=0.8, capsize=0,
                    **style,
                )  # fmt: skip
            for members in sweeps(infos).values():
                pts = [points[m.label] for m in members if m.label in points]
                if len(pts) >= 2:
                    xs, ys = zip(*pts, strict=True)
                    info = members[0]
                    ax.plot(xs, ys, color=info.style.colour, linestyle=info.linestyle, lw=0.9)
            log_axis(ax, "x", t["cpu_time_ratio"])
            log_axis(ax, "y", [v for v in t["rel_l1"] if floor is None or v >= floor])
            ax.margins(x=0.12, y=0.08)
            if floor is not None:
                ax.set_ylim(bottom=floor)
                ax.axhline(floor * 1.6, **_ROUNDING_LINE)
            overlaps[task] = _overlaps(ax, points)
            ax.set_title(task)
            ax.set_xlabel(_TIME_RATIO)
            ax.set_ylabel(_REL_L1)
        handles = [handle(i, line=False) for label, i in infos.items() if label in shown]
        if rounded:
            handles.append(
                Line2D([], [], label=f"error < {ROUNDING:g} (rounding)", **_ROUNDING_LINE)
            )
        legend(fig, handles)
        r.figure = fig
    if rounded:
        values = ", ".join(f"{label} {v:.1e}" for label, v in rounded.items())
        r.notes.append(
            f"Errors below {ROUNDING:g} are float rounding of an exact computation ({values}): "
            "they are drawn on the dotted line at the bottom so that the other points keep "
            "the axis."
        )
    r.notes += coincide_notes(overlaps, len(axes), _points_sentence)
    return r


def _points_sentence(a: str, b: str, tasks: list[str]) -> str:
    on = f" on {', '.join(tasks)}" if tasks else ""
    return f"The points of {a} and {b} lie on top of each other{on}."


# Why a Monte-Carlo estimator's error may not fall with its number of samples: what its
# samples average to is not the diagonal (the figure finds the flat curve in the data).
BIAS = {
    "adahessian": "AdaHessian averages |z ∘ Hz| over its samples z; with Rademacher z "
    "that is |Hz|, whose mean is about √(2/π) times the norm of each Hessian row, not the "
    "diagonal, so more samples only converge to that biased value (its spatial averaging "
    "touches convolution kernels only)",
}


def samples_figure(df: pd.DataFrame) -> FigureResult:
    """4. Error against the number of samples of the Monte-Carlo estimators, with 1/sqrt(k)."""
    r = FigureResult(
        "error_vs_samples",
        "Error against the number of samples",
        "Median relative L1 error (bars: inter-quartile range over seeds) of the Monte-Carlo "
        "estimators against their number of samples k, log-log; the dotted guide falls as "
        "1/sqrt(k), the rate of an unbiased estimator's standard error.",
        read="A curve parallel to the guide is an unbiased estimator whose error is its "
        "variance, which more samples reduce; a curve that stays flat has an error more "
        "samples do not remove (bias).",
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
    hidden: dict[str, list[tuple[str, str]]] = {}
    with figure_context():
        fig, axes = grid(len(panels), 3.6, 3.0)
        for ax, (task, curves) in zip(axes, panels, strict=True):
            hidden[task] = coinciding(
                [(n, [k for k, _ in p], [q[1] for _, q in p]) for n, (_, p) in curves.items()]
            )
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
    r.notes += coincide_notes(hidden, len(panels))
    r.notes += _flat_notes(panels)
    return r


def _flat_notes(panels: list) -> list[str]:
    """Sentences naming the sweeps whose error does not fall with k, and why where known.

    Flat: from the fewest to the most samples the median error falls by less than a
    fifth, where 1/sqrt(k) would at least halve it.
    """
    flat: dict[str, tuple[str, list[str]]] = {}
    for task, curves in panels:
        for name, (info, pts) in curves.items():
            (k0, q0), (k1, q1) = pts[0], pts[-1]
            if math.sqrt(k0 / k1) <= 0.5 and q1[1] > 0.8 * q0[1]:
                text = f"{short(q0[1])} at k={k0}, {short(q1[1])} at k={k1}"
                flat.setdefault(name, (info.estimator, []))[1].append(f"{task}: {text}")
    out = []
    for name, (estimator, where) in flat.items():
        text = f"{name} stays flat ({'; '.join(where)}) where 1/√k would have cut its error"
        if estimator in BIAS:
            out.append(
                f"{text} at least in half: its error is bias, not variance. {BIAS[estimator]}."
            )
        else:
            out.append(f"{text} at least in half: more samples do not reduce its error here.")
    return out


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
        read="The slope on the left is how an estimator's cost grows with the model; a "
        "flat line on the right is an estimator that costs a fixed number of gradients "
        "whatever the model's size.",
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
