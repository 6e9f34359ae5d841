"""L1 / HesScale across tasks: per task first, then a geometric mean, without rounding-level tasks.

A ratio to HesScale's error means something only where HesScale's error is an
approximation error. Where HesScale is exact in exact arithmetic (say, MSE
through a single hidden unit) its error is rounding, about ``1e-8`` of the
diagonal in float32, and every other estimator's ratio to it is ``1e6`` or more,
however good the estimator is. A median over the cells of all tasks then shows
such a number. So the summary statistic is built in three steps:

1. **Per task** and label: the median over seeds of the label's L1 error divided
   by the median over the same seeds of HesScale's (the seeds where both cells
   are ``ok`` with an L1 value): :func:`task_ratios`.
2. **Rounding level**: a task is left out when HesScale's median relative L1
   error over the task's seeds is at most :data:`ROUNDING_EPS` times the machine
   epsilon of the dtype the estimators computed in (``2**-23`` for float32,
   ``2**-52`` for float64): :func:`rounding_tasks`. The relative L1 error is
   ``sum |estimate - exact| / sum |exact|``, so the bound is ``100 eps`` times the
   scale of the diagonal. The ground truth is computed in float64, so a result
   that is exact in exact arithmetic scores the rounding of its own dtype: the
   ``exact`` estimator in float32 scores ``1.9e-8 .. 2.4e-8`` (``0.2 eps``) on
   every task of the shipped suites, MLPs to transformers. ``100 eps`` leaves
   room for rounding that grows with depth and width, and is still 200 times
   below the smallest approximation error HesScale has on a shipped task
   (``2.6e-3``). Records written before cells recorded their dtype count as
   float32 (the suites' default).
3. **Across tasks**: the geometric mean of the per-task ratios of the remaining
   tasks (ratios multiply, so their mean is taken on a log scale), with the
   smallest and largest per-task ratio and the number of tasks:
   :func:`ratio_summaries`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "EPS",
    "ROUNDING_EPS",
    "RatioSummary",
    "RoundingTask",
    "ratio_summaries",
    "reference_cells",
    "rounding_tasks",
    "task_ratios",
]

ROUNDING_EPS = 100
"""A reference error at most this many machine epsilons (relative L1) is rounding."""

EPS = {"float32": 2.0**-23, "float64": 2.0**-52}
"""Machine epsilon of each dtype a cell computes in."""

DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class RoundingTask:
    """A task whose HesScale error is at rounding level."""

    task: str
    rel_l1: float  # HesScale's median relative L1 error over the task's seeds
    dtype: str
    bound: float  # ROUNDING_EPS * eps(dtype)

    def describe(self) -> str:
        """``mlp_mse (HesScale's rel. L1 7.6e-08 <= 1.2e-05 = 100 eps of float32)``."""
        return (
            f"{self.task} (HesScale's rel. L1 {self.rel_l1:.2g} <= {self.bound:.2g} = "
            f"{ROUNDING_EPS} eps of {self.dtype})"
        )


@dataclass(frozen=True)
class RatioSummary:
    """One label's L1 / HesScale across tasks (``nan`` when no task is left)."""

    geomean: float
    low: float  # the smallest per-task ratio
    high: float  # the largest
    tasks: int  # tasks in the geometric mean
    left_out: tuple[str, ...]  # tasks with a ratio, left out at rounding level


def reference_cells(sub: pd.DataFrame) -> pd.DataFrame:
    """HesScale's cells among ``sub`` (the ``hesscale`` label when there are several)."""
    ref = sub[sub["estimator"] == "hesscale"]
    return ref[ref["label"] == "hesscale"] if "hesscale" in set(ref["label"]) else ref


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "ok") & df["l1"].notna()]


def task_ratios(df: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Per (task, label): median L1 over seeds / HesScale's median L1 over the same seeds."""
    out: dict[tuple[str, str], float] = {}
    for task, sub in _ok(df).groupby("task"):
        ref = reference_cells(sub).groupby("seed")["l1"].first()
        if ref.empty:
            continue
        # each label's first L1 per seed, next to HesScale's on the same seed
        per_seed = sub.groupby(["label", "seed"])["l1"].first().rename("e").reset_index()
        both = per_seed.merge(ref.rename("r").reset_index(), on="seed", how="inner")
        for label, (e, r) in both.groupby("label")[["e", "r"]].median().iterrows():
            e, r = float(e), float(r)
            out[str(task), str(label)] = e / r if r > 0 else (math.inf if e > 0 else math.nan)
    return out


def _dtype(values: pd.Series) -> str:
    known = [v for v in values if isinstance(v, str) and v in EPS]
    # a task computes in one dtype; of mixed records the coarser bound is the safe one
    return "float32" if not known or "float32" in known else known[0]


def rounding_tasks(df: pd.DataFrame) -> dict[str, RoundingTask]:
    """The tasks whose HesScale median relative L1 error is at rounding level."""
    out: dict[str, RoundingTask] = {}
    for task, sub in _ok(df).groupby("task"):
        ref = reference_cells(sub)
        rel = ref["rel_l1"].dropna()
        if rel.empty:
            continue
        dtype = _dtype(ref["dtype"]) if "dtype" in ref else DEFAULT_DTYPE
        bound = ROUNDING_EPS * EPS[dtype]
        value = float(rel.median())
        if value <= bound:
            out[str(task)] = RoundingTask(str(task), value, dtype, bound)
    return out


def _geomean(values: list[float]) -> float:
    # scipy.stats.gmean computes the same; importing scipy.stats would add 1.2 s
    # to the end of every run, which prints this summary
    with np.errstate(divide="ignore"):  # a ratio of 0 (an exact estimate) gives 0
        return float(np.exp(np.mean(np.log(values))))


def ratio_summaries(df: pd.DataFrame) -> dict[str, RatioSummary]:
    """Per label: the geometric mean over tasks of :func:`task_ratios`, rounding tasks left out."""
    ratios = task_ratios(df)
    rounding = rounding_tasks(df)
    per_label: dict[str, list[tuple[str, float]]] = {}
    for (task, label), r in ratios.items():
        per_label.setdefault(label, []).append((task, r))
    out: dict[str, RatioSummary] = {}
    for label, items in per_label.items():
        kept = [r for t, r in items if t not in rounding and not math.isnan(r)]
        left_out = tuple(sorted(t for t, _ in items if t in rounding))
        if kept:
            out[label] = RatioSummary(_geomean(kept), min(kept), max(kept), len(kept), left_out)
        else:
            out[label] = RatioSummary(math.nan, math.nan, math.nan, 0, left_out)
    return out
