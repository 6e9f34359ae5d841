"""One-pass engines over ``nn.Sequential`` models, driven by the rule table.

:func:`build_plan` turns a model into a list of steps (nested ``Sequential``
containers are flattened; ``Identity`` and eval-mode ``Dropout`` are skipped).
The engines then run the forward pass, the loss and one backward pass by hand,
without autograd or hooks:

- :func:`diag_pass` propagates a diagonal curvature estimate (HesScale, BL89)
  alongside the gradient;
- :func:`sampled_grad_pass` backpropagates the gradient at sampled targets;
- :mod:`hessbench.estimators._factor_pass` (GGN, exact Hessian, K-FAC) builds on
  :func:`run_start` and the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from hessbench.errors import UnsupportedError
from hessbench.estimators._base import check_output
from hessbench.estimators._graph import GraphPlan, PerModel, build_graph_plan, model_key
from hessbench.estimators._graph_pass import graph_diag_pass
from hessbench.estimators._layers import RULES, Rule
from hessbench.estimators._losses import LossSpec, LossState

__all__ = [
    "CastView",
    "Plan",
    "build_plan",
    "check_output",
    "diag_pass",
    "ordered",
    "run_start",
    "sampled_grad_pass",
    "store",
]


class Step(NamedTuple):
    """One layer of a plan: its path, module, rule and trainable parameter names."""

    path: str
    module: nn.Module
    rule: Rule
    weight_key: str | None
    bias_key: str | None


@dataclass(frozen=True, slots=True)
class Plan:
    """The layers to run, and where the first trainable parameter sits."""

    steps: tuple[Step, ...]
    first_param: int
    keys: tuple[str, ...]
    source: Plan | None = None
    """The plan this one reads in another dtype (:meth:`cast`), whose modules are the layers."""

    def cast(self, dtype: torch.dtype) -> Plan:
        """The plan with every layer read in ``dtype`` (:class:`CastView`)."""
        steps = tuple(st._replace(module=CastView(st.module, dtype)) for st in self.steps)
        return Plan(steps, self.first_param, self.keys, self)


class CastView:
    """A layer read in another dtype: each floating-point tensor attribute cast when read.

    A pass in float64 over a float32 model reads its layers through these, so
    the float64 weights exist one layer at a time, while that layer is being
    processed, and not for the whole model at once as in a cast copy
    (:func:`~hessbench.estimators._base.cast_copy`). Every other attribute is
    the module's own.
    """

    __slots__ = ("_dtype", "_module")

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self._module, self._dtype = module, dtype

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != self._dtype:
            return value.detach().to(self._dtype)
        return value


def _flatten(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            _flatten(child, path + ".", out)
        else:
            out.append((path, child))


def build_plan(
    model: nn.Module, *, graph: bool = False, like: nn.Module | None = None
) -> Plan | GraphPlan:
    """Check ``model`` against the rule table and list its steps.

    With ``graph``, a model that is not an ``nn.Sequential`` is captured by
    ``torch.fx`` into a :class:`~hessbench.estimators._graph.GraphPlan` (for the
    engines that take one: ``diag_pass`` and ``factor_pass``), and so is an
    ``nn.Sequential`` with a layer outside the sequential rule table (BatchNorm,
    LayerNorm, GELU, a residual block of the user's); any other
    ``nn.Sequential`` gets the sequential plan. ``like``: the model that
    ``model`` is a cast copy of, whose trace the graph plan reuses
    (:func:`~hessbench.estimators._graph.build_graph_plan`). Plans are cached
    per model while what they read of it is unchanged (:data:`_PLANS`).

    Raises:
        UnsupportedError: naming the first unsupported layer's path and type, or
            when the model is not an ``nn.Sequential`` (without ``graph``) or has
            no trainable parameter.
    """
    if graph and type(model) is not nn.Sequential:
        return build_graph_plan(model, like=like)
    if type(model) is not nn.Sequential:
        raise UnsupportedError(
            f"model {type(model).__name__} is not an nn.Sequential; this estimator's "
            "layer-by-layer pass needs one"
        )
    key = model_key(model)
    plan = _PLANS.get(model, key)
    if plan is None:
        try:
            plan = _build(model)
        except UnsupportedError as exc:
            # remembered (the message, not the exception and its frames): the sequential
            # table is not tried again for this model
            plan = _Refused(str(exc))
        _PLANS.put(model, key, plan)
    if isinstance(plan, _Refused):
        if graph:
            return _graph_fallback(model, like, plan.why)
        raise UnsupportedError(plan.why)
    return plan


@dataclass(frozen=True)
class _Refused:
    """A model the sequential table refused, and why (its one-line message)."""

    why: str


def _graph_fallback(model: nn.Sequential, like: nn.Module | None, why: str) -> GraphPlan:
    """The graph plan of an ``nn.Sequential`` the sequential table refused (for ``why``).

    Refused by the graph engine too: one line with both reasons, the table's
    first (it names the layer by path and type), unless the two say the same.
    """
    try:
        return build_graph_plan(model, like=like)
    except UnsupportedError as exc:
        first = why.split("; supported layers:")[0]
        if first in str(exc):
            raise
        raise UnsupportedError(f"{first} by the sequential pass; graph engine: {exc}") from None


_PLANS = PerModel()
"""Sequential plans of the last few models, kept while their modules, training
flags, dropout probabilities and parameters (objects and ``requires_grad``) are
unchanged (:func:`~hessbench.estimators._graph.model_key`): building one costs about
as much as a kernel launch per layer, a noticeable share of a pass at batch 1."""


def _build(model: nn.Sequential) -> Plan:
    layers: list[tuple[str, nn.Module]] = []
    _flatten(model, "", layers)
    steps = []
    first = -1
    keys: list[str] = []
    seen: set[int] = set()
    for path, m in layers:
        kind = type(m)
        rule = RULES.get(kind)
        if rule is None:
            supported = ", ".join(sorted(t.__name__ for t in RULES))
            raise UnsupportedError(
                f"layer '{path}' ({kind.__name__}) is not supported; supported layers: {supported}"
            )
        rule.check(m, path)
        wkey = bkey = None
        if rule.parametric:
            weight, bias = m.weight, m.bias  # each read once: nn.Module attributes are slow
            for p, suffix in ((weight, ".weight"), (bias, ".bias")):
                if p is None or not p.requires_grad:
                    continue
                if id(p) in seen:
                    raise UnsupportedError(
                        f"layer '{path}' ({kind.__name__}) shares a parameter with another "
                        "layer; tied parameters are not supported by the layer-by-layer pass"
                    )
                seen.add(id(p))
                if p is weight:
                    wkey = path + suffix
                else:
                    bkey = path + suffix
        elif m._parameters or m._modules:
            stray = [n for n, p in m.named_parameters() if p.requires_grad]
            if stray:
                raise UnsupportedError(
                    f"layer '{path}' ({kind.__name__}) has trainable parameters {stray} "
                    "that this estimator cannot handle"
                )
        if kind is nn.Identity or (kind is nn.Dropout and (not m.training or m.p == 0.0)):
            continue
        if (wkey or bkey) and first < 0:
            first = len(steps)
        if wkey:
            keys.append(wkey)
        if bkey:
            keys.append(bkey)
        steps.append(Step(path, m, rule, wkey, bkey))
    if first < 0:
        raise UnsupportedError("the model has no trainable parameters")
    return Plan(tuple(steps), first, tuple(keys))


def _type_name(module: nn.Module | CastView) -> str:
    """The layer's class name (a :class:`CastView`'s module's)."""
    return type(module._module if isinstance(module, CastView) else module).__name__


def _forward(plan: Plan, x: Tensor, generator: torch.Generator | None):
    caches = []
    shapes = []
    for st in plan.steps:
        shapes.append(x.shape[1:])
        try:
            x, cache = st.rule.forward(st.module, x, generator)
        except UnsupportedError as exc:
            raise UnsupportedError(f"layer '{st.path}' ({_type_name(st.module)}): {exc}") from None
        caches.append(cache)
    return x, caches, shapes


def run_start(plan, model, loss: LossSpec, x, targets, generator):
    """The forward pass (output, caches, input shapes per step) and the loss state, checked."""
    out, caches, shapes = _forward(plan, x, generator)
    check_output(model, out)
    loss.check_targets(out, targets)
    return out, caches, shapes, loss.evaluate(out, targets)


def ordered(plan: Plan, res: dict[str, Tensor]) -> dict[str, Tensor]:
    """``res`` in the plan's parameter order."""
    return {k: res[k] for k in plan.keys}


def store(res: dict, step: Step, w: Tensor, b: Tensor | None) -> None:
    """Put a layer's weight and bias results into ``res`` under its trainable names."""
    if step.weight_key:
        res[step.weight_key] = w
    if step.bias_key and b is not None:
        res[step.bias_key] = b


def diag_pass(
    plan: Plan | GraphPlan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    *,
    output: Literal["exact", "bl89", "zero"],
    residual: bool,
    generator: torch.Generator | None = None,
    with_grad: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], LossState]:
    """HesScale-style diagonal backprop: ``h_u = f'^2 h_a (+ f'' g_a)``, ``h_a = (W o W)^T h_z``.

    Returns:
        the parameter diagonals, the parameter gradients (empty unless
        ``with_grad``) and the loss state.
    """
    if isinstance(plan, GraphPlan):
        return graph_diag_pass(
            plan,
            model,
            loss,
            x,
            targets,
            output=output,
            residual=residual,
            generator=generator,
            with_grad=with_grad,
        )
    with torch.no_grad():
        out, caches, _, state = run_start(plan, model, loss, x, targets, generator)
        if output == "exact":
            h = loss.hess_diag(out, state)
        elif output == "bl89":
            h = loss.target_hess_diag(out, targets, state)
        else:
            h = torch.zeros_like(out)
        steps = plan.steps
        # the gradient is read by curved activations (f'' g) and needed down to the lowest
        # one; with ``with_grad`` everywhere (below it, no J^T g is computed)
        curved = [i for i, st in enumerate(steps) if st.rule.elementwise and st.rule.curved]
        low = plan.first_param if with_grad else curved[0] if residual and curved else len(steps)
        g = state.grad if low < len(steps) else None
        diag: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        for i in range(len(steps) - 1, plan.first_param - 1, -1):
            st = steps[i]
            rule = st.rule
            m = st.module
            c = caches[i]
            last = i == plan.first_param
            if rule.parametric:
                hw, hb, gw, gb, h_in, g_in = rule.diag_backward(
                    m,
                    c,
                    g if with_grad or i > low else None,
                    h,
                    need_input=not last,
                    with_grad=with_grad,
                )
                store(diag, st, hw, hb)
                if with_grad:
                    store(grads, st, gw, gb)
                if last:
                    break
                h, g = h_in, g_in
            elif rule.elementwise:
                g, h = rule.backward_diag(m, c, g, h, residual)
            else:
                h = rule.vjp_sq(m, c, h)
                g = rule.vjp(m, c, g) if g is not None and i > low else None
    return ordered(plan, diag), ordered(plan, grads) if with_grad else grads, state


