"""HesScale: BL89's recursion started from the exact output Hessian diagonal.

Elsayed & Mahmood, "HesScale: Scalable Computation of Hessian Diagonals" (2022);
Elsayed, Farrahi, Dangel & Mahmood, "Revisiting Scalable Hessian Diagonal
Approximations for Applications in Reinforcement Learning" (ICML 2024).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators._layerwise import DiagPassEstimator
from hessbench.estimators._rules_maps import avgpool_rule

__all__ = ["HesScale"]


@register
@estimator_dataclass
class HesScale(DiagPassEstimator):
    r"""HesScale diagonal estimate, computed with the gradient in one pass.

    Each layer passes back, per sample, a diagonal estimate ``h_o`` of the
    output curvature with the exact gradient ``g_o``. At the network output
    ``h_z`` is exact: ``c (p - p^2)`` for cross-entropy, ``2c`` for MSE. Then

    - Linear ``z = W a + b``: ``h_a = (W o W)^T h_z``, ``h_W = sum_n h_z a^T o a^T``,
      ``h_b = sum_n h_z``; Conv the same with a transposed convolution by ``W o W``;
    - activation ``a = f(u)``: ``h_u = f'(u)^2 h_a + f''(u) g_a``;
    - max pooling routes ``h`` to the argmax, average pooling weights it ``1/K^2``.

    The last layer's diagonals are exact; with MSE so is the last-but-one
    Linear layer.

    Cost: about one backprop (one joint forward/backward pass, no autograd).
    Supports: the layers of :class:`~hessbench.estimators._layerwise.LayerwiseEstimator`.

    Args:
        avgpool: below average pooling, ``consistent`` (default) propagates
            ``(J o J)^T h``, weights ``1/K^2`` for a window of ``K`` inputs;
            ``authors`` uses ``J^T h``, weights ``1/K``, as the HesScale authors'
            code does (``hesscale/core/derivatives.py``, "should be _pow(2)").

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
        >>> diag = HesScale()(model, nn.MSELoss(), x, y)
        >>> sorted(diag), diag["0.weight"].shape
        (['0.bias', '0.weight', '2.bias', '2.weight'], torch.Size([4, 3]))
    """

    name: ClassVar[str] = "hesscale"
    cost: ClassVar[str] = "~1 backprop"
    quiet_fields: ClassVar[tuple[str, ...]] = ("avgpool",)
    avgpool: Literal["consistent", "authors"] = "consistent"

    def _diag_pass(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with avgpool_rule(self.avgpool):
            return super()._diag_pass(*args, **kwargs)

    def _diag_options(self) -> tuple[Literal["exact", "bl89", "zero"], bool]:
        return "exact", True
