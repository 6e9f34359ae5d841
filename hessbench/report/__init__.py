"""Reports of a run: tables, figures and a browsable page (``hessbench report``).

The functions here take the cell table of :func:`hessbench.store.records.load` (and
the per-layer rows of :func:`hessbench.store.records.load_parts`) and return tables,
figures and page text; the command line writes them to files.

The figures and the page import matplotlib (half a second), so they are loaded on
first use: the run summary (:mod:`hessbench.report.summary`) imports this package
without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hessbench.report.compare import Comparison, compare
from hessbench.report.tables import Table, accuracy_table, cost_table, layer_table

if TYPE_CHECKING:
    from hessbench.report.figures import FigureResult, figure_bytes, make_figures
    from hessbench.report.page import Report, render_report

__all__ = [
    "Comparison",
    "FigureResult",
    "Report",
    "Table",
    "accuracy_table",
    "compare",
    "cost_table",
    "figure_bytes",
    "layer_table",
    "make_figures",
    "render_report",
]

_LAZY = {
    "FigureResult": "figures",
    "figure_bytes": "figures",
    "make_figures": "figures",
    "Report": "page",
    "render_report": "page",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
