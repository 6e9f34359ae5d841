"""Shared test cases: tiny float64 ``nn.Sequential`` problems, and the one tolerance table.

A :class:`Case` is a model factory and an input shape; :func:`problem` expands it
over a loss, a reduction and a batch size into ``(model, loss_fn, x, y)`` with
fixed seeds. :func:`reference` caches the brute-force diagonals of ``reference.py``.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
import reference
import torch
from pairwise import covering
from torch import Tensor, nn

# Every tensor here is tiny: intra-op threads only add synchronisation, and on a
# shared, loaded machine they made the suite ~10x slower.
torch.set_num_threads(1)

# The one table of tolerances (norm-relative: max|a - b| / max|b| per parameter).
TOL = {
    "exact": 1e-10,  # estimators that compute the same quantity, in float64
    "facts": 1e-8,  # the BRIEF 2.1 identities
    "float32": 1e-6,  # a float64 computation returned in float32 (rounding only)
}
# Two estimates count as different when they differ by more than this.
DIFFERENT = 1e-3

LOSSES = ("ce", "mse")
REDUCTIONS = ("mean", "sum")
BATCHES = (1, 3)
NUM_CLASSES = 3


@dataclass(frozen=True)
class Case:
    """A model (built from ``seed``) and the shapes of one input and one output sample.

    ``train`` leaves the model in training mode (only Dropout cares); ``losses``
    lists the losses the output fits (cross-entropy needs ``(N, C)`` outputs).
    """

    name: str
    factory: Callable[[], nn.Sequential]
    in_shape: tuple[int, ...]
    seed: int
    train: bool = False
    out_shape: tuple[int, ...] = (NUM_CLASSES,)
    losses: tuple[str, ...] = LOSSES

    def model(self) -> nn.Sequential:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            m = self.factory().double()
        return m.train(self.train)


def _mlp(act: Callable[[], nn.Module]) -> Callable[[], nn.Sequential]:
    return lambda: nn.Sequential(
        nn.Linear(4, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, NUM_CLASSES)
    )


def mlp1(act: Callable[[], nn.Module]) -> Callable[[], nn.Sequential]:
    """One hidden layer: with MSE, HesScale is exact on every parameter."""
    return lambda: nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, NUM_CLASSES))


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.1),
    "elu": lambda: nn.ELU(0.7),
    "selu": nn.SELU,
    # threshold 0.5 puts some inputs on softplus's linear branch
    "softplus": lambda: nn.Softplus(beta=1.5, threshold=0.5),
    "logsigmoid": nn.LogSigmoid,
}


def _frozen_first() -> nn.Sequential:
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES))
    m[0].requires_grad_(False)
    return m


def _frozen_mix() -> nn.Sequential:  # a frozen bias mid-network, a frozen last weight
    m = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, NUM_CLASSES)
    )  # fmt: skip
    m[2].bias.requires_grad_(False)
    m[4].weight.requires_grad_(False)
    return m


def _nested() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.Tanh(),
        nn.Dropout(0.3),  # eval mode: the identity
        nn.Sequential(
            nn.Linear(6, 5, bias=False),
            nn.Identity(),
            nn.Sequential(nn.Sigmoid(), nn.Linear(5, 4)),
        ),
        nn.ELU(),
        nn.Linear(4, NUM_CLASSES),
    )


def _dropout_p0() -> nn.Sequential:  # training mode, p = 0: the identity, reference-checkable
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.0), nn.Linear(5, NUM_CLASSES))


def _dropout_p1() -> nn.Sequential:  # training mode, p = 1: all zeros, reference-checkable
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(1.0), nn.Linear(5, NUM_CLASSES))


def _stacked() -> nn.Sequential:  # consecutive element-wise layers
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Sigmoid(), nn.Linear(6, 5), nn.Softplus(), nn.ELU(),
        nn.Linear(5, NUM_CLASSES),
    )  # fmt: skip


def _ends_in_tanh() -> nn.Sequential:  # the output passes through an activation
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, NUM_CLASSES), nn.Tanh())


def _conv1d() -> nn.Sequential:  # input (2, 11)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1),  # -> (4, 6)
        nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=2),  # -> (4, 6)
        nn.Softplus(),
        nn.MaxPool1d(3, stride=2, padding=1),  # -> (4, 3)
        nn.AvgPool1d(3, stride=1, padding=1),  # -> (4, 3)
        nn.Conv1d(4, 3, 2, padding="valid", bias=False),  # -> (3, 2)
        nn.Flatten(),
        nn.Linear(6, NUM_CLASSES),
    )


def _conv2d() -> nn.Sequential:  # input (1, 7, 7)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # -> (4, 7, 7)
        nn.LeakyReLU(0.2),
        nn.MaxPool2d(3, stride=2, padding=1),  # -> (4, 4, 4)
        nn.Conv2d(4, 4, (3, 2), groups=2, dilation=(1, 2), padding="valid"),  # -> (4, 2, 2)
        nn.Sigmoid(),
        nn.AvgPool2d(2, stride=1, padding=1),  # -> (4, 3, 3)
        nn.Flatten(),
        nn.Linear(36, NUM_CLASSES),
    )


def _conv2d_stride() -> nn.Sequential:  # input (2, 6, 6)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=2),  # -> (3, 4, 4)
        nn.SELU(),
        nn.Conv2d(3, 3, 3, padding="same", groups=3),  # depthwise -> (3, 4, 4)
        nn.LogSigmoid(),
        nn.AvgPool2d(2),  # -> (3, 2, 2)
        nn.Flatten(),
        nn.Linear(12, NUM_CLASSES),
    )


def _pools() -> nn.Sequential:  # input (2, 7, 7)
    return nn.Sequential(
        nn.Conv2d(2, 3, 2, padding="same", dilation=2),  # even kernel, even total padding
        nn.Tanh(),
        nn.MaxPool2d(3, stride=2, dilation=2, ceil_mode=True),  # -> (3, 2, 2)
        nn.AvgPool2d((2, 1), stride=(1, 2), padding=(1, 0)),  # -> (3, 3, 1)
        nn.Flatten(),
        nn.Linear(9, NUM_CLASSES),
    )


def _conv_out() -> nn.Sequential:  # input (2, 10), output (2, 3): MSE on a feature map
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1),  # -> (3, 10)
        nn.Tanh(),
        nn.AvgPool1d(2),  # -> (3, 5)
        nn.Conv1d(3, 2, 3, stride=2, padding=1),  # -> (2, 3)
    )


def _cnn_relu() -> nn.Sequential:  # input (1, 6, 6)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> (3, 3, 3)
        nn.Flatten(),
        nn.Linear(27, 4),
        nn.LeakyReLU(0.05),
        nn.Linear(4, NUM_CLASSES),
    )


def _dropout_train_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 5), nn.Sigmoid(),
        nn.Linear(5, NUM_CLASSES),
    )  # fmt: skip


def _dropout_train_cnn() -> nn.Sequential:  # input (2, 8)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3),  # -> (3, 6)
        nn.ELU(),
        nn.Dropout(0.4),
        nn.MaxPool1d(2),  # -> (3, 3)
        nn.Flatten(),
        nn.Linear(9, NUM_CLASSES),
    )


CASES: list[Case] = [
    *(Case(f"mlp_{a}", _mlp(f), (4,), seed=i) for i, (a, f) in enumerate(ACTIVATIONS.items())),
    Case("single_linear", lambda: nn.Sequential(nn.Linear(4, NUM_CLASSES)), (4,), seed=19),
    Case("frozen_first", _frozen_first, (4,), seed=20),
    Case("frozen_mix", _frozen_mix, (4,), seed=34),
    Case("stacked", _stacked, (4,), seed=29),
    Case("ends_in_tanh", _ends_in_tanh, (4,), seed=32),
    Case("nested", _nested, (4,), seed=21),
    Case("dropout_p0_train", _dropout_p0, (4,), seed=22, train=True),
    Case("dropout_p1_train", _dropout_p1, (4,), seed=27, train=True),
    Case("conv1d", _conv1d, (2, 11), seed=23),
    Case("conv2d", _conv2d, (1, 7, 7), seed=24),
    Case("conv2d_stride", _conv2d_stride, (2, 6, 6), seed=25),
    Case("cnn_relu", _cnn_relu, (1, 6, 6), seed=26),
    Case("pools", _pools, (2, 7, 7), seed=33),
    Case("conv_out", _conv_out, (2, 10), seed=28, out_shape=(2, 3), losses=("mse",)),
]
"""Cases the brute-force reference can check (no random Dropout mask)."""

DROPOUT_TRAIN_CASES: list[Case] = [
    Case("dropout_train_mlp", _dropout_train_mlp, (4,), seed=30, train=True),
    Case("dropout_train_cnn", _dropout_train_cnn, (2, 8), seed=31, train=True),
]
"""Training-mode Dropout with ``p > 0``: the mask comes from the estimator's generator."""

