"""Shared plotting helpers: panel grids, the log-scale rule, legends, skipped figures.

Figures are sized to be read where they are shown: at most :data:`MAX_WIDTH`
inches wide (a page shows a figure at most about 1,000 CSS pixels wide, GitHub's
``report.md`` about 880, so 8-point text stays about 10 pixels tall), at most
:data:`PANEL_COLUMNS` panels a row, and a legend goes below the panels when it
would make the figure wider than that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from hessbench.report.style import LabelInfo, natural_key

LOG_RANGE = 100.0  # a log axis when the largest positive value exceeds the smallest this much
PANEL_COLUMNS = 2
MAX_WIDTH = 8.5  # inches: 1275 pixels at 150 dpi
ROUNDING = 1e-5
"""A relative error below this is float rounding of an exact computation (about 100 float32
epsilons: the exact estimators', and exact layers of others, reach 1.1e-6 in 16-layer nets)."""
SAME = 1e-3  # curves whose values agree within this relative tolerance coincide on the plot


@dataclass
class FigureResult:
    """A figure (or why it was skipped), its file name stem, title and caption.

    ``read`` is one sentence saying what to read from the figure; ``notes`` are
    sentences about this run's data the figure cannot show by itself (curves that
    coincide, points at rounding level, a sweep that does not improve).
    """

    name: str
    title: str
    caption: str
    figure: Figure | None = None
    skipped: str = ""
    read: str = ""
    notes: list[str] = field(default_factory=list)


def needs_log(values: Iterable[float]) -> bool:
    """Whether positive ``values`` span more than :data:`LOG_RANGE`."""
    v = _positive(values)
    return bool(len(v)) and float(v.max()) > LOG_RANGE * float(v.min())


def grid(
    n: int, width: float, height: float, left: float = 0.0, **share: object
) -> tuple[Figure, list[Axes]]:
    """``n`` panels of ``width`` x ``height`` inches, at most :data:`PANEL_COLUMNS` a row.

    ``left``: inches once for the row's tick labels (shared y labels); panels are
    narrowed so that the figure is at most :data:`MAX_WIDTH` wide.
    """
    ncols = min(n, PANEL_COLUMNS)
    nrows = math.ceil(n / ncols)
    width = min(width, (MAX_WIDTH - left) / ncols)
    fig = Figure(figsize=(left + width * ncols, height * nrows), layout="constrained")
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
    """A legend outside the panels: to their right, or below them if that is too wide.

    To the right (one column per 24 entries) while the figure stays within
    :data:`MAX_WIDTH`; else below, as many columns as fit the figure's width. The
    figure grows by the legend's size, so constrained layout never squeezes the
    panels to nothing.
    """
    if not handles:
        return
    entry = 0.6 + text_inches([*(h.get_label() for h in handles), title or ""])
    w, h = fig.get_figwidth(), fig.get_figheight()
    ncols = math.ceil(len(handles) / 24)
    if w + ncols * entry <= MAX_WIDTH:
        rows = math.ceil(len(handles) / ncols)
        fig.set_size_inches(w + ncols * entry, max(h, 0.6 + 0.2 * rows))
        loc = "outside right upper"
    else:
        ncols = max(1, min(len(handles), int(max(w, MAX_WIDTH) // entry)))
        rows = math.ceil(len(handles) / ncols)
        fig.set_size_inches(max(w, ncols * entry), h + 0.25 + 0.2 * rows + (0.2 if title else 0))
        loc = "outside lower center"
    fig.legend(handles=handles, loc=loc, ncols=ncols, title=title, frameon=False)


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


def rounding_floor(values: Iterable[float]) -> float | None:
    """The lower limit of a log axis of relative errors: a tenth of the smallest above rounding.

    ``None`` when no value is above :data:`ROUNDING` (then the axis keeps its limits).
    Values below the floor (rounding-level errors) are drawn at it and labelled.
    """
    v = _positive(values)
    v = v[v >= ROUNDING]
    return float(v.min()) / 10 if len(v) else None


def short(v: float) -> str:
    """A number in at most about five characters: ``33``, ``0.04``, ``2e-8``."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    if 0.01 <= abs(v) < 100:
        return f"{v:.2g}"
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def coinciding(
    curves: Sequence[tuple[str, Sequence[float], Sequence[float]]],
) -> list[tuple[str, str]]:
    """``(hidden, front)`` for each curve that an identical later one hides.

    ``curves`` are ``(name, xs, ys)`` in drawing order; two coincide when they have
    the same xs and their ys agree within :data:`SAME` (relative). The earlier
    one is drawn first, so it is the one hidden behind the later.
    """
    out = []
    for i, (name, xs, ys) in enumerate(curves):
        x, y = np.asarray(xs, float), np.asarray(ys, float)
        for later, xs2, ys2 in curves[i + 1 :]:
            x2, y2 = np.asarray(xs2, float), np.asarray(ys2, float)
            same_x = x.shape == x2.shape and len(x) > 0 and np.array_equal(x, x2)
            if same_x and np.allclose(y, y2, rtol=SAME, atol=0, equal_nan=True):
                out.append((name, later))
                break
    return out


def _hidden_sentence(hidden: str, front: str, titles: list[str]) -> str:
    on = f" (on {', '.join(titles)})" if titles else ""
    return (
        f"{hidden} and {front} coincide{on} (equal within {SAME:.1%}): one is hidden "
        "behind the other."
    )


def coincide_notes(
    pairs: dict[str, list[tuple[str, str]]],
    panels: int,
    sentence: Callable[[str, str, list[str]], str] = _hidden_sentence,
) -> list[str]:
    """Sentences naming the curves hidden behind identical ones, per panel title.

    ``pairs`` maps a panel's title to its :func:`coinciding` pairs; a pair found on
    every one of the ``panels`` panels is named once. ``sentence(a, b, titles)``
    words one pair (``titles`` empty when the pair is on every panel).
    """
    where: dict[tuple[str, str], list[str]] = {}
    for title, found in pairs.items():
        for pair in found:
            where.setdefault(pair, []).append(title)
    return [
        sentence(a, b, [] if len(titles) == panels or panels == 1 else titles)
        for (a, b), titles in where.items()
    ]


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
