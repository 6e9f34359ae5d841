"""The task part of the suite schema: model, loss, data and evaluation protocol.

Re-exported by :mod:`hessbench.suite.schema`; the field reference is ``docs/suites.md``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import (
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    model_validator,
)
from torch import nn

from hessbench.errors import ConfigError, HessbenchError
from hessbench.suite.parsing import (
    KwValue,
    Name,
    Number,
    Problems,
    StrictModel,
    custom_error,
    fail,
    repeats,
)

DIGITS_SAMPLES, DIGITS_EVAL, DIGITS_CLASSES = 1797, 297, 10
"""scikit-learn's digits: samples, the fixed evaluation part, classes (training: the rest)."""

Activation = Literal[
    "tanh", "relu", "sigmoid", "leaky_relu", "elu", "selu", "softplus", "logsigmoid"
]
LayerType = Literal[
    "Linear", "Conv1d", "Conv2d", "Tanh", "Sigmoid", "ReLU", "LeakyReLU", "ELU", "SELU",
    "Softplus", "LogSigmoid", "Flatten", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d",
    "Dropout", "Identity",
]  # fmt: skip


class MLPModel(StrictModel):
    """``Linear``/activation blocks; input and output sizes come from the data."""

    kind: Literal["mlp"]
    widths: list[PositiveInt]
    activation: Activation = "tanh"
    bias: bool = True
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


class CNNModel(StrictModel):
    """``Conv2d``/activation/pool blocks, ``Flatten``, hidden ``Linear`` layers, output."""

    kind: Literal["cnn"]
    channels: list[PositiveInt] = Field(min_length=1)
    kernel: PositiveInt = 3
    stride: PositiveInt = 1
    padding: NonNegativeInt = 1
    pooling: Literal["max", "avg", "none"] = "max"
    pool_size: PositiveInt = 2
    activation: Activation = "relu"
    hidden: list[PositiveInt] = Field(default_factory=list)
    bias: bool = True


class LayerSpec(StrictModel):
    """One ``torch.nn`` layer from the allow-list, built as ``nn.<type>(*args, **kwargs)``."""

    type: LayerType
    args: list[Number] = Field(default_factory=list)
    kwargs: dict[str, KwValue] = Field(default_factory=dict)

    def build(self) -> nn.Module:
        """The layer (initialized from the global RNG, like any ``torch.nn`` layer)."""
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.kwargs.items()}
        return getattr(nn, self.type)(*self.args, **kwargs)

    @model_validator(mode="after")
    def _builds(self) -> LayerSpec:
        fixed = sorted(set(self.kwargs) & {"device", "dtype"})
        if fixed:
            fail([(("kwargs", fixed[0]), "set by the harness (defaults.device, dtype)")])
        try:
            with torch.device("meta"):  # checks the arguments without allocating
                self.build()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise custom_error(f"cannot build {self.type}: {exc}") from None
        return self


class SequentialModel(StrictModel):
    """Any ``nn.Sequential`` of allow-listed layers."""

    kind: Literal["sequential"]
    layers: list[LayerSpec] = Field(min_length=1)


ModelSpec = Annotated[MLPModel | CNNModel | SequentialModel, Field(discriminator="kind")]


class LossConfig(StrictModel):
    """``nn.CrossEntropyLoss`` (class labels) or ``nn.MSELoss``."""

    kind: Literal["cross_entropy", "mse"]
    reduction: Literal["mean", "sum"] = "mean"


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


DataSpec = Annotated[SyntheticData | DigitsData, Field(discriminator="kind")]


class TrainState(StrictModel):
    """The model after ``steps`` optimizer steps on minibatches of the training part."""

    steps: PositiveInt
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
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
        return tuple(self.data.input_shape)

    @property
    def output_dim(self) -> int:
        """The number of model outputs per sample (classes, or regression targets)."""
        if isinstance(self.data, DigitsData):
            return DIGITS_CLASSES
        n = self.data.num_classes if self.loss.kind == "cross_entropy" else self.data.output_dim
        if n is None:
            raise ConfigError(f"task {self.name!r}: the data give no output size")
        return n

    @model_validator(mode="after")
    def _fits(self) -> TaskSpec:
        problems: Problems = {}
        data, loss, pool = self.data, self.loss.kind, DIGITS_SAMPLES - DIGITS_EVAL
        if isinstance(data, SyntheticData):
            pool = data.size
            need, other = ("num_classes", "output_dim")[:: 1 if loss == "cross_entropy" else -1]
            if getattr(data, need) is None:
                problems["data", need] = f"field required with loss {loss}"
            if getattr(data, other) is not None:
                problems["data", other] = f"not used with loss {loss}; give {need}"
        elif self.eval.batch_size > DIGITS_EVAL:
            problems["eval", "batch_size"] = f"more than the {DIGITS_EVAL} evaluation samples"
        for i, state in enumerate(self.eval.states):
            if state != "init" and state.batch_size > pool:
                problems["eval", "states", i, "batch_size"] = (
                    f"more than the {pool} training samples"
                )
        if isinstance(self.model, CNNModel) and len(self.input_shape) != 3:
            where = "layout" if isinstance(data, DigitsData) else "input_shape"
            problems["data", where] = "a cnn needs image inputs (channels, height, width)"
        if not problems:
            from hessbench.bench.problem import check_model  # tasks imports this module

            try:
                check_model(self.model, self.input_shape, self.output_dim)
            except HessbenchError as exc:
                problems["model",] = str(exc)
        fail(problems.items())
        return self
