"""Build what a cell evaluates: a task's model, loss and evaluated batches, deterministically.

Everything is a function of the task's name and the seed, through
:func:`~hessbench.suite.schema.derive_seed` and local ``torch.Generator`` objects:

- weights: ``torch.nn``'s own initialization, drawn from the global RNG seeded with
  ``derive_seed(task, seed, "init")`` inside ``torch.random.fork_rng`` (so the
  caller's global RNG state is restored);
- synthetic evaluation data: fresh draws from ``derive_seed(task, seed, "eval")``;
  the synthetic training pool (``size`` samples) from ``derive_seed(task, seed, "data")``;
- digits: a fixed split (a permutation seeded with ``derive_seed("digits", "split")``)
  into 297 evaluation and 1500 training samples; evaluated samples are drawn
  without replacement from the evaluation part (``derive_seed(task, seed, "eval")``);
- training: minibatches from ``derive_seed(task, seed, "train")``, a fresh permutation
  every epoch; dropout masks (training only) from ``derive_seed(task, seed, "dropout")``.

The task's name, not the variant's, enters every seed: ``task@init`` and
``task@trained<steps>`` start from the same weights and evaluate the same batches.
Weights and data are drawn in float32 and then cast, so a float64 task is the
float32 task in higher precision. Models are evaluated in eval mode (dropout,
if any, is active only during training).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from hessbench.errors import ConfigError
from hessbench.suite.schema import (
    CNNModel,
    DigitsData,
    MLPModel,
    ModelSpec,
    SuiteError,
    TaskSpec,
    TaskVariant,
    TrainState,
    derive_seed,
)
from hessbench.suite.task import DIGITS_EVAL

__all__ = ["ACTIVATIONS", "Problem", "build_model", "build_problem", "check_model", "load_digits"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "softplus": nn.Softplus,
    "logsigmoid": nn.LogSigmoid,
}


@dataclass
class Problem:
    """What one (task variant, seed) evaluates.

    Attributes:
        model: the ``nn.Sequential`` in eval mode, in the requested dtype and device.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` with the task's reduction.
        batches: ``eval.num_batches`` pairs ``(inputs, targets)`` of ``eval.batch_size``
            samples (targets: int64 class labels, or regression targets in the dtype).
        input_shape: the shape of one input sample.
        num_params: the number of trainable parameter entries.
    """

    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    input_shape: tuple[int, ...]
    num_params: int


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], output_dim: int) -> nn.Sequential:
    """The model of ``spec`` for inputs of ``input_shape`` and ``output_dim`` outputs.

    Initialized from the global RNG, like any ``torch.nn`` layer (:func:`build_problem`
    seeds it). An MLP flattens multi-dimensional inputs first.

    Raises:
        ConfigError: a CNN whose feature maps shrink to nothing, or on non-image inputs.
    """
    if not isinstance(spec, (MLPModel, CNNModel)):
        return nn.Sequential(*(layer.build() for layer in spec.layers))
    layers: list[nn.Module] = []
    act = ACTIVATIONS[spec.activation]
    if isinstance(spec, MLPModel):
        if len(input_shape) > 1:
            layers.append(nn.Flatten())
        width, hidden = math.prod(input_shape), spec.widths
    else:
        if len(input_shape) != 3:
            raise ConfigError(f"a cnn needs (channels, height, width) inputs, got {input_shape}")
        channels, h, w = input_shape
        pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}.get(spec.pooling)
        for i, c in enumerate(spec.channels):
            layers += [
                nn.Conv2d(channels, c, spec.kernel, spec.stride, spec.padding, bias=spec.bias),
                act(),
            ]
            h, w = ((n + 2 * spec.padding - spec.kernel) // spec.stride + 1 for n in (h, w))
            if pool is not None:
                layers.append(pool(spec.pool_size))
                h, w = h // spec.pool_size, w // spec.pool_size
            if min(h, w) < 1:
                raise ConfigError(f"cnn block {i}: the feature maps shrink to nothing")
            channels = c
        layers.append(nn.Flatten())
        width, hidden = channels * h * w, spec.hidden
    for n in hidden:
        layers += [nn.Linear(width, n, bias=spec.bias), act()]
        if isinstance(spec, MLPModel) and spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = n
    layers.append(nn.Linear(width, output_dim, bias=spec.bias))
    return nn.Sequential(*layers)


def check_model(spec: ModelSpec, input_shape: tuple[int, ...], output_dim: int) -> None:
    """Check that ``spec`` builds and maps one input sample to ``output_dim`` outputs.

    Cheap: the layers are built on the meta device (no initialization, no RNG),
    then given uninitialized CPU memory, zeroed, for one forward pass.

    Raises:
        ConfigError: naming what does not fit.
    """
    with torch.device("meta"):
        model = build_model(spec, input_shape, output_dim)
    model.to_empty(device="cpu")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        try:
            out = model(torch.zeros(1, *input_shape))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"does not fit inputs of shape {input_shape}: {first}") from None
    if tuple(out.shape) != (1, output_dim):
        raise ConfigError(
            f"outputs of shape {tuple(out.shape[1:])} per sample; the data need ({output_dim},)"
        )


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: ``(1797, 64)`` float32 pixels in [0, 1] and int64 labels.

    The data set ships inside scikit-learn (``sklearn.datasets.load_digits``),
    so nothing is downloaded. Imported on first use (about a second), once per
    worker process. The tensors are shared between calls: do not modify them.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy((bunch.data / 16).astype(np.float32))
    return x, torch.from_numpy(bunch.target.astype(np.int64))


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _digits_part(task: TaskSpec, evaluation: bool) -> tuple[Tensor, Tensor]:
    x, labels = load_digits()
    perm = torch.randperm(len(x), generator=_generator("digits", "split"))
    idx = perm[:DIGITS_EVAL] if evaluation else perm[DIGITS_EVAL:]
    return x[idx].reshape(len(idx), *task.input_shape), labels[idx]


def _targets(task: TaskSpec, labels: Tensor) -> Tensor:
    if task.loss.kind == "cross_entropy":
        return labels
    return nn.functional.one_hot(labels, task.output_dim).float()  # digits with MSE


def _synthetic(task: TaskSpec, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, *task.input_shape, generator=gen)
    if task.loss.kind == "cross_entropy":
        return x, torch.randint(task.output_dim, (n,), generator=gen)
    return x, torch.randn(n, task.output_dim, generator=gen)


def training_data(task: TaskSpec, seed: int) -> tuple[Tensor, Tensor]:
    """The training part (float32 inputs, targets): digits' 1500, or ``size`` synthetic samples."""
    if isinstance(task.data, DigitsData):
        x, labels = _digits_part(task, evaluation=False)
        return x, _targets(task, labels)
    return _synthetic(task, task.data.size, _generator(task.name, seed, "data"))


def evaluation_data(task: TaskSpec, seed: int) -> tuple[Tensor, Tensor]:
    """The ``num_batches * batch_size`` evaluated samples (float32 inputs, targets), in order."""
    n, gen = task.eval.num_batches * task.eval.batch_size, _generator(task.name, seed, "eval")
    if not isinstance(task.data, DigitsData):
        return _synthetic(task, n, gen)
    x, labels = _digits_part(task, evaluation=True)
    # Without replacement, cycling through fresh permutations when more are needed.
    idx = torch.cat([torch.randperm(len(x), generator=gen) for _ in range(-(-n // len(x)))])[:n]
    return x[idx], _targets(task, labels[idx])


def _train(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    state: TrainState,
    gen: torch.Generator,
) -> None:
    """``state.steps`` optimizer steps on minibatches, a fresh permutation every epoch."""
    opt_cls = torch.optim.Adam if state.optimizer == "adam" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=state.lr)
    per_epoch = len(x) // state.batch_size
    model.train()
    for step in range(state.steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen).to(x.device)
        idx = order[(step % per_epoch) * state.batch_size :][: state.batch_size]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def _to(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def build_problem(
    variant: TaskVariant, seed: int, *, dtype: torch.dtype, device: torch.device | str
) -> Problem:
    """The model (trained if the variant's state says so), loss and batches of one cell.

    Deterministic given ``(variant, seed, dtype, device)``; the global RNG is left
    as it was. Training runs in ``dtype`` on ``device`` (on CPU, float32 and float64
    training give slightly different weights).

    Raises:
        SuiteError: naming the task, when its model cannot be built or its outputs
            do not fit its targets (a validated suite never gets here).
    """
    task, device = variant.task, torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(task.name, seed, "init"))
        try:
            model = build_model(task.model, task.input_shape, task.output_dim)
        except ConfigError as exc:
            raise SuiteError(f"task {task.name!r}: {exc}") from None
    model = model.to(device=device, dtype=dtype)
    loss_cls = nn.CrossEntropyLoss if task.loss.kind == "cross_entropy" else nn.MSELoss
    loss_fn = loss_cls(reduction=task.loss.reduction)
    if isinstance(variant.state, TrainState):
        x, y = training_data(task, seed)
        x, y, gen = (
            _to(x, dtype, device),
            _to(y, dtype, device),
            _generator(task.name, seed, "train"),
        )
        dropout_seed = derive_seed(task.name, seed, "dropout")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(dropout_seed)  # nn.Dropout draws from it
            if device.type == "cuda":
                torch.cuda.manual_seed(dropout_seed)
            _train(model, loss_fn, x, y, variant.state, gen)
    model.eval()
    x, y = evaluation_data(task, seed)
    size = task.eval.batch_size
    batches = list(
        zip(_to(x, dtype, device).split(size), _to(y, dtype, device).split(size), strict=True)
    )
    with torch.no_grad():
        out = model(batches[0][0])
    expected = (size, task.output_dim)
    if tuple(out.shape) != expected:
        raise SuiteError(
            f"task {task.name!r}: model outputs have shape {tuple(out.shape)}, expected {expected}"
        )
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Problem(model, loss_fn, batches, task.input_shape, num_params)
