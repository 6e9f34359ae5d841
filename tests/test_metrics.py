"""Accuracy metrics (hessbench.bench.metrics) against scipy and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from hessbench.bench.metrics import (
    aggregate,
    average_ranks,
    batch_metrics,
    batches_metrics,
    prepare_truth,
    spearman,
)


def _pairs():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 1000, 20000):
        a = rng.standard_normal(n)
        b = a + rng.standard_normal(n)
        yield a, b
        # ties: rounded values, and many exact zeros (dead ReLU units give these)
        yield a.round(), np.maximum((2 * b).round(), 0.0)


@pytest.mark.parametrize("k", range(10))
def test_average_ranks_equal_scipys_rankdata(k):
    a, b = list(_pairs())[k]
    for x in (a, b):
        np.testing.assert_array_equal(average_ranks(x), rankdata(x, method="average"))


NON_CONSTANT = [(a, b) for a, b in _pairs() if np.ptp(a) > 0 and np.ptp(b) > 0]


@pytest.mark.parametrize("k", range(len(NON_CONSTANT)))
def test_spearman_equals_scipys_spearmanr(k):
    a, b = NON_CONSTANT[k]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-14)


def test_spearman_closed_forms():
    x = np.array([3.0, -1.0, 2.0, 7.0])
    assert spearman(x, x**3) == pytest.approx(1.0, abs=1e-15)  # monotone: 1
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0, abs=1e-15)  # antitone: -1
    # ranks (3, 1, 2, 4) against (1, 2, 3, 4): 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 36/60
    assert spearman(x, np.arange(4.0)) == pytest.approx(0.4, abs=1e-15)


def test_batch_metrics_closed_forms():
    truth = {"0.weight": torch.tensor([1.0, 2.0, 3.0]), "0.bias": torch.tensor([-4.0])}
    est = {"0.weight": torch.tensor([1.0, 2.0, 4.0]), "0.bias": torch.tensor([4.0])}
    m = batch_metrics(est, truth)
    assert m["l1"] == 9.0
    assert m["abs_truth"] == 10.0
    assert m["per_param"] == {"0.weight": (1.0, 6.0), "0.bias": (8.0, 4.0)}
    assert m["sign_agreement"] == 0.75
    assert m["cosine"] == pytest.approx((1 + 4 + 12 - 16) / math.sqrt(30 * 37))
    # flattened in truth's order: truth (1, 2, 3, -4) ranks (2, 3, 4, 1); the estimate
    # (1, 2, 4, 4) ranks (1, 2, 3.5, 3.5); centred: (-.5, .5, 1.5, -1.5), (-1.5, -.5, 1, 1)
    assert m["spearman"] == pytest.approx(0.5 / math.sqrt(5 * 4.5), abs=1e-15)
    out = aggregate([m, m])
    assert out["rel_l1"] == 0.9


def test_constant_inputs_give_nan_correlations():
    truth = {"w": torch.tensor([1.0, 2.0, 3.0])}
    m = batch_metrics({"w": torch.zeros(3)}, truth)
    assert math.isnan(m["spearman"])
    assert math.isnan(m["cosine"])
    assert m["l1"] == 6.0


def test_a_prepared_truth_gives_the_same_metrics_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    truth = {"a": torch.randn(7, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    truth["b"][2] = 0.0
    est = {k: (v + 0.1 * torch.randn(v.shape, generator=gen)).float() for k, v in truth.items()}
    prepared = prepare_truth(truth)
    assert batch_metrics(est, prepared) == batch_metrics(est, truth)
    # the old per-parameter formulas, term by term
    m = batch_metrics(est, prepared)
    for name, h in truth.items():
        e, t = est[name].double().reshape(-1), h.double().reshape(-1)
        assert m["per_param"][name] == (float((e - t).abs().sum()), float(t.abs().sum()))


def test_a_non_finite_estimate_is_an_error_naming_the_parameter():
    truth = {"0.weight": torch.ones(3), "2.bias": torch.ones(2)}
    est = {"0.weight": torch.ones(3), "2.bias": torch.tensor([1.0, math.inf])}
    with pytest.raises(FloatingPointError, match=r"non-finite estimate for parameter '2\.bias'"):
        batch_metrics(est, prepare_truth(truth))


def _one_by_one(est: dict, truth: dict) -> dict:
    """The single-batch formulas, written out independently (as before batching)."""
    names = list(truth)
    e = torch.cat([est[n].double().reshape(-1) for n in names]).numpy()
    t = torch.cat([truth[n].double().reshape(-1) for n in names]).numpy()
    rank_corr = math.nan
    if np.ptp(e) > 0 and np.ptp(t) > 0:
        rank_corr = spearman(e, t)
    norm = float(np.linalg.norm(e) * np.linalg.norm(t))
    return {
        "l1": float(np.abs(e - t).sum()),
        "cosine": float(e @ t) / norm if norm > 0 else math.nan,
        "spearman": rank_corr,
        "sign_agreement": float(np.count_nonzero(np.sign(e) == np.sign(t))) / e.shape[0],
    }


def test_batches_metrics_equal_each_batch_alone_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    shapes = {"0.weight": (7, 5), "0.bias": (7,), "2.weight": (3, 7)}
    truths, estimates = [], []
    for b in range(6):
        truth = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
        est = {k: (v + 0.3 * torch.randn(v.shape, generator=gen)).float() for k, v in truth.items()}
        if b == 1:  # ties in the estimate (rounded, dead units at zero)
            est = {k: v.round().clamp_min(0.0) for k, v in est.items()}
        if b == 2:  # a constant estimate: no rank correlation
            est = {k: torch.full_like(v, 0.5) for k, v in est.items()}
        if b == 3:  # a constant truth
            truth = {k: torch.ones_like(v) for k, v in truth.items()}
        if b == 4:  # an all-zero estimate: no cosine either
            est = {k: torch.zeros_like(v) for k, v in est.items()}
        truths.append(truth)
        estimates.append(est)
    prepared = [prepare_truth(t) for t in truths]
    together = batches_metrics(estimates, prepared)
    assert together == [batch_metrics(e, t) for e, t in zip(estimates, prepared, strict=True)]
    for got, e, t in zip(together, estimates, truths, strict=True):
        want = _one_by_one(e, t)
        for key, value in want.items():
            assert (math.isnan(got[key]) and math.isnan(value)) or got[key] == value, key
    assert math.isnan(together[2]["spearman"])
    assert math.isnan(together[3]["spearman"])
    assert math.isnan(together[4]["cosine"])


def test_batches_metrics_name_the_first_non_finite_parameter():
    truth = prepare_truth({"a": torch.ones(3), "b": torch.ones(2)})
    good = {"a": torch.ones(3), "b": torch.ones(2)}
    bad = {"a": torch.ones(3), "b": torch.tensor([1.0, math.nan])}
    with pytest.raises(FloatingPointError, match="non-finite estimate for parameter 'b'"):
        batches_metrics([good, bad, good], [truth, truth, truth])
