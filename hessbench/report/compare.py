"""Compare two runs (``hessbench compare``): status, accuracy, then cost.

Three kinds of change, decided differently because they behave differently:

- **status**, per cell: a status that moved from ``ok`` towards ``unsupported``
  or a failure (``error``, ``timeout``, ``crashed``, ...) is worse, the other
  way better, between two failures "changed".
- **accuracy**, per cell, exactly: the accuracy metrics are deterministic
  (seeded), so any difference beyond float rounding (relative ``tol``, default
  1e-9) is a change; a higher ``rel_l1`` or a lower ``cosine``, ``spearman`` or
  ``sign_agreement`` is worse. Relative L1 errors both below ``rel_l1_floor``
  (rounding-level errors of exact estimators) are not compared.
- **cost**, per estimator label, against the measurements' own noise: the
  label's CPU-time ratio to one gradient in A and in B is the median over its
  cells (the cells ``ok`` in both runs), with a spread, the median over the same
  cells of half the relative inter-quartile range of the ratio,
  ``hypot(time_iqr_s / time_s, grad_time_iqr_s / grad_time_s) / 2``. Time is
  worse (better) only when B / A is beyond ``factor`` (below ``1 / factor``)
  *and* the intervals ``median x (1 +- spread)`` of A and B do not overlap. Cells timed
  fewer than :data:`MIN_REPEATS` times (``--quick``) or without a recorded IQR
  have no spread; a label without such cells is not judged on time. The memory
  ratio (deterministic allocation counts) is judged on ``factor`` alone, per
  label as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

__all__ = [
    "ACCURACY",
    "MIN_REPEATS",
    "Change",
    "Comparison",
    "CostChange",
    "compare",
    "relative_spread",
]

ACCURACY = {"rel_l1": -1, "cosine": 1, "spearman": 1, "sign_agreement": 1}
"""Accuracy metrics compared per cell, with the direction that is better (+1: higher)."""
MIN_REPEATS = 4
"""Fewer timed repeats than this give no usable inter-quartile range."""
_RANK = {"ok": 0, "unsupported": 1}  # anything else is a failure (rank 2)


@dataclass(frozen=True)
class Change:
    """A per-cell change: an accuracy metric beyond rounding, or a status."""

    cell_id: str
    what: str  # an accuracy metric, or "status"
    a: object
    b: object
    ratio: float  # B / A (NaN for a status)
    verdict: str  # "worse", "better" or "changed"


@dataclass(frozen=True)
class CostChange:
    """One estimator label's cost in both runs (medians over its cells ``ok`` in both)."""

    label: str
    cells: int  # cells ok in both runs
    timed: int  # of those, cells with a spread in both runs (the time figures use these)
    time_a: float
    spread_a: float  # relative half-width of A's interval
    time_b: float
    spread_b: float
    memory_a: float
    memory_b: float
    time_verdict: str  # "worse", "better", "same" (within noise or factor), "not judged"
    memory_verdict: str  # "worse", "better", "same", "not judged"

    @property
    def time_ratio(self) -> float:
        """B / A of the label's median CPU-time ratio (NaN when not judged)."""
        return _ratio(self.time_a, self.time_b)

    @property
    def memory_ratio(self) -> float:
        """B / A of the label's median memory ratio."""
        return _ratio(self.memory_a, self.memory_b)


@dataclass
class Comparison:
    """The outcome of :func:`compare`."""

    factor: float
    tol: float = 1e-9
    compared: int = 0
    status: list[Change] = field(default_factory=list)
    accuracy: list[Change] = field(default_factory=list)
    cost: list[CostChange] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[Change]:
        """The per-cell changes: status, then accuracy."""
        return self.status + self.accuracy

    def count(self, verdict: str) -> int:
        """How many status and accuracy changes, and label time and memory verdicts, are ``verdict``."""
        cells = sum(c.verdict == verdict for c in self.changes)
        cost = sum((c.time_verdict == verdict) + (c.memory_verdict == verdict) for c in self.cost)
        return cells + cost

    @property
    def worse(self) -> int:
        """How many changes are for the worse (the command exits 1 when any)."""
        return self.count("worse")


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if a == b:
        return 1.0
    if a == 0:
        return math.inf if b > 0 else -math.inf
    return b / a