def sampled_grad_pass(
    plan: Plan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    *,
    with_grad: bool = False,
) -> tuple[dict[str, Tensor], LossState, dict[str, Tensor]]:
    """The gradient of the loss at targets drawn from the model's predictive distribution.

    The output gradient is the loss's ``sampled_grad`` (see
    :class:`~hessbench.estimators._losses.LossSpec`). With ``with_grad`` the same
    walk also backpropagates the gradient at the true targets (the forward pass
    is shared; each layer does two ``J^T g`` and two parameter gradients).

    Returns:
        the parameter gradients at the sampled targets, the loss state at the true
        targets and (with ``with_grad``, else empty) the parameter gradients there.
    """
    with torch.no_grad():
        out, caches, _, state = run_start(plan, model, loss, x, targets, generator)
        vectors = [loss.sampled_grad(out, state, generator)]
        if with_grad:
            vectors.append(state.grad)
        grads: list[dict[str, Tensor]] = [{} for _ in vectors]
        steps = plan.steps
        for i in range(len(steps) - 1, plan.first_param - 1, -1):
            st = steps[i]
            for k, g in enumerate(vectors):
                if st.rule.parametric:
                    store(grads[k], st, *st.rule.param_grad(st.module, caches[i], g))
                if i > plan.first_param:
                    vectors[k] = st.rule.vjp(st.module, caches[i], g)
            if i == plan.first_param:
                break
    return ordered(plan, grads[0]), state, ordered(plan, grads[1]) if with_grad else {}
