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
