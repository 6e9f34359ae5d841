"""The common estimator interface and the registry.

An estimator is a frozen (pydantic-validated) dataclass whose fields are its
hyper-parameters. Calling it returns the estimated Hessian diagonal::

    est = get_estimator("hutchinson", num_samples=10)
    diag = est(model, loss_fn, inputs, targets, generator=torch.Generator().manual_seed(0))
    diag["0.weight"].shape == model[0].weight.shape

The result is keyed by ``model.named_parameters()`` names (trainable parameters
only, in that order), each detached, with its parameter's shape, dtype and
device. Estimators leave parameters, ``.grad``, hooks and the global RNG as they
found them; randomness comes only from the ``generator`` (a fresh,
non-deterministically seeded one when none is given).

:meth:`Estimator.estimate_with_grad` also hands back the gradient of the loss
and the loss value, for optimizers. Estimators whose pass computes the gradient
anyway (HesScale, HesScaleGN, BL89, ``grad_sq``, Hutchinson and AdaHessian)
return it at no extra cost; the factor pass (``exact``, ``ggn_exact``,
``ggn_mc``, ``kfac`` on supported ``nn.Sequential`` models) backpropagates it
alongside the curvature for a fraction of a gradient; the others pay one extra
autograd gradient::

    diag, grad, loss = est.estimate_with_grad(model, loss_fn, inputs, targets, generator=g)
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Annotated, ClassVar, TypeVar

import pydantic
import torch
from torch import Tensor, nn

from hessbench.errors import ConfigError, InputError, UnsupportedError
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._rng import global_rng, rng_state, set_rng_state

__all__ = [
    "Count",
    "Estimator",
    "Flag",
    "all_finite",
    "available_estimators",
    "check_output",
    "defer_registration",
    "estimator_class",
    "finalize",
    "fresh_generator",
    "get_estimator",
    "has_active_dropout",
    "loss_and_grad",
    "preserve_state",
    "register",
    "trainable_parameters",
]

_REGISTRY: dict[str, type[Estimator]] = {}
_DEFERRED: list[Callable[[], object]] = []
E = TypeVar("E", bound="type[Estimator]")


def defer_registration(load: Callable[[], object]) -> None:
    """Register more estimators only when a lookup needs them.

    ``load`` (say, importing the optional peers, whose libraries take a quarter
    of a second to import) runs once, the first time the registry is listed or
    asked for a name it does not hold. So a command that only uses built-in
    estimators never imports the optional libraries.
    """
    _DEFERRED.append(load)


def _load_deferred() -> bool:
    """Run the deferred registrations; whether there were any."""
    loaded = bool(_DEFERRED)
    while _DEFERRED:
        _DEFERRED.pop(0)()
    return loaded


def register(cls: E) -> E:
    """Class decorator: add an estimator class to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"estimator {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_estimators() -> list[str]:
    """Names of every registered estimator, sorted."""
    _load_deferred()
    return sorted(_REGISTRY)


def estimator_class(name: str) -> type[Estimator]:
    """The class registered as ``name``; :class:`ConfigError` listing the known ones otherwise."""
    if name not in _REGISTRY and _load_deferred():
        return estimator_class(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_estimators())
        raise ConfigError(f"unknown estimator {name!r}; available: {known}") from None


def get_estimator(name: str, **params: object) -> Estimator:
    """Build the estimator ``name`` with hyper-parameters ``params``.

    Raises:
        ConfigError: one line naming an unknown estimator or a bad hyper-parameter
            and what is allowed.
    """
    cls = estimator_class(name)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{name}: unknown hyper-parameter {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}"
        )
    try:
        return cls(**params)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "?"
        raise ConfigError(
            f"{name}: hyper-parameter {field}: {err['msg']} (got {err.get('input')!r})"
        ) from None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters()`` restricted to parameters that require grad (same names, order).

    A direct walk over the module tree: ``named_parameters()`` costs tens of
    microseconds per call, a sizeable share of one gradient at batch size 1.
    """
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                if p.requires_grad:
                    params[prefix + name] = p
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    if not params:
        raise UnsupportedError(f"model {type(model).__name__} has no trainable parameters")
    return params


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (one reduction in the common case)."""
    t = t.detach()
    if not t.is_floating_point() or math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())  # the sum overflowed or saw NaN/inf: check exactly


