"""Micro-benchmarks of hessbench's hot paths (pytest-benchmark, CPU time).

Timed with ``time.process_time`` on one thread, like the asv suite. Nothing here
asserts a duration: each test only checks that the benchmarked call returned a
well-formed result.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from benchmarks._problems import build_problem
from hessbench.estimators import available_estimators, get_estimator

pytestmark = pytest.mark.benchmark(
    timer=time.process_time, min_time=0.005, max_time=0.5, warmup=True, warmup_iterations=20
)


@pytest.fixture(scope="module")
def mlp():
    """The 784-128-64-10 tanh MLP with cross-entropy, batch 1."""
    return build_problem("mlp784_b1")


def _keys(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_gradient(benchmark, mlp):
    """The reference every cost is quoted in: one forward and backward pass."""
    model, loss_fn, x, y = mlp
    params = [p for p in model.parameters() if p.requires_grad]
    grads = benchmark(lambda: torch.autograd.grad(loss_fn(model(x), y), params))
    assert len(grads) == len(params)


def test_build_plan(benchmark, mlp):
    """Checking a model against the layer-rule table (every layer-by-layer call pays it)."""
    from hessbench.estimators._sequential import build_plan

    plan = benchmark(build_plan, mlp[0])
    assert len(plan.steps) == 5


def test_hesscale(benchmark, mlp):
    """HesScale's joint forward/backward pass."""
    model, loss_fn, x, y = mlp
    est = get_estimator("hesscale")
    diag = benchmark(est, model, loss_fn, x, y)
    assert list(diag) == _keys(model)


def test_hutchinson(benchmark, mlp):
    """One Rademacher probe: a Hessian-vector product."""
    model, loss_fn, x, y = mlp
    est, gen = get_estimator("hutchinson"), torch.Generator().manual_seed(0)
    diag = benchmark(lambda: est(model, loss_fn, x, y, generator=gen))
    assert list(diag) == _keys(model)


def test_exact_small_mlp(benchmark):
    """The float64 ground truth on the HesScale 2022 6-16-16-16-10 tanh MLP, batch 1."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    x, y = torch.randn(1, 6, dtype=torch.float64), torch.tensor([3])
    diag = benchmark(get_estimator("exact"), model, nn.CrossEntropyLoss(), x, y)
    assert list(diag) == _keys(model)


@pytest.mark.parametrize("name", available_estimators())
def test_estimator(benchmark, mlp, name):
    """Every registered estimator (default hyper-parameters, float32) on the MLP."""
    model, loss_fn, x, y = mlp
    est = get_estimator("exact", compute_dtype="model") if name == "exact" else get_estimator(name)
    gen = torch.Generator().manual_seed(0)
    diag = benchmark(lambda: est(model, loss_fn, x, y, generator=gen))
    assert list(diag) == _keys(model)
