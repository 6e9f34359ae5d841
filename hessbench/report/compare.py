"""Compare two runs cell by cell (``hessbench compare``).

For every cell id in both runs: the ratio B / A of the relative L1 error, the
CPU-time ratio to one gradient and the peak-memory ratio. A ratio above
``factor`` is *worse*, below ``1 / factor`` *better*. A status that moved from
``ok`` towards ``unsupported`` or a failure (``error``, ``timeout``,
``crashed``) is worse, the other way better. Relative L1 errors that are both
below ``rel_l1_floor`` (rounding-level differences of exact estimators) are
not compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["METRICS", "Change", "Comparison", "compare"]

METRICS = ("rel_l1", "cpu_time_ratio", "memory_ratio")
_RANK = {"ok": 0, "unsupported": 1}  # anything else is a failure (rank 2)


@dataclass(frozen=True)
class Change:
    """One change beyond the factor: a metric's ratio B / A, or a status."""

    cell_id: str
    what: str  # a metric name, or "status"
    a: object
    b: object
    ratio: float  # B / A (NaN for a status)
    verdict: str  # "worse", "better" or "changed"


@dataclass
class Comparison:
    """The outcome of :func:`compare`."""

    factor: float
    compared: int = 0
    changes: list[Change] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def worse(self) -> list[Change]:
        """The changes for the worse."""
        return [c for c in self.changes if c.verdict == "worse"]


def _ratio(a: float, b: float) -> float:
    if a == b:
        return 1.0
    if a == 0:
        return math.inf if b > 0 else -math.inf
    return b / a


def compare(
    a: pd.DataFrame, b: pd.DataFrame, factor: float = 1.2, rel_l1_floor: float = 1e-6
) -> Comparison:
    """Cell-by-cell changes from run ``a`` to run ``b`` (cell tables of ``results.load``)."""
    if not factor > 1:
        raise ValueError(f"factor must be above 1, got {factor}")
    ra, rb = a.set_index("cell_id"), b.set_index("cell_id")
    out = Comparison(factor)
    out.only_a = sorted(set(ra.index) - set(rb.index))
    out.only_b = sorted(set(rb.index) - set(ra.index))
    for cid in sorted(set(ra.index) & set(rb.index)):
        out.compared += 1
        x, y = ra.loc[cid], rb.loc[cid]
        if x["status"] != y["status"]:
            dx, dy = _RANK.get(x["status"], 2), _RANK.get(y["status"], 2)
            verdict = "worse" if dy > dx else "better" if dy < dx else "changed"
            out.changes.append(Change(cid, "status", x["status"], y["status"], math.nan, verdict))
            continue
        if x["status"] != "ok":
            continue
        for m in METRICS:
            va, vb = float(x[m]), float(y[m])
            if math.isnan(va) or math.isnan(vb):
                continue
            if m == "rel_l1" and max(va, vb) < rel_l1_floor:
                continue
            r = _ratio(va, vb)
            if r > factor or r < 1 / factor:
                verdict = "worse" if r > factor else "better"
                out.changes.append(Change(cid, m, va, vb, r, verdict))
    return out
