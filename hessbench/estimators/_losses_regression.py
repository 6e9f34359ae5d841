"""Element-wise regression losses in closed form: MSE, Huber and smooth L1.

For outputs ``z`` and targets ``y`` of the same shape ``(N, *D)``, ``r = z - y`` and
``L = c * sum``, ``c = 1/numel(z)`` for ``mean`` (torch averages over every
element), 1 for ``sum``. Each output Hessian is diagonal, ``c kappa 1[|r| < t]``:

| loss | ``dL/dz`` | ``kappa`` | region ``t`` |
|---|---|---|---|
| ``MSELoss`` | ``2c r`` | 2 | everywhere |
| ``HuberLoss(delta)`` | ``c clamp(r, -delta, delta)`` | 1 | ``delta`` |
| ``SmoothL1Loss(beta)`` | ``c clamp(r / beta, -1, 1)`` (``c sign(r)`` at ``beta = 0``) | ``1/beta`` (0 at ``beta = 0``) | ``beta`` |

At the kink ``|r| = t`` the curvature is 0, torch autograd's convention (its double
backward uses a strict ``|r| < t``; ``torch.func.jacrev`` twice gives 1 for Huber).
The factor is ``diag(sqrt(c kappa 1[|r| < t]))``. Monte-Carlo columns are
``-sqrt(c kappa / k) 1[|r| < t] eps``, ``eps ~ N(0, I)``: the gradient of the
quadratic branch ``kappa/2 (z - yhat)^2`` at ``yhat = z + eps / sqrt(kappa)``, the
Gaussian whose negative log-likelihood that branch is (MSE: ``N(z, I/2)``), kept
only where the *true* residual lies in the quadratic region. The expectation is
the output Hessian at the data, so ``ggn_mc`` and ``sophia_gnb`` are unbiased for
the GGN. (Labels drawn from the Huber density itself would give its Fisher
``c kappa P(|eps| < t)`` instead, which is not the GGN at the data.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> spec = RegressionSpec.recognise(nn.HuberLoss(reduction="sum", delta=1.0))
    >>> z, y = torch.tensor([[0.5, 3.0]]), torch.zeros(1, 2)
    >>> state = spec.evaluate(z, y)
    >>> state.grad, spec.hess_diag(z, state)  # r inside, delta sign(r) outside; 1 and 0
    (tensor([[0.5000, 1.0000]]), tensor([[1., 0.]]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessbench.errors import InputError
from hessbench.estimators._losses_base import (
    LossSpec,
    LossState,
    check_finite,
    diag_factor,
    randn_like,
)

__all__ = ["RegressionSpec"]

_NAMES = {"mse": "MSE", "huber": "Huber", "smooth_l1": "smooth L1"}


@dataclass(frozen=True, eq=False)
class RegressionSpec(LossSpec):
    """``nn.MSELoss``, ``nn.HuberLoss(delta)`` or ``nn.SmoothL1Loss(beta)``."""

    kind: Literal["mse", "huber", "smooth_l1"] = "mse"
    threshold: float = 0.0  # Huber's delta, smooth L1's beta

    @classmethod
    def recognise(cls, loss_fn: nn.Module) -> RegressionSpec | None:
        """A spec for ``nn.MSELoss``, ``nn.HuberLoss`` or ``nn.SmoothL1Loss``."""
        if isinstance(loss_fn, nn.MSELoss):
            return cls(cls.reduction_of(loss_fn))
        if isinstance(loss_fn, nn.HuberLoss):
            return cls(cls.reduction_of(loss_fn), "huber", float(loss_fn.delta))
        if isinstance(loss_fn, nn.SmoothL1Loss):
            return cls(cls.reduction_of(loss_fn), "smooth_l1", float(loss_fn.beta))
        return None

    def plain_module(self) -> nn.Module | None:
        """``nn.MSELoss(reduction)`` for MSE."""
        return nn.MSELoss(reduction=self.reduction) if self.kind == "mse" else None

    @property
    def kappa(self) -> float:
        """The curvature of the quadratic branch: 2 (MSE), 1 (Huber), ``1/beta`` (smooth L1)."""
        if self.kind == "mse":
            return 2.0
        if self.kind == "huber":
            return 1.0
        return 1.0 / self.threshold if self.threshold > 0 else 0.0

    # ------------------------------------------------------------- the loss
    def check_targets(self, out: Tensor, targets: Tensor) -> None:
        """Finite targets of the output's shape."""
        name = _NAMES[self.kind]
        if targets.shape != out.shape:
            raise InputError(
                f"{name} targets must have the output's shape {tuple(out.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        check_finite(targets, name)

    def scale(self, targets: Tensor) -> float:
        """``1/numel`` for ``mean``, 1 for ``sum``."""
        return 1.0 if self.reduction == "sum" else 1.0 / targets.numel()

    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """The loss through differentiable torch operations (for autograd paths)."""
        return self._elements(out, targets, self.reduction)

    def _elements(self, out: Tensor, targets: Tensor, reduction: str) -> Tensor:
        if self.kind == "mse":
            return F.mse_loss(out, targets, reduction=reduction)
        if self.kind == "huber":
            return F.huber_loss(out, targets, reduction=reduction, delta=self.threshold)
        return F.smooth_l1_loss(out, targets, reduction=reduction, beta=self.threshold)

    def per_sample_loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """``l_n``: the element losses of sample ``n``, summed."""
        if self.kind == "mse":
            return (out - targets).square().flatten(1).sum(1)
        return self._elements(out, targets, "none").reshape(out.shape[0], -1).sum(1)

    def evaluate(self, out: Tensor, targets: Tensor) -> LossState:
        """``dL/dz`` (see the table) and the quadratic region as 0/1."""
        c = self.scale(targets)
        r = out - targets
        if self.kind == "mse":
            return LossState(r.mul_(2.0 * c), c, out, targets, self)
        t = self.threshold
        inside = (r.abs() < t).to(r.dtype)
        if self.kind == "huber":
            grad = r.clamp(-t, t)
        else:
            grad = r.div(t).clamp_(-1.0, 1.0) if t > 0 else r.sign()
        return LossState(grad.mul_(c), c, out, targets, self, inside)

    # ------------------------------------------------------------ curvature
    def hess_diag(self, out: Tensor, state: LossState) -> Tensor:
        """``c kappa 1[|r| < t]`` (``2c`` for MSE)."""
        if state.aux is None:
            return torch.full_like(out, 2.0 * state.scale)
        return state.aux * (self.kappa * state.scale)

    def hess_vec(self, state: LossState, r: Tensor) -> Tensor:
        """``c kappa 1[|r| < t] o r``."""
        if state.aux is None:
            return r * (2.0 * state.scale)
        return r * self.hess_diag(state.out, state)

    def sqrt_factor(self, out: Tensor, state: LossState, *, signed: bool = False) -> Tensor:
        """``sqrt(2c) I`` for MSE, else ``diag(sqrt(c kappa 1[|r| < t]))``: ``(N, D, *out)``."""
        if state.aux is not None:
            return diag_factor(self.hess_diag(out, state))
        n, d = out.shape[0], out[0].numel()
        eye = torch.eye(d, dtype=out.dtype, device=out.device) * (2.0 * state.scale) ** 0.5
        return eye.expand(n, d, d).reshape(n, d, *out.shape[1:])

    def mc_factor(
        self, out: Tensor, state: LossState, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        """``-sqrt(c kappa / k) 1[|r| < t] eps``, ``eps ~ N(0, I)``: ``(N, k, *out)``."""
        k = num_samples
        noise = randn_like((out.shape[0], k, *out.shape[1:]), out, generator)
        # gradient of kappa/2 (z - y)^2 at y = z + eps / sqrt(kappa) is -sqrt(kappa) eps
        noise.mul_(-((self.kappa * state.scale / k) ** 0.5))
        return noise if state.aux is None else noise.mul_(state.aux.unsqueeze(1))
