"""The fixed problems the asv suite, the CI gate and the micro-benchmarks run on.

Each problem is built deterministically (weights from a fixed global seed inside
``torch.random.fork_rng``, data from a local ``torch.Generator``) in float32,
from plain ``torch.nn`` only, so that the same definitions run against any
version of hessbench.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["EXTRA_PROBLEMS", "PROBLEMS", "Problem", "build_problem"]

Problem = tuple[nn.Module, nn.Module, Tensor, Tensor]


def _mlp784(batch: int) -> Problem:
    """784-128-64-10 tanh MLP, cross-entropy (MNIST-sized)."""
    model = nn.Sequential(
        nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def _cnn8(batch: int) -> Problem:
    """Two 3x3 convolutions, tanh and max pooling on 1x8x8 images, cross-entropy."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def cnn3x16_model() -> nn.Sequential:
    """Conv2d(3,16,3) ReLU MaxPool2d(2) Conv2d(16,32,3) Tanh Flatten Linear(800,10), for 3x16x16.

    The CNN of the performance issue; initialized from the global RNG.
    """
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(800, 10),
    )


def _cnn3x16(batch: int) -> Problem:
    """:func:`cnn3x16_model` on 3x16x16 inputs, cross-entropy."""
    model = cnn3x16_model()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def _costnet(batch: int, layers: int = 2) -> Problem:
    """The HesScale paper's cost net: Linear(64,512), L x [Linear(512,512), Tanh], Linear(512,100), MSE."""
    mods: list[nn.Module] = [nn.Linear(64, 512, bias=False)]
    for _ in range(layers):
        mods += [nn.Linear(512, 512, bias=False), nn.Tanh()]
    mods.append(nn.Linear(512, 100, bias=False))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 64, generator=gen)
    y = torch.randn(batch, 100, generator=gen)
    return nn.Sequential(*mods), nn.MSELoss(), x, y


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "mlp784_b1": lambda: _mlp784(1),
    "mlp784_b32": lambda: _mlp784(32),
    "cnn8_b8": lambda: _cnn8(8),
    "costnet_b1": lambda: _costnet(1),
    "cnn3x16_b1": lambda: _cnn3x16(1),
}

EXTRA_PROBLEMS: dict[str, Callable[[], Problem]] = {
    "cnn8_b32": lambda: _cnn8(32),
}
"""Problems benchmarked for a few estimators only (``bench_estimators.ExactBatch``)."""


def build_problem(name: str) -> Problem:
    """``(model, loss_fn, inputs, targets)`` of the problem ``name``, model in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, loss_fn, x, y = {**PROBLEMS, **EXTRA_PROBLEMS}[name]()
    return model.eval(), loss_fn, x, y
