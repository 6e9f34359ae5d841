"""Shared plotting helpers: panel grids, the log-scale rule, legends, skipped figures."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from hessbench.report.style import LabelInfo, natural_key

LOG_RANGE = 100.0  # a log axis when the largest positive value exceeds the smallest this much
PANEL_COLUMNS = 3


@dataclass
class FigureResult:
    """A figure (or why it was skipped), its file name stem, title and caption."""

    name: str
    title: str
    caption: str
    figure: Figure | None = None
    skipped: str = ""


def needs_log(values: Iterable[float]) -> bool:
    """Whether positive ``values`` span more than :data:`LOG_RANGE`."""
    v = _positive(values)
    return bool(len(v)) and float(v.max()) > LOG_RANGE * float(v.min())


def grid(n: int, width: float, height: float, **share: object) -> tuple[Figure, list[Axes]]:
    """``n`` panels of ``width`` x ``height`` inches, at most :data:`PANEL_COLUMNS` a row."""
    ncols = min(n, PANEL_COLUMNS)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **share).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def tasks_of(df: pd.DataFrame) -> list[str]:
    """Task variants in natural order."""
    return sorted((str(t) for t in df["task"].unique()), key=natural_key)


def ok_cells(df: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The ``ok`` cells with a finite value in every one of ``columns``."""
    ok = df[df["status"] == "ok"]
    for c in columns:
        ok = ok[np.isfinite(ok[c].astype(float))]
    return ok


def quartiles(values: pd.Series) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles (pandas' linear interpolation)."""
    q = values.quantile([0.25, 0.5, 0.75])
    return float(q.iloc[0]), float(q.iloc[1]), float(q.iloc[2])


def handle(info: LabelInfo, line: bool = True) -> Line2D:
    """A legend entry in the label's colour, marker and variant style."""
    return Line2D(
        [],
        [],
        color=info.colour,
        marker=info.style.marker,
        markerfacecolor=info.facecolour,
        linestyle=info.linestyle if line else "none",
        label=info.label,
    )


CHAR_INCHES = 0.07  # rough width of one 8-point character


def text_inches(texts: Iterable[object]) -> float:
    """Rough width in inches of the longest of ``texts`` (for sizing figures)."""
    return CHAR_INCHES * max((len(str(t)) for t in texts), default=0)


def legend(fig: Figure, handles: list, title: str | None = None) -> None:
    """A legend to the right of every panel, one column per 24 entries.

    The figure is widened by the legend's width (and made tall enough for its
    rows), so constrained layout never squeezes the panels to nothing.
    """
    if handles:
        ncols = math.ceil(len(handles) / 24)
        rows = math.ceil(len(handles) / ncols)
        width = ncols * (0.6 + text_inches(h.get_label() for h in handles))
        fig.set_size_inches(fig.get_figwidth() + width, max(fig.get_figheight(), 0.6 + 0.2 * rows))
        fig.legend(
            handles=handles,
            loc="outside right upper",
            ncols=ncols,
            title=title,
            frameon=False,
        )


def _positive(values: Iterable[float]) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and math.isfinite(x) and x > 0])


def log_axis(ax: Axes, axis: str, values: Iterable[float]) -> None:
    """A log scale on ``axis`` ("x" or "y").

    Where ``values`` span at most two decades, ticks at 1, 2, 5 (1, 2, 3, 5 within
    one decade) times a power of ten, labelled plainly ("0.5", "2"), instead of
    matplotlib's crowded ``2×10⁰`` minor labels.
    """
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    v = _positive(values)
    if len(v) and v.max() <= LOG_RANGE * v.min():
        subs = (1.0, 2.0, 3.0, 5.0) if v.max() <= 10 * v.min() else (1.0, 2.0, 5.0)
        a = ax.xaxis if axis == "x" else ax.yaxis
        a.set_major_locator(LogLocator(subs=subs))
        a.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        a.set_minor_formatter(NullFormatter())


def set_log(ax: Axes, axis: str, values: Iterable[float]) -> None:
    """Log scale on ``axis`` ("x" or "y") where the values need it."""
    values = list(values)
    if needs_log(values):
        log_axis(ax, axis, values)


def note(ax: Axes, y: float, text: str) -> None:
    """A grey note at the left of a horizontal-bar row (for rows without a bar)."""
    ax.text(
        0.02,
        y,
        text,
        transform=ax.get_yaxis_transform(),
        va="center",
        ha="left",
        fontsize=7,
        color="#666666",
        style="italic",
    )
