"""Build what a cell evaluates: a task's model, loss and evaluated batches, deterministically.

Everything is a function of the task's name and the seed, through
:func:`~hessbench.suite.derive_seed` and local ``torch.Generator`` objects:

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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hessbench.errors import ConfigError
from hessbench.suite import SuiteError, TaskVariant, TrainState, derive_seed
from hessbench.suite.data import evaluation_data, seeded_generator, training_data
from hessbench.suite.models import build_model

__all__ = ["Problem", "build_problem"]


@dataclass
class Problem:
    """What one (task variant, seed) evaluates.

    Attributes:
        model: the model in eval mode, in the requested dtype and device (ending with
            ``nn.LogSoftmax(dim=1)`` for loss ``nll``).
        loss_fn: the task's loss module (class weights in the dtype, on the device).
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
            model = build_model(
                task.model, task.input_shape, task.output_dim, log_softmax=task.loss.kind == "nll"
            )
        except ConfigError as exc:
            raise SuiteError(f"task {task.name!r}: {exc}") from None
    model = model.to(device=device, dtype=dtype)
    loss_fn = task.loss.build(dtype=dtype, device=device)
    if isinstance(variant.state, TrainState):
        x, y = training_data(task, seed)
        x, y, gen = (
            _to(x, dtype, device),
            _to(y, dtype, device),
            seeded_generator(task.name, seed, "train"),
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
