"""One interface over every optimizer the train harness compares: ``stepper.step(x, y)``."""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from hessbench.errors import DivergenceError, InputError
from hessbench.estimators import all_finite, global_rng
from hessbench.optim.diagonal import DiagonalOptimizer

__all__ = ["DiagonalStepper", "Stepper", "TorchStepper"]


class Stepper(abc.ABC):
    """One optimization step per call, whatever the optimizer.

    Attributes:
        name: the preset name (e.g. ``"adahesscale"``).
        optimizer: the underlying ``torch.optim.Optimizer`` (for LR schedulers
            and state dicts).
    """

    name: str
    optimizer: torch.optim.Optimizer

    @abc.abstractmethod
    def step(self, inputs: Tensor, targets: Tensor) -> float:
        """One step on ``(inputs, targets)``; returns the loss before the step.

        Raises:
            DivergenceError: a non-finite loss, gradient or update (a diverged run).
        """


class DiagonalStepper(Stepper):
    """A :class:`~hessbench.optim.diagonal.DiagonalOptimizer` behind :class:`Stepper`."""

    def __init__(self, name: str, optimizer: DiagonalOptimizer) -> None:
        self.name = name
        self.optimizer = optimizer

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        """``optimizer.step_batch(inputs, targets)``."""
        return self.optimizer.step_batch(inputs, targets)


class TorchStepper(Stepper):
    """A plain ``torch.optim`` optimizer: zero_grad, forward, backward, step.

    The forward pass draws dropout masks from the global RNG seeded from the
    stepper's own generator, and the global RNG is restored afterwards, as for
    :class:`DiagonalOptimizer`. Buffers (batch-norm statistics) update as usual.
    A non-finite loss or gradient raises :class:`DivergenceError` before the
    step; parameters made non-finite by the step itself raise it after.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self._steps = 0
        first = next(p for group in optimizer.param_groups for p in group["params"])
        self._generator = torch.Generator(device=first.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        """zero_grad, forward, backward and ``optimizer.step()``; the loss before the step."""
        if not all_finite(inputs):
            raise InputError("the inputs contain NaN or infinity")
        t = self._steps + 1
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.zero_grad(set_to_none=True)
        with global_rng(inputs.device, self._generator):
            loss = self.loss_fn(self.model(inputs), targets)
            if not all_finite(loss):
                raise DivergenceError(
                    f"diverged at step {t}: the loss is {float(loss.detach())}", t
                )
            loss.backward()
        for p in params:
            if p.grad is not None and not all_finite(p.grad):
                self.optimizer.zero_grad(set_to_none=True)
                raise DivergenceError(f"diverged at step {t}: a gradient is not finite", t)
        self.optimizer.step()
        self._steps = t
        if not all(all_finite(p) for p in params):
            raise DivergenceError(f"diverged at step {t}: the parameters are not finite", t)
        return float(loss.detach())
