"""The factor pass's representations and its per-layer choice, against brute force in float64.

Every schedule of representations (factored or full at each layer, switching
either way between layers) must give the brute-force Hessian (residuals on) or
GGN (residuals off) diagonal; the planner's own choice must switch back from
full to factored where a layer widens the tensor; the gradient handed back by
``estimate_with_grad`` comes out of the same pass and equals autograd's.
"""

from __future__ import annotations

import itertools

import pytest
import reference
import torch
from conftest import TOL, Variant, assert_close, gen, problem
from conftest import Case as BaseCase
from torch import nn

import hessbench.estimators._factor_pass as fp
from hessbench.estimators import get_estimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import build_plan, run_start


def _cnn_pools() -> nn.Sequential:  # input (2, 6, 6): conv, maxpool, avgpool, flatten
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),  # -> (3, 3, 3)
        nn.Conv2d(3, 2, 2),  # -> (2, 2, 2)
        nn.Sigmoid(),
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=True),  # -> (2, 3, 3)
        nn.Flatten(),
        nn.Linear(18, 3),
    )


def _widening() -> nn.Sequential:  # input (2, 12): many columns at a narrow layer, then 40 wide
    return nn.Sequential(
        nn.Conv1d(2, 4, 3),  # -> (4, 10)
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(40, 3),
        nn.Tanh(),
        nn.Linear(3, 3),
        nn.Tanh(),
        nn.Linear(3, 3),
    )


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


CASES = [
    BaseCase("cnn_pools", _cnn_pools, (2, 6, 6), seed=50),
    BaseCase("widening", _widening, (2, 12), seed=51),
    BaseCase("mlp_elu_tanh", _mlp, (4,), seed=52),
]
VARIANTS = [
    pytest.param(Variant(c, loss, "mean", n), id=f"{c.name}-{loss}-N{n}")
    for c in CASES
    for loss in ("ce", "mse")
    for n in (1, 3)
]


def _schedules(plan) -> list[dict[int, str]]:
    """All-factored, all-full, and both alternations (each switches both ways)."""
    idx = list(range(plan.first_param, len(plan.steps)))
    alt = itertools.cycle(["factored", "full"])
    first = {i: next(alt) for i in idx}
    second = {i: ("full" if k == "factored" else "factored") for i, k in first.items()}
    return [dict.fromkeys(idx, "factored"), dict.fromkeys(idx, "full"), first, second]


def _run(v, mode: fp.Mode, schedule=None, with_grad=False):
    model, loss_fn, x, y = problem(v)
    plan = build_plan(model)
    prob = fp.Problem(model, LossSpec.of(loss_fn), x, y, gen())
    return plan, fp.factor_pass(plan, prob, mode, with_grad=with_grad, schedule=schedule)


@pytest.mark.parametrize("residual", [True, False], ids=["hessian", "ggn"])
@pytest.mark.parametrize("v", VARIANTS)
def test_every_schedule_matches_reference(v, residual):
    want = (reference.hessian_diag if residual else reference.ggn_diag)(*problem(v))
    mode = fp.Mode(columns="exact", residual=residual)
    plan, auto = _run(v, mode)
    assert_close(auto.diag, want, TOL["exact"])
    for schedule in _schedules(plan):
        _, res = _run(v, mode, schedule)
        assert_close(res.diag, want, TOL["exact"])


@pytest.mark.parametrize("representation", ["factored", "full", "auto"])
@pytest.mark.parametrize("v", VARIANTS)
def test_exact_representation_option_matches_reference(v, representation):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("exact", method="structured", representation=representation)(
        model, loss_fn, x, y
    )
    assert_close(got, reference.hessian_diag(model, loss_fn, x, y), TOL["exact"])


def _planned(v, mode) -> dict[int, str]:
    model, loss_fn, x, y = problem(v)
    plan = build_plan(model)
    loss = LossSpec.of(loss_fn)
    with torch.no_grad():
        out, _, shapes, state = run_start(plan, model, loss, x, y, None)
        cols = mode.start(loss, out, state, None).columns
        return fp.choose_representations(plan, shapes, out.shape[1:], cols, mode, -1)


def test_planner_switches_back_to_factored_before_a_widening_layer():
    """10 MSE columns over 3 features go dense, then 2F = 6 columns beat 40 x 40 below."""
    v = Variant(CASES[1], "mse", "mean", 3)
    kinds = _planned(v, fp.Mode(columns="exact", residual=True))
    order = [kinds[i] for i in sorted(kinds, reverse=True)]
    assert "full" in order
    assert order[-1] == "factored"
    assert order.index("full") < len(order) - 1 - order[::-1].index("factored")
    # and that very schedule is exact
    _, res = _run(v, fp.Mode(columns="exact", residual=True), kinds)
    assert_close(res.diag, reference.hessian_diag(*problem(v)), TOL["exact"])


def test_planner_keeps_columns_through_a_pooling_layer():
    """The issue's case in miniature: columns outnumber features above a max-pooling layer
    that widens the tensor 4x; densifying there would square the width, so stay factored."""
    case = BaseCase(
        "pool_cnn",
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(16, 10),
        ),
        (3, 10, 10),
        seed=53,
    )
    kinds = _planned(Variant(case, "ce", "mean", 1), fp.Mode(columns="exact", residual=True))
    assert set(kinds.values()) == {"factored"}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("exact", {}),
        ("exact", {"representation": "full"}),
        ("ggn_exact", {}),
        ("ggn_mc", {"num_samples": 2}),
        ("kfac", {}),
        ("kfac", {"backward": "exact"}),
    ],
)
@pytest.mark.parametrize("v", VARIANTS[:4])
def test_with_grad_is_autograds_gradient_from_the_same_pass(v, name, params, monkeypatch):
    model, loss_fn, x, y = problem(v)
    params_t = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(loss_fn(model(x), y), params_t)
    value = loss_fn(model(x), y).detach()
    est = get_estimator(name, **params)
    diag = est(model, loss_fn, x, y, generator=gen(3))
    calls = {"forward": 0, "autograd": 0}
    start, autograd_grad = fp.run_start, torch.autograd.grad

    def counting_start(*a, **k):
        calls["forward"] += 1
        return start(*a, **k)

    def counting_grad(*a, **k):
        calls["autograd"] += 1
        return autograd_grad(*a, **k)

    monkeypatch.setattr(fp, "run_start", counting_start)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    diag2, grad, loss = est.estimate_with_grad(model, loss_fn, x, y, generator=gen(3))
    monkeypatch.undo()
    assert calls == {"forward": 1, "autograd": 0}
    assert list(grad) == list(diag)
    for (k, g), w in zip(grad.items(), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=k)
        torch.testing.assert_close(diag2[k], diag[k], rtol=0, atol=0)
    torch.testing.assert_close(loss, value, rtol=1e-12, atol=1e-12)
