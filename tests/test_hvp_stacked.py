"""Hessian-vector products for several directions at once equal the one-at-a-time products.

The R-operator pass (:mod:`hessbench.estimators._hvp_pass`) multiplies a chunk of
directions in one ``torch.func.vmap``-ed pass. Every layer rule and loss must give
the products of the per-direction pass (to rounding: the batched kernels may sum
in another order), and the estimators built on them (``hutchinson``,
``adahessian``, ``xdiag``, ``diagpp``) must give what they gave one product at a
time, with the same probes. ``STACK_BYTES = 0`` forces one direction per pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessbench.estimators._hvp_pass as hvp_pass
from hessbench.estimators import get_estimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import build_plan
from tests.conftest import ALL_CASES, TOL, assert_close, gen, problem, variants

ROUNDING = 1e-12  # float64, another summation order at most


def _directions(model: nn.Module, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {
        n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("v", variants(ALL_CASES.values(), reductions=("mean",)))
def test_stacked_products_equal_one_at_a_time(v):
    model, loss_fn, x, y = problem(v)
    if v.case.train:
        model.train()
    product = hvp_pass.structured_hvp(build_plan(model), model, LossSpec.of(loss_fn), x, y, gen(5))
    k = 5
    dirs = _directions(model, k, seed=11)
    assert product.chunk(k) == k  # tiny nets: one vectorised pass
    got = product.stacked(dirs)
    for j in range(k):
        want = product({n: t[j] for n, t in dirs.items()})
        assert_close({n: t[j] for n, t in got.items()}, want, ROUNDING)


@pytest.mark.parametrize(("budget", "chunk"), [(0, 1), (3, 1), (4, 4), (5, 5)])
def test_chunks_follow_the_byte_budget(monkeypatch, budget, chunk):
    v = variants([ALL_CASES["conv2d"]], losses=("ce",), reductions=("sum",), batches=(3,))[0]
    model, loss_fn, x, y = problem(v.values[0])
    product = hvp_pass.structured_hvp(build_plan(model), model, LossSpec.of(loss_fn), x, y)
    monkeypatch.setattr(hvp_pass, "STACK_BYTES", budget * product.footprint)
    assert product.chunk(11) == chunk
    assert product.chunk(3) == 1  # under MIN_STACK: one at a time
    dirs = _directions(model, 11, seed=2)  # chunks of `chunk` and a remainder
    got = product.stacked(dirs)
    assert set(got) == set(dirs)
    for j in range(11):
        want = product({n: t[j] for n, t in dirs.items()})
        assert_close({n: t[j] for n, t in got.items()}, want, ROUNDING)


def test_footprint_counts_activations_and_parameters():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 1, 3])
    spec = LossSpec.of(nn.CrossEntropyLoss())
    product = hvp_pass.structured_hvp(build_plan(model), model, spec, x, y)
    params = 6 * 5 + 5 + 5 * 4 + 4
    features = 6 + 5 + 5 + 4  # every step's input from the first parametric one on, and the output
    assert product.footprint == (2 * 3 * features + 3 * params) * 8


LOSSES = {
    "bce": (nn.BCEWithLogitsLoss(), lambda g, out: torch.rand(out, generator=g).double()),
    "huber": (nn.HuberLoss(delta=0.5), lambda g, out: torch.randn(out, generator=g).double()),
    "ce_smooth": (
        nn.CrossEntropyLoss(label_smoothing=0.1),
        lambda g, out: torch.randint(0, out[1], out[:1], generator=g),
    ),
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("case", ["mlp_tanh", "cnn_relu", "dropout_train_cnn"])
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("hutchinson", {"num_samples": 6}),
        ("hutchinson", {"num_matvecs": 4, "probes": "gaussian"}),
        # every configuration has a round of at least MIN_STACK products: vectorised
        ("adahessian", {"num_samples": 5}),
        ("xdiag", {"num_matvecs": 10}),
        ("diagpp", {"num_matvecs": 9}),
    ],
)
def test_estimators_unchanged_by_vectorised_products(monkeypatch, loss, case, name, params):
    c = ALL_CASES[case]
    model = c.model()
    model.train(c.train)
    loss_fn, targets = LOSSES[loss]
    g = gen(7)
    x = torch.randn(3, *c.in_shape, generator=g, dtype=torch.float64)
    y = targets(g, (3, *c.out_shape))
    est = get_estimator(name, method="structured", **params)
    vectorised = est(model, loss_fn, x, y, generator=gen(1))
    monkeypatch.setattr(hvp_pass, "STACK_BYTES", 0)
    one_by_one = est(model, loss_fn, x, y, generator=gen(1))
    assert_close(vectorised, one_by_one, TOL["exact"])
