"""Named optimizer presets and the :func:`make_stepper` factory.

Diagonal presets run :class:`~hessbench.optim.diagonal.DiagonalOptimizer`
with an estimator; ``adam`` and ``sgd`` are ``torch.optim`` baselines. Every
hyper-parameter of a preset can be overridden by keyword (validated by
pydantic); ``estimator`` and ``estimator_params`` too, so any registered
estimator can drive a diagonal preset::

    stepper = make_stepper("adahesscale", model, nn.CrossEntropyLoss(), lr=1e-3, seed=0)
    loss = stepper.step(inputs, targets)
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import pydantic
import torch
from torch import nn

from hessbench.errors import ConfigError, HessbenchError
from hessbench.estimators import Count, Flag, estimator_dataclass, get_estimator
from hessbench.optim.diagonal import DiagonalOptimizer
from hessbench.optim.stepper import DiagonalStepper, Stepper, TorchStepper

__all__ = [
    "PRESETS",
    "AdamPreset",
    "DiagonalPreset",
    "SGDPreset",
    "available_optimizers",
    "make_stepper",
    "preset",
]

Beta = Annotated[float, pydantic.Field(ge=0.0, lt=1.0)]
NonNeg = Annotated[float, pydantic.Field(ge=0.0)]
Pos = Annotated[float, pydantic.Field(gt=0.0)]


@estimator_dataclass
class DiagonalPreset:
    """Hyper-parameters of a :class:`DiagonalOptimizer` preset (see its docstring)."""

    estimator: str
    estimator_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    decoupled_weight_decay: Flag = True
    curvature: Literal["square", "abs", "signed"] = "square"
    hessian_power: Pos = 1.0
    update_every: Count = 1
    bias_correction: Flag = True
    clip: Pos | None = None
    gamma: Pos = 1.0
    step_scaling: tuple[Pos, Pos] | None = None
    scale_bias_correction: Flag = True
    schedule: Literal["paper", "script"] = "paper"
    grad_clip: Pos | None = None
    seed: int | None = None

    def build(self, model: nn.Module, loss_fn: nn.Module, lr: float) -> DiagonalOptimizer:
        """The optimizer for ``model`` and ``loss_fn``."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        est = get_estimator(kw.pop("estimator"), **kw.pop("estimator_params"))
        return DiagonalOptimizer(model, loss_fn, estimator=est, lr=lr, **kw)


@estimator_dataclass
class AdamPreset:
    """``torch.optim.Adam`` (L2 weight decay, as torch's Adam does)."""

    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    seed: int | None = None

    def build(self, model: nn.Module, loss_fn: nn.Module, lr: float) -> torch.optim.Optimizer:
        """``torch.optim.Adam`` over the trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.Adam(
            params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )


@estimator_dataclass
class SGDPreset:
    """``torch.optim.SGD``."""

    momentum: NonNeg = 0.0
    weight_decay: NonNeg = 0.0
    nesterov: Flag = False
    seed: int | None = None

    def build(self, model: nn.Module, loss_fn: nn.Module, lr: float) -> torch.optim.Optimizer:
        """``torch.optim.SGD`` over the trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )


# hessbench's default (delta, max_scale): the scaling only shrinks steps. With delta = 0.01
# the factor never fell below 1 in the shipped suites (there 1/2 sum D u^2 was about 1e-5 to
# 1e-3 at learning rates 1e-3 to 1e-2), so the scaled presets equalled the unscaled ones;
# 1e-4 starts to shrink steps from a learning rate of about 3e-3 on the digits networks.
_SCALING = (1e-4, 1.0)
_AUTHORS: dict[str, Any] = {"step_scaling": (1e-8, 1.0), "scale_bias_correction": False}

