"""Deterministic estimators against the brute-force reference, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import reference
import torch
from conftest import (
    CASES,
    DIFFERENT,
    DROPOUT_TRAIN_CASES,
    TOL,
    Variant,
    assert_close,
    covering_variants,
    gen,
    is_linear_only,
    is_piecewise_linear,
    problem,
    reference_diag,
    relerr,
    variants,
)
from torch import nn

from hessbench.errors import UnsupportedError
from hessbench.estimators import get_estimator

# Every case (and so every layer rule and layer option the cases hold) with every loss,
# reduction, batch size and method, and every pair of those: a pairwise covering set of
# the full product (see conftest.covering_variants).
EXACT_METHODS = {
    "structured-factored": {"method": "structured", "representation": "factored"},
    "structured-full": {"method": "structured", "representation": "full"},
    "structured-auto": {"method": "structured", "representation": "auto"},
    "hvp": {"method": "hvp"},
}


# ------------------------------------------------------------ the reference itself
def test_reference_single_linear_closed_form():
    """One Linear layer with sum-MSE: ``h_W[o, i] = 2 sum_n x_ni^2``, ``h_b = 2N``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    for fn in (reference.hessian_diag, reference.ggn_diag):
        h = fn(model, nn.MSELoss(reduction="sum"), x, y)
        torch.testing.assert_close(h["weight"], 2 * x.square().sum(0).expand(3, 4))
        torch.testing.assert_close(h["bias"], torch.full((3,), 10.0, dtype=torch.float64))


@pytest.mark.parametrize("v", covering_variants(CASES, batches=(3,)))
def test_reference_hessian_vs_ggn(v):
    """Piecewise-linear nets have Hessian == GGN; curved MLPs do not."""
    h, g = reference_diag(v, "hessian"), reference_diag(v, "ggn")
    if is_piecewise_linear(v.case.model()):
        assert_close(h, g, TOL["exact"])
    elif v.case.name.startswith("mlp_"):
        assert max(relerr(h[k], g[k]) for k in h) > DIFFERENT


# ------------------------------------------------------------------- exact
@pytest.mark.parametrize(("v", "params"), covering_variants(CASES, params=EXACT_METHODS))
def test_exact_matches_reference(v, params):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("exact", **params)(model, loss_fn, x, y, generator=gen())
    assert list(got) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert_close(got, reference_diag(v, "hessian"), TOL["exact"])


