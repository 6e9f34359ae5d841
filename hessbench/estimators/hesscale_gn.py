"""HesScaleGN: HesScale without the ``f''(u) g`` terms (a GGN-flavoured diagonal).

Elsayed & Mahmood (2022), Elsayed et al. (ICML 2024).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators._layerwise import DiagPassEstimator
from hessbench.estimators._rules_maps import avgpool_rule

__all__ = ["HesScaleGN"]


@register
@estimator_dataclass
class HesScaleGN(DiagPassEstimator):
    r"""HesScale's recursion with ``h_u = f'(u)^2 h_a`` (no second-derivative term).

    It approximates the diagonal of the generalized Gauss-Newton matrix. For
    networks whose activations have ``f'' = 0`` (ReLU, LeakyReLU) it equals
    HesScale exactly, and ``hesscale == hesscale_gn + bl89(output_curvature=zero)``.

    Cost: about one backprop. Supports: the layers of
    :class:`~hessbench.estimators._layerwise.LayerwiseEstimator`.

    Args:
        avgpool: below average pooling, ``consistent`` (default) propagates
            ``(J o J)^T h``, weights ``1/K^2`` for a window of ``K`` inputs;
            ``authors`` uses ``J^T h``, weights ``1/K``, as the HesScale authors'
            code does (``hesscale/core/derivatives.py``, "should be _pow(2)").

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])
        >>> a = HesScaleGN()(model, nn.CrossEntropyLoss(), x, y)
        >>> from hessbench.estimators import HesScale
        >>> b = HesScale()(model, nn.CrossEntropyLoss(), x, y)
        >>> all(torch.allclose(a[k], b[k]) for k in a)
        True
    """

    name: ClassVar[str] = "hesscale_gn"
    cost: ClassVar[str] = "~1 backprop"
    quiet_fields: ClassVar[tuple[str, ...]] = ("avgpool",)
    avgpool: Literal["consistent", "authors"] = "consistent"

    def _diag_pass(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with avgpool_rule(self.avgpool):
            return super()._diag_pass(*args, **kwargs)

    def _diag_options(self) -> tuple[Literal["exact", "bl89", "zero"], bool]:
        return "exact", False
