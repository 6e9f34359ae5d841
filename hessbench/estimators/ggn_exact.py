"""The exact diagonal of the generalized Gauss-Newton matrix."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import ggn_diag_jacobian
from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators._factor_pass import Mode, Problem, factor_pass
from hessbench.estimators._layerwise import DualPathEstimator, keep_grad
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan

__all__ = ["GGNExact"]

_MODE = Mode(columns="exact", residual=False)


@register
@estimator_dataclass
class GGNExact(DualPathEstimator):
    r"""``diag(J^T (d2L/dz2) J)``, via a symmetric factor ``S S^T = d2L/dz2``.

    ``ggn = sum_n sum_k (J_n^T s_nk)^2``: the ``C`` columns of the loss Hessian's
    factor (``sqrt(c) (diag sqrt(p) - p sqrt(p)^T)`` for cross-entropy,
    ``sqrt(2c) I`` for MSE) are backpropagated through the network. Equals the
    exact Hessian diagonal for a network that is linear in its parameters
    before the loss (e.g. one Linear layer).

    Args:
        method: ``auto`` (layer-by-layer pass on supported ``nn.Sequential``
            models, else per-sample Jacobians with ``torch.func``),
            ``structured`` or ``jacobian``.

    Cost: ``O(C)`` backprops (the layer-by-layer pass carries ``C`` columns);
    :meth:`estimate_with_grad` takes the gradient from the same pass.
    Reference: Schraudolph (2002); BackPACK's DiagGGNExact (Dangel et al., 2020).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> g = GGNExact()(model, nn.CrossEntropyLoss(), x, y)
        >>> from hessbench.estimators import get_estimator
        >>> h = get_estimator("exact")(model, nn.CrossEntropyLoss(), x, y)
        >>> all(torch.allclose(g[k], h[k]) for k in g)
        True
    """

    name: ClassVar[str] = "ggn_exact"
    cost: ClassVar[str] = "O(C) backprops"
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)
    method: Literal["auto", "structured", "jacobian"] = "auto"
    passes_grad: ClassVar[bool] = True
    graph_plans: ClassVar[bool] = True

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
        problem = Problem(model, loss, inputs, targets, generator)
        res = factor_pass(plan, problem, _MODE, with_grad=extras is not None)
        return keep_grad(res, extras)

    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        return ggn_diag_jacobian(model, loss, inputs, targets, loss.sqrt_factor)
