"""Optimizers built on the estimators, for the ``train`` benchmarks.

>>> from hessbench.optim import available_optimizers
>>> "adahesscale" in available_optimizers()
True
"""

from hessbench.errors import DivergenceError
from hessbench.optim.diagonal import DiagonalOptimizer
from hessbench.optim.presets import (
    PRESETS,
    AdamPreset,
    DiagonalPreset,
    SGDPreset,
    available_optimizers,
    make_stepper,
    preset,
)
from hessbench.optim.stepper import DiagonalStepper, Stepper, TorchStepper

__all__ = [
    "PRESETS",
    "AdamPreset",
    "DiagonalOptimizer",
    "DiagonalPreset",
    "DiagonalStepper",
    "DivergenceError",
    "SGDPreset",
    "Stepper",
    "TorchStepper",
    "available_optimizers",
    "make_stepper",
    "preset",
]
