"""Monte-Carlo estimate of the generalized Gauss-Newton diagonal."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import ggn_diag_jacobian
from hessbench.estimators._base import Count, estimator_dataclass, register
from hessbench.estimators._factor_pass import Mode, Problem, factor_pass
from hessbench.estimators._layerwise import DualPathEstimator, keep_grad
from hessbench.estimators._losses import LossSpec, LossState
from hessbench.estimators._sequential import Plan

__all__ = ["GGNMC"]


@register
@estimator_dataclass
class GGNMC(DualPathEstimator):
    r"""``sum_n mean_k (c^(1/2) J_n^T grad_z l(z_n, y_hat_nk))^2``, labels from the model.

    Labels ``y_hat`` are drawn from the model's predictive distribution
    (categorical ``softmax(z)`` for cross-entropy; ``N(z, I/2)`` for MSE, the
    Gaussian whose negative log-likelihood is the squared error), so the
    expectation is the exact GGN diagonal. BackPACK's DiagGGNMC semantics.

    Args:
        num_samples: MC samples ``k`` per data point.
        method: ``auto``, ``structured`` (layer-by-layer pass) or ``jacobian``.

    Cost: ``k`` backprops (one pass carrying ``k`` columns); :meth:`estimate_with_grad`
    takes the gradient from the same pass.
    Reference: Dangel, Kunstner & Hennig, "BackPACK" (ICLR 2020).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> a = GGNMC()(model, nn.CrossEntropyLoss(), x, y, generator=torch.Generator().manual_seed(0))
        >>> b = GGNMC()(model, nn.CrossEntropyLoss(), x, y, generator=torch.Generator().manual_seed(0))
        >>> all(torch.equal(a[k], b[k]) for k in a)
        True
    """

    name: ClassVar[str] = "ggn_mc"
    cost: ClassVar[str] = "k backprops"
    stochastic: ClassVar[bool] = True
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)
    num_samples: Count = 1
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
        mode = Mode(columns="mc", residual=False, num_samples=self.num_samples)
        problem = Problem(model, loss, inputs, targets, generator)
        return keep_grad(factor_pass(plan, problem, mode, with_grad=extras is not None), extras)

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

        def columns(out: Tensor, state: LossState) -> Tensor:
            return loss.mc_factor(out, state, self.num_samples, generator)

        return ggn_diag_jacobian(model, loss, inputs, targets, columns)
