"""The exact Hessian diagonal: hessbench's ground truth."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import exact_diag_hvp
from hessbench.estimators._base import (
    Count,
    estimator_dataclass,
    finalize,
    register,
    trainable_parameters,
)
from hessbench.estimators._factor_pass import Mode, Problem, factor_pass
from hessbench.estimators._layerwise import DualPathEstimator, keep_grad
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan

__all__ = ["Exact"]


@register
@estimator_dataclass
class Exact(DualPathEstimator):
    r"""Exact diagonal of the loss Hessian, by default computed in float64.

    Two independent ways, tested against each other:

    - ``structured`` (supported ``nn.Sequential`` models): backpropagate each
      sample's exact Hessian with respect to every layer's output. Linear maps
      give ``H_a = J^T H_z J``; an activation ``a = f(u)`` gives
      ``H_u = f' f'^T o H_a + diag(f''(u) g_a)``. The Hessian is kept in factored
      form (the loss Hessian's symmetric factor pushed through the layers plus a
      signed factor for every curved activation's residual, as BackPACK's
      DiagHessian does) or as full per-sample matrices, chosen per layer by
      estimated cost (``representation="auto"``; see ``_factor_pass.py``). A
      parameter's diagonal follows from its layer's output Hessian: ``h_W[o, i] = sum_n H_z[n, o, o] a[n, i]^2`` for Linear.
    - ``hvp`` (any ``nn.Module``): one double-backprop Hessian row per
      parameter entry, refused above ``max_params`` entries.

    Args:
        method: ``auto`` (structured where supported, else hvp), ``structured`` or ``hvp``.
        representation: ``auto`` (per layer, by estimated cost), ``factored`` or
            ``full`` everywhere (structured path only; the same numbers to rounding).
        compute_dtype: ``float64`` (default) or ``model``; the result always has
            the parameters' dtype, so pass a float64 model for a float64 truth.
        max_params: the size guard of the hvp path.

    Cost: a few backprops on the structured path (columns: number of outputs plus
    the widths of the curved activations above a layer); ``P`` backprops on the
    hvp path.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])
        >>> a = Exact()(model, nn.CrossEntropyLoss(), x, y)
        >>> b = Exact(method="hvp")(model, nn.CrossEntropyLoss(), x, y)
        >>> all(torch.allclose(a[k], b[k], rtol=1e-10, atol=0) for k in a)
        True
    """

    name: ClassVar[str] = "exact"
    cost: ClassVar[str] = "a few backprops (Sequential); one HVP per parameter otherwise"
    impl_fields: ClassVar[tuple[str, ...]] = (
        "method",
        "representation",
        "compute_dtype",
        "max_params",
    )
    method: Literal["auto", "structured", "hvp"] = "auto"
    representation: Literal["auto", "factored", "full"] = "auto"
    compute_dtype: Literal["float64", "model"] = "float64"
    max_params: Count = 50_000
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
        dtype = torch.float64 if self.compute_dtype == "float64" else None
        problem, plan = Problem(model, loss, inputs, targets, generator).cast(dtype, plan)
        mode = Mode(columns="exact", residual=True, representation=self.representation)
        res = factor_pass(plan, problem, mode, with_grad=extras is not None)
        params = trainable_parameters(model)
        return finalize(params, keep_grad(res, extras, params))

    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        dtype = torch.float64 if self.compute_dtype == "float64" else None
        diag = exact_diag_hvp(model, loss, inputs, targets, dtype=dtype, max_params=self.max_params)
        return finalize(trainable_parameters(model), diag)
