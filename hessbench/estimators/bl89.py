"""BL89: Becker & LeCun's diagonal Hessian recursion.

Becker & LeCun, "Improving the convergence of back-propagation learning with
second order methods" (1989).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators._layerwise import LayerwiseEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import build_plan, diag_pass

__all__ = ["BL89"]


@register
@estimator_dataclass
class BL89(LayerwiseEstimator):
    r"""BL89: HesScale's recursion with the output softmax treated element-wise.

    For cross-entropy the output curvature is ``c (p_y - p_y^2) e_y``, on the
    target logit only (log-softmax followed by NLL, each treated as an
    element-wise function); for MSE it is the exact ``2c`` and BL89 equals HesScale.
    The rest of the recursion is HesScale's: ``h_u = f'(u)^2 h_a + f''(u) g_a``.

    Args:
        output_curvature: ``elementwise`` (the method as published) or ``zero``:
            ``h_z = 0`` at the output, so only the ``f'' g`` terms propagate. The
            HesScale papers' BL89 numbers came from code that effectively did
            this; use ``zero`` to reproduce them.

    Cost: about one backprop. Supports: the layers of
    :class:`~hessbench.estimators._layerwise.LayerwiseEstimator`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
        >>> diag = BL89(output_curvature="zero")(model, nn.CrossEntropyLoss(), x, y)
        >>> float(sum(d.abs().sum() for d in diag.values()))  # ReLU: no f'' terms
        0.0
    """

    name: ClassVar[str] = "bl89"
    cost: ClassVar[str] = "~1 backprop"
    output_curvature: Literal["elementwise", "zero"] = "elementwise"

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        plan = build_plan(model)
        output = "bl89" if self.output_curvature == "elementwise" else "zero"
        diag, _, _ = diag_pass(
            plan, model, loss, inputs, targets, output=output, residual=True, generator=generator
        )
        return diag

    def _estimate_with_grad(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """The same pass, keeping the gradient it computes anyway (no extra backprop)."""
        plan = build_plan(model)
        diag, grad, state = diag_pass(
            plan,
            model,
            loss,
            inputs,
            targets,
            output="bl89" if self.output_curvature == "elementwise" else "zero",
            residual=True,
            generator=generator,
            with_grad=True,
        )
        return diag, grad, state.value()