PRESETS: dict[str, DiagonalPreset | AdamPreset | SGDPreset] = {
    # Yao et al., "ADAHESSIAN" (AAAI 2021): |z o Hz| with spatial averaging, squared,
    # Adam-style, eps 1e-4, Hessian power 1, decoupled weight decay.
    "adahessian": DiagonalPreset(estimator="adahessian", eps=1e-4),
    # Elsayed et al. (2022, ICML 2024): AdaHesScale / AdaHesScaleGN, Adam with h^2 for g^2.
    "adahesscale": DiagonalPreset(estimator="hesscale"),
    "adahesscale_gn": DiagonalPreset(estimator="hesscale_gn"),
    # Adam itself: grad_sq is the squared mini-batch gradient, Adam's g^2, already squared:
    # average it as it is ("abs") and divide by its square root (Hessian power 1/2).
    "adam_equiv": DiagonalPreset(estimator="grad_sq", curvature="abs", hessian_power=0.5),
    # Liu et al., "Sophia" (ICLR 2024), SophiaG: GNB every 10 steps, clip(m / max(rho h, eps), 1),
    # no bias correction, decoupled weight decay 0.1, the official code's defaults.
    "sophia": DiagonalPreset(
        estimator="sophia_gnb",
        betas=(0.965, 0.99),
        eps=1e-15,
        weight_decay=0.1,
        curvature="abs",
        update_every=10,
        bias_correction=False,
        clip=1.0,
        gamma=0.04,
    ),
    # Sophia-H (Liu et al., ICLR 2024, Algorithm 3 with Algorithm 1): Sophia's clipped update
    # with the signed Hutchinson estimate z o Hz (one HVP) every 10 steps, averaged as it is;
    # max(gamma h, eps) floors negative entries. SophiaG's other hyper-parameters.
    "sophia_h": DiagonalPreset(
        estimator="hutchinson",
        betas=(0.965, 0.99),
        eps=1e-15,
        weight_decay=0.1,
        curvature="signed",
        update_every=10,
        bias_correction=False,
        clip=1.0,
        gamma=0.04,
    ),
    # The HesScale papers' step-size scaling on top of the Adam-style presets.
    "adahesscale_scaled": DiagonalPreset(estimator="hesscale", step_scaling=_SCALING),
    "adahesscale_gn_scaled": DiagonalPreset(estimator="hesscale_gn", step_scaling=_SCALING),
    "adahessian_scaled": DiagonalPreset(estimator="adahessian", eps=1e-4, step_scaling=_SCALING),
    # The HesScale authors' scaled optimizers (github.com/mohmdelsayed/HesScale, branches
    # experiments .. homayoon, core/optim/*_with_scaling.py) under their learner names with an
    # authors_ prefix: the raw running average in the trust-region term (no bias correction),
    # delta 1e-8 as in their RL runs (their latest class default is 1e-4), max_scale 1. Their
    # adahesscale_scaled is the |h| (Newton-style) variant; hessbench's is their adamstyle one.
    "authors_adahesscale_scaled": DiagonalPreset(estimator="hesscale", curvature="abs", **_AUTHORS),
    "authors_adahesscale_adamstyle_scaled": DiagonalPreset(estimator="hesscale", **_AUTHORS),
    "authors_adahesscalegn_scaled": DiagonalPreset(
        estimator="hesscale_gn", curvature="abs", **_AUTHORS
    ),
    "authors_adahesscalegn_adamstyle_scaled": DiagonalPreset(estimator="hesscale_gn", **_AUTHORS),
    # Their AdaHessianScaled: eps 1e-8 (weight decay 0; theirs would enter the scaled step).
    "authors_adahessian_scaled": DiagonalPreset(estimator="adahessian", **_AUTHORS),
    # Sophia as its official training script runs it (Liuhong99/Sophia, train_sophiag.py):
    # the estimate after the step on the next batch (none before step k + 1: sign steps
    # until then) and the gradient's total norm clipped to 1.
    "sophia_script": DiagonalPreset(
        estimator="sophia_gnb",
        betas=(0.965, 0.99),
        eps=1e-15,
        weight_decay=0.1,
        curvature="abs",
        update_every=10,
        bias_correction=False,
        clip=1.0,
        gamma=0.04,
        schedule="script",
        grad_clip=1.0,
    ),
    "adam": AdamPreset(),
    "sgd": SGDPreset(),
}


def available_optimizers() -> list[str]:
    """Names of every optimizer preset, sorted."""
    return sorted(PRESETS)


def preset(name: str, **overrides: Any) -> DiagonalPreset | AdamPreset | SGDPreset:
    """The preset ``name`` with ``overrides`` applied and validated.

    Raises:
        ConfigError: one line naming an unknown optimizer (listing the known
            ones) or a bad hyper-parameter (listing the allowed ones).
    """
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown optimizer {name!r}; available: {', '.join(available_optimizers())}"
        ) from None
    allowed = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(
            f"optimizer {name}: unknown hyper-parameter {unknown[0]!r}; allowed: {', '.join(allowed)}"
        )
    try:
        return dataclasses.replace(base, **overrides)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "?"
        raise ConfigError(
            f"optimizer {name}: hyper-parameter {field}: {err['msg']} (got {err.get('input')!r})"
        ) from None


def make_stepper(
    name: str, model: nn.Module, loss_fn: nn.Module, lr: float, **overrides: Any
) -> Stepper:
    """Build the optimizer preset ``name`` for ``model`` and ``loss_fn`` at learning rate ``lr``.

    Raises:
        ConfigError: an unknown name, a bad override or learning rate (one line).
        UnsupportedError: an estimator that cannot handle the model or loss.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"optimizer {name}: lr must be a positive number (got {lr!r})")
    p = preset(name, **overrides)
    try:
        opt = p.build(model, loss_fn, float(lr))
    except ConfigError as exc:
        raise ConfigError(f"optimizer {name}: {exc}") from None
    except HessbenchError:
        raise
    if isinstance(p, DiagonalPreset):
        assert isinstance(opt, DiagonalOptimizer)
        return DiagonalStepper(name, opt)
    return TorchStepper(name, model, loss_fn, opt, seed=p.seed)
