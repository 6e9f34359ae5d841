"""What a suite says about an optimizer: a preset name, a learning-rate grid, overrides.

Shared by every suite kind that trains (``kind: train``, ``kind: rl``): the schema
of one ``optimizers:`` entry, checked by building the preset on a tiny model, and
the one way a learning rate is written in run ids and tables.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any

import torch
from pydantic import Discriminator, Field, Tag, model_validator

from hessbench.errors import HessbenchError
from hessbench.optim.presets import available_optimizers, make_stepper
from hessbench.suite.parsing import Name, Problems, StrictModel, custom_error, fail, repeats

__all__ = ["OptimizerSpec", "check_optimizer", "format_lr", "known_optimizers"]


@functools.lru_cache(maxsize=1)
def known_optimizers() -> tuple[str, ...]:
    """Every optimizer name a train suite may use, sorted."""
    return tuple(sorted(available_optimizers()))


def format_lr(lr: float) -> str:
    """A learning rate as it appears in run ids and tables: ``0.001``, ``3e-05``."""
    return format(lr, "g")


def _lr_tag(value: object) -> str:
    return "list" if isinstance(value, list) else "one"


LrGrid = Annotated[
    Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Tag("list")]
    | Annotated[Annotated[float, Field(gt=0, allow_inf_nan=False)], Tag("one")],
    Discriminator(_lr_tag),
]


class OptimizerSpec(StrictModel):
    """An optimizer preset, its learning-rate grid and hyper-parameter overrides."""

    name: str
    lr: LrGrid
    params: dict[str, Any] = Field(default_factory=dict)
    label: Name | None = None

    @property
    def lrs(self) -> list[float]:
        """The learning rates, as given."""
        return list(self.lr) if isinstance(self.lr, list) else [float(self.lr)]

    @property
    def display(self) -> str:
        """``label``, else the name with the overrides: ``adahesscale[beta2=0.99]``."""
        if self.label:
            return self.label
        if not self.params:
            return self.name
        shown = (f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in self.params.items())
        return f"{self.name}[{','.join(shown)}]"

    @model_validator(mode="after")
    def _check(self) -> OptimizerSpec:
        problems: Problems = {}
        lrs = self.lrs
        if not lrs:
            problems["lr",] = "an empty learning-rate grid"
        shown = [format_lr(v) for v in lrs]
        for i in repeats(shown):
            problems["lr", i] = f"learning rate {shown[i]} appears twice"
        known = known_optimizers()
        if self.name not in known:
            raise custom_error(f"unknown optimizer {self.name!r}; available: {', '.join(known)}")
        if "lr" in self.params:
            problems["params", "lr"] = "give learning rates in the lr field"
        if not problems:
            problem = check_optimizer(self.name, lrs[0], self.params)
            if problem:
                problems["params",] = problem
        fail(problems.items())
        return self


def check_optimizer(name: str, lr: float, params: dict) -> str | None:
    """Why ``make_stepper(name, ..., lr, **params)`` fails on a tiny model; None if it builds."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    with torch.random.fork_rng(devices=[]):
        try:
            make_stepper(name, model, torch.nn.MSELoss(), lr, **params)
        except (HessbenchError, TypeError, ValueError) as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
