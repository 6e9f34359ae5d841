"""The empirical Fisher diagonal from per-sample gradients."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import per_sample_grad_sq
from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators._factor_pass import Mode, Problem, factor_pass
from hessbench.estimators._layerwise import DualPathEstimator, keep_grad
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan

__all__ = ["EmpiricalFisher"]


@register
@estimator_dataclass
class EmpiricalFisher(DualPathEstimator):
    r"""``c sum_n (grad l_n)^2``, ``l_n`` the per-sample loss summed over outputs.

    With ``L = c sum_n l_n`` this is the diagonal of the empirical Fisher at the
    loss's scale. At batch size 1 it is ``grad_sq / c``: equal to ``grad_sq``
    for cross-entropy, ``D`` times it for mean MSE with ``D`` outputs.
    On supported ``nn.Sequential`` models the per-sample gradients come from
    the layer-by-layer pass (one backpropagated column per sample); on any
    other module from ``torch.func.vmap`` over ``torch.func.grad``.

    Args:
        method: ``auto``, ``structured`` or ``vmap``.

    Cost: one backprop; :meth:`estimate_with_grad` takes the gradient from the same
    pass (the vmap path sums the per-sample gradients it has anyway). Supports any
    differentiable ``nn.Module`` that handles a batch of one sample (the vmap path).
    Reference: Kunstner, Hennig & Balles, "Limitations of the empirical Fisher
    approximation" (NeurIPS 2019).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> x, y = torch.randn(1, 3), torch.tensor([1])
        >>> from hessbench.estimators import get_estimator
        >>> a = EmpiricalFisher()(model, nn.CrossEntropyLoss(), x, y)
        >>> b = get_estimator("grad_sq")(model, nn.CrossEntropyLoss(), x, y)
        >>> all(torch.allclose(a[k], b[k]) for k in a)
        True
    """

    name: ClassVar[str] = "efisher"
    cost: ClassVar[str] = "1 backprop"
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)
    passes_grad: ClassVar[bool] = True
    method: Literal["auto", "structured", "vmap"] = "auto"

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
        # columns = dL/dz_n = c dl_n/dz_n, so the pass gives c^2 sum_n (grad l_n)^2
        problem = Problem(model, loss, inputs, targets, generator)
        res = factor_pass(
            plan, problem, Mode(columns="grad", residual=False), with_grad=extras is not None
        )
        sq = keep_grad(res, extras)
        c = loss.scale(targets)
        return {n: s.div_(c) for n, s in sq.items()}

    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        sq, c = per_sample_grad_sq(model, loss, inputs, targets, extras=extras)
        return {n: s.mul_(c) for n, s in sq.items()}
