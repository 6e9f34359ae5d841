"""Hutchinson's unbiased stochastic estimator of the Hessian diagonal."""

from __future__ import annotations

from typing import ClassVar, Literal

import pydantic
import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import Probes, draw_probes, hvp_samples
from hessbench.estimators._base import Count, estimator_dataclass, register
from hessbench.estimators._hvp_pass import structured_hutchinson
from hessbench.estimators._layerwise import DualPathEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan

__all__ = ["Hutchinson"]


@register
@estimator_dataclass
class Hutchinson(DualPathEstimator):
    r"""``mean_k z_k o (H z_k)`` with Rademacher (or Gaussian) ``z_k``: unbiased for ``diag H``.

    ``E[z z^T] = I`` gives ``E[z o Hz] = diag H``; the variance of one sample's
    entry ``i`` is ``sum_{j != i} H_ij^2`` for Rademacher probes and
    ``sum_{j != i} H_ij^2 + 2 H_ii^2`` for Gaussian ones. Hessian-vector products
    by the R-operator pass over an ``nn.Sequential`` of supported layers, or by
    double backprop through the module's own ``forward`` (any differentiable
    ``nn.Module``).

    Args:
        num_samples: number of probe vectors ``k``.
        num_matvecs: the same count stated as a budget of Hessian-vector products
            (``k = num_matvecs``), so that ``hutchinson``, ``xdiag`` and ``diagpp``
            can be compared at equal cost; ``None`` (default) means ``num_samples``.
            Give one or the other.
        probes: ``rademacher`` (default) or ``gaussian``.
        method: ``auto``, ``structured`` (R-operator pass) or ``autograd``.

    Cost: ``k`` Hessian-vector products (about 2-3 backprops each). The gradient
    the products start from is handed back by :meth:`estimate_with_grad`.
    Reference: Hutchinson (1989); Bekas, Kokiopoulou & Saad (2007).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(2, 3), torch.tensor([0, 1])
        >>> est = Hutchinson(num_samples=10)
        >>> est.label
        'hutchinson[num_samples=10]'
        >>> est(model, nn.CrossEntropyLoss(), x, y)["0.weight"].shape
        torch.Size([4, 3])
        >>> Hutchinson(num_matvecs=10, probes="gaussian").label
        'hutchinson[probes=gaussian,num_matvecs=10]'
    """

    name: ClassVar[str] = "hutchinson"
    cost: ClassVar[str] = "k HVPs"
    stochastic: ClassVar[bool] = True
    passes_grad: ClassVar[bool] = True
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)
    quiet_fields: ClassVar[tuple[str, ...]] = ("probes", "num_matvecs")
    num_samples: Count = 1
    method: Literal["auto", "structured", "autograd"] = "auto"
    probes: Probes = "rademacher"
    num_matvecs: Count | None = None

    @pydantic.model_validator(mode="after")
    def _one_count(self):
        if self.num_matvecs is not None and self.num_samples != 1:
            raise ValueError("give num_samples or num_matvecs, not both")
        return self

    @property
    def samples(self) -> int:
        """The number of probes ``k``: ``num_matvecs`` when given, else ``num_samples``."""
        return self.num_matvecs if self.num_matvecs is not None else self.num_samples

    def _label_params(self) -> dict[str, object]:
        shown = super()._label_params()
        if self.num_matvecs is not None:
            shown.pop("num_samples", None)  # the count is num_matvecs
        return shown

    @property
    def sample_param(self) -> str | None:
        """``num_matvecs`` when the budget is given that way, else ``num_samples``."""
        return "num_matvecs" if self.num_matvecs is not None else "num_samples"

    @staticmethod
    def _combine(z: Tensor, hz: Tensor) -> Tensor:
        return z * hz

    def _structured(
        self,
        plan: Plan,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        return structured_hutchinson(
            plan,
            model,
            loss,
            inputs,
            targets,
            self.samples,
            generator,
            self._combine,
            extras,
            draw_probes(self.probes),
        )

    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        return hvp_samples(
            model,
            loss,
            inputs,
            targets,
            self.samples,
            generator,
            self._combine,
            extras,
            draw_probes(self.probes),
        )