ONE_HIDDEN_CASES: list[Case] = [
    Case(f"mlp1_{a}", mlp1(f), (4,), seed=40 + i) for i, (a, f) in enumerate(ACTIVATIONS.items())
]

ALL_CASES = {c.name: c for c in [*CASES, *DROPOUT_TRAIN_CASES, *ONE_HIDDEN_CASES]}


def is_linear_only(model: nn.Module) -> bool:
    """Every parametric layer is an ``nn.Linear``."""
    return all(
        isinstance(m, nn.Linear)
        for m in model.modules()
        if next(m.parameters(False), None) is not None
    )


def is_piecewise_linear(model: nn.Module) -> bool:
    """Every activation has ``f'' = 0`` (ReLU, LeakyReLU)."""
    curved = (nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.Softplus, nn.LogSigmoid)
    return not any(isinstance(m, curved) for m in model.modules())


@dataclass(frozen=True)
class Variant:
    """A case expanded over a loss, a reduction and a batch size."""

    case: Case
    loss: str
    reduction: str
    n: int

    @property
    def id(self) -> str:
        return f"{self.case.name}-{self.loss}-{self.reduction}-N{self.n}"

    @property
    def scale(self) -> float:
        """The reduction factor ``c``: ``1/N`` (CE mean), ``1/(N D)`` (MSE mean), 1 (sum)."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (self.n * (math.prod(self.case.out_shape) if self.loss == "mse" else 1))


def variants(
    cases: Iterable[Case],
    losses: Iterable[str] = LOSSES,
    reductions: Iterable[str] = REDUCTIONS,
    batches: Iterable[int] = BATCHES,
) -> list:
    """``pytest.param`` per combination, with readable ids."""
    return [
        pytest.param(v, id=v.id)
        for c in cases
        for loss in losses
        if loss in c.losses
        for red in reductions
        for n in batches
        for v in [Variant(c, loss, red, n)]
    ]


def covering_variants(
    cases: Iterable[Case],
    losses: Iterable[str] = LOSSES,
    reductions: Iterable[str] = REDUCTIONS,
    batches: Iterable[int] = BATCHES,
    **extra: dict[str, object],
) -> list:
    """A pairwise covering subset of :func:`variants` x the ``extra`` factors.

    Every case appears with every loss it fits, every reduction, every batch size and
    every value of every extra factor (``name={id: value}``), and every pair of values
    of any two factors appears in some param: the full product is only needed for
    three-way interactions. Params are ``pytest.param(v, *extra values)``.
    """
    factors: dict[str, list] = {
        "case": list(cases),
        "loss": list(losses),
        "reduction": list(reductions),
        "n": list(batches),
    }
    factors.update({name: list(values) for name, values in extra.items()})
    rows = covering(factors, valid=lambda r: r["loss"] in r["case"].losses)
    out = []
    for r in rows:
        v = Variant(r["case"], r["loss"], r["reduction"], r["n"])
        ids = [v.id, *(str(r[name]) for name in extra)]
        out.append(pytest.param(v, *(extra[name][r[name]] for name in extra), id="-".join(ids)))
    return out


def problem(v: Variant) -> tuple[nn.Sequential, nn.Module, Tensor, Tensor]:
    """A fresh ``(model, loss_fn, x, y)`` for the variant, the same on every call."""
    model = v.case.model()
    seed = zlib.crc32(v.id.encode())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(v.n, *v.case.in_shape, generator=gen, dtype=torch.float64)
    if v.loss == "ce":
        y = torch.randint(0, NUM_CLASSES, (v.n,), generator=gen)
        loss_fn: nn.Module = nn.CrossEntropyLoss(reduction=v.reduction)
    else:
        y = torch.randn(v.n, *v.case.out_shape, generator=gen, dtype=torch.float64)
        loss_fn = nn.MSELoss(reduction=v.reduction)
    return model, loss_fn, x, y


@functools.cache
def reference_diag(v: Variant, kind: str) -> dict[str, Tensor]:
    """Brute-force ``hessian`` or ``ggn`` diagonal of the variant (cached)."""
    fn = {"hessian": reference.hessian_diag, "ggn": reference.ggn_diag}[kind]
    return fn(*problem(v))


def relerr(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|``; the absolute error where ``b`` is all zero."""
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_close(
    got: dict[str, Tensor], want: dict[str, Tensor], tol: float, keys: Iterable[str] | None = None
) -> None:
    """Per parameter, ``relerr(got, want) <= tol``; shapes and dtypes must match."""
    keys = list(want) if keys is None else list(keys)
    assert keys, "nothing to compare"
    errors = {}
    for k in keys:
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        errors[k] = relerr(got[k], want[k])
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


def gen(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator."""
    return torch.Generator().manual_seed(seed)
