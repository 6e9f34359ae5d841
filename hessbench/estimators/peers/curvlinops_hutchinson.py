"""curvlinops' Hutchinson diagonal estimator on its Hessian linear operator."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from hessbench.errors import UnsupportedError
from hessbench.estimators._autograd import Probes
from hessbench.estimators._base import (
    Count,
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

__all__ = ["CurvlinopsHutchinson"]


def _refuse_training_mode_batch_layers(model: nn.Module) -> None:
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}) in training mode: curvlinops' Hessian "
                "operator multiplies under torch.func.vmap, which cannot update running "
                "statistics; call model.eval() first"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and 0 < m.p < 1:
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}) in training mode: curvlinops draws the "
                "probe vectors before the masks, so the mask would not be the one hessbench's "
                "other estimators see; call model.eval()"
            )


@estimator_dataclass
class CurvlinopsHutchinson(Estimator):
    r"""curvlinops' ``hutchinson_diag`` of its ``HessianLinearOperator``: hessbench's ``hutchinson``.

    Library: curvlinops (``curvlinops-for-pytorch``):
    ``hutchinson_diag(HessianLinearOperator(model, loss, params, [(x, y)]), k)``,
    ``mean_k z_k o (H z_k)`` with Rademacher ``z_k``; Hessian-vector products by
    ``torch.func`` (``jvp`` of ``jacrev``, ``vmap`` over the ``k`` probes). Works on
    any differentiable ``nn.Module``, on the caller's model (functional calls:
    no hooks, no ``.grad``).

    Randomness: curvlinops draws the probes from the global RNG; it is seeded from
    the caller's generator for the call and restored afterwards. The probes are
    not the ones ``hutchinson`` draws from the same generator: the two agree in
    distribution, not sample by sample.

    Known deviations: curvlinops refuses ``k`` at or above the number of
    parameter entries ``P``; hessbench then calls it on chunks of at most ``P - 1``
    probes and averages them (the same estimator; ``P = 1`` is refused).
    Training-mode dropout and batch normalisation are refused. The call includes
    one extra no-grad forward pass, to check the inputs, targets and output the
    way hessbench's own estimators do.

    Args:
        num_samples: number of probe vectors ``k``.
        probes: ``rademacher`` (default) or ``gaussian`` (curvlinops' ``normal``),
            as ``hutchinson``'s option; shown in the label only when not the default.

    Reference: Bekas, Kokiopoulou & Saad (2007); Dangel, Kunstner & Hennig's
    curvlinops.
    """

    name: ClassVar[str] = "curvlinops.hutchinson"
    cost: ClassVar[str] = "k HVPs (curvlinops, torch.func)"
    stochastic: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = (
        "curvlinops:HessianLinearOperator",
        "curvlinops:hutchinson_diag",
    )
    quiet_fields: ClassVar[tuple[str, ...]] = ("probes",)
    plain_losses_only: ClassVar[bool] = True
    num_samples: Count = 1
    probes: Probes = "rademacher"

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        from curvlinops import HessianLinearOperator, hutchinson_diag

        assert generator is not None
        _refuse_training_mode_batch_layers(model)
        params = trainable_parameters(model)
        dim = sum(p.numel() for p in params.values())
        if dim < 2:
            raise UnsupportedError(
                "curvlinops' hutchinson_diag needs at least two parameter entries"
            )
        with torch.no_grad(), rng_restored(inputs.device):
            out = model(inputs)
        check_output(model, out)
        loss.check_targets(out, targets)
        with library_errors("curvlinops' hutchinson_diag"):
            op = HessianLinearOperator(
                model,
                loss_module(loss),
                list(params.values()),
                [(inputs, targets)],
                check_deterministic=False,
                num_data=inputs.shape[0],
            )
            with seeded_global_rng(generator, inputs.device), quiet_jvp_import():
                total = torch.zeros(dim, dtype=op.dtype, device=op.device)
                distribution = "rademacher" if self.probes == "rademacher" else "normal"
                left = self.num_samples
                while left:
                    k = min(left, dim - 1)  # curvlinops wants fewer probes than entries
                    total.add_(hutchinson_diag(op, k, distribution), alpha=k)
                    left -= k
        flat = total.div_(self.num_samples)
        parts = flat.split([p.numel() for p in params.values()])
        result = {n: v.view_as(p) for (n, p), v in zip(params.items(), parts, strict=True)}
        return finalize(params, result)
