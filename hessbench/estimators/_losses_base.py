"""The interface every supported loss implements in closed form, and the loss state.

A loss family is a direct subclass of :class:`LossSpec` (cross-entropy in
``_losses_ce``, binary cross-entropy with logits in ``_losses_bce``, MSE, Huber and
smooth L1 in ``_losses_regression``); :meth:`LossSpec.of` asks each in turn to
recognise a loss module. :mod:`hessbench.estimators._losses` imports them all: import
``LossSpec`` from there. The closed forms, the factors and the Monte-Carlo rules
are tabulated in its docstring and in ``docs/estimators.md``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hessbench.errors import InputError, UnsupportedError

__all__ = [
    "LossSpec",
    "LossState",
    "broadcast_check",
    "check_finite",
    "diag_factor",
    "option_tensor",
    "randn_like",
    "scale_",
    "weigh",
]

Reduction = Literal["mean", "sum"]


@dataclass(frozen=True, slots=True, eq=False)
class LossState:
    """The loss at a batch of outputs, in closed form (no autograd involved).

    Attributes:
        grad: ``dL/dz``, shaped like the output.
        scale: the reduction factor ``c``.
        out: the outputs, and ``targets`` the targets.
        spec: the loss they were evaluated with (for :meth:`value`).
        aux: what the family's curvature needs: softmax probabilities (cross-entropy),
            sigmoids (binary cross-entropy), the quadratic region as 0/1 (Huber,
            smooth L1), ``None`` (MSE).
        mass: a per-sample (``(N, 1)``) or per-element factor of the output Hessian
            (weights), ``None`` for 1.
    """

    grad: Tensor
    scale: float
    out: Tensor
    targets: Tensor
    spec: LossSpec
    aux: Tensor | None = None
    mass: Tensor | None = None

    def value(self) -> Tensor:
        """The loss ``L`` (computed on demand: the estimators never need it)."""
        with torch.no_grad():
            return self.spec.per_sample_loss(self.out, self.targets).sum() * self.scale


@dataclass(frozen=True, eq=False)  # no slots: LossSpec.of walks the subclasses
class LossSpec(abc.ABC):
    """A supported loss and its options; build it with :meth:`of`.

    Every method works on the network output ``z`` of a batch (``N`` samples) and
    the reduction factor ``c`` of ``L = c * sum_n l(z_n, y_n)``.
    """

    reduction: Reduction

    @classmethod
    def of(cls, loss_fn: nn.Module) -> LossSpec:
        """Recognise ``loss_fn`` or raise :class:`UnsupportedError` naming why."""
        for family in LossSpec.__subclasses__():
            spec = family.recognise(loss_fn)
            if spec is not None:
                return spec
        what = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
        raise UnsupportedError(
            f"loss {what} is not supported; use the modules nn.CrossEntropyLoss, nn.NLLLoss "
            "(after nn.LogSoftmax), nn.BCEWithLogitsLoss, nn.MSELoss, nn.HuberLoss or "
            "nn.SmoothL1Loss"
        )

    @staticmethod
    def reduction_of(loss_fn: nn.Module) -> Reduction:
        """``loss_fn.reduction``; :class:`UnsupportedError` unless ``mean`` or ``sum``."""
        if loss_fn.reduction not in ("mean", "sum"):
            raise UnsupportedError(
                f"{type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) is not supported; "
                "use 'mean' or 'sum'"
            )
        return loss_fn.reduction

    @classmethod
    @abc.abstractmethod
    def recognise(cls, loss_fn: nn.Module) -> LossSpec | None:
        """The spec of ``loss_fn`` if it belongs to this family, else ``None``.

        Raises:
            UnsupportedError: one line naming an option of the family not supported.
        """

    def absorb(self, model: nn.Module) -> tuple[nn.Module, LossSpec]:
        """The model and loss the estimators see (``NLLLoss`` absorbs a final ``LogSoftmax``)."""
        return model, self

    def plain_module(self) -> nn.Module | None:
        """A fresh torch loss module equal to this one if it has no options, else ``None``."""
        return None

    # ------------------------------------------------------------- the loss
    @abc.abstractmethod
    def check_targets(self, out: Tensor, targets: Tensor) -> None:
        """Raise :class:`InputError` when ``targets`` (or the loss's weights) do not fit ``out``."""

    @abc.abstractmethod
    def scale(self, targets: Tensor) -> float:
        """The reduction factor ``c`` for a batch of (checked) targets."""

    @abc.abstractmethod
    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """The loss through differentiable torch operations (for autograd paths)."""

    @abc.abstractmethod
    def per_sample_loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """``l_n``: the unreduced loss summed over output dimensions, one entry per sample."""

    @abc.abstractmethod
    def evaluate(self, out: Tensor, targets: Tensor) -> LossState:
        """Output gradient ``dL/dz`` (and what the curvature needs) in closed form."""

    # ------------------------------------------------------------ curvature
    @abc.abstractmethod
    def hess_diag(self, out: Tensor, state: LossState) -> Tensor:
        """Exact diagonal of ``d2L/dz2`` per sample, shaped like the output."""

    @abc.abstractmethod
    def hess_vec(self, state: LossState, r: Tensor) -> Tensor:
        """``(d2L/dz2) r`` per sample."""

    def target_hess_diag(self, out: Tensor, targets: Tensor, state: LossState) -> Tensor:
        """BL89's output curvature; the exact diagonal for an element-wise loss."""
        return self.hess_diag(out, state)

    @abc.abstractmethod
    def sqrt_factor(self, out: Tensor, state: LossState, *, signed: bool = False) -> Tensor:
        """Columns ``S`` with ``S S^T = d2L/dz2`` per sample: shape ``(N, K, *out)``.

        With ``signed=True`` the columns may carry ``sqrt|w_n|`` and
        ``S diag(s) S^T = d2L/dz2`` with the signs ``s`` of :meth:`factor_signs`.
        """

    def factor_signs(self, out: Tensor) -> Tensor | None:
        """The signs of a signed factor as an ``(N, 1)`` column; ``None`` if all are positive."""
        return None

    @abc.abstractmethod
    def mc_factor(
        self, out: Tensor, state: LossState, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        """Monte-Carlo columns with ``E[S S^T] = d2L/dz2``: shape ``(N, num_samples, *out)``."""

    def sampled_grad(self, out: Tensor, state: LossState, generator: torch.Generator) -> Tensor:
        """An output gradient ``g`` with ``E[g] = 0`` and ``E[g_n g_n^T] = c d2L/dz_n2``.

        Sophia-GNB's gradient at targets drawn from the model: ``sqrt(c)`` times one
        Monte-Carlo column (for a plain loss, exactly the gradient of ``L`` at the
        sampled targets).
        """
        return self.mc_factor(out, state, 1, generator)[:, 0].mul_(state.scale**0.5)


# ------------------------------------------------------------------ helpers
def scale_(t: Tensor, c: float) -> Tensor:
    """``t`` (in place) times the loss scale ``c``; no kernel when ``c`` is 1 (batch 1, a sum)."""
    return t if c == 1.0 else t.mul_(c)


def weigh(t: Tensor, w: Tensor | None, dims: int = 1) -> Tensor:
    """``t`` (in place) times the per-sample column ``w`` (``(N, 1)``), broadcast over ``dims``."""
    if w is None:
        return t
    return t.mul_(w.view(-1, *[1] * dims))


def randn_like(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the generator's device, moved next to ``like``."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)


def diag_factor(h: Tensor) -> Tensor:
    """Columns ``diag(sqrt(h_n))`` of a non-negative diagonal Hessian ``h``: ``(N, D, *out)``."""
    n = h.shape[0]
    return torch.diag_embed(h.reshape(n, -1).sqrt()).view(n, -1, *h.shape[1:])


def check_finite(targets: Tensor, what: str) -> None:
    """:class:`InputError` when floating-point ``targets`` contain NaN or infinity."""
    if math.isfinite(float(targets.sum())):  # one reduction in the common case
        return
    if not bool(torch.isfinite(targets).all()):
        raise InputError(f"{what} targets contain NaN or infinity")


def option_tensor(t: Tensor | None, what: str) -> Tensor | None:
    """A loss module's weight tensor, detached; refused when negative or not finite."""
    if t is None:
        return None
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise UnsupportedError(f"{what} needs finite, non-negative weights")
    return t.detach()


def broadcast_check(t: Tensor | None, out: Tensor, what: str) -> None:
    """:class:`InputError` unless the weight tensor ``t`` broadcasts to the output's shape."""
    if t is None:
        return
    try:
        ok = torch.broadcast_shapes(t.shape, out.shape) == out.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise InputError(
            f"{what} of shape {tuple(t.shape)} does not broadcast to the outputs {tuple(out.shape)}"
        )
