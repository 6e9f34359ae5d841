"""Reports of a run: tables, figures and a browsable page (``hessbench report``).

The functions here take the cell table of :func:`hessbench.store.records.load` (and
the per-layer rows of :func:`hessbench.store.records.load_parts`) and return tables,
figures and page text; the command line writes them to files.
"""

from hessbench.report.compare import Comparison, compare
from hessbench.report.figures import FigureResult, figure_bytes, make_figures
from hessbench.report.page import Report, render_report
from hessbench.report.tables import Table, accuracy_table, cost_table, layer_table

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