def check_output(model: nn.Module, out: Tensor) -> None:
    """Raise :class:`InputError` for a non-finite output, naming a bad parameter."""
    if all_finite(out):
        return
    bad = [n for n, p in model.named_parameters() if not all_finite(p)]
    hint = f"; non-finite parameters: {', '.join(bad)}" if bad else ""
    raise InputError(f"the model output contains NaN or infinity{hint}")


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose floating-point parameters and buffers are in ``dtype``.

    What ``copy.deepcopy(model).to(dtype)`` gives, for what the passes read,
    at a fraction of its cost (a deep copy walks every attribute of every
    module: on a small MLP it cost more than the exact diagonal itself): each
    module is copied shallowly (its class and attributes; hooks and other
    attributes are shared with the original) and gets its own parameter,
    buffer and child dictionaries. Floating-point parameters are new leaf
    ``nn.Parameter`` objects in ``dtype`` (a parameter shared by two modules
    stays shared); every buffer is a copy, so nothing the copy does reaches the
    original's state. Tensors held in plain attributes are shared, as
    ``Module.to`` would leave them.
    """
    memo: dict[int, Tensor] = {}

    def param(p: Tensor | None) -> Tensor | None:
        if p is None:
            return None
        if id(p) not in memo:
            data = p.detach().to(dtype) if p.is_floating_point() else p.detach()
            memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
        return memo[id(p)]

    def buffer(b: Tensor | None) -> Tensor | None:
        if b is None:
            return None
        if id(b) not in memo:
            memo[id(b)] = b.to(dtype, copy=True) if b.is_floating_point() else b.clone()
        return memo[id(b)]

    done: dict[int, nn.Module] = {}

    def walk(m: nn.Module) -> nn.Module:
        if id(m) in done:  # a module reached twice stays one module
            return done[id(m)]
        twin = copy.copy(m)
        done[id(m)] = twin
        # straight into __dict__: nn.Module.__setattr__ would inspect each value
        twin.__dict__["_parameters"] = {k: param(v) for k, v in m._parameters.items()}
        twin.__dict__["_buffers"] = {k: buffer(v) for k, v in m._buffers.items()}
        twin.__dict__["_modules"] = {
            k: None if c is None else walk(c) for k, c in m._modules.items()
        }
        return twin

    twin = walk(model)
    done.clear()  # ``walk`` refers to itself: without this the copy would wait for the
    memo.clear()  # cycle collector, and each call would take fresh pages for its tensors
    return twin


def fresh_generator(device: torch.device) -> torch.Generator:
    """A generator seeded non-deterministically, without touching the global RNG."""
    gen = torch.Generator(device=device)
    gen.seed()
    return gen


def finalize(params: dict[str, nn.Parameter], result: dict[str, Tensor]) -> dict[str, Tensor]:
    """``result`` ordered like ``params``, detached and cast to each parameter's dtype."""
    out = {}
    for name, p in params.items():
        r = result[name]
        if r.dtype != p.dtype:
            r = r.to(p.dtype)
        out[name] = r.detach() if r.requires_grad else r
    return out


def loss_and_grad(
    model: nn.Module, loss: LossSpec, inputs: Tensor, targets: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """``dL/dtheta`` (trainable parameters, detached) and the detached loss, by autograd.

    Uses ``torch.autograd.grad``: ``.grad`` is not touched. The model output and
    the targets are validated like an estimator validates them.
    """
    params = trainable_parameters(model)
    out = model(inputs)
    check_output(model, out.detach())
    loss.check_targets(out, targets)
    value = loss.loss(out, targets)
    grads = torch.autograd.grad(value, list(params.values()))
    return finalize(params, dict(zip(params, grads, strict=True))), value.detach()


def _buffers(model: nn.Module) -> list[Tensor]:
    found: list[Tensor] = []

    def walk(module: nn.Module) -> None:
        found.extend(b for b in module._buffers.values() if b is not None)
        for child in module._modules.values():
            if child is not None:
                walk(child)

    walk(model)
    return found


def has_active_dropout(model: nn.Module) -> bool:
    """Whether a dropout layer of ``model`` is in training mode with ``p > 0``."""
    stack = [model]  # a walk without recursion or generators: it runs on every call
    while stack:
        m = stack.pop()
        if isinstance(m, _DROPOUT) and m.training and m.p > 0:
            return True
        children = m._modules
        if children:
            stack.extend(c for c in children.values() if c is not None)
    return False


_DROPOUT = nn.modules.dropout._DropoutNd


@contextlib.contextmanager
def preserve_state(
    model: nn.Module, device: torch.device, seed_from: torch.Generator | None
) -> Iterator[None]:
    """Restore the global RNG and the model's buffers afterwards.

    A model's own forward may draw from the global RNG (dropout) or update
    buffers (running statistics of batch normalisation in training mode). With
    ``seed_from``, the global RNG is seeded from that generator for the
    duration, so dropout masks are a function of the caller's generator, and
    the same in the layer-by-layer and autograd paths.
    """
    buffers = _buffers(model)
    saved = [b.clone() for b in buffers]
    try:
        with global_rng(device, seed_from):
            yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved, strict=True):
                b.copy_(v)


