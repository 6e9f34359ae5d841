"""The rl-suite schema: ``kind: rl`` YAML files parsed into frozen pydantic models.

Unknown fields are refused; a malformed file raises
:class:`~hessbench.suite.SuiteError` with one line per problem,
``FILE: field.path: message``. Field reference: ``docs/rl.md``.

>>> suite = parse_rl_suite('''
... kind: rl
... name: demo
... optimizers:
...   - {name: adam, lr: [0.001, 0.003]}
... seeds: 1
... total_steps: 1000
... eval_every: 500
... ''')
>>> [run.id for run in plan_rl_runs(suite)]
['CartPole-v1/adam/lr=0.001/seed=0', 'CartPole-v1/adam/lr=0.003/seed=0']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from hessbench.optim.spec import OptimizerSpec, format_lr
from hessbench.suite.parsing import (
    Name,
    Problems,
    Seeds,
    StrictModel,
    fail,
    load_file,
    read_yaml,
    validate,
)

__all__ = ["ENVS", "RLRunSpec", "RLSuite", "load_rl_suite", "parse_rl_suite", "plan_rl_runs"]

ENVS = ("CartPole-v1", "Acrobot-v1")
"""Classic-control environments with discrete actions (A2C's categorical policy)."""


class RLSuite(StrictModel):
    """An A2C benchmark: one environment, optimizers x learning rates x seeds."""

    kind: Literal["rl"]
    name: Name
    description: str = ""
    env: Literal[ENVS] = "CartPole-v1"
    optimizers: list[OptimizerSpec] = Field(min_length=1)
    seeds: Seeds = 3
    total_steps: PositiveInt
    eval_every: PositiveInt
    num_envs: PositiveInt = 8
    n_steps: PositiveInt = 5
    gamma: float = Field(0.99, gt=0.0, le=1.0)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    critic_lr: Annotated[PositiveFloat, Field(allow_inf_nan=False)] = 1e-3
    normalize_advantages: bool = False
    return_window: PositiveInt = 10
    threads: PositiveInt = 1

    @property
    def seed_list(self) -> list[int]:
        """The seeds: the list as given, or ``range(n)`` for an integer ``n``."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def batch(self) -> int:
        """Transitions per update: ``num_envs * n_steps``."""
        return self.num_envs * self.n_steps

    @model_validator(mode="after")
    def _check(self) -> RLSuite:
        problems: Problems = {}
        if isinstance(self.seeds, list):
            if not self.seeds:
                problems["seeds",] = "an empty list of seeds"
            for i, s in enumerate(self.seeds):
                if s in self.seeds[:i]:
                    problems["seeds", i] = f"seed {s} appears twice"
        labels = [o.display for o in self.optimizers]
        for i, label in enumerate(labels):
            if label in labels[:i]:
                problems["optimizers", i] = (
                    f"label {label!r} again; give the entries different params or a label"
                )
        if self.total_steps < self.batch:
            problems["total_steps",] = (
                f"fewer than one update's {self.batch} transitions (num_envs * n_steps)"
            )
        if self.eval_every > self.total_steps:
            problems["eval_every",] = f"more than total_steps ({self.total_steps})"
        fail(problems.items())
        return self


@dataclass(frozen=True)
class RLRunSpec:
    """One A2C run: the suite, an optimizer entry, a learning rate and a seed."""

    suite: RLSuite
    optimizer: OptimizerSpec
    lr: float
    seed: int

    @property
    def id(self) -> str:
        """``env/label/lr=<lr>/seed=<seed>``, stable across runs."""
        return f"{self.suite.env}/{self.optimizer.display}/lr={format_lr(self.lr)}/seed={self.seed}"


def plan_rl_runs(suite: RLSuite) -> list[RLRunSpec]:
    """Every run, in the order optimizer, learning rate, seed (pure and cheap)."""
    return [
        RLRunSpec(suite, opt, lr, seed)
        for opt in suite.optimizers
        for lr in opt.lrs
        for seed in suite.seed_list
    ]


def parse_rl_suite(text: str, source: str = "<suite>") -> RLSuite:
    """Parse and validate an rl suite from YAML text; ``source`` names it in messages.

    Raises:
        SuiteError: one line per problem, ``SOURCE: field.path: message``.
    """
    return validate(RLSuite, read_yaml(text, source), source)


def load_rl_suite(path: str | Path) -> RLSuite:
    """Read and validate the rl suite at ``path`` (see :func:`parse_rl_suite`)."""
    return load_file(path, parse_rl_suite)
