"""Per-sample weighted cross-entropy (the A2C actor loss) through every closed form.

References are brute force (``torch.func.jacrev(jacrev)`` over the flattened
parameters, in ``reference.py``), evaluated on the weighted loss module itself,
so they see exactly ``c * sum_n w_n CE(z_n, y_n)``.
"""

from __future__ import annotations

import pytest
import reference
import torch
from conftest import TOL, assert_close, gen
from torch import nn

from hessbench.errors import InputError, UnsupportedError
from hessbench.estimators import get_estimator
from hessbench.estimators._autograd import rademacher
from hessbench.estimators.losses import WeightedCrossEntropyLoss
from hessbench.optim import make_stepper

MIXED = (1.5, -0.7, 0.3, -2.0)  # mixed-sign weights (advantages)
REDUCTIONS = ("mean", "sum")


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _data(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(7)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _weighted(weights, reduction: str = "mean") -> WeightedCrossEntropyLoss:
    w = torch.tensor(weights, dtype=torch.float64)
    return WeightedCrossEntropyLoss(reduction=reduction).set_weights(w)


def _problem(reduction: str, weights=MIXED):
    return _mlp().double(), _weighted(weights, reduction), *_data(len(weights))


# ---------------------------------------------------------------- the module itself
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_value_is_weighted_sum(reduction):
    model, loss_fn, x, y = _problem(reduction)
    out = model(x)
    per = nn.functional.cross_entropy(out, y, reduction="none")
    want = (per * torch.tensor(MIXED, dtype=torch.float64)).sum()
    want = want / len(MIXED) if reduction == "mean" else want
    torch.testing.assert_close(loss_fn(out, y), want, rtol=0, atol=1e-14)


def test_module_needs_weights_of_batch_shape():
    model, _, x, y = _problem("mean")
    with pytest.raises(InputError, match="set_weights"):
        WeightedCrossEntropyLoss()(model(x), y)
    with pytest.raises(InputError, match=r"shape \(4,\)"):
        _weighted((1.0, 2.0))(model(x), y)
    with pytest.raises(InputError, match="set_weights"):
        get_estimator("hesscale")(model, WeightedCrossEntropyLoss(), x, y)
    with pytest.raises(InputError, match="NaN"):
        WeightedCrossEntropyLoss().set_weights(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------- exact Hessian
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "params",
    [
        {"method": "structured"},
        {"method": "hvp"},
        {"method": "structured", "representation": "full"},
    ],
    ids=["structured", "hvp", "full"],
)
def test_exact_matches_brute_force(reduction, params):
    model, loss_fn, x, y = _problem(reduction)
    want = reference.hessian_diag(model, loss_fn, x, y)
    assert_close(get_estimator("exact", **params)(model, loss_fn, x, y), want, TOL["exact"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ggn_exact_matches_brute_force_for_nonnegative_weights(reduction):
    model, loss_fn, x, y = _problem(reduction, weights=(1.5, 0.0, 0.3, 2.0))
    want = reference.ggn_diag(model, loss_fn, x, y)
    for method in ("structured", "jacobian"):
        got = get_estimator("ggn_exact", method=method)(model, loss_fn, x, y)
        assert_close(got, want, TOL["exact"])


# ---------------------------------------------------------------- HesScale family
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn"])
def test_hesscale_family_exact_where_hesscale_is_exact(reduction, name):
    """One Linear layer: the diagonal recursion is exact; the last layer is exact for any net."""
    x, y = _data()
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Linear(4, 3)).double()
    loss_fn = _weighted(MIXED, reduction)
    est = get_estimator(name)
    assert_close(
        est(linear, loss_fn, x, y), reference.hessian_diag(linear, loss_fn, x, y), TOL["exact"]
    )
    model = _mlp().double()
    got, want = est(model, loss_fn, x, y), reference.hessian_diag(model, loss_fn, x, y)
    assert_close(
        {k: got[k] for k in ("4.weight", "4.bias")},
        {k: want[k] for k in ("4.weight", "4.bias")},
        TOL["exact"],
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn", "bl89", "exact", "ggn_exact"])
def test_weights_scale_each_sample(reduction, name):
    """The estimate is ``sum_n w_n * (sample n's unweighted estimate)`` (all are linear in H_n)."""
    weights = (1.5, 0.5, 0.3, 2.0) if name == "ggn_exact" else MIXED
    model, loss_fn, x, y = _problem(reduction, weights)
    est = get_estimator(name)
    got = est(model, loss_fn, x, y)
    c = 1 / len(weights) if reduction == "mean" else 1.0
    plain = nn.CrossEntropyLoss(reduction="sum")
    want = {k: torch.zeros_like(v) for k, v in got.items()}
    for n, w in enumerate(weights):
        single = est(model, plain, x[n : n + 1], y[n : n + 1])
        for k in want:
            want[k] += c * w * single[k]
    assert_close(got, want, TOL["exact"])


def test_hesscale_gradient_handback_is_weighted():
    model, loss_fn, x, y = _problem("mean")
    _, grad, value = get_estimator("hesscale").estimate_with_grad(model, loss_fn, x, y)
    params = dict(model.named_parameters())
    want = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
    assert_close(grad, dict(zip(params, want, strict=True)), TOL["exact"])
    torch.testing.assert_close(value, loss_fn(model(x), y).detach(), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- Hutchinson
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", ["structured", "autograd"])
def test_hutchinson_matches_brute_force_probes(reduction, method):
    """Same probes as the estimator draws, applied to the brute-force Hessian."""
    model, loss_fn, x, y = _problem(reduction)
    k = 3
    got = get_estimator("hutchinson", num_samples=k, method=method)(
        model, loss_fn, x, y, generator=gen(5)
    )
    f, theta0, unflatten = reference.flat_loss_fn(model, loss_fn, x, y)
    hess = reference.hessian(f)(theta0)
    g, plist = gen(5), list(model.parameters())
    acc = torch.zeros_like(theta0)
    for _ in range(k):
        z = torch.cat([t.reshape(-1) for t in rademacher(plist, g)])
        acc += z * (hess @ z)
    assert_close(got, {n: t.clone() for n, t in unflatten(acc / k).items()}, TOL["exact"])


# ---------------------------------------------------------------- unit weights
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "name",
    [
        "exact",
        "hesscale",
        "hesscale_gn",
        "bl89",
        "ggn_exact",
        "ggn_mc",
        "hutchinson",
        "efisher",
        "sophia_gnb",
        "kfac",
    ],
)
def test_unit_weights_equal_plain_cross_entropy(reduction, name):
    model, loss_fn, x, y = _problem(reduction, weights=(1.0,) * 4)
    est = get_estimator(name)
    got = est(model, loss_fn, x, y, generator=gen(2))
    want = est(model, nn.CrossEntropyLoss(reduction=reduction), x, y, generator=gen(2))
    for k in want:
        assert torch.equal(got[k], want[k]), (name, k)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["ggn_mc", "ggn_exact", "kfac"])
def test_negative_weights_refused_by_factor_estimators(name):
    model, loss_fn, x, y = _problem("mean")
    with pytest.raises(UnsupportedError, match="non-negative per-sample weights") as info:
        get_estimator(name)(model, loss_fn, x, y, generator=gen(0))
    assert "\n" not in str(info.value)


def test_optimizer_reads_weights_per_batch():
    """``update_every > 1``: the gradient-only steps use the current weights too."""
    x, y = _data()
    w1, w2 = (
        torch.tensor(MIXED, dtype=torch.float64),
        torch.tensor((1.0, 1.0, -1.0, 0.5), dtype=torch.float64),
    )
    loss_fn = WeightedCrossEntropyLoss()
    model = _mlp().double()
    stepper = make_stepper("adahesscale", model, loss_fn, lr=1e-2, seed=0, update_every=2)
    loss_fn.set_weights(w1)
    stepper.step(x, y)
    loss_fn.set_weights(w2)
    with torch.no_grad():
        want = float(loss_fn(model(x), y))
    assert stepper.step(x, y) == pytest.approx(want, rel=1e-12)
