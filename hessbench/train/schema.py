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

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from hessbench.optim.spec import OptimizerSpec, format_lr
from hessbench.suite.models import Activation, ModelSpec
from hessbench.suite.parsing import (
    Name,
    Problems,
    Seeds,
    StrictModel,
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
    "load_train_suite",
    "parse_train_suite",
    "plan_runs",
]


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
        if self.loss.kind not in ("cross_entropy", "mse"):
            fail([(("loss", "kind"), "train suites take loss cross_entropy or mse")])
        options = [k for k in ("weight", "label_smoothing") if getattr(self.loss, k) is not None]
        if options:
            fail([(("loss", options[0]), "not supported in train suites")])
        if isinstance(self.data, TeacherData) and self.loss.kind != "mse":
            fail([(("loss", "kind"), "teacher data need loss mse")])
        try:
            self.task_spec()
        except pydantic.ValidationError as exc:
            fail((err["loc"], err["msg"]) for err in exc.errors())
        return self


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
