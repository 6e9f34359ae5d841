"""BackPACK's exact GGN diagonal (``DiagGGNExact``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from hessbench.estimators._base import estimator_dataclass
from hessbench.estimators.peers._backpack import BackpackEstimator

if TYPE_CHECKING:
    from backpack.extensions.backprop_extension import BackpropExtension

__all__ = ["BackpackDiagGGNExact"]


@estimator_dataclass
class BackpackDiagGGNExact(BackpackEstimator):
    r"""BackPACK's ``DiagGGNExact``: the exact GGN diagonal, hessbench's ``ggn_exact``.

    Library: BackPACK (``backpack-for-pytorch``), ``backpack.extensions.DiagGGNExact``,
    run on a deep copy of the model. Quantity: ``diag(J^T (nabla^2_z L) J)``,
    backpropagating the ``C`` columns of a symmetric factor of the loss Hessian.

    Known deviations: none in the quantity (equal to ``ggn_exact`` to round-off in
    float64). Layers: those of hessbench's table that BackPACK's DiagGGNExact also
    handles (no Softplus). Cost includes a ``copy.deepcopy`` of the model per call.

    Reference: Dangel, Kunstner & Hennig, "BackPACK" (ICLR 2020).
    """

    name: ClassVar[str] = "backpack.diag_ggn_exact"
    cost: ClassVar[str] = "O(C) backprops (BackPACK)"
    extension_name: ClassVar[str] = "DiagGGNExact"
    requires: ClassVar[tuple[str, ...]] = (
        *BackpackEstimator.requires,
        "backpack.extensions:DiagGGNExact",
    )

    def _extension(self) -> BackpropExtension:
        from backpack.extensions import DiagGGNExact

        return DiagGGNExact()
