"""The shared runner of the BackPACK peer estimators.

BackPACK (Dangel, Kunstner & Hennig, ICLR 2020; ``pip install
backpack-for-pytorch``) computes curvature quantities during one backward pass
through hooks that it installs with ``extend()``, storing the results as
attributes of the parameters. ``extend()`` mutates the model (hooks,
attributes, ``.grad``), so every call here works on a deep copy of the caller's
model, extended and discarded afterwards, and removes the hooks it installed
from BackPACK's global handle list; the caller's model, its ``.grad`` and its
hooks stay as they were. The copy costs one ``copy.deepcopy`` per call, which
is included in the timings.

BackPACK 1.7.1 builds the transposed convolution that applies an average
pooling layer's Jacobian in torch's default dtype, so on a float64 model it
fails ("expected scalar type Double but found Float"); the backward pass runs
with the default dtype set to the model's (restored afterwards).
"""

from __future__ import annotations

import abc
import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from hessbench.estimators._base import finalize, has_active_dropout, trainable_parameters
from hessbench.estimators._layerwise import LayerwiseEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan, build_plan
from hessbench.estimators.peers._common import (
    check_layer_types,
    library_errors,
    loss_module,
    quiet_backward_hooks,
    run_steps,
    seeded_global_rng,
)

if TYPE_CHECKING:
    from backpack.extensions.backprop_extension import BackpropExtension

__all__ = ["BackpackEstimator", "kronecker_diagonal"]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` torch's default for the duration (restored afterwards).

    BackPACK 1.7.1 builds the transposed convolution that applies an average
    pooling layer's Jacobian in the default dtype, so AvgPool layers fail on
    float64 models ("expected scalar type Double but found Float") unless the
    default matches the model's.
    """
    old = torch.get_default_dtype()
    if dtype not in (torch.float32, torch.float64) or dtype == old:
        yield
        return
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _supported_types(ext: BackpropExtension) -> set[type] | None:
    """The layer types ``ext`` handles; None where BackPACK no longer exposes them."""
    # BackPACK keeps its layer table private (a name-mangled attribute); should a
    # release rename it, BackPACK's own NotImplementedError refuses unknown layers.
    table = getattr(ext, "_BackpropExtension__module_extensions", None)
    if not isinstance(table, dict):
        return None
    return {t for t in table if isinstance(t, type) and issubclass(t, nn.Module)}


class BackpackEstimator(LayerwiseEstimator):
    """A BackPACK extension run on a deep copy of an ``nn.Sequential`` model.

    The module imports without BackPACK (so that it can be collected and
    documented anywhere); :mod:`hessbench.estimators.peers` registers the
    subclasses only when BackPACK imports, after checking :attr:`requires`.

    Subclasses set :attr:`extension_name` and implement :meth:`_extension` and,
    when BackPACK's stored quantity is not already the diagonal, :meth:`_diagonal`.
    The model must be an ``nn.Sequential`` that hessbench's layer table accepts,
    whose layers BackPACK's extension also handles (``Identity`` and eval-mode
    ``Dropout`` are skipped: they compute the identity).
    """

    graph_capable: ClassVar[bool] = False  # the library needs an nn.Sequential

    uses_model_forward: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = (
        "backpack:backpack",
        "backpack:extend",
        "backpack.context:CTX",
    )
    extension_name: ClassVar[str]
    groups_supported: ClassVar[bool] = True
    plain_losses_only: ClassVar[bool] = True

    @abc.abstractmethod
    def _extension(self) -> BackpropExtension:
        """A fresh BackPACK extension object."""

    def _diagonal(self, value: object, param: Tensor) -> Tensor:
        """The diagonal from what BackPACK stored on ``param`` (default: itself)."""
        assert isinstance(value, Tensor)
        return value

    def _check_plan(self, plan: Plan, ext: BackpropExtension) -> None:
        supported = _supported_types(ext)
        check_layer_types(
            plan,
            {type(st.module) for st in plan.steps} if supported is None else supported,
            f"BackPACK's {self.extension_name}",
            groups=self.groups_supported,
        )

    def _check_model(self, model: nn.Module, loss: LossSpec) -> None:
        """Also refuse layers that BackPACK's extension does not handle."""
        self._check_plan(build_plan(model), self._extension())

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        plan = build_plan(model)
        ext = self._extension()
        self._check_plan(plan, ext)
        params = trainable_parameters(model)
        if self.stochastic and not has_active_dropout(model):
            # BackPACK samples from the global RNG: seed it from the generator. With
            # active dropout __call__ has already seeded it (the masks come first).
            assert generator is not None
            with seeded_global_rng(generator, inputs.device):
                stored = self._run(plan, model, loss, inputs, targets, ext)
        else:
            stored = self._run(plan, model, loss, inputs, targets, ext)
        return finalize(params, {n: self._diagonal(stored[n], params[n]) for n in params})

    @staticmethod
    def _run(
        plan: Plan,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        ext: BackpropExtension,
    ) -> dict[str, object]:
        """What BackPACK stores on each trainable parameter of an extended copy."""
        from backpack import backpack, extend
        from backpack.context import CTX

        twin = copy.deepcopy(model)
        n_handles = len(CTX.hook_handles)
        try:
            loss_fn = extend(loss_module(loss))
            extend(twin)
            with library_errors(f"BackPACK's {type(ext).__name__}"):
                out = run_steps(plan, twin, inputs)
                loss.check_targets(out, targets)
                value = loss_fn(out, targets)
                with quiet_backward_hooks(), backpack(ext), _default_dtype(out.dtype):
                    value.backward()
            return {
                n: getattr(p, ext.savefield) for n, p in twin.named_parameters() if p.requires_grad
            }
        finally:
            for handle in CTX.hook_handles[n_handles:]:
                handle.remove()
            del CTX.hook_handles[n_handles:]


def kronecker_diagonal(factors: list[Tensor], param: Tensor) -> Tensor:
    """The diagonal of ``factors[0] (x) factors[1] (x) ...`` shaped like ``param``."""
    diag = factors[0].diagonal()
    for f in factors[1:]:
        diag = torch.outer(diag, f.diagonal()).flatten()
    return diag.reshape(param.shape)
