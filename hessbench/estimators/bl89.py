"""BL89: Becker & LeCun's diagonal Hessian recursion.

Becker & LeCun, "Improving the convergence of back-propagation learning with
second order methods" (1989).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators._layerwise import DiagPassEstimator
from hessbench.estimators._rules_maps import avgpool_rule

__all__ = ["BL89"]


@register
@estimator_dataclass
class BL89(DiagPassEstimator):
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
        avgpool: below average pooling, ``consistent`` (default) propagates
            ``(J o J)^T h``, weights ``1/K^2`` for a window of ``K`` inputs;
            ``authors`` uses ``J^T h``, weights ``1/K``, as the HesScale authors'
            code does (``hesscale/core/derivatives.py``, "should be _pow(2)").

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
    quiet_fields: ClassVar[tuple[str, ...]] = ("avgpool",)
    avgpool: Literal["consistent", "authors"] = "consistent"

    def _diag_pass(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with avgpool_rule(self.avgpool):
            return super()._diag_pass(*args, **kwargs)

    def _diag_options(self) -> tuple[Literal["exact", "bl89", "zero"], bool]:
        return ("bl89" if self.output_curvature == "elementwise" else "zero"), True
