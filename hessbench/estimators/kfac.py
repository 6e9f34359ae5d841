"""The diagonal of the Kronecker-factored (K-FAC) GGN approximation."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._base import Count, estimator_dataclass, register
from hessbench.estimators._factor_pass import Mode, PassResult, Problem, factor_pass
from hessbench.estimators._layerwise import LayerwiseEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import build_plan

__all__ = ["KFAC"]


@register
@estimator_dataclass
class KFAC(LayerwiseEstimator):
    r"""``diag(A)_i diag(G)_o`` for every Linear/Conv weight, ``diag(G)_o`` for its bias.

    The GGN block of a layer ``z = W a`` is approximated by ``A (x) G`` with
    ``A = 1/(N P) sum_{n,p} a a^T`` (the layer's input, unfolded into patches
    at each of the ``P`` output positions for convolutions; ``P = 1`` for
    Linear) and ``G = sum_{n,p,k} s s^T`` from backpropagated vectors ``s`` at
    the layer's output (the loss scale ``c`` included). Convolutions follow
    the KFAC-expand convention (positions treated like samples). At batch size
    1 on Linear layers with ``backward="exact"`` this equals the exact GGN
    diagonal.

    Args:
        backward: ``mc`` (Martens & Grosse's K-FAC: ``s`` from labels sampled
            from the model) or ``exact`` (KFLR-style: the columns of the loss
            Hessian's symmetric factor).
        num_samples: MC samples for ``backward="mc"`` (ignored for ``exact``).

    Cost: one backprop plus ``k`` (or ``C``) backpropagated columns; :meth:`estimate_with_grad`
    takes the gradient from the same pass.
    Reference: Martens & Grosse (ICML 2015); Grosse & Martens (ICML 2016) for
    convolutions; Botev et al. (ICML 2017) for KFLR.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
        >>> k = KFAC(backward="exact")(model, nn.CrossEntropyLoss(), x, y)
        >>> from hessbench.estimators import get_estimator
        >>> g = get_estimator("ggn_exact")(model, nn.CrossEntropyLoss(), x, y)
        >>> all(torch.allclose(k[n], g[n]) for n in k)
        True
    """

    name: ClassVar[str] = "kfac"
    cost: ClassVar[str] = "~1 backprop + k columns"
    backward: Literal["mc", "exact"] = "mc"
    num_samples: Count = 1
    grad_in_pass: ClassVar[bool] = True

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Only the Monte-Carlo backward vectors depend on the generator."""
        return self.backward == "mc"

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        return self._pass(model, loss, inputs, targets, generator, with_grad=False).diag

    def _estimate_with_grad(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """The same pass, keeping the gradient it backpropagates alongside (no extra forward)."""
        res = self._pass(model, loss, inputs, targets, generator, with_grad=True)
        return res.diag, res.grad, res.state.value()

    def _pass(self, model, loss, inputs, targets, generator, *, with_grad: bool) -> PassResult:
        mode = Mode(columns=self.backward, residual=False, kfac=True, num_samples=self.num_samples)
        problem = Problem(model, loss, inputs, targets, generator)
        return factor_pass(build_plan(model, graph=True), problem, mode, with_grad=with_grad)
