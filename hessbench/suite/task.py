"""The task part of the suite schema: loss, data, evaluation protocol, and the task itself.

Model specs live in :mod:`hessbench.suite.models`; the field reference is ``docs/suites.md``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import (
    Discriminator,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Tag,
    model_validator,
)
from torch import nn

from hessbench.errors import ConfigError, HessbenchError
from hessbench.suite.models import (
    CNNModel,
    MLPModel,
    ModelSpec,
    ResNetModel,
    SequentialModel,
    TransformerModel,
    check_model,
)
from hessbench.suite.parsing import (
    Name,
    Problems,
    StrictModel,
    fail,
    repeats,
)

DIGITS_SAMPLES, DIGITS_EVAL, DIGITS_CLASSES = 1797, 297, 10
"""scikit-learn's digits: samples, the fixed evaluation part, classes (training: the rest)."""


CLASS_LOSSES = ("cross_entropy", "nll")
"""Loss kinds whose targets are class labels (the data's ``num_classes``)."""
_OPTIONS = {
    "weight": CLASS_LOSSES,
    "label_smoothing": ("cross_entropy",),
    "delta": ("huber",),
    "beta": ("smooth_l1",),
}


class LossConfig(StrictModel):
    """A ``torch.nn`` loss module and its options (each only with its loss kind).

    ``cross_entropy``: ``nn.CrossEntropyLoss`` on class labels (``weight``: one weight
    per class, ``label_smoothing``); ``nll``: ``nn.NLLLoss`` (``weight``), the model
    ends with ``nn.LogSoftmax(dim=1)``; ``bce_with_logits``: ``nn.BCEWithLogitsLoss``
    on 0/1 labels; ``mse``; ``huber``: ``nn.HuberLoss(delta)``; ``smooth_l1``:
    ``nn.SmoothL1Loss(beta)``.
    """

    kind: Literal["cross_entropy", "nll", "bce_with_logits", "mse", "huber", "smooth_l1"]
    reduction: Literal["mean", "sum"] = "mean"
    weight: list[NonNegativeFloat] | None = Field(default=None, min_length=1)
    label_smoothing: Annotated[float, Field(ge=0, le=1)] | None = None
    delta: PositiveFloat | None = None
    beta: NonNegativeFloat | None = None

    @property
    def classes(self) -> bool:
        """Whether the targets are class labels (``cross_entropy``, ``nll``)."""
        return self.kind in CLASS_LOSSES

    def build(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> nn.Module:
        """The loss module; class weights as a tensor in ``dtype`` on ``device``."""
        red = self.reduction
        if self.kind in CLASS_LOSSES:
            w = self.weight and torch.tensor(self.weight, dtype=dtype, device=device)
            if self.kind == "nll":
                return nn.NLLLoss(w, reduction=red)
            return nn.CrossEntropyLoss(
                w, reduction=red, label_smoothing=self.label_smoothing or 0.0
            )
        if self.kind == "bce_with_logits":
            return nn.BCEWithLogitsLoss(reduction=red)
        if self.kind == "huber":
            return nn.HuberLoss(reduction=red, delta=1.0 if self.delta is None else self.delta)
        if self.kind == "smooth_l1":
            return nn.SmoothL1Loss(reduction=red, beta=1.0 if self.beta is None else self.beta)
        return nn.MSELoss(reduction=red)

    @model_validator(mode="after")
    def _options_fit(self) -> LossConfig:
        problems: Problems = {
            (name,): f"not used with loss {self.kind}"
            for name, kinds in _OPTIONS.items()
            if getattr(self, name) is not None and self.kind not in kinds
        }
        if self.weight is not None and not any(self.weight):
            problems["weight",] = "every class weight is zero"
        fail(problems.items())
        return self


class SyntheticData(StrictModel):
    """``x ~ N(0, I)``; uniform class labels or ``N(0, I)`` regression targets."""

    kind: Literal["synthetic"]
    input_shape: list[PositiveInt] = Field(min_length=1)
    num_classes: PositiveInt | None = None
    output_dim: PositiveInt | None = None
    size: PositiveInt = 1000


class DigitsData(StrictModel):
    """scikit-learn's 1797 8x8 digits, pixels in [0, 1], 10 classes (one-hot rows for MSE)."""

    kind: Literal["digits"]
    layout: Literal["flat", "image"] = "flat"


class SequenceData(StrictModel):
    """Token sequences of ``length`` tokens uniform over ``vocab``; the label is a token too.

    ``task``: ``sum_mod`` (the sum of the tokens modulo ``vocab``), ``copy_first``
    (the first token), ``min`` (the smallest token: the first of the sorted
    sequence). Cross-entropy only; the model reads the sequence and predicts the
    label at its last position.
    """

    kind: Literal["sequence"]
    task: Literal["sum_mod", "copy_first", "min"] = "sum_mod"
    vocab: Annotated[int, Field(ge=2, le=4096)] = 16
    length: Annotated[int, Field(ge=1, le=512)] = 8
    size: PositiveInt = 1000


DataSpec = Annotated[SyntheticData | DigitsData | SequenceData, Field(discriminator="kind")]


class TrainState(StrictModel):
    """The model after ``steps`` optimizer steps on minibatches of the training part."""

    steps: PositiveInt
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[PositiveFloat, Field(allow_inf_nan=False)] = 1e-3
    batch_size: PositiveInt = 32

    @property
    def label(self) -> str:
        """``trained<steps>``, the state's part of a task variant's name."""
        return f"trained{self.steps}"


def _state_tag(value: object) -> str:
    return "train" if isinstance(value, (dict, TrainState)) else "init"


State = Annotated[
    Annotated[Literal["init"], Tag("init")] | Annotated[TrainState, Tag("train")],
    Discriminator(_state_tag),
]


class Evaluation(StrictModel):
    """What is evaluated: batches per seed, their size, and the model states."""

    batch_size: PositiveInt = 1
    num_batches: PositiveInt = 10
    states: list[State] = Field(default=["init"], min_length=1)

    @model_validator(mode="after")
    def _unique_states(self) -> Evaluation:
        names = [s if s == "init" else s.label for s in self.states]
        fail((("states", i), f"a second state named {names[i]!r}") for i in repeats(names))
        return self


class TaskSpec(StrictModel):
    """A model, a loss, data and an evaluation protocol."""

    name: Name
    model: ModelSpec
    loss: LossConfig
    data: DataSpec
    eval: Evaluation = Evaluation()
    dtype: Literal["float32", "float64"] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input sample."""
        if isinstance(self.data, DigitsData):
            return (64,) if self.data.layout == "flat" else (1, 8, 8)
        if isinstance(self.data, SequenceData):
            return (self.data.length,)
        return tuple(self.data.input_shape)

    @property
    def output_dim(self) -> int:
        """The number of model outputs per sample (classes, or regression targets)."""
        if isinstance(self.data, DigitsData):
            return DIGITS_CLASSES
        if isinstance(self.data, SequenceData):
            return self.data.vocab
        n = self.data.num_classes if self.loss.classes else self.data.output_dim
        if n is None:
            raise ConfigError(f"task {self.name!r}: the data give no output size")
        return n

    @model_validator(mode="after")
    def _fits(self) -> TaskSpec:
        problems: Problems = {}
        data, loss, pool = self.data, self.loss.kind, DIGITS_SAMPLES - DIGITS_EVAL
        if isinstance(data, SyntheticData):
            pool = data.size
            need, other = ("num_classes", "output_dim")[:: 1 if self.loss.classes else -1]
            if getattr(data, need) is None:
                problems["data", need] = f"field required with loss {loss}"
            if getattr(data, other) is not None:
                problems["data", other] = f"not used with loss {loss}; give {need}"
        elif isinstance(data, SequenceData):
            pool = data.size
            if loss != "cross_entropy":
                problems["loss", "kind"] = "sequence data need loss cross_entropy"
        elif self.eval.batch_size > DIGITS_EVAL:
            problems["eval", "batch_size"] = f"more than the {DIGITS_EVAL} evaluation samples"
        for i, state in enumerate(self.eval.states):
            if state != "init" and state.batch_size > pool:
                problems["eval", "states", i, "batch_size"] = (
                    f"more than the {pool} training samples"
                )
        if loss == "nll" and not isinstance(self.model, (MLPModel, CNNModel, SequentialModel)):
            problems["loss", "kind"] = (
                "nll needs a model of kind mlp, cnn or sequential (it gets a final "
                "nn.LogSoftmax(dim=1))"
            )
        weight = self.loss.weight
        known = ("data", "num_classes") not in problems  # else output_dim is unknown
        if weight is not None and known and len(weight) != self.output_dim:
            problems["loss", "weight"] = (
                f"{len(weight)} class weights for {self.output_dim} classes"
            )
        tokens = isinstance(self.model, TransformerModel)
        if tokens != isinstance(data, SequenceData):
            where = ("data", "kind") if tokens else ("model", "kind")
            problems[where] = "a transformer reads token sequences (data kind sequence)"
        elif isinstance(self.model, (CNNModel, ResNetModel)) and len(self.input_shape) != 3:
            where = "layout" if isinstance(data, DigitsData) else "input_shape"
            problems["data", where] = (
                f"a {self.model.kind} needs image inputs (channels, height, width)"
            )
        if not problems:
            try:
                check_model(
                    self.model, self.input_shape, self.output_dim, log_softmax=loss == "nll"
                )
            except HessbenchError as exc:
                problems["model",] = str(exc)
        fail(problems.items())
        return self
