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

What depends on the exact diagonal only (its sums, norm, signs and ranks) is
computed once per batch (:func:`prepare_truth`) and shared by every estimator
compared with it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BatchMetrics",
    "Truth",
    "aggregate",
    "average_ranks",
    "batch_metrics",
    "batches_metrics",
    "layer_of",
    "prepare_truth",
    "spearman",
]

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
    ranks = np.empty(x.shape[0])
    if (ordered[1:] != ordered[:-1]).all():  # no ties (the usual case): ranks 1..n
        ranks[order] = np.arange(1.0, x.shape[0] + 1.0)
        return ranks
    # each run of equal values as [start, end) in sorted order
    edges = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1], [True])))
    mean_rank = (edges[:-1] + edges[1:] + 1) / 2
    ranks[order] = np.repeat(mean_rank, np.diff(edges))
    return ranks


def _centered_ranks(x: np.ndarray) -> tuple[np.ndarray, float]:
    r = average_ranks(x)
    r -= r.mean()
    return r, float(r @ r)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two finite 1-D arrays, neither constant."""
    (ra, aa), (rb, bb) = _centered_ranks(a), _centered_ranks(b)
    return float(ra @ rb / math.sqrt(aa * bb))


@dataclass(frozen=True)
class Truth:
    """The exact diagonal of one batch, flattened, with what every estimate is compared to.

    Built once per evaluated batch (:func:`prepare_truth`) and shared by every
    estimator of a group: its absolute sums, norm and centred ranks do not
    depend on the estimate.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    flat: np.ndarray  # float64, the parameters' diagonals concatenated in ``names`` order
    abs_by_param: tuple[float, ...]
    abs_total: float
    sign: np.ndarray
    norm: float
    ranks: np.ndarray | None  # centred average ranks; None when the truth is constant
    ranks_sq: float


def prepare_truth(truth: dict[str, Tensor]) -> Truth:
    """The comparison data of an exact diagonal keyed by parameter name."""
    names = tuple(truth)
    parts = [truth[n].detach().reshape(-1) for n in names]
    flat = torch.cat(parts).to(device="cpu", dtype=torch.float64)
    sizes = tuple(p.numel() for p in parts)
    abs_by_param = tuple(torch.stack([c.abs().sum() for c in flat.split(sizes)]).tolist())
    t = flat.numpy()
    ranks, ranks_sq = _centered_ranks(t) if np.ptp(t) > 0 else (None, 0.0)
    abs_total = float(np.abs(t).sum())
    norm = float(np.linalg.norm(t))
    return Truth(names, sizes, t, abs_by_param, abs_total, np.sign(t), norm, ranks, ranks_sq)


def batch_metrics(estimate: dict[str, Tensor], truth: Truth | dict[str, Tensor]) -> BatchMetrics:
    """Metrics of one evaluated batch; ``truth`` keyed like ``estimate`` or prepared.

    Raises:
        FloatingPointError: naming the first parameter whose estimate is not finite.
    """
    return batches_metrics([estimate], [truth])[0]


def batches_metrics(
    estimates: Sequence[dict[str, Tensor]], truths: Sequence[Truth | dict[str, Tensor]]
) -> list[BatchMetrics]:
    """:func:`batch_metrics` of several evaluated batches of one model, in one pass.

    The estimates are stacked into one ``(batches, P)`` array, so each step runs
    once for all of them; every value equals the one-batch computation bit for
    bit (the same sums along the same contiguous rows, one dot product per row).

    Raises:
        FloatingPointError: naming the first parameter whose estimate is not finite,
            in the first batch that has one.
    """
    truths = [t if isinstance(t, Truth) else prepare_truth(t) for t in truths]
    names, sizes = truths[0].names, truths[0].sizes
    rows = [torch.cat([est[n].detach().reshape(-1) for n in names]) for est in estimates]
    flat = torch.stack(rows).to(device="cpu", dtype=torch.float64)
    e = flat.numpy()
    finite = np.isfinite(e).all(axis=1)
    if not finite.all():
        chunks = zip(names, flat[int(np.flatnonzero(~finite)[0])].split(sizes), strict=True)
        bad = next(n for n, c in chunks if not c.isfinite().all())
        raise FloatingPointError(f"non-finite estimate for parameter '{bad}'")
    diff = np.abs(e - np.stack([t.flat for t in truths]))
    l1 = diff.sum(axis=1)
    parts = torch.from_numpy(diff).split(sizes, dim=1)
    l1_by_param = torch.stack([c.sum(1) for c in parts], dim=1).tolist()
    agree = np.count_nonzero(np.sign(e) == np.stack([t.sign for t in truths]), axis=1)
    varied = np.ptp(e, axis=1) > 0
    ranked = varied & np.array([t.ranks is not None for t in truths])
    out = []
    for b, truth in enumerate(truths):
        eb = e[b]
        norm = float(np.linalg.norm(eb) * truth.norm)
        cosine = float(eb @ truth.flat) / norm if norm > 0 else math.nan
        rank_corr = math.nan
        if ranked[b]:  # one sort per row: vectorised ranking was slower (fancy indexing)
            ra, aa = _centered_ranks(eb)
            rank_corr = float(ra @ truth.ranks / math.sqrt(aa * truth.ranks_sq))
        per_param = zip(
            truth.names, zip(l1_by_param[b], truth.abs_by_param, strict=True), strict=True
        )
        out.append(
            {
                "l1": float(l1[b]),
                "abs_truth": truth.abs_total,
                "cosine": cosine,
                "spearman": rank_corr,
                "sign_agreement": float(agree[b]) / e.shape[1],
                "per_param": dict(per_param),
            }
        )
    return out


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
