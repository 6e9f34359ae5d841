"""Statistics over seeds that reports print: the papers' ratio of means and bootstrap intervals.

Every interval is a percentile bootstrap over seeds: ``RESAMPLES`` resamples of
the seeds with replacement, drawn by ``numpy.random.default_rng(SEED)``, so the
same numbers give the same interval; the interval is the ``2.5``-th to
``97.5``-th percentile of the statistic over the resamples (95 %). Paired
statistics resample seeds, keeping the values of one seed together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RESAMPLES",
    "SEED",
    "Estimate",
    "bootstrap",
    "mean_ci",
    "paired_diff_ci",
    "ratio_of_means_ci",
]

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A statistic over seeds with its bootstrap interval (``nan`` bounds with < 2 seeds)."""

    value: float
    low: float
    high: float
    n: int

    def overlaps(self, other: Estimate) -> bool:
        """Whether the two intervals share a point (NaN bounds count as overlapping)."""
        if any(np.isnan(v) for v in (self.low, self.high, other.low, other.high)):
            return True
        return self.low <= other.high and other.low <= self.high

    def excludes(self, value: float) -> bool:
        """Whether the interval lies entirely on one side of ``value``."""
        return bool(self.low > value or self.high < value)


def bootstrap(columns: list[np.ndarray], stat: Callable[..., float]) -> Estimate:
    """``stat(*columns)`` and its percentile-bootstrap interval, rows (seeds) resampled together."""
    cols = [np.asarray(c, dtype=float) for c in columns]
    n = len(cols[0])
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(stat(*cols))
    if n < 2:
        return Estimate(value, float("nan"), float("nan"), n)
    rng = np.random.default_rng(SEED)
    idx = rng.integers(0, n, size=(RESAMPLES, n))
    stats = np.array([stat(*(c[i] for c in cols)) for i in idx], dtype=float)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.nanpercentile(stats, [tail, 100 - tail])
    return Estimate(value, float(low), float(high), n)


def mean_ci(values: np.ndarray) -> Estimate:
    """The mean over seeds with its interval."""
    return bootstrap([values], lambda v: v.mean())


def ratio_of_means_ci(errors: np.ndarray, reference: np.ndarray) -> Estimate:
    """The papers' statistic: ``mean(errors) / mean(reference)``, the two on the same seeds."""
    return bootstrap([errors, reference], lambda e, r: e.mean() / r.mean())


def paired_diff_ci(values: np.ndarray, reference: np.ndarray) -> Estimate:
    """``mean(values - reference)`` over seeds (paired on the same seed), with its interval."""
    return bootstrap([values, reference], lambda v, r: (v - r).mean())


def compare_to_reference(
    values: dict[str, dict[int, float]], reference: str | None, higher_is_better: bool
) -> dict[str, tuple[Estimate, Estimate | None, str]]:
    """Per label: the mean over seeds with its CI, and the paired difference to ``reference``.

    ``values[label][seed]`` is one run's final metric. The difference is
    ``label − reference`` over the seeds both have (paired on the same seed);
    the verdict says "better"/"worse" only when its interval excludes 0, else
    "no difference detected"; "reference" for the reference itself and "" when
    there is none or no common seed.
    """
    out: dict[str, tuple[Estimate, Estimate | None, str]] = {}
    ref = values.get(reference or "", {})
    for label, by_seed in values.items():
        mean = mean_ci(np.array(list(by_seed.values()), dtype=float))
        if not ref or label == reference:
            out[label] = (mean, None, "reference" if label == reference and ref else "")
            continue
        seeds = sorted(set(by_seed) & set(ref))
        if not seeds:
            out[label] = (mean, None, "")
            continue
        diff = paired_diff_ci(
            np.array([by_seed[s] for s in seeds]), np.array([ref[s] for s in seeds])
        )
        if np.isnan(diff.low) or not diff.excludes(0.0):
            verdict = "no difference detected"
        else:
            verdict = "better" if (diff.value > 0) == higher_is_better else "worse"
        out[label] = (mean, diff, verdict)
    return out
