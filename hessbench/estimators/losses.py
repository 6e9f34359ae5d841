"""Loss modules that hessbench's estimators understand beyond torch's own.

:class:`WeightedCrossEntropyLoss` is cross-entropy with one weight per sample,
``L = c * sum_n w_n CE(z_n, y_n)`` (``c = 1/N`` for ``reduction="mean"``, ``1``
for ``"sum"``), set per batch with :meth:`~WeightedCrossEntropyLoss.set_weights`.
With ``w_n`` the advantages it is the actor loss of policy-gradient methods
(A2C's ``-sum_n A_n log pi(a_n | s_n)``), and every estimator sees that loss
exactly: the closed forms of ``hessbench.estimators._losses`` scale by ``w_n``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessbench.errors import InputError

__all__ = ["WeightedCrossEntropyLoss"]


class WeightedCrossEntropyLoss(nn.CrossEntropyLoss):
    """Cross-entropy with per-sample weights (any sign), set per batch.

    Args:
        reduction: ``"mean"`` (``c = 1/N``, like ``nn.CrossEntropyLoss``) or ``"sum"``.

    Example:
        >>> import torch
        >>> loss_fn = WeightedCrossEntropyLoss().set_weights(torch.tensor([1.0, -2.0]))
        >>> z, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> round(float(loss_fn(z, y)), 4)  # (1 - 2) / 2 * log 3
        -0.5493
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.sample_weights: Tensor | None = None

    def set_weights(self, weights: Tensor) -> WeightedCrossEntropyLoss:
        """Use ``weights`` (shape ``(N,)``, finite, detached) for the next batches; returns self."""
        if not isinstance(weights, Tensor) or weights.dim() != 1:
            raise InputError("per-sample weights must be a 1-D tensor")
        if not bool(torch.isfinite(weights).all()):
            raise InputError("per-sample weights contain NaN or infinity")
        self.sample_weights = weights.detach()
        return self

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """``c * sum_n w_n CE(input_n, target_n)``."""
        w = self.sample_weights
        if w is None or w.shape != input.shape[:1]:
            got = "none" if w is None else tuple(w.shape)
            raise InputError(
                f"WeightedCrossEntropyLoss needs weights of shape ({input.shape[0]},) "
                f"(call set_weights first), got {got}"
            )
        per = F.cross_entropy(input, target, reduction="none")
        total = (per * w.to(per)).sum()
        return total / input.shape[0] if self.reduction == "mean" else total