def _num(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def relative_spread(row: pd.Series) -> float:
    """Half the relative inter-quartile range of a cell's time ratio (NaN when not measured).

    ``hypot(time_iqr_s / time_s, grad_time_iqr_s / grad_time_s) / 2``: the relative
    IQRs of the estimator's and the gradient's timings, combined as independent;
    the ratio's interval is its median times ``1 +- spread``.
    NaN when the cell was timed fewer than :data:`MIN_REPEATS` times or a field is
    missing.
    """
    repeats = _num(row.get("repeats"))
    if not repeats >= MIN_REPEATS:
        return math.nan
    t, ti = _num(row.get("time_s")), _num(row.get("time_iqr_s"))
    g, gi = _num(row.get("grad_time_s")), _num(row.get("grad_time_iqr_s"))
    if not (t > 0 and g > 0 and ti >= 0 and gi >= 0):
        return math.nan
    return math.hypot(ti / t, gi / g) / 2


def _differs(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return False
    if math.isnan(a) or math.isnan(b):
        return True
    return abs(b - a) > tol * max(abs(a), abs(b))


def _accuracy(cid: str, x: pd.Series, y: pd.Series, tol: float, floor: float) -> list[Change]:
    out = []
    for m, better in ACCURACY.items():
        va, vb = _num(x.get(m)), _num(y.get(m))
        if m == "rel_l1" and max(va, vb) < floor:
            continue
        if not _differs(va, vb, tol):
            continue
        if math.isnan(va) or math.isnan(vb):
            verdict = "changed"
        else:
            verdict = "worse" if (vb - va) * better < 0 else "better"
        out.append(Change(cid, m, va, vb, _ratio(va, vb), verdict))
    return out


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(pd.Series(values).median()) if values else math.nan


def _cost(label: str, rows: list[tuple[pd.Series, pd.Series]], factor: float) -> CostChange:
    timed = []
    for x, y in rows:
        sa, sb = relative_spread(x), relative_spread(y)
        ta, tb = _num(x.get("cpu_time_ratio")), _num(y.get("cpu_time_ratio"))
        if not (math.isnan(sa) or math.isnan(sb) or math.isnan(ta) or math.isnan(tb)):
            timed.append((ta, sa, tb, sb))
    time_a = _median([t[0] for t in timed])
    spread_a = _median([t[1] for t in timed])
    time_b = _median([t[2] for t in timed])
    spread_b = _median([t[3] for t in timed])
    r = _ratio(time_a, time_b)
    if not timed or math.isnan(r):
        time_verdict = "not judged"
    elif r > factor and time_b * (1 - spread_b) > time_a * (1 + spread_a):
        time_verdict = "worse"
    elif r < 1 / factor and time_b * (1 + spread_b) < time_a * (1 - spread_a):
        time_verdict = "better"
    else:
        time_verdict = "same"
    memory_a = _median([_num(x.get("memory_ratio")) for x, _ in rows])
    memory_b = _median([_num(y.get("memory_ratio")) for _, y in rows])
    m = _ratio(memory_a, memory_b)
    memory_verdict = (
        "not judged"
        if math.isnan(m)
        else "worse"
        if m > factor
        else "better"
        if m < 1 / factor
        else "same"
    )
    return CostChange(
        label, len(rows), len(timed), time_a, spread_a, time_b, spread_b,
        memory_a, memory_b, time_verdict, memory_verdict,
    )  # fmt: skip


def compare(
    a: pd.DataFrame,
    b: pd.DataFrame,
    factor: float = 1.2,
    rel_l1_floor: float = 1e-6,
    tol: float = 1e-9,
) -> Comparison:
    """Changes from run ``a`` to run ``b`` (cell tables of ``records.load``); see the module."""
    if not factor > 1:
        raise ValueError(f"factor must be above 1, got {factor}")
    if not tol >= 0:
        raise ValueError(f"tol must be at least 0, got {tol}")
    ra, rb = a.set_index("cell_id"), b.set_index("cell_id")
    out = Comparison(factor, tol)
    out.only_a = sorted(set(ra.index) - set(rb.index))
    out.only_b = sorted(set(rb.index) - set(ra.index))
    by_label: dict[str, list[tuple[pd.Series, pd.Series]]] = {}
    for cid in sorted(set(ra.index) & set(rb.index)):
        out.compared += 1
        x, y = ra.loc[cid], rb.loc[cid]
        if x["status"] != y["status"]:
            dx, dy = _RANK.get(x["status"], 2), _RANK.get(y["status"], 2)
            verdict = "worse" if dy > dx else "better" if dy < dx else "changed"
            out.status.append(Change(cid, "status", x["status"], y["status"], math.nan, verdict))
            continue
        if x["status"] != "ok":
            continue
        out.accuracy += _accuracy(cid, x, y, tol, rel_l1_floor)
        by_label.setdefault(str(y["label"]), []).append((x, y))
    out.cost = [_cost(label, rows, factor) for label, rows in sorted(by_label.items())]
    return out
