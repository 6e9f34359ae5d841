"""The squared gradient, what Adam's second moment tracks."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import gradient
from hessbench.estimators._base import Estimator, estimator_dataclass, loss_and_grad, register
from hessbench.estimators._losses import LossSpec

__all__ = ["GradSq"]


@register
@estimator_dataclass
class GradSq(Estimator):
    r"""``(dL/dtheta)^2``: the squared mini-batch gradient.

    Not an estimator of the Hessian diagonal in any unbiased sense; it is the
    quantity Adam's second moment averages, included as the baseline the
    HesScale papers compare against (``g^2``).

    Cost: one backprop. Supports any differentiable ``nn.Module``.
    Reference: Kingma & Ba, "Adam" (ICLR 2015).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> x, y = torch.randn(2, 3), torch.tensor([0, 1])
        >>> GradSq()(model, nn.CrossEntropyLoss(), x, y)["0.bias"].shape
        torch.Size([2])
    """

    name: ClassVar[str] = "grad_sq"
    cost: ClassVar[str] = "1 backprop"

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        grads, _ = gradient(model, loss, inputs, targets)
        return {n: g.square() for n, g in grads.items()}

    def _estimate_with_grad(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One gradient, squared for the estimate and handed back as it is."""
        grads, value = loss_and_grad(model, loss, inputs, targets)
        return {n: g.square() for n, g in grads.items()}, grads, value
