"""Base classes of estimators built on the layer-by-layer pass over ``nn.Sequential``."""

from __future__ import annotations

import abc
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.errors import UnsupportedError
from hessbench.estimators._base import (
    Estimator,
    finalize,
    loss_and_grad,
    preserve_state,
)
from hessbench.estimators._factor_pass import PassResult
from hessbench.estimators._losses import LossSpec, LossState
from hessbench.estimators._rng import rng_state, set_rng_state
from hessbench.estimators._sequential import Plan, build_plan, diag_pass

__all__ = ["DiagPassEstimator", "DualPathEstimator", "LayerwiseEstimator", "keep_grad"]


def keep_grad(
    res: PassResult, extras: dict[str, object] | None, params: dict | None = None
) -> dict[str, Tensor]:
    """The pass's diagonals; its gradient and loss go to ``extras`` (when given).

    With ``params`` (the caller's trainable parameters) the gradient and the
    loss are cast to the parameters' dtype (a pass computed in float64).
    """
    if extras is not None:
        grad, value = res.grad, res.state.value()
        if params is not None:
            grad = finalize(params, grad)
            value = value.to(next(iter(params.values())).dtype)
        extras["grad"], extras["loss"] = grad, value
    return res.diag


class LayerwiseEstimator(Estimator):
    """An estimator that supports exactly the layers of the rule tables.

    The sequential engine: ``nn.Sequential`` (nested allowed) of Linear, Conv1d,
    Conv2d (stride, padding, dilation, groups), Tanh, Sigmoid, ReLU, LeakyReLU,
    ELU, SELU, Softplus, LogSigmoid, Flatten, MaxPool1d/2d, AvgPool1d/2d, Dropout
    and Identity; with ``graph_capable``, any other model (an ``nn.Sequential``
    with other layers included) runs on the graph engine
    (:mod:`hessbench.estimators._graph`). Every loss of
    :class:`~hessbench.estimators._losses.LossSpec`.
    """

    uses_model_forward: ClassVar[bool] = False
    graph_capable: ClassVar[bool] = True
    """Whether non-``Sequential`` models run on the graph engine (peer wrappers: no)."""

    def _check_model(self, model: nn.Module, loss: LossSpec) -> None:
        """Also refuse any model the layer-by-layer pass cannot run."""
        build_plan(model, graph=self.graph_capable)


class DiagPassEstimator(LayerwiseEstimator):
    """A :class:`LayerwiseEstimator` computed by one :func:`diag_pass` (HesScale, BL89, ...).

    Subclasses give the pass's options with :meth:`_diag_options`; the gradient
    comes out of the same pass (no extra backprop).
    """

    grad_in_pass: ClassVar[bool] = True

    @abc.abstractmethod
    def _diag_options(self) -> tuple[Literal["exact", "bl89", "zero"], bool]:
        """``diag_pass``'s ``output`` and ``residual`` options."""

    def _diag_pass(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        with_grad: bool,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], LossState]:
        output, residual = self._diag_options()
        return diag_pass(
            build_plan(model, graph=True),
            model,
            loss,
            inputs,
            targets,
            output=output,
            residual=residual,
            generator=generator,
            with_grad=with_grad,
        )

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        diag, _, _ = self._diag_pass(model, loss, inputs, targets, generator, with_grad=False)
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
        diag, grad, state = self._diag_pass(model, loss, inputs, targets, generator, with_grad=True)
        return diag, grad, state.value()


class DualPathEstimator(Estimator):
    """An estimator with a layer-by-layer path and a generic (autograd) path.

    Subclasses declare a ``method`` field whose values are ``auto``,
    ``structured`` and the name of their generic path. ``auto`` takes the
    layer-by-layer path where the model and inputs allow it and falls back to
    the generic path on :class:`UnsupportedError`; ``structured`` raises it.
    """

    method: str
    uses_model_forward: ClassVar[bool] = False  # only the generic path does: guarded there
    graph_plans: ClassVar[bool] = False
    """Whether ``_structured`` also runs the graph engine (non-``Sequential`` models)."""
    passes_grad: ClassVar[bool] = False
    """Whether ``_structured`` and ``_generic`` take ``extras=`` and may store the gradient
    and the loss there (``extras["grad"]``, ``extras["loss"]``) for :meth:`estimate_with_grad`;
    a path that leaves them out is followed by one autograd gradient."""

    @property
    def grad_in_pass(self) -> bool:  # type: ignore[override]
        """Estimators passing the gradient guard their own autograd fallbacks."""
        return self.passes_grad

    def _check_model(self, model: nn.Module, loss: LossSpec) -> None:
        """Also refuse models the layer-by-layer pass cannot run when it is forced."""
        if self.method == "structured":
            build_plan(model, graph=self.graph_plans)

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        return self._dispatch(model, loss, inputs, targets, generator, None)

    def _estimate_with_grad(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        if not self.passes_grad:
            return super()._estimate_with_grad(model, loss, inputs, targets, generator)
        extras: dict[str, object] = {}
        rng = rng_state(inputs.device)
        diag = self._dispatch(model, loss, inputs, targets, generator, extras)
        if "grad" not in extras:  # this path has no gradient on the way
            set_rng_state(inputs.device, rng)  # replay the estimate's dropout masks
            with preserve_state(model, inputs.device, None):
                extras["grad"], extras["loss"] = loss_and_grad(model, loss, inputs, targets)
        return diag, extras["grad"], extras["loss"]  # type: ignore[return-value]

    def _dispatch(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None,
    ) -> dict[str, Tensor]:
        kw = {} if extras is None else {"extras": extras}
        if self.method in ("auto", "structured"):
            try:
                plan = build_plan(model, graph=self.graph_plans)
                return self._structured(plan, model, loss, inputs, targets, generator, **kw)
            except UnsupportedError:
                if self.method == "structured":
                    raise
        with preserve_state(model, inputs.device, None):
            return self._generic(model, loss, inputs, targets, generator, **kw)

    @abc.abstractmethod
    def _structured(
        self,
        plan: Plan,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """The layer-by-layer path."""

    @abc.abstractmethod
    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """The path for any differentiable ``nn.Module``."""
