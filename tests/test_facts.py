"""The HesScale / BL89 facts of BRIEF section 2.1, against brute force where it applies."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CASES,
    DIFFERENT,
    DROPOUT_TRAIN_CASES,
    ONE_HIDDEN_CASES,
    TOL,
    Variant,
    assert_close,
    covering_variants,
    gen,
    is_piecewise_linear,
    problem,
    reference_diag,
    relerr,
)
from torch import nn

from hessbench.estimators import get_estimator

TOL_FACTS = TOL["facts"]


def _keys(model: nn.Module, path: str) -> list[str]:
    return [
        f"{path}.{n}" for n, p in model.get_submodule(path).named_parameters() if p.requires_grad
    ]


def last_layer_keys(model: nn.Module) -> list[str]:
    """Trainable parameter names of the last layer that has parameters."""
    paths = [p for p, m in model.named_modules() if next(m.parameters(False), None) is not None]
    return _keys(model, paths[-1])


def last_linear_keys(model: nn.Module, count: int) -> list[str]:
    """Trainable parameter names of the last ``count`` ``nn.Linear`` layers."""
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [k for p in paths[-count:] for k in _keys(model, p)]


def run(name: str, v: Variant, seed: int = 0, **params) -> dict[str, torch.Tensor]:
    model, loss_fn, x, y = problem(v)
    return get_estimator(name, **params)(model, loss_fn, x, y, generator=gen(seed))


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def max_relerr(a: dict, b: dict) -> float:
    return max(relerr(a[k], b[k]) for k in b)


# Pairwise covering sets (conftest.covering_variants): every case with every loss it
# fits, every reduction and every batch size, and every pair of those.
ALL = covering_variants(CASES)
ALL_AND_DROPOUT = covering_variants(CASES + DROPOUT_TRAIN_CASES)
MSE_LINEAR_PAIRS = covering_variants(  # cases with two Linear layers (only element-wise between)
    [c for c in CASES if sum(isinstance(m, nn.Linear) for m in c.model().modules()) >= 2],
    losses=("mse",),
)


# ------------------------------------------------------------- exact layers
@pytest.mark.parametrize("v", ALL)
def test_last_layer_is_exact(v):
    """The last layer's weight and bias diagonals equal the Hessian's (CE and MSE)."""
    got = run("hesscale", v)
    keys = last_layer_keys(v.case.model())
    assert_close(got, reference_diag(v, "hessian"), TOL_FACTS, keys)


@pytest.mark.parametrize("v", covering_variants(DROPOUT_TRAIN_CASES))
def test_last_layer_is_exact_with_train_dropout(v):
    """With a training-mode Dropout mask (same generator seed), against the exact estimator."""
    keys = last_layer_keys(v.case.model())
    want = run("exact", v, seed=3, method="structured")
    assert_close(run("hesscale", v, seed=3), want, TOL_FACTS, keys)
    ggn = run("ggn_exact", v, seed=3, method="structured")
    assert_close(run("hesscale_gn", v, seed=3), ggn, TOL_FACTS, keys)


@pytest.mark.parametrize("v", MSE_LINEAR_PAIRS)
def test_mse_last_two_linear_layers_are_exact(v):
    """With MSE the second-to-last Linear layer is exact too."""
    keys = last_linear_keys(v.case.model(), 2)
    assert_close(run("hesscale", v), reference_diag(v, "hessian"), TOL_FACTS, keys)


@pytest.mark.parametrize("v", covering_variants(ONE_HIDDEN_CASES, losses=("mse",)))
def test_one_hidden_layer_mlp_with_mse_is_exact_everywhere(v):
    assert_close(run("hesscale", v), reference_diag(v, "hessian"), TOL_FACTS)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp_tanh", "conv2d_stride")])
def test_hesscale_is_not_exact_in_general(case, loss):
    """The facts above are not vacuous: deeper layers are approximations."""
    v = Variant(case, loss, "mean", 1)
    assert max_relerr(run("hesscale", v), reference_diag(v, "hessian")) > DIFFERENT


# ------------------------------------------------------------ GGN flavour
@pytest.mark.parametrize("v", ALL)
def test_hesscale_gn_last_layer_equals_ggn(v):
    keys = last_layer_keys(v.case.model())
    assert_close(run("hesscale_gn", v), reference_diag(v, "ggn"), TOL_FACTS, keys)


@pytest.mark.parametrize("v", MSE_LINEAR_PAIRS)
def test_hesscale_gn_mse_last_two_linear_layers_equal_ggn(v):
    keys = last_linear_keys(v.case.model(), 2)
    assert_close(run("hesscale_gn", v), reference_diag(v, "ggn"), TOL_FACTS, keys)


@pytest.mark.parametrize(
    "v", covering_variants([c for c in CASES if is_piecewise_linear(c.model())])
)
def test_hesscale_equals_gn_for_piecewise_linear_nets(v):
    """ReLU / LeakyReLU (and max pooling) have ``f'' = 0``: no residual terms."""
    assert_close(run("hesscale", v), run("hesscale_gn", v), TOL_FACTS)
    assert not any(t.any() for t in run("bl89", v, output_curvature="zero").values())


@pytest.mark.parametrize("v", ALL_AND_DROPOUT)
def test_hesscale_is_gn_plus_bl89_zero(v):
    """The recursion is linear: output curvature and ``f'' g`` residuals add up."""
    hs = run("hesscale", v, seed=5)
    gn = run("hesscale_gn", v, seed=5)
    residual = run("bl89", v, seed=5, output_curvature="zero")
    assert_close(_add(gn, residual), hs, TOL_FACTS)
    if v.case.name.startswith("mlp_") and not is_piecewise_linear(v.case.model()):
        assert max_relerr(gn, hs) > DIFFERENT  # the residual is really there


# --------------------------------------------------------------------- BL89
@pytest.mark.parametrize("v", covering_variants(CASES + DROPOUT_TRAIN_CASES, losses=("mse",)))
def test_bl89_equals_hesscale_for_mse(v):
    assert_close(run("bl89", v, seed=2), run("hesscale", v, seed=2), TOL_FACTS)


@pytest.mark.parametrize("v", covering_variants(CASES, losses=("ce",)))
def test_bl89_differs_from_hesscale_for_ce(v):
    bl = run("bl89", v)
    hs = run("hesscale", v)
    keys = last_layer_keys(v.case.model())
    assert max(relerr(bl[k], hs[k]) for k in keys) > DIFFERENT


@pytest.mark.parametrize(
    "v",
    covering_variants([c for c in CASES if isinstance(c.model()[-1], nn.Linear)], losses=("ce",)),
)
def test_bl89_ce_last_layer_closed_form(v):
    """``h_z = c (p_y - p_y^2) e_y``: bias = ``sum_n h_z[n]``, weight = ``sum_n h_z[n] a_n^2``."""
    model, loss_fn, x, y = problem(v)
    got = get_estimator("bl89")(model, loss_fn, x, y, generator=gen())
    last = model[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        a = model[:-1](x)
        p = torch.softmax(last(a), dim=1)
    c = 1.0 / v.n if v.reduction == "mean" else 1.0
    py = p[torch.arange(v.n), y]
    hz = torch.zeros_like(p)
    hz[torch.arange(v.n), y] = c * (py - py.square())
    path = str(len(model) - 1)
    want = {f"{path}.bias": hz.sum(0), f"{path}.weight": hz.T @ a.square()}
    keys = last_layer_keys(model)
    assert f"{path}.bias" in keys
    assert_close(got, want, TOL_FACTS, keys)
    if v.n == 1:  # one sample: curvature on the target entry only
        bias = got[f"{path}.bias"]
        assert bias[y[0]] > 0
        assert not bias[torch.arange(bias.numel()) != y[0]].any()
