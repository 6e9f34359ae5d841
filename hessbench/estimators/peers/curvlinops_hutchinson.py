"""curvlinops' Hutchinson diagonal estimator on its Hessian linear operator."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor, nn

from hessbench.errors import UnsupportedError
from hessbench.estimators._autograd import Probes, autograd_hvp, differentiable_attention
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


@functools.cache
def layer_norm_hvp_error() -> float:
    """Relative error of curvlinops' Hessian-vector product on a net with an affine LayerNorm.

    ``Linear(3, 4) - LayerNorm(4) - Linear(4, 2)``, cross-entropy, float64: the
    largest entry of ``|H v - H v (autograd)|`` over ``max |H v (autograd)|`` for one
    fixed ``v``, where the reference is plain double backpropagation (the products
    of hessbench's own ``hutchinson`` on such models, ``autograd_hvp``). Measured once
    per process, the first time a model with an affine LayerNorm meets a
    curvlinops peer (1.4-1.9 s: curvlinops' first products load torch.func's
    decompositions). With torch 2.13
    and curvlinops 3.0.1 it is 0.73: the operator, ``torch.func.vmap`` over ``jvp``
    of the gradient, gets the rows of a LayerNorm weight wrong (their diagonal
    entries are right); without the weight it is 2e-15.
    """
    from curvlinops import HessianLinearOperator

    f64 = torch.float64
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(f64)
        x = torch.randn(2, 3, dtype=f64)
    with torch.no_grad():  # a non-trivial affine part
        model[1].weight.copy_(torch.linspace(0.5, 1.5, 4, dtype=f64))
        model[1].bias.copy_(torch.linspace(-0.5, 0.5, 4, dtype=f64))
    y = torch.tensor([0, 1])
    loss_fn = nn.CrossEntropyLoss()
    params, product = autograd_hvp(model, LossSpec.of(loss_fn), x, y)  # hessbench's own
    plist = list(params.values())
    v = torch.linspace(-1.0, 1.0, sum(p.numel() for p in plist), dtype=f64)
    with quiet_jvp_import():
        op = HessianLinearOperator(
            model, loss_fn, plist, [(x, y)], check_deterministic=False, num_data=2
        )
        theirs = op @ v
    parts = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in plist]), plist, strict=True)]
    ours = torch.cat([h.reshape(-1) for h in product(parts, last=True)])
    return float((theirs - ours).abs().max() / ours.abs().max())


def _refuse_layer_norm_weights(model: nn.Module) -> None:
    """Refuse an affine LayerNorm while curvlinops' products are wrong there (this torch)."""
    for path, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and m.weight is not None:
            err = layer_norm_hvp_error()
            if err > 1e-8:
                raise UnsupportedError(
                    f"layer '{path}' (LayerNorm with a weight): with torch {torch.__version__}, "
                    "curvlinops' Hessian-vector products are wrong on the rows of a LayerNorm "
                    f"weight (relative error {err:.2g} on a test net; torch.func's vmap over "
                    "layer_norm's double backward, pytorch/functorch#534); hessbench's "
                    "hutchinson and xdiag multiply by plain double backpropagation there"
                )
            return


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
    Training-mode dropout and batch normalisation are refused, and so is a model
    with an affine ``LayerNorm`` while curvlinops' products are wrong there
    (:func:`layer_norm_hvp_error`, measured at first use). The call includes
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
        from curvlinops import HessianLinearOperator, hutchinson_diag

        assert generator is not None
        _refuse_training_mode_batch_layers(model)
        _refuse_layer_norm_weights(model)
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
