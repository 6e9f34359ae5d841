"""Sophia's Gauss-Newton-Bartlett estimator."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._base import (
    estimator_dataclass,
    register,
    trainable_parameters,
)
from hessbench.estimators._layerwise import DualPathEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan, check_output, sampled_grad_pass

__all__ = ["SophiaGNB"]


@register
@estimator_dataclass
class SophiaGNB(DualPathEstimator):
    r"""``(grad L_hat)^2 / c``, ``L_hat`` the loss at labels sampled from the model.

    Labels are drawn from the model's predictive distribution: categorical
    ``softmax(z)`` for cross-entropy, ``y_hat = z + eps/sqrt(2)`` for MSE (the
    Gaussian whose negative log-likelihood is the squared error), Bernoulli
    ``sigmoid(z)`` for binary cross-entropy. For mean cross-entropy this is
    Sophia's ``N (grad L_hat)^2``. With class weights, label smoothing,
    ``pos_weight`` or a Huber-type loss the output gradient is the loss's
    ``sampled_grad`` instead of the gradient of the loss at the drawn labels (which
    would be biased): ``sqrt(c)`` times a Monte-Carlo GGN column, with
    ``E[g g^T] = c d2L/dz2`` (the rules: ``hessbench/estimators/_losses.py``). By Bartlett's second
    identity its expectation is ``c sum_n diag(J_n^T d2l/dz2 J_n)`` (exact at
    batch size 1, where it equals the GGN diagonal of the loss ``L``); for
    ``N > 1`` the expectation also contains cross-sample terms
    ``c sum_{n != m} E[g_n] o E[g_m]``, which vanish because ``E[g_n] = 0``, so
    the expectation is the GGN diagonal of ``L`` in all cases.

    Args:
        method: ``auto`` (the layer-by-layer gradient pass on supported
            ``nn.Sequential`` models, else autograd), ``structured`` or ``autograd``.
            Both draw the same labels from the same generator.

    Cost: one forward and one backprop. Supports any differentiable ``nn.Module``.
    :meth:`estimate_with_grad` shares the forward pass: the gradient at the true
    labels is a second backpropagated vector (about half a gradient more).
    Reference: Liu et al., "Sophia" (ICLR 2024).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> x, y = torch.randn(2, 3), torch.tensor([0, 1])
        >>> SophiaGNB()(model, nn.CrossEntropyLoss(), x, y)["0.weight"].shape
        torch.Size([2, 3])
    """

    name: ClassVar[str] = "sophia_gnb"
    cost: ClassVar[str] = "1 backprop"
    stochastic: ClassVar[bool] = True
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)
    passes_grad: ClassVar[bool] = True
    method: Literal["auto", "structured", "autograd"] = "auto"

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
        assert generator is not None
        grads, state, true_grads = sampled_grad_pass(
            plan, model, loss, inputs, targets, generator, with_grad=extras is not None
        )
        if extras is not None:
            extras["grad"], extras["loss"] = true_grads, state.value()
        if state.scale == 1.0:
            return {n: g.square_() for n, g in grads.items()}
        return {n: g.square_().div_(state.scale) for n, g in grads.items()}

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
        params = trainable_parameters(model)
        out = model(inputs)
        check_output(model, out.detach())
        loss.check_targets(out, targets)
        with torch.no_grad():
            state = loss.evaluate(out.detach(), targets)
            g = loss.sampled_grad(out.detach(), state, generator)
        keep = extras is not None
        grads = torch.autograd.grad(out, list(params.values()), grad_outputs=g, retain_graph=keep)
        if keep:  # the true labels' gradient from the same forward pass
            true = torch.autograd.grad(out, list(params.values()), grad_outputs=state.grad)
            extras["grad"] = {n: t.detach() for n, t in zip(params, true, strict=True)}
            extras["loss"] = state.value()
        return {n: g.square().div_(state.scale) for n, g in zip(params, grads, strict=True)}