class Estimator(abc.ABC):
    """A Hessian-diagonal estimator.

    Subclasses are pydantic dataclasses (frozen, fields = hyper-parameters) that
    set the class variables below and implement :meth:`_estimate`.

    Attributes:
        name: registry name, e.g. ``"hutchinson"``.
        cost: rough cost in gradient computations, e.g. ``"k HVPs"``.
        stochastic: whether the estimate depends on the generator.
        uses_model_forward: whether the module's own ``forward`` may be called
            (then the global RNG and the buffers are saved and restored around
            the call).
        impl_fields: fields that choose an implementation, not the quantity;
            they are left out of :attr:`label`.
        grad_in_pass: whether :meth:`_estimate_with_grad` takes the gradient
            from its own pass and calls the module's ``forward`` only inside a
            :func:`preserve_state` of its own; then, like :meth:`__call__`,
            :meth:`estimate_with_grad` skips the state guard where neither
            ``uses_model_forward`` nor active dropout needs it.
        quiet_fields: fields shown in :attr:`label` only when they differ from
            their default (options added after results were published, e.g. those
            that restore an author's rule, so existing labels stay as they were).
        plain_losses_only: whether only ``nn.CrossEntropyLoss`` and ``nn.MSELoss``
            without options are taken (the peer libraries); others are refused.
    """

    name: ClassVar[str]
    cost: ClassVar[str]
    stochastic: ClassVar[bool] = False
    uses_model_forward: ClassVar[bool] = True
    impl_fields: ClassVar[tuple[str, ...]] = ()
    grad_in_pass: ClassVar[bool] = False
    quiet_fields: ClassVar[tuple[str, ...]] = ()
    plain_losses_only: ClassVar[bool] = False

    @property
    def params(self) -> dict[str, object]:
        """The hyper-parameters as a dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @property
    def sample_param(self) -> str | None:
        """The hyper-parameter that counts Monte-Carlo samples (a sweep varies it), if any.

        Reports read it from the records: labels that differ only in this field form
        a sweep when the estimator is :attr:`stochastic`.
        """
        return "num_samples" if "num_samples" in self.params else None

    @property
    def default_params(self) -> bool:
        """Whether the hyper-parameters shown in the label, bar the sample count, are defaults.

        Reports list an estimator's default variant first.
        """
        default = type(self)().params
        skip = {*self.impl_fields, self.sample_param}
        return all(v == default[k] for k, v in self.params.items() if k not in skip)

    @property
    def label(self) -> str:
        """A readable, stable label such as ``hutchinson[num_samples=10]``."""
        shown = [f"{k}={v}" for k, v in self._label_params().items()]
        return f"{self.name}[{','.join(shown)}]" if shown else self.name

    @property
    def label_params(self) -> dict[str, object]:
        """The hyper-parameters :attr:`label` shows (what records store).

        Building the estimator from them gives this estimator back.
        """
        return self._label_params()

    def _label_params(self) -> dict[str, object]:
        """The hyper-parameters :attr:`label` shows.

        All but ``impl_fields``; ``quiet_fields`` only where they differ from their default.
        """
        default = type(self)().params if self.quiet_fields else {}
        return {
            k: v
            for k, v in self.params.items()
            if k not in self.impl_fields and not (k in self.quiet_fields and v == default[k])
        }

    def check_supported(self, model: nn.Module, loss_fn: nn.Module) -> None:
        """Raise :class:`UnsupportedError` when this estimator cannot handle the pair."""
        model, loss = self._loss(model, loss_fn)
        trainable_parameters(model)
        self._check_model(model, loss)

    def _check_model(self, model: nn.Module, loss: LossSpec) -> None:
        """What a subclass refuses beyond the loss and the parameters.

        ``model`` is the one the estimate sees: with ``NLLLoss``, without its final
        ``LogSoftmax`` (absorbed into the loss, see :meth:`LossSpec.absorb`).
        """
        return None

    def _loss(self, model: nn.Module, loss_fn: nn.Module) -> tuple[nn.Module, LossSpec]:
        """The model and the loss spec the estimate sees; refuses an unsupported loss."""
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedError(
                f"model {type(model).__name__} is TorchScript; pass the eager nn.Module it "
                "was scripted from (estimators differentiate through the module's parameters)"
            )
        model, loss = LossSpec.of(loss_fn).absorb(model)
        if self.plain_losses_only and loss.plain_module() is None:
            raise UnsupportedError(
                f"{self.name} takes only nn.CrossEntropyLoss or nn.MSELoss without options "
                f"(or nn.NLLLoss after nn.LogSoftmax), not this {type(loss_fn).__name__}"
            )
        return model, loss

    def _prepare(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[nn.Module, LossSpec, bool, torch.Generator | None]:
        """The model and loss spec to use, whether dropout is active, and the generator.

        Checks the inputs.
        """
        model, loss = self._loss(model, loss_fn)
        if not all_finite(inputs):
            raise InputError("the inputs contain NaN or infinity")
        dropout = has_active_dropout(model)
        if generator is None and (self.stochastic or dropout):
            generator = fresh_generator(inputs.device)
        return model, loss, dropout, generator

    def __call__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Estimate the diagonal of the Hessian of ``loss_fn(model(inputs), targets)``."""
        model, loss, dropout, generator = self._prepare(model, loss_fn, inputs, generator)
        if self.uses_model_forward or dropout:
            with preserve_state(model, inputs.device, generator if dropout else None):
                return self._estimate(model, loss, inputs, targets, generator)
        return self._estimate(model, loss, inputs, targets, generator)

    def estimate_with_grad(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """The diagonal estimate, the gradient of the loss and the loss, for one optimizer step.

        The diagonal is the one :meth:`__call__` returns for the same generator
        state (same draws, same dropout masks). The gradient ``dL/dtheta`` is keyed
        and ordered like the diagonal (trainable parameters, detached, each with
        its parameter's dtype); the loss is a detached 0-dim tensor. Both are
        evaluated at the true targets, with the dropout masks the estimate used.

        Estimators whose pass computes the gradient on the way return it at no
        extra cost; the default pays one autograd gradient (``torch.autograd.grad``,
        ``.grad`` is not touched). The same guarantees as :meth:`__call__` hold:
        parameters, ``.grad``, buffers, hooks and the global RNG are left as found.

        Returns:
            ``(diag, grad, loss)``.
        """
        model, loss, dropout, generator = self._prepare(model, loss_fn, inputs, generator)
        if self.uses_model_forward or dropout or not self.grad_in_pass:
            with preserve_state(model, inputs.device, generator if dropout else None):
                return self._estimate_with_grad(model, loss, inputs, targets, generator)
        return self._estimate_with_grad(model, loss, inputs, targets, generator)

    def _estimate_with_grad(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """:meth:`_estimate`, then one autograd gradient with the same dropout masks.

        Runs inside :func:`preserve_state`. Override where the estimate's pass
        yields the gradient anyway.
        """
        rng = rng_state(inputs.device)
        diag = self._estimate(model, loss, inputs, targets, generator)
        set_rng_state(inputs.device, rng)  # replay the estimate's dropout masks
        grad, value = loss_and_grad(model, loss, inputs, targets)
        return diag, grad, value

    @abc.abstractmethod
    def _estimate(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """The estimate, keyed by trainable parameter name in ``named_parameters()`` order.

        Tensors must be detached and have their parameter's dtype (see
        :func:`finalize`). ``generator`` is None only for a non-stochastic
        estimator called without one.
        """


def _no_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected an integer, not a boolean")
    return value


Count = Annotated[int, pydantic.BeforeValidator(_no_bool), pydantic.Field(gt=0)]
"""A positive integer hyper-parameter (``"10"`` parses; ``True`` is refused)."""

Flag = Annotated[bool, pydantic.Field(strict=True)]
"""A boolean hyper-parameter (no coercion from integers or strings)."""


def estimator_dataclass(cls):
    """Decorator: make ``cls`` a frozen, validated dataclass that forbids unknown fields."""
    return pydantic.dataclasses.dataclass(
        frozen=True, config=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    )(cls)
