"""The model part of the suite schema and its builders: MLP, CNN, Sequential of allow-listed layers.

The spec classes are validated by pydantic (nothing executes code); :func:`build_model`
turns a spec into an ``nn.Module`` and :func:`check_model` checks one cheaply on the
meta device. Field reference: ``docs/suites.md``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from torch import nn

from hessbench.errors import ConfigError
from hessbench.suite.architectures import ResidualMLP, ResNet, TinyGPT
from hessbench.suite.parsing import KwValue, Number, StrictModel, custom_error, fail

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "CNNModel",
    "LayerSpec",
    "MLPModel",
    "ModelSpec",
    "ResMLPModel",
    "ResNetModel",
    "SequentialModel",
    "TransformerModel",
    "build_model",
    "check_model",
    "materialize",
]

Activation = Literal[
    "tanh",
    "relu",
    "sigmoid",
    "leaky_relu",
    "elu",
    "selu",
    "softplus",
    "logsigmoid",
    "gelu",
    "silu",
]
LayerType = Literal[
    "Linear", "Conv1d", "Conv2d", "Tanh", "Sigmoid", "ReLU", "LeakyReLU", "ELU", "SELU",
    "Softplus", "LogSigmoid", "Flatten", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d",
    "Dropout", "Identity", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm",
    "AdaptiveAvgPool2d", "GELU", "SiLU",
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


class ResMLPModel(StrictModel):
    """A residual MLP: ``Linear`` in, pre-norm blocks ``x + W2 act(W1 LN(x))``, ``Linear`` out."""

    kind: Literal["resmlp"]
    width: PositiveInt = 32
    hidden: PositiveInt | None = None  # the blocks' inner width (default: width)
    blocks: PositiveInt = 2
    activation: Activation = "tanh"
    layernorm: bool = True
    bias: bool = True


class ResNetModel(StrictModel):
    """A small ResNet of basic blocks (two 3x3 convolutions and a skip connection)."""

    kind: Literal["resnet"]
    channels: list[PositiveInt] = Field(default_factory=lambda: [8, 16], min_length=1)
    blocks: PositiveInt = 1  # basic blocks per stage
    activation: Activation = "relu"
    batchnorm: bool = True


class TransformerModel(StrictModel):
    """A tiny GPT: token and position embeddings, pre-norm encoder blocks, a last-position head.

    The vocabulary and the sequence length come from the data (``kind: sequence``).
    """

    kind: Literal["transformer"]
    d_model: PositiveInt = 32
    heads: PositiveInt = 4
    layers: PositiveInt = 2
    mlp_ratio: PositiveInt = 4
    causal: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerModel:
        if self.d_model % self.heads:
            fail([(("heads",), f"must divide d_model={self.d_model}")])
        return self


ModelSpec = Annotated[
    MLPModel | CNNModel | SequentialModel | ResMLPModel | ResNetModel | TransformerModel,
    Field(discriminator="kind"),
]


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "softplus": nn.Softplus,
    "logsigmoid": nn.LogSigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def build_model(
    spec: ModelSpec, input_shape: tuple[int, ...], output_dim: int, *, log_softmax: bool = False
) -> nn.Module:
    """The model of ``spec`` for inputs of ``input_shape`` and ``output_dim`` outputs.

    Initialized from the global RNG, like any ``torch.nn`` layer (:func:`build_problem`
    seeds it). An MLP flattens multi-dimensional inputs first. ``mlp``, ``cnn`` and
    ``sequential`` give an ``nn.Sequential``, ending with ``nn.LogSoftmax(dim=1)`` if
    ``log_softmax`` (for ``NLLLoss``); ``resmlp`` and ``resnet`` the modules of
    :mod:`hessbench.suite.architectures`.

    Raises:
        ConfigError: a CNN whose feature maps shrink to nothing, on non-image inputs,
            or ``log_softmax`` for a model that is not an ``nn.Sequential``.
    """
    if log_softmax:
        if not isinstance(spec, (MLPModel, CNNModel, SequentialModel)):
            raise ConfigError(f"a {spec.kind} model cannot end with nn.LogSoftmax (loss nll)")
        model = build_model(spec, input_shape, output_dim)
        assert isinstance(model, nn.Sequential)
        return model.append(nn.LogSoftmax(dim=1))
    if isinstance(spec, SequentialModel):
        return nn.Sequential(*(layer.build() for layer in spec.layers))
    if isinstance(spec, TransformerModel):
        if len(input_shape) != 1:
            raise ConfigError(f"a transformer reads token sequences, got inputs {input_shape}")
        return TinyGPT(
            input_shape[0], output_dim, d_model=spec.d_model, heads=spec.heads,
            layers=spec.layers, mlp_ratio=spec.mlp_ratio, causal=spec.causal,
        )  # fmt: skip
    act = ACTIVATIONS[spec.activation]
    if isinstance(spec, ResMLPModel):
        return ResidualMLP(
            input_shape, output_dim, width=spec.width, hidden=spec.hidden or spec.width,
            blocks=spec.blocks, act=act, norm=spec.layernorm, bias=spec.bias,
        )  # fmt: skip
    if isinstance(spec, ResNetModel):
        if len(input_shape) != 3:
            raise ConfigError(f"a resnet needs (channels, height, width) inputs, got {input_shape}")
        return ResNet(
            input_shape, output_dim, channels=spec.channels, blocks=spec.blocks, act=act,
            bn=spec.batchnorm,
        )  # fmt: skip
    layers: list[nn.Module] = []
    if isinstance(spec, MLPModel):
        if len(input_shape) > 1:
            layers.append(nn.Flatten())
        width, hidden = math.prod(input_shape), spec.widths
    else:
        if len(input_shape) != 3:
            raise ConfigError(f"a cnn needs (channels, height, width) inputs, got {input_shape}")
        channels, h, w = input_shape
        pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}.get(spec.pooling)
        for i, c in enumerate(spec.channels):
            layers += [
                nn.Conv2d(channels, c, spec.kernel, spec.stride, spec.padding, bias=spec.bias),
                act(),
            ]
            h, w = ((n + 2 * spec.padding - spec.kernel) // spec.stride + 1 for n in (h, w))
            if pool is not None:
                layers.append(pool(spec.pool_size))
                h, w = h // spec.pool_size, w // spec.pool_size
            if min(h, w) < 1:
                raise ConfigError(f"cnn block {i}: the feature maps shrink to nothing")
            channels = c
        layers.append(nn.Flatten())
        width, hidden = channels * h * w, spec.hidden
    for n in hidden:
        layers += [nn.Linear(width, n, bias=spec.bias), act()]
        if isinstance(spec, MLPModel) and spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = n
    layers.append(nn.Linear(width, output_dim, bias=spec.bias))
    return nn.Sequential(*layers)


def materialize(model: nn.Module) -> nn.Module:
    """A model built on the meta device, moved to the CPU and filled with zeros, in place.

    Like ``model.to_empty(device="cpu")`` and zeroing, without its first-use cost:
    ``empty_like`` of a meta tensor imports sympy (0.6 s).
    """
    return model._apply(lambda t: torch.zeros(t.shape, dtype=t.dtype, device="cpu"))


def check_model(
    spec: ModelSpec, input_shape: tuple[int, ...], output_dim: int, *, log_softmax: bool = False
) -> None:
    """Check that ``spec`` builds and maps one input sample to ``output_dim`` outputs.

    Cheap: the layers are built on the meta device (no initialization, no RNG),
    then given zeroed CPU memory (:func:`materialize`) for one forward pass.

    Raises:
        ConfigError: naming what does not fit.
    """
    with torch.device("meta"):
        model = build_model(spec, input_shape, output_dim, log_softmax=log_softmax)
    materialize(model).eval()  # as evaluated (batch norm of one sample needs it)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    with torch.no_grad():
        try:
            tokens = isinstance(spec, TransformerModel)
            x = torch.zeros(1, *input_shape, dtype=torch.long if tokens else torch.float32)
            out = model(x)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"does not fit inputs of shape {input_shape}: {first}") from None
    if tuple(out.shape) != (1, output_dim):
        raise ConfigError(
            f"outputs of shape {tuple(out.shape[1:])} per sample; the data need ({output_dim},)"
        )