@pytest.mark.parametrize(
    ("v", "method"),
    covering_variants(
        [c for c in CASES if c.name in ("mlp_tanh", "nested", "conv2d")],
        batches=(3,),
        method={m: m for m in ("structured", "hvp", "auto")},
    ),
)
def test_exact_float32_model(v, method):
    """A float32 model gets float32 results computed in float64 (only the final rounding differs)."""
    model64, loss_fn, x64, y64 = problem(v)
    model = copy.deepcopy(model64).float()
    x = x64.float()
    y = y64.float() if y64.is_floating_point() else y64
    # The float64 truth of the float32 problem: its parameters and data, widened exactly.
    y_wide = y.double() if y.is_floating_point() else y
    want = reference.hessian_diag(copy.deepcopy(model).double(), loss_fn, x.double(), y_wide)
    got = get_estimator("exact", method=method)(model, loss_fn, x, y, generator=gen())
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_close({k: t.double() for k, t in got.items()}, want, TOL["float32"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("case", DROPOUT_TRAIN_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_exact_train_dropout_representations_agree(case, loss):
    """Training-mode Dropout: the mask comes from the generator, so equal seeds agree."""
    v = Variant(case, loss, "mean", 3)
    model, loss_fn, x, y = problem(v)
    runs = {
        rep: get_estimator("exact", method="structured", representation=rep)(
            model, loss_fn, x, y, generator=gen(7)
        )
        for rep in ("factored", "full", "auto")
    }
    assert_close(runs["factored"], runs["full"], TOL["exact"])
    assert_close(runs["auto"], runs["full"], TOL["exact"])
    # not vacuous: the mask matters, so another seed or eval mode changes the diagonal
    other = get_estimator("exact", method="structured")(model, loss_fn, x, y, generator=gen(8))
    assert max(relerr(other[k], runs["full"][k]) for k in other) > DIFFERENT
    evald = get_estimator("exact")(copy.deepcopy(model).eval(), loss_fn, x, y, generator=gen(7))
    assert max(relerr(evald[k], runs["full"][k]) for k in evald) > DIFFERENT


TWINS = [  # the layer-by-layer pass and its autograd twin
    pytest.param("exact", "structured", "hvp", id="exact"),
    pytest.param("ggn_exact", "structured", "jacobian", id="ggn_exact"),
    pytest.param("efisher", "structured", "vmap", id="efisher"),
]


@pytest.mark.parametrize(("name", "fast", "slow"), TWINS)
@pytest.mark.parametrize("case", DROPOUT_TRAIN_CASES, ids=lambda c: c.name)
def test_train_dropout_same_mask_across_implementations(case, name, fast, slow):
    """Equal generators mean equal Dropout masks (the rule's promise), whichever method runs.

    The autograd twin may instead refuse a training-mode Dropout; silently using
    another mask (the module's own, from the global RNG) is the bug this catches.
    """
    model, loss_fn, x, y = problem(Variant(case, "ce", "mean", 3))
    want = get_estimator(name, method=fast)(model, loss_fn, x, y, generator=gen(7))
    try:
        got = get_estimator(name, method=slow)(model, loss_fn, x, y, generator=gen(7))
    except UnsupportedError:
        return
    assert_close(got, want, TOL["exact"])


# --------------------------------------------------------------- ggn_exact, kfac
@pytest.mark.parametrize(
    ("v", "method"), covering_variants(CASES, method={m: m for m in ("structured", "jacobian")})
)
def test_ggn_exact_matches_reference(v, method):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("ggn_exact", method=method)(model, loss_fn, x, y, generator=gen())
    assert_close(got, reference_diag(v, "ggn"), TOL["exact"])


@pytest.mark.parametrize(
    "v", covering_variants([c for c in CASES if is_linear_only(c.model())], batches=(1,))
)
def test_kfac_exact_backward_equals_ggn_at_batch_one(v):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("kfac", backward="exact")(model, loss_fn, x, y, generator=gen())
    assert_close(got, reference_diag(v, "ggn"), TOL["exact"])


# -------------------------------------------------------------- efisher, zero
EFISHER_METHODS = {m: m for m in ("structured", "vmap")}


@pytest.mark.parametrize(
    ("v", "method"), covering_variants(CASES, batches=(1,), method=EFISHER_METHODS)
)
def test_efisher_is_grad_sq_over_c_at_batch_one(v, method):
    """``efisher = grad_sq / c`` at N = 1: equal for CE and sum-MSE, ``D x`` for mean-MSE."""
    model, loss_fn, x, y = problem(v)
    ef = get_estimator("efisher", method=method)(model, loss_fn, x, y, generator=gen())
    gsq = get_estimator("grad_sq")(model, loss_fn, x, y, generator=gen())
    factor = math.prod(v.case.out_shape) if (v.loss, v.reduction) == ("mse", "mean") else 1
    assert 1 / v.scale == factor
    assert_close(ef, {k: factor * t for k, t in gsq.items()}, TOL["exact"])


@pytest.mark.parametrize(
    ("v", "method"), covering_variants(CASES, batches=(3,), method=EFISHER_METHODS)
)
def test_efisher_matches_per_sample_gradients(v, method):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("efisher", method=method)(model, loss_fn, x, y, generator=gen())
    grads = reference.per_sample_grads(model, loss_fn, x, y)
    want = {k: v.scale * sum(g[k].square() for g in grads) for k in grads[0]}
    assert_close(got, want, TOL["exact"])


@pytest.mark.parametrize("v", variants(CASES[:1] + CASES[-2:], reductions=("mean",)))
def test_zero_is_zero(v):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("zero")(model, loss_fn, x, y, generator=gen())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(got) == list(params)
    for k, p in params.items():
        assert got[k].shape == p.shape
        assert got[k].dtype == p.dtype
        assert not got[k].any()


# ------------------------------------------------------- hesscale batch structure
@pytest.mark.parametrize(
    ("v", "name"),
    covering_variants(
        CASES,
        batches=(3,),
        reductions=("mean",),
        name={n: n for n in ("hesscale", "hesscale_gn", "bl89")},
    ),
)
def test_layerwise_batch_is_mean_of_single_samples(v, name):
    """A mean batch is the mean of single-sample runs; a sum batch is ``1/c`` times it."""
    model, mean_fn, x, y = problem(v)
    sum_fn = type(mean_fn)(reduction="sum")
    est = get_estimator(name)
    batch_mean = est(model, mean_fn, x, y, generator=gen())
    batch_sum = est(model, sum_fn, x, y, generator=gen())
    singles = [est(model, mean_fn, x[n : n + 1], y[n : n + 1], generator=gen()) for n in range(3)]
    singles_sum = [
        est(model, sum_fn, x[n : n + 1], y[n : n + 1], generator=gen()) for n in range(3)
    ]
    mean_of_singles = {k: sum(s[k] for s in singles) / 3 for k in batch_mean}
    assert_close(batch_mean, mean_of_singles, TOL["exact"])
    assert_close(batch_sum, {k: sum(s[k] for s in singles_sum) for k in batch_sum}, TOL["exact"])
    assert_close(batch_sum, {k: t / v.scale for k, t in batch_mean.items()}, TOL["exact"])
    if v.loss == "ce":  # c = 1/N: the sum batch is N x the mean of single-sample runs
        assert_close(batch_sum, {k: 3 * t for k, t in mean_of_singles.items()}, TOL["exact"])
