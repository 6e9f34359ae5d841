"""The per-layer rule table shared by every backprop-style estimator.

:data:`RULES` maps a layer type to its rule (see :mod:`hessbench.estimators._rules`
for what a rule knows); it is also the list of supported layers. Layer types
match exactly: subclasses of supported layers are refused.
"""

from __future__ import annotations

from torch import nn

from hessbench.estimators._rules import Elementwise, LinearMap, Parametric, Rule
from hessbench.estimators._rules_activations import (
    DropoutRule,
    ELURule,
    LeakyReLURule,
    LogSigmoidRule,
    ReLURule,
    SELURule,
    SigmoidRule,
    SoftplusRule,
    TanhRule,
)
from hessbench.estimators._rules_affine import ConvRule, LinearRule
from hessbench.estimators._rules_maps import AvgPoolRule, FlattenRule, IdentityRule, MaxPoolRule

__all__ = ["RULES", "Elementwise", "LinearMap", "Parametric", "Rule"]

RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Flatten: FlattenRule(),
    nn.MaxPool1d: MaxPoolRule(1),
    nn.MaxPool2d: MaxPoolRule(2),
    nn.AvgPool1d: AvgPoolRule(1),
    nn.AvgPool2d: AvgPoolRule(2),
    nn.Tanh: TanhRule(),
    nn.Sigmoid: SigmoidRule(),
    nn.ReLU: ReLURule(),
    nn.LeakyReLU: LeakyReLURule(),
    nn.ELU: ELURule(),
    nn.SELU: SELURule(),
    nn.Softplus: SoftplusRule(),
    nn.LogSigmoid: LogSigmoidRule(),
    nn.Dropout: DropoutRule(),
    nn.Identity: IdentityRule(),
}
"""Supported layer types (exact type match; subclasses are refused) and their rules."""
