"""The all-zero estimate: the floor every estimator must beat."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from hessbench.estimators._base import (
    Estimator,
    estimator_dataclass,
    register,
    trainable_parameters,
)
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import check_output

__all__ = ["Zero"]


@register
@estimator_dataclass
class Zero(Estimator):
    r"""``0`` for every entry; its L1 error is ``||h||_1`` and its relative L1 is 1.

    Cost: one forward pass without autograd, only to validate the model output
    and the targets like every other estimator. Supports any ``nn.Module`` with
    trainable parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> d = Zero()(model, nn.MSELoss(), torch.randn(1, 3), torch.randn(1, 2))
        >>> float(d["0.weight"].abs().sum())
        0.0
    """

    name: ClassVar[str] = "zero"
    cost: ClassVar[str] = "0"

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        params = trainable_parameters(model)
        with torch.no_grad():  # validate like every other estimator: output and targets
            out = model(inputs)
        check_output(model, out)
        loss.check_targets(out, targets)
        return {n: torch.zeros_like(p) for n, p in params.items()}
