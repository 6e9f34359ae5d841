"""AdaHessian's Hessian-diagonal estimate: ``|z o Hz|`` with spatial averaging."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import hvp_samples
from hessbench.estimators._base import Count, Flag, estimator_dataclass, register
from hessbench.estimators._hvp_pass import structured_hutchinson
from hessbench.estimators._layerwise import DualPathEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan

__all__ = ["AdaHessian"]


@register
@estimator_dataclass
class AdaHessian(DualPathEstimator):
    r"""``mean_k |z_k o (H z_k)|``, kernels of convolutions averaged over space.

    As AdaHessian's optimizer uses it: the absolute value of one Hutchinson
    sample (biased, always non-negative), and for parameters with three or more
    dimensions (Conv1d/Conv2d weights) the mean over the kernel's spatial
    dimensions, broadcast back to the kernel's shape. With ``num_samples > 1``
    the samples' absolute values are averaged. (The HesScale authors' code
    divided a single sample's estimate by 50 for "AdaHessian-50"; hessbench
    averages 50 samples.)

    Args:
        num_samples: number of probe vectors ``k``.
        spatial_averaging: average conv kernels over their spatial dimensions.

    Cost: ``k`` Hessian-vector products.
    Reference: Yao et al., "ADAHESSIAN" (AAAI 2021).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> x, y = torch.randn(2, 3), torch.tensor([0, 1])
        >>> d = AdaHessian()(model, nn.CrossEntropyLoss(), x, y)
        >>> bool((d["0.weight"] >= 0).all())
        True
    """

    name: ClassVar[str] = "adahessian"
    cost: ClassVar[str] = "k HVPs"
    stochastic: ClassVar[bool] = True
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)
    num_samples: Count = 1
    method: Literal["auto", "structured", "autograd"] = "auto"
    spatial_averaging: Flag = True

    @staticmethod
    def _combine(z: Tensor, hz: Tensor) -> Tensor:
        return (z * hz).abs()

    def _structured(
        self,
        plan: Plan,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        return structured_hutchinson(
            plan, model, loss, inputs, targets, self.num_samples, generator, self._combine
        )

    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        return hvp_samples(model, loss, inputs, targets, self.num_samples, generator, self._combine)

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        diag = super()._estimate(model, loss, inputs, targets, generator)
        if self.spatial_averaging:
            for name, d in diag.items():
                if d.dim() >= 3:
                    dims = tuple(range(2, d.dim()))
                    diag[name] = d.mean(dims, keepdim=True).expand_as(d).clone()
        return diag
