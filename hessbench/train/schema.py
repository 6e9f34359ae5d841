"""The train-suite schema: ``kind: train`` YAML files parsed into frozen pydantic models.

A train suite names one task (a model, a loss and data, as in an accuracy suite,
plus the ``teacher`` regression data that only training needs), optimizers each
with a learning-rate grid, seeds, a step budget and an evaluation interval.
Every model refuses unknown fields; a malformed file raises
:class:`~hessbench.suite.SuiteError` with one line per problem,
``FILE: field.path: message``. Field reference: ``docs/train.md``.

>>> suite = parse_train_suite('''
... kind: train
... name: demo
... task:
...   name: t
...   model: {kind: mlp, widths: [4]}
...   loss: {kind: mse}
...   data: {kind: teacher, input_shape: [3], output_dim: 2}
... optimizers:
...   - {name: sgd, lr: [0.01, 0.1]}
... seeds: 1
... steps: 10
... eval_every: 5
... ''')
>>> [run.id for run in plan_runs(suite)]
['t/sgd/lr=0.01/seed=0', 't/sgd/lr=0.1/seed=0']
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import Discriminator, Field, NonNegativeFloat, PositiveInt, Tag, model_validator

from hessbench.errors import HessbenchError
from hessbench.suite.models import Activation, ModelSpec
from hessbench.suite.parsing import (
    Name,
    Problems,
    StrictModel,
    custom_error,
    fail,
    load_file,
    read_yaml,
    repeats,
    validate,
)
from hessbench.suite.task import (
    DIGITS_EVAL,
    DIGITS_SAMPLES,
    DigitsData,
    Evaluation,
    LossConfig,
    SyntheticData,
    TaskSpec,
)

__all__ = [
    "OptimizerSpec",
    "RunSpec",
    "TeacherData",
    "TrainSuite",
    "TrainTask",
    "format_lr",
    "load_train_suite",
    "parse_train_suite",
    "plan_runs",
]


def _optim():
    """The optimizer package (imported late: it imports the estimators)."""
    import hessbench.optim

    return hessbench.optim


@functools.lru_cache(maxsize=1)
def known_optimizers() -> tuple[str, ...]:
    """Every optimizer name a train suite may use, sorted."""
    return tuple(sorted(_optim().available_optimizers()))


class TeacherData(StrictModel):
    """Regression targets from a fixed random "teacher" MLP: ``y = f(x) / s + noise * e``.

    ``x ~ N(0, I)``; the teacher's weights depend on the task's name only (the same
    function for every seed); ``s`` scales its outputs to unit variance (measured on
    a fixed draw of 1000 inputs); ``e ~ N(0, I)``. Needs ``loss: {kind: mse}``.
    """

    kind: Literal["teacher"]
    input_shape: list[PositiveInt] = Field(min_length=1)
    output_dim: PositiveInt
    widths: list[PositiveInt] = Field(default_factory=lambda: [32])
    activation: Activation = "tanh"
    noise: NonNegativeFloat = 0.1
    size: PositiveInt = 1000


TrainData = Annotated[SyntheticData | DigitsData | TeacherData, Field(discriminator="kind")]


class TrainTask(StrictModel):
    """A model, a loss and data (``synthetic``, ``digits`` or ``teacher``)."""

    name: Name
    model: ModelSpec
    loss: LossConfig
    data: TrainData

    def task_spec(self, heldout_size: int = 1) -> TaskSpec:
        """The equivalent accuracy-suite task (teacher data become synthetic regression).

        Its ``eval`` holds ``heldout_size`` samples in one batch, so
        :func:`hessbench.suite.evaluation_data` gives the held-out set.
        """
        data = self.data
        if isinstance(data, TeacherData):
            data = SyntheticData(
                kind="synthetic",
                input_shape=data.input_shape,
                output_dim=data.output_dim,
                size=data.size,
            )
        return TaskSpec(
            name=self.name,
            model=self.model,
            loss=self.loss,
            data=data,
            eval=Evaluation(batch_size=heldout_size, num_batches=1),
        )

    @property
    def pool_size(self) -> int:
        """The number of training samples."""
        if isinstance(self.data, DigitsData):
            return DIGITS_SAMPLES - DIGITS_EVAL
        return self.data.size

    @model_validator(mode="after")
    def _fits(self) -> TrainTask:
        if isinstance(self.data, TeacherData) and self.loss.kind != "mse":
            fail([(("loss", "kind"), "teacher data need loss mse")])
        try:
            self.task_spec()
        except pydantic.ValidationError as exc:
            fail((err["loc"], err["msg"]) for err in exc.errors())
        return self


def format_lr(lr: float) -> str:
    """A learning rate as it appears in run ids and tables: ``0.001``, ``3e-05``."""
    return format(lr, "g")


def _lr_tag(value: object) -> str:
    return "list" if isinstance(value, list) else "one"


LrGrid = Annotated[
    Annotated[list[Annotated[float, Field(gt=0)]], Tag("list")]
    | Annotated[Annotated[float, Field(gt=0)], Tag("one")],
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
            _optim().make_stepper(name, model, torch.nn.MSELoss(), lr, **params)
        except (HessbenchError, TypeError, ValueError) as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _seeds_tag(value: object) -> str:
    return "list" if isinstance(value, list) else "count"


Seeds = Annotated[
    Annotated[list[Annotated[int, Field(ge=0)]], Tag("list")]
    | Annotated[PositiveInt, Tag("count")],
    Discriminator(_seeds_tag),
]


class TrainSuite(StrictModel):
    """A training benchmark: one task, optimizers x learning rates x seeds."""

    kind: Literal["train"]
    name: Name
    description: str = ""
    task: TrainTask
    optimizers: list[OptimizerSpec] = Field(min_length=1)
    seeds: Seeds = 3
    steps: PositiveInt
    eval_every: PositiveInt
    batch_size: PositiveInt = 32
    heldout_size: PositiveInt | None = None
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    threads: PositiveInt = 1

    @property
    def seed_list(self) -> list[int]:
        """The seeds: the list as given, or ``range(n)`` for an integer ``n``."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def heldout(self) -> int:
        """Held-out samples: ``heldout_size``, or 297 for digits and 1000 otherwise."""
        if self.heldout_size is not None:
            return self.heldout_size
        return DIGITS_EVAL if isinstance(self.task.data, DigitsData) else 1000

    @property
    def classification(self) -> bool:
        """Whether the loss is cross-entropy (held-out accuracy is recorded)."""
        return self.task.loss.kind == "cross_entropy"

    @model_validator(mode="after")
    def _check(self) -> TrainSuite:
        problems: Problems = {}
        if isinstance(self.seeds, list):
            if not self.seeds:
                problems["seeds",] = "an empty list of seeds"
            for i in repeats(self.seeds):
                problems["seeds", i] = f"seed {self.seeds[i]} appears twice"
        labels = [o.display for o in self.optimizers]
        for i in repeats(labels):
            problems["optimizers", i] = (
                f"label {labels[i]!r} again; give the entries different params or a label"
            )
        if self.eval_every > self.steps:
            problems["eval_every",] = f"more than steps ({self.steps})"
        if self.batch_size > self.task.pool_size:
            problems["batch_size",] = f"more than the {self.task.pool_size} training samples"
        if isinstance(self.task.data, DigitsData) and self.heldout > DIGITS_EVAL:
            problems["heldout_size",] = f"more than the {DIGITS_EVAL} held-out digits"
        fail(problems.items())
        return self


