"""The diagonal of curvlinops' K-FAC linear operator (``KFACLinearOperator``)."""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from hessbench.estimators._base import (
    Count,
    estimator_dataclass,
    finalize,
    trainable_parameters,
)
from hessbench.estimators._layers import RULES
from hessbench.estimators._layerwise import LayerwiseEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan, build_plan
from hessbench.estimators.peers._common import (
    check_layer_types,
    draw_seed,
    library_errors,
    loss_module,
    rng_restored,
    run_steps,
)

__all__ = ["CurvlinopsKFAC"]

# curvlinops handles the parameters of Linear and Conv2d layers only; the rest of
# hessbench's table is parameter-free and reached by autograd.
_SUPPORTED = {t for t in RULES if t is not nn.Conv1d}


@estimator_dataclass
class CurvlinopsKFAC(LayerwiseEstimator):
    r"""The diagonal of curvlinops' ``KFACLinearOperator``: hessbench's ``kfac``.

    Library: curvlinops (``curvlinops-for-pytorch``),
    ``KFACLinearOperator(model, loss, params, [(x, y)], fisher_type=..., mc_samples=k,
    kfac_approx="expand", seed=...)``, run on a deep copy of the model (it installs
    hooks while it computes the factors). The Kronecker factors come from its
    public ``compute_kronecker_factors()`` and ``state_dict()``; the diagonal of
    ``A (x) G`` is ``diag(G)_o diag(A)_i`` for a weight, ``diag(G)`` for a bias
    (weights and biases kept separate, curvlinops' default).

    Known deviations: none found against hessbench's ``kfac`` (same KFAC-expand
    convention for convolutions: ``A`` averaged over the ``N P`` patches, ``G``
    summed over positions of per-position outer products); with
    ``backward="exact"`` (curvlinops' type-2 Fisher) the two agree to round-off,
    Linear and Conv2d alike. Conv1d and grouped convolutions are refused
    (curvlinops handles Linear and Conv2d only, and averages grouped patches).

    Randomness (``backward="mc"``): curvlinops draws the labels from its own
    ``torch.Generator``, seeded with a number drawn from the caller's generator.
    The draws are not the ones ``kfac`` makes from the same generator.

    Args:
        backward: ``mc`` (curvlinops' ``FisherType.MC``) or ``exact``
            (``FisherType.TYPE2``: the columns of the loss Hessian's factor).
        num_samples: MC samples for ``backward="mc"`` (ignored for ``exact``).

    Reference: Martens & Grosse (ICML 2015); Grosse & Martens (ICML 2016);
    Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern
    Neural Network Architectures" (NeurIPS 2023) for expand/reduce.
    """

    graph_capable: ClassVar[bool] = False  # the library needs an nn.Sequential

    name: ClassVar[str] = "curvlinops.kfac"
    cost: ClassVar[str] = "~1 backprop + k (or C) backprops (curvlinops)"
    uses_model_forward: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("curvlinops:KFACLinearOperator",)
    plain_losses_only: ClassVar[bool] = True
    backward: Literal["mc", "exact"] = "mc"
    num_samples: Count = 1

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Only the Monte-Carlo labels depend on the generator."""
        return self.backward == "mc"

    @staticmethod
    def _check_plan(plan: Plan) -> None:
        check_layer_types(plan, _SUPPORTED, "curvlinops' KFACLinearOperator", groups=False)

    def _check_model(self, model: nn.Module, loss: LossSpec) -> None:
        """Also refuse Conv1d and grouped convolutions."""
        self._check_plan(build_plan(model))

    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        from curvlinops import KFACLinearOperator

        plan = build_plan(model)
        self._check_plan(plan)
        params = trainable_parameters(model)
        twin = copy.deepcopy(model)
        # Check inputs, output and targets with the RNG put back afterwards, so that
        # curvlinops' own forward draws the dropout masks hessbench's other paths see.
        with torch.no_grad(), rng_restored(inputs.device):
            out = run_steps(plan, twin, inputs)
        loss.check_targets(out, targets)
        seed = 0
        if self.backward == "mc":
            assert generator is not None
            seed = draw_seed(generator)
        twin_params = dict(twin.named_parameters())
        with library_errors("curvlinops' KFACLinearOperator"):
            op = KFACLinearOperator(
                twin,
                loss_module(loss),
                [twin_params[n] for n in params],
                [(inputs, targets)],
                check_deterministic=False,
                seed=seed,
                fisher_type="mc" if self.backward == "mc" else "type-2",
                mc_samples=self.num_samples if self.backward == "mc" else 1,
                kfac_approx="expand",
                num_per_example_loss_terms=1,
                num_data=inputs.shape[0],
            )
            op.compute_kronecker_factors()
            state = op.state_dict()
        inputs_cov, grads_cov = state["input_covariances"], state["gradient_covariances"]
        result = {}
        for name, p in params.items():
            layer, kind = name.rsplit(".", 1)
            g = grads_cov[layer].diagonal()
            if kind == "weight":
                a = inputs_cov[layer].diagonal()
                result[name] = torch.outer(g, a).reshape(p.shape)
            else:
                result[name] = g
        return finalize(params, result)
