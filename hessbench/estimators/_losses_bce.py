"""Binary cross-entropy with logits in closed form (binary and multi-label outputs).

For outputs ``z`` (any shape ``(N, *D)``: ``(N, 1)`` or ``(N,)`` binary, ``(N, K)``
multi-label) and targets ``y`` in ``[0, 1]`` of the same shape, ``s = sigmoid(z)``,
the loss per element is ``-w (v y log s + (1 - y) log(1 - s))`` with ``w`` the
``weight`` and ``v`` the ``pos_weight`` options (1 without), and
``L = c * sum``, ``c = 1/numel(z)`` for ``mean``, 1 for ``sum``. With the mass
``m = w (1 - y + v y)`` (``m = w`` without ``pos_weight``):

- ``dL/dz = c (m s - w v y)``, ``c (s - y)`` without options;
- ``d2L/dz2 = c diag(m s (1 - s))``, factor ``diag(sqrt(c m s (1 - s)))``;
- Monte-Carlo column ``sqrt(c m / k) (s - yhat)``, ``yhat ~ Bernoulli(s)`` per element:
  ``E[(s - yhat)^2] = s (1 - s)``, independent elements. ``m`` is taken at the
  *true* targets (with ``pos_weight`` the Hessian depends on them).

The loss is element-wise, so BL89's output curvature is the exact diagonal.

Example:
    >>> import torch
    >>> from torch import nn
    >>> spec = BCEWithLogitsSpec.recognise(nn.BCEWithLogitsLoss(reduction="sum"))
    >>> z, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[1.0, 0.0]])
    >>> state = spec.evaluate(z, y)
    >>> state.grad, spec.hess_diag(z, state)  # s - y, s (1 - s)
    (tensor([[-0.5000,  0.5000]], dtype=torch.float64), tensor([[0.2500, 0.2500]], dtype=torch.float64))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessbench.errors import InputError
from hessbench.estimators._losses_base import (
    LossSpec,
    LossState,
    broadcast_check,
    check_finite,
    diag_factor,
    option_tensor,
)

__all__ = ["BCEWithLogitsSpec"]


@dataclass(frozen=True, eq=False)
class BCEWithLogitsSpec(LossSpec):
    """``nn.BCEWithLogitsLoss`` with its ``weight`` and ``pos_weight`` options (non-negative)."""

    weight: Tensor | None = None
    pos_weight: Tensor | None = None

    @classmethod
    def recognise(cls, loss_fn: nn.Module) -> BCEWithLogitsSpec | None:
        """A spec for ``nn.BCEWithLogitsLoss``."""
        if not isinstance(loss_fn, nn.BCEWithLogitsLoss):
            return None
        weight = option_tensor(loss_fn.weight, "BCEWithLogitsLoss(weight=...)")
        pos_weight = option_tensor(loss_fn.pos_weight, "BCEWithLogitsLoss(pos_weight=...)")
        return cls(cls.reduction_of(loss_fn), weight, pos_weight)

    def _options(self, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        return tuple(  # type: ignore[return-value]
            None if t is None else t.to(device=like.device, dtype=like.dtype)
            for t in (self.weight, self.pos_weight)
        )

    # ------------------------------------------------------------- the loss
    def check_targets(self, out: Tensor, targets: Tensor) -> None:
        """Floating-point targets in ``[0, 1]`` of the output's shape; weights that broadcast."""
        if targets.shape != out.shape or not targets.is_floating_point():
            raise InputError(
                "binary cross-entropy targets must be floating-point values of the output's "
                f"shape {tuple(out.shape)}, got {targets.dtype} {tuple(targets.shape)}"
            )
        check_finite(targets, "binary cross-entropy")
        if targets.numel() and (float(targets.min()) < 0.0 or float(targets.max()) > 1.0):
            raise InputError("binary cross-entropy targets must lie in [0, 1]")
        broadcast_check(self.weight, out, "BCEWithLogitsLoss weight")
        broadcast_check(self.pos_weight, out, "BCEWithLogitsLoss pos_weight")

    def scale(self, targets: Tensor) -> float:
        """``1/numel`` for ``mean``, 1 for ``sum``."""
        return 1.0 if self.reduction == "sum" else 1.0 / targets.numel()

    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """The loss through differentiable torch operations (for autograd paths)."""
        w, v = self._options(out)
        return F.binary_cross_entropy_with_logits(
            out, targets, w, reduction=self.reduction, pos_weight=v
        )

    def per_sample_loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """``l_n``: the element losses of sample ``n``, summed."""
        w, v = self._options(out)
        per = F.binary_cross_entropy_with_logits(out, targets, w, reduction="none", pos_weight=v)
        return per.reshape(out.shape[0], -1).sum(1)

    def evaluate(self, out: Tensor, targets: Tensor) -> LossState:
        """``dL/dz = c (m s - w v y)``, and the sigmoids and masses."""
        c = self.scale(targets)
        s = torch.sigmoid(out)
        w, v = self._options(out)
        if v is None:
            mass = None if w is None else w.expand_as(out)
            grad = s - targets if w is None else (s - targets) * w
        else:
            pos = targets * v if w is None else targets * v * w
            mass = 1.0 - targets + targets * v
            mass = mass if w is None else mass * w
            grad = s * mass - pos
        return LossState(grad.mul_(c), c, out, targets, self, s, mass)

    # ------------------------------------------------------------ curvature
    def hess_diag(self, out: Tensor, state: LossState) -> Tensor:
        """``c m s (1 - s)``."""
        s = state.aux
        assert s is not None
        h = (s - s * s).mul_(state.scale)
        return h if state.mass is None else h.mul_(state.mass)

    def hess_vec(self, state: LossState, r: Tensor) -> Tensor:
        """``c m s (1 - s) r`` (out of place: ``r`` may carry a vmapped direction axis)."""
        return self.hess_diag(state.out, state) * r

    def sqrt_factor(self, out: Tensor, state: LossState, *, signed: bool = False) -> Tensor:
        """``diag(sqrt(c m s (1 - s)))`` as ``(N, D, *out)`` columns."""
        return diag_factor(self.hess_diag(out, state))

    def mc_factor(
        self, out: Tensor, state: LossState, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        """``sqrt(c m / k) (s - yhat)``, ``yhat ~ Bernoulli(s)``: ``(N, k, *out)``."""
        s = state.aux
        assert s is not None
        k = num_samples
        u = torch.rand((out.shape[0], k, *out.shape[1:]), generator=generator,
                       device=generator.device, dtype=torch.float64)  # fmt: skip
        drawn = u < s.detach().unsqueeze(1).to(device=u.device, dtype=u.dtype)
        cols = (s.unsqueeze(1) - drawn.to(device=s.device, dtype=s.dtype)).mul_(
            (state.scale / k) ** 0.5
        )
        return cols if state.mass is None else cols.mul_(state.mass.sqrt().unsqueeze(1))
