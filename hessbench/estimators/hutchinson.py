"""Hutchinson's unbiased stochastic estimator of the Hessian diagonal."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import hvp_samples
from hessbench.estimators._base import Count, estimator_dataclass, register
from hessbench.estimators._hvp_pass import structured_hutchinson
from hessbench.estimators._layerwise import DualPathEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan

__all__ = ["Hutchinson"]


@register
@estimator_dataclass
class Hutchinson(DualPathEstimator):
    r"""``mean_k z_k o (H z_k)`` with Rademacher ``z_k``: unbiased for ``diag H``.

    ``E[z z^T] = I`` gives ``E[z o Hz] = diag H``; the variance of one sample's
    entry ``i`` is ``sum_{j != i} H_ij^2``. Hessian-vector products by double
    backprop through the module's own ``forward`` (any differentiable ``nn.Module``).

    Args:
        num_samples: number of probe vectors ``k``.

    Cost: ``k`` Hessian-vector products (about 2-3 backprops each). The gradient
    the products start from is handed back by :meth:`estimate_with_grad`.
    Reference: Hutchinson (1989); Bekas, Kokiopoulou & Saad (2007).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(2, 3), torch.tensor([0, 1])
        >>> est = Hutchinson(num_samples=10)
        >>> est.label
        'hutchinson[num_samples=10]'
        >>> est(model, nn.CrossEntropyLoss(), x, y)["0.weight"].shape
        torch.Size([4, 3])
    """

    name: ClassVar[str] = "hutchinson"
    cost: ClassVar[str] = "k HVPs"
    stochastic: ClassVar[bool] = True
    passes_grad: ClassVar[bool] = True
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)
    num_samples: Count = 1
    method: Literal["auto", "structured", "autograd"] = "auto"

    @staticmethod
    def _combine(z: Tensor, hz: Tensor) -> Tensor:
        return z * hz

    def _structured(
        self,
        plan: Plan,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        return structured_hutchinson(
            plan, model, loss, inputs, targets, self.num_samples, generator, self._combine, extras
        )

    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        return hvp_samples(
            model, loss, inputs, targets, self.num_samples, generator, self._combine, extras
        )
