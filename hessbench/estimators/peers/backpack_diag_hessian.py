"""BackPACK's exact Hessian diagonal (``DiagHessian``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from hessbench.estimators._base import estimator_dataclass
from hessbench.estimators.peers._backpack import BackpackEstimator

if TYPE_CHECKING:
    from backpack.extensions.backprop_extension import BackpropExtension

__all__ = ["BackpackDiagHessian"]


@estimator_dataclass
class BackpackDiagHessian(BackpackEstimator):
    r"""BackPACK's ``DiagHessian``: the exact Hessian diagonal, hessbench's ``exact``.

    Library: BackPACK (``backpack-for-pytorch``), ``backpack.extensions.DiagHessian``,
    run on a deep copy of the model. Quantity: ``diag nabla^2_theta L``, by
    backpropagating symmetric factors of the output Hessian and of each curved
    activation's residual (the method hessbench's ``exact[method=structured]``
    follows).

    Known deviations: none in the quantity (equal to ``exact`` to round-off in
    float64). Layers: those of hessbench's table that BackPACK's DiagHessian also
    handles (no Softplus; ``Identity`` and eval-mode ``Dropout`` are not called).
    BackPACK 1.7.1 fails on average pooling in float64 unless torch's default
    dtype is float64 (it builds a transposed convolution in the default dtype):
    the wrapper sets the default to the model's dtype for the backward pass. Cost
    includes a ``copy.deepcopy`` of the model per call.

    Reference: Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop"
    (ICLR 2020).
    """

    name: ClassVar[str] = "backpack.diag_hessian"
    cost: ClassVar[str] = "1 pass of C + curved widths columns (BackPACK)"
    extension_name: ClassVar[str] = "DiagHessian"
    requires: ClassVar[tuple[str, ...]] = (
        *BackpackEstimator.requires,
        "backpack.extensions:DiagHessian",
    )

    def _extension(self) -> BackpropExtension:
        from backpack.extensions import DiagHessian

        return DiagHessian()
