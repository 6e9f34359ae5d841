"""BackPACK's exact Hessian diagonal (``DiagHessian``)."""

from __future__ import annotations

from typing import ClassVar

from backpack.extensions import DiagHessian

from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators.peers._backpack import BackpackEstimator

__all__ = ["BackpackDiagHessian"]


@register
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
    handles (no Softplus; ``Identity`` is skipped); grouped convolutions are
    BackPACK's own. Cost includes a ``copy.deepcopy`` of the model per call.

    Reference: Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop"
    (ICLR 2020).
    """

    name: ClassVar[str] = "backpack.diag_hessian"
    cost: ClassVar[str] = "~1 backprop + C + sum of curved widths columns (BackPACK)"
    extension_name: ClassVar[str] = "DiagHessian"

    def _extension(self) -> DiagHessian:
        return DiagHessian()
