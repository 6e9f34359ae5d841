"""BackPACK's Monte-Carlo GGN diagonal (``DiagGGNMC``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from hessbench.estimators._base import Count, estimator_dataclass
from hessbench.estimators.peers._backpack import BackpackEstimator

if TYPE_CHECKING:
    from backpack.extensions.backprop_extension import BackpropExtension

__all__ = ["BackpackDiagGGNMC"]


@estimator_dataclass
class BackpackDiagGGNMC(BackpackEstimator):
    r"""BackPACK's ``DiagGGNMC``: the Monte-Carlo GGN diagonal, hessbench's ``ggn_mc``.

    Library: BackPACK (``backpack-for-pytorch``),
    ``backpack.extensions.DiagGGNMC(mc_samples=num_samples)``, run on a deep copy
    of the model. Quantity: ``sum_n mean_k (c^(1/2) J_n^T grad_z l(z_n, y_hat_nk))^2``
    with labels drawn from the model's predictive distribution (categorical for
    cross-entropy, ``N(z, I/2)`` for MSE); its expectation is the exact GGN
    diagonal.

    Randomness: BackPACK draws the labels from the global RNG (``torch.distributions``);
    it is seeded from the caller's generator for the call and restored afterwards,
    so equal generators give equal estimates. The draws are not the ones
    ``ggn_mc`` makes from the same generator: the two agree in distribution, not
    sample by sample.

    Known deviations: none in the quantity. Layers as ``backpack.diag_ggn_exact``.
    Cost includes a ``copy.deepcopy`` of the model per call.

    Args:
        num_samples: MC samples ``k`` per data point (BackPACK's ``mc_samples``).

    Reference: Dangel, Kunstner & Hennig, "BackPACK" (ICLR 2020).
    """

    name: ClassVar[str] = "backpack.diag_ggn_mc"
    cost: ClassVar[str] = "k backprops (BackPACK)"
    stochastic: ClassVar[bool] = True
    extension_name: ClassVar[str] = "DiagGGNMC"
    requires: ClassVar[tuple[str, ...]] = (
        *BackpackEstimator.requires,
        "backpack.extensions:DiagGGNMC",
    )
    num_samples: Count = 1

    def _extension(self) -> BackpropExtension:
        from backpack.extensions import DiagGGNMC

        return DiagGGNMC(mc_samples=self.num_samples)
