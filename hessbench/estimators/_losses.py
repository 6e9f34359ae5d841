"""The losses hessbench understands, in closed form.

For a batch of outputs ``z`` (``N`` samples) the loss is ``L = c * sum_n l(z_n, y_n)``
with ``c = 1`` for ``reduction="sum"`` and, for ``"mean"``, ``c = 1/N`` for
cross-entropy (``1 / sum_n w_{y_n}`` with class weights ``w``, as torch
normalises) and ``c = 1/numel(z)`` for the element-wise losses (torch averages
over every element). Everything works on the network output directly, without
autograd; ``p = softmax(z)``, ``s = sigmoid(z)``, ``r = z - y``:

| loss | ``d2L/dz2`` | symmetric factor | Monte-Carlo column (``k`` draws) |
|---|---|---|---|
| cross-entropy, NLL after ``LogSoftmax`` | ``c Q (diag p - p p^T)`` | ``sqrt(c Q) (diag sqrt(p) - p sqrt(p)^T)`` | ``sqrt(c Q / k) (p - e_yhat)``, ``yhat ~ Cat(p)`` |
| BCE with logits | ``c m diag(s (1 - s))`` | ``diag(sqrt(c m s (1 - s)))`` | ``sqrt(c m / k) (s - yhat)``, ``yhat ~ Bernoulli(s)`` |
| MSE | ``2c I`` | ``sqrt(2c) I`` | ``-sqrt(2c / k) eps``, ``eps ~ N(0, I)`` |
| Huber(delta), smooth L1(beta) | ``c kappa diag(1[abs(r) < t])`` | ``diag(sqrt(...))`` | ``-sqrt(c kappa / k) 1[abs(r) < t] eps`` |

``Q`` is the per-sample mass of the cross-entropy target distribution (class
weight of the true label, label smoothing, per-sample weight; 1 without options),
``m`` BCE's element mass ``w (1 - y + v y)`` (``weight`` ``w``, ``pos_weight`` ``v``);
``kappa = 1`` (Huber) or ``1/beta``, ``t = delta`` or ``beta``. The families live
in ``_losses_ce``, ``_losses_bce`` and ``_losses_regression`` (their docstrings
derive each rule); :class:`LossSpec` (``_losses_base``) is their interface.

Per-sample weights (:class:`hessbench.estimators.losses.WeightedCrossEntropyLoss`) make the loss
``L = c * sum_n w_n l(z_n, y_n)``: every closed form is scaled by ``w_n`` per
sample, and the square-root and Monte-Carlo factors by ``sqrt(w_n)``, which needs
``w_n >= 0``.
"""

from __future__ import annotations

from hessbench.estimators._losses_base import LossSpec, LossState
from hessbench.estimators._losses_bce import BCEWithLogitsSpec
from hessbench.estimators._losses_ce import CrossEntropySpec
from hessbench.estimators._losses_regression import RegressionSpec

__all__ = ["BCEWithLogitsSpec", "CrossEntropySpec", "LossSpec", "LossState", "RegressionSpec"]