@dataclass(frozen=True)
class RunSpec:
    """One training run: the suite, an optimizer entry, a learning rate and a seed."""

    suite: TrainSuite
    optimizer: OptimizerSpec
    lr: float
    seed: int

    @property
    def id(self) -> str:
        """``task/label/lr=<lr>/seed=<seed>``, stable across runs."""
        return (
            f"{self.suite.task.name}/{self.optimizer.display}/lr={format_lr(self.lr)}"
            f"/seed={self.seed}"
        )


def plan_runs(suite: TrainSuite, seeds: list[int] | None = None) -> list[RunSpec]:
    """Every run, in the order optimizer, learning rate, seed (pure and cheap)."""
    chosen = suite.seed_list if seeds is None else [s for s in suite.seed_list if s in seeds]
    return [
        RunSpec(suite, opt, lr, seed)
        for opt in suite.optimizers
        for lr in opt.lrs
        for seed in chosen
    ]


def parse_train_suite(text: str, source: str = "<suite>") -> TrainSuite:
    """Parse and validate a train suite from YAML text; ``source`` names it in messages.

    Raises:
        SuiteError: every problem, one per line, ``SOURCE: field.path: message``.
    """
    return validate(TrainSuite, read_yaml(text, source), source)


def load_train_suite(path: str | Path) -> TrainSuite:
    """Read and validate a train suite file (see :func:`parse_train_suite`)."""
    return load_file(path, parse_train_suite)
