"""The diagonal of BackPACK's K-FAC (``KFAC``) and KFLR (``KFLR``) approximations."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from torch import Tensor

from hessbench.estimators._base import Count, estimator_dataclass
from hessbench.estimators.peers._backpack import BackpackEstimator, kronecker_diagonal

if TYPE_CHECKING:
    from backpack.extensions.backprop_extension import BackpropExtension

__all__ = ["BackpackKFAC"]


@estimator_dataclass
class BackpackKFAC(BackpackEstimator):
    r"""The diagonal of BackPACK's Kronecker factors: ``KFAC`` (MC) or ``KFLR`` (exact).

    Library: BackPACK (``backpack-for-pytorch``),
    ``backpack.extensions.KFAC(mc_samples=num_samples)`` for ``backward="mc"`` and
    ``backpack.extensions.KFLR()`` for ``backward="exact"``, run on a deep copy of
    the model. BackPACK stores ``[G, A]`` for a weight and ``[G]`` for a bias;
    the diagonal of ``G (x) A`` is ``diag(G)_o diag(A)_i``, the bias gets
    ``diag(G)``. Compare with hessbench's ``kfac`` (same ``backward`` values).

    Known deviations from hessbench's ``kfac`` (asserted in ``tests/test_peers.py``):

    - Linear layers: none; ``backward="exact"`` equals ``kfac[backward=exact]`` to
      round-off.
    - Convolutions: BackPACK's input factor is ``A = 1/N sum_{n,p} a a^T``, not
      divided by the number ``P`` of output positions (its source marks this
      with a TODO), and its output factor sums the backpropagated vectors over
      positions before the outer product, ``G = sum_{n,k} (sum_p s_p)(sum_p s_p)^T``
      (so the bias entry of KFLR is the exact GGN diagonal of the bias),
      where hessbench's KFAC-expand convention uses ``sum_{n,k,p} s_p s_p^T``.
      The weight entries are therefore ``P`` times larger through ``A``, times a
      position-dependent ratio through ``G``.
    - Grouped convolutions are refused (BackPACK raises for ``groups != 1``).

    Randomness (``backward="mc"``): labels from the global RNG, seeded from the
    caller's generator for the call and restored afterwards.

    Args:
        backward: ``mc`` (K-FAC, sampled labels) or ``exact`` (KFLR).
        num_samples: MC samples for ``backward="mc"`` (ignored for ``exact``).

    Reference: Dangel, Kunstner & Hennig, "BackPACK" (ICLR 2020); Martens &
    Grosse (ICML 2015); Botev, Ritter & Barber (ICML 2017).
    """

    name: ClassVar[str] = "backpack.kfac"
    cost: ClassVar[str] = "~1 backprop + k (or C) columns (BackPACK)"
    groups_supported: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = (
        *BackpackEstimator.requires,
        "backpack.extensions:KFAC",
        "backpack.extensions:KFLR",
    )
    backward: Literal["mc", "exact"] = "mc"
    num_samples: Count = 1

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Only the Monte-Carlo backward vectors depend on the generator."""
        return self.backward == "mc"

    @property
    def extension_name(self) -> str:  # type: ignore[override]
        """BackPACK's extension: ``KFAC`` or ``KFLR``."""
        return "KFAC" if self.backward == "mc" else "KFLR"

    def _extension(self) -> BackpropExtension:
        from backpack.extensions import KFAC, KFLR

        return KFAC(mc_samples=self.num_samples) if self.backward == "mc" else KFLR()

    def _diagonal(self, value: object, param: Tensor) -> Tensor:
        assert isinstance(value, list)
        return kronecker_diagonal(value, param)
