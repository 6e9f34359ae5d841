"""Base class of estimators that run the layer-by-layer pass over ``nn.Sequential``."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from hessbench.estimators._base import Estimator
from hessbench.estimators._sequential import build_plan

__all__ = ["LayerwiseEstimator"]


class LayerwiseEstimator(Estimator):
    """An estimator that supports exactly the layers of the rule table.

    Supported: ``nn.Sequential`` (nested allowed) of Linear, Conv1d, Conv2d
    (stride, padding, dilation, groups), Tanh, Sigmoid, ReLU, LeakyReLU, ELU,
    SELU, Softplus, LogSigmoid, Flatten, MaxPool1d/2d, AvgPool1d/2d, Dropout and
    Identity; losses CrossEntropyLoss and MSELoss with ``mean`` or ``sum``.
    """

    uses_model_forward: ClassVar[bool] = False

    def check_supported(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().check_supported(model, loss_fn)
        build_plan(model)
