"""Accuracy metrics of an estimated Hessian diagonal against the exact one.

For one evaluated batch with exact diagonal ``h`` and estimate ``ĥ`` (both
float64, concatenated over every trainable parameter):

- ``l1 = Σ |ĥ − h|`` (the HesScale papers' metric) and ``abs_truth = Σ |h|``;
- ``cosine``: cosine similarity of ``ĥ`` and ``h`` (NaN when either is zero);
- ``spearman``: Spearman rank correlation, the Pearson correlation of the
  ranks with ties given their average rank (as ``scipy.stats.spearmanr``, which
  the tests compare it with; NaN when either is constant). Computed here in
  numpy: scipy's per-call overhead was a third of a cell's time on small models and
  importing ``scipy.stats`` cost every worker a second and a half;
- ``sign_agreement``: fraction of entries where ``sign(ĥ) == sign(h)``.

Over the evaluated batches of a cell, :func:`aggregate` averages each metric
and defines ``rel_l1 = mean(l1) / mean(abs_truth)`` (so ``zero`` scores exactly
1.0). The same ``l1``/``abs_truth``/``rel_l1`` are kept per parameter and per
layer (a layer is a parameter's module path, e.g. ``"0"`` for ``"0.weight"``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

__all__ = ["BatchMetrics", "aggregate", "average_ranks", "batch_metrics", "layer_of", "spearman"]

BatchMetrics = dict[str, object]


def layer_of(param_name: str) -> str:
    """The module path of a parameter name: ``"3.weight"`` -> ``"3"``."""
    return param_name.rpartition(".")[0] or param_name


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based float64 ranks of a 1-D array, tied values sharing their mean rank.

    The ``"average"`` method of ``scipy.stats.rankdata``: sort, find the runs of
    equal values, give each run the mean of the ranks it spans.
    """
    order = np.argsort(x)
    ordered = x[order]
    # each run of equal values as [start, end) in sorted order
    edges = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1], [True])))
    mean_rank = (edges[:-1] + edges[1:] + 1) / 2
    ranks = np.empty(x.shape[0])
    ranks[order] = np.repeat(mean_rank, np.diff(edges))
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two finite 1-D arrays, neither constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float(ra @ rb / math.sqrt(float(ra @ ra) * float(rb @ rb)))


def batch_metrics(estimate: dict[str, Tensor], truth: dict[str, Tensor]) -> BatchMetrics:
    """Metrics of one evaluated batch; both dicts keyed by parameter name."""
    per_param: dict[str, tuple[float, float]] = {}
    est_flat, true_flat = [], []
    for name, h in truth.items():
        e = estimate[name].detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        t = h.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        per_param[name] = (float((e - t).abs().sum()), float(t.abs().sum()))
        est_flat.append(e)
        true_flat.append(t)
    e = torch.cat(est_flat).numpy()
    t = torch.cat(true_flat).numpy()
    norm = float(np.linalg.norm(e) * np.linalg.norm(t))
    cosine = float(e @ t) / norm if norm > 0 else math.nan
    rank_corr = spearman(e, t) if np.ptp(e) > 0 and np.ptp(t) > 0 else math.nan
    return {
        "l1": float(np.abs(e - t).sum()),
        "abs_truth": float(np.abs(t).sum()),
        "cosine": cosine,
        "spearman": rank_corr,
        "sign_agreement": float(np.mean(np.sign(e) == np.sign(t))),
        "per_param": per_param,
    }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def aggregate(batches: list[BatchMetrics]) -> dict[str, object]:
    """Average the batches' metrics; add ``rel_l1`` and per-parameter and per-layer rows.

    Returns:
        a dict with ``l1``, ``abs_truth``, ``rel_l1``, ``cosine``, ``spearman``,
        ``sign_agreement`` and ``parts``: a list of ``{"level", "name", "l1",
        "abs_truth", "rel_l1"}`` rows (``level`` is ``"param"`` or ``"layer"``).
    """
    out: dict[str, object] = {
        key: _mean([float(b[key]) for b in batches])  # type: ignore[arg-type]
        for key in ("l1", "abs_truth", "cosine", "spearman", "sign_agreement")
    }
    out["rel_l1"] = _ratio(out["l1"], out["abs_truth"])  # type: ignore[arg-type]
    params: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    layers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    n = len(batches)
    for b in batches:
        for name, (l1, truth) in b["per_param"].items():  # type: ignore[union-attr]
            for acc in (params[name], layers[layer_of(name)]):
                acc[0] += l1 / n
                acc[1] += truth / n
    out["parts"] = [
        {"level": level, "name": name, "l1": l1, "abs_truth": t, "rel_l1": _ratio(l1, t)}
        for level, table in (("param", params), ("layer", layers))
        for name, (l1, t) in table.items()
    ]
    return out
