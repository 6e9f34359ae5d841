"""curvlinops' XDiag diagonal estimator on its Hessian linear operator."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from hessbench.errors import UnsupportedError
from hessbench.estimators._autograd import differentiable_attention
from hessbench.estimators._base import (
    Estimator,
    estimator_dataclass,
    finalize,
    trainable_parameters,
)
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import check_output
from hessbench.estimators.peers._common import (
    library_errors,
    loss_module,
    quiet_jvp_import,
    rng_restored,
    seeded_global_rng,
)
from hessbench.estimators.peers.curvlinops_hutchinson import (
    _refuse_layer_norm_weights,
    _refuse_training_mode_batch_layers,
)
from hessbench.estimators.xdiag import EvenCount

__all__ = ["CurvlinopsXDiag"]


@estimator_dataclass
class CurvlinopsXDiag(Estimator):
    r"""curvlinops' ``xdiag`` of its ``HessianLinearOperator``: hessbench's ``xdiag``.

    Library: curvlinops (``curvlinops-for-pytorch``):
    ``xdiag(HessianLinearOperator(model, loss, params, [(x, y)]), m)``, Epperly,
    Tropp & Webber's XDiag with ``m/2`` Rademacher test vectors; products by
    ``torch.func`` on the caller's model (functional calls: no hooks, no ``.grad``).

    Randomness: curvlinops draws its test vectors from the global RNG; it is
    seeded from the caller's generator for the call (one draw) and restored
    afterwards. Given the same test vectors its result equals
    :func:`hessbench.estimators.xdiag.xdiag_from_probes` to rounding
    (``tests/test_peers.py``); hessbench's ``xdiag`` draws other vectors from the
    same generator, so the two agree in distribution, not draw by draw.

    Known deviations: curvlinops refuses ``m`` at or above the number of
    parameter entries ``P`` (hessbench's ``xdiag`` is exact there), and inverts
    ``R`` without a rank check (a Hessian of rank below ``m/2`` gives a singular
    ``R``: NaN or inaccurate results, where hessbench's ``xdiag`` is exact).
    Training-mode dropout and batch normalisation are refused, and so is an affine
    ``LayerNorm`` while curvlinops' products are wrong there (as for
    ``curvlinops.hutchinson``). One extra
    no-grad forward pass checks inputs, targets and output.

    Args:
        num_matvecs: budget ``m`` of Hessian-vector products (even, ``< P``).

    Reference: Epperly, Tropp & Webber, SIMAX 2024; Dangel, Kunstner & Hennig's curvlinops.
    """

    name: ClassVar[str] = "curvlinops.xdiag"
    cost: ClassVar[str] = "m HVPs (curvlinops, torch.func)"
    stochastic: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("curvlinops:HessianLinearOperator", "curvlinops:xdiag")
    plain_losses_only: ClassVar[bool] = True
    num_matvecs: EvenCount = 2

    @property
    def sample_param(self) -> str | None:
        """A sweep varies the budget ``num_matvecs``."""
        return "num_matvecs"

    def _check_model(self, model: nn.Module, loss: LossSpec) -> None:
        _refuse_layer_norm_weights(model)

    @differentiable_attention  # the fused attention kernels have no forward-mode AD rule
    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        from curvlinops import HessianLinearOperator, xdiag

        assert generator is not None
        _refuse_training_mode_batch_layers(model)
        _refuse_layer_norm_weights(model)
        params = trainable_parameters(model)
        dim = sum(p.numel() for p in params.values())
        if self.num_matvecs >= dim:
            raise UnsupportedError(
                f"curvlinops' xdiag needs num_matvecs below the number of parameter entries "
                f"({self.num_matvecs} >= {dim}); hessbench's xdiag takes any budget"
            )
        with torch.no_grad(), rng_restored(inputs.device):
            out = model(inputs)
        check_output(model, out)
        loss.check_targets(out, targets)
        with library_errors("curvlinops' xdiag"):
            op = HessianLinearOperator(
                model,
                loss_module(loss),
                list(params.values()),
                [(inputs, targets)],
                check_deterministic=False,
                num_data=inputs.shape[0],
            )
            with seeded_global_rng(generator, inputs.device), quiet_jvp_import():
                flat = xdiag(op, self.num_matvecs)
        parts = flat.split([p.numel() for p in params.values()])
        result = {n: v.view_as(p) for (n, p), v in zip(params.items(), parts, strict=True)}
        return finalize(params, result)
