"""AdaHessian's Hessian-diagonal estimate: ``|z o Hz|`` with spatial averaging."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from hessbench.estimators._base import Flag, estimator_dataclass, register
from hessbench.estimators._losses import LossSpec
from hessbench.estimators.hutchinson import Hutchinson

__all__ = ["AdaHessian"]


@register
@estimator_dataclass
class AdaHessian(Hutchinson):
    r"""``mean_k |z_k o (H z_k)|``, kernels of convolutions averaged over space.

    As AdaHessian's optimizer uses it: the absolute value of one Hutchinson
    sample (biased, always non-negative), and for parameters with three or more
    dimensions (Conv1d/Conv2d weights) the mean over the kernel's spatial
    dimensions, broadcast back to the kernel's shape. With ``num_samples > 1``
    the samples' absolute values are averaged. (The HesScale authors' code
    divided a single sample's estimate by 50 for "AdaHessian-50"; hessbench
    averages 50 samples.)

    The same Hessian-vector products as :class:`Hutchinson` (same probes for
    equal generators), combined as ``|z o Hz|``.

    Args:
        num_samples: number of probe vectors ``k``.
        method: as :class:`Hutchinson`.
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
    spatial_averaging: Flag = True

    @staticmethod
    def _combine(z: Tensor, hz: Tensor) -> Tensor:
        return (z * hz).abs()

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        return self._average(super()._estimate(model, loss, inputs, targets, generator))

    def _estimate_with_grad(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        diag, grad, value = super()._estimate_with_grad(model, loss, inputs, targets, generator)
        return self._average(diag), grad, value

    def _average(self, diag: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.spatial_averaging:
            for name, d in diag.items():
                if d.dim() >= 3:
                    dims = tuple(range(2, d.dim()))
                    diag[name] = d.mean(dims, keepdim=True).expand_as(d).clone()
        return diag
