"""One-pass engines over ``nn.Sequential`` models, driven by the rule table.

:func:`build_plan` turns a model into a list of steps (nested ``Sequential``
containers are flattened; ``Identity`` and eval-mode ``Dropout`` are skipped).
The engines then run the forward pass, the loss and one backward pass by hand,
without autograd or hooks:

- :func:`diag_pass` propagates a diagonal curvature estimate (HesScale, BL89)
  alongside the gradient;
- :func:`factor_pass` propagates signed symmetric factors of the exact output
  Hessian (or of its Monte-Carlo estimate), and for the exact Hessian the
  factors of every curved activation's ``f''(u) g`` residual, as BackPACK's
  DiagHessian does. When a layer has more columns than features it switches to
  full per-sample matrices, ``H_u = f' f'^T o (J^T H_z J) + diag(f'' g)``.
  The same pass yields the K-FAC factors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from hessbench.errors import InputError, UnsupportedError
from hessbench.estimators._base import all_finite
from hessbench.estimators._layers import RULES, Elementwise, Parametric, Rule
from hessbench.estimators._losses import LossSpec, LossState

__all__ = ["Plan", "build_plan", "diag_pass", "factor_pass", "sampled_grad_pass"]


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


def _flatten(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            _flatten(child, path + ".", out)
        else:
            out.append((path, child))


def build_plan(model: nn.Module) -> Plan:
    """Check ``model`` against the rule table and list its steps.

    Raises:
        UnsupportedError: naming the first unsupported layer's path and type, or
            when the model is not an ``nn.Sequential`` or has no trainable parameter.
    """
    if type(model) is not nn.Sequential:
        raise UnsupportedError(
            f"model {type(model).__name__} is not an nn.Sequential; this estimator's "
            "layer-by-layer pass needs one"
        )
    layers: list[tuple[str, nn.Module]] = []
    _flatten(model, "", layers)
    steps = []
    first = -1
    keys: list[str] = []
    seen: set[int] = set()
    for path, m in layers:
        rule = RULES.get(type(m))
        if rule is None:
            supported = ", ".join(sorted(t.__name__ for t in RULES))
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}) is not supported; supported layers: {supported}"
            )
        rule.check(m, path)
        wkey = bkey = None
        if rule.parametric:
            if m.weight.requires_grad:
                wkey = f"{path}.weight"
            if m.bias is not None and m.bias.requires_grad:
                bkey = f"{path}.bias"
            for p in (m.weight, m.bias):
                if p is not None and p.requires_grad:
                    if id(p) in seen:
                        raise UnsupportedError(
                            f"layer '{path}' ({type(m).__name__}) shares a parameter with another "
                            "layer; tied parameters are not supported by the layer-by-layer pass"
                        )
                    seen.add(id(p))
        elif m._parameters or m._modules:
            stray = [n for n, p in m.named_parameters() if p.requires_grad]
            if stray:
                raise UnsupportedError(
                    f"layer '{path}' ({type(m).__name__}) has trainable parameters {stray} "
                    "that this estimator cannot handle"
                )
        if type(m) is nn.Identity or (type(m) is nn.Dropout and (not m.training or m.p == 0.0)):
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


def _forward(plan: Plan, x: Tensor, generator: torch.Generator | None):
    caches = []
    shapes = []
    for st in plan.steps:
        shapes.append(x.shape[1:])
        try:
            x, cache = st.rule.forward(st.module, x, generator)
        except UnsupportedError as exc:
            raise UnsupportedError(
                f"layer '{st.path}' ({type(st.module).__name__}): {exc}"
            ) from None
        caches.append(cache)
    return x, caches, shapes


def check_output(model: nn.Module, out: Tensor) -> None:
    """Raise :class:`InputError` for a non-finite output, naming a bad parameter."""
    if all_finite(out):
        return
    bad = [n for n, p in model.named_parameters() if not all_finite(p)]
    hint = f"; non-finite parameters: {', '.join(bad)}" if bad else ""
    raise InputError(f"the model output contains NaN or infinity{hint}")


def run_start(plan, model, loss: LossSpec, x, targets, generator):
    out, caches, shapes = _forward(plan, x, generator)
    check_output(model, out)
    loss.check_targets(out, targets)
    return out, caches, shapes, loss.evaluate(out, targets)


def ordered(plan: Plan, res: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: res[k] for k in plan.keys}


def _store(res: dict, step: Step, w: Tensor, b: Tensor | None) -> None:
    if step.weight_key:
        res[step.weight_key] = w
    if step.bias_key and b is not None:
        res[step.bias_key] = b


def diag_pass(
    plan: Plan,
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
    with torch.no_grad():
        out, caches, _, state = run_start(plan, model, loss, x, targets, generator)
        if output == "exact":
            h = loss.hess_diag(out, state)
        elif output == "bl89":
            h = loss.target_hess_diag(out, targets, state)
        else:
            h = torch.zeros_like(out)
        need_g = residual or with_grad
        g = state.grad if need_g else None
        diag: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        steps = plan.steps
        for i in range(len(steps) - 1, plan.first_param - 1, -1):
            st = steps[i]
            rule = st.rule
            m = st.module
            c = caches[i]
            last = i == plan.first_param
            if rule.parametric:
                hw, hb, gw, gb, h_in, g_in = rule.diag_backward(
                    m, c, g if need_g else None, h, need_input=not last, with_grad=with_grad
                )
                _store(diag, st, hw, hb)
                if with_grad:
                    _store(grads, st, gw, gb)
                if last:
                    break
                h, g = h_in, g_in
            elif rule.elementwise:
                g, h = rule.backward_diag(m, c, g, h, residual)
            else:
                h = rule.vjp_sq(m, c, h)
                if need_g:
                    g = rule.vjp(m, c, g)
    return ordered(plan, diag), ordered(plan, grads) if with_grad else grads, state


def sampled_grad_pass(
    plan: Plan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], LossState]:
    """The gradient of the loss at targets drawn from the model's predictive distribution.

    Returns:
        the parameter gradients and the loss state at the true targets.
    """
    with torch.no_grad():
        out, caches, _, state = run_start(plan, model, loss, x, targets, generator)
        g = loss.grad_at(state, loss.sample_targets(out, state, generator))
        grads: dict[str, Tensor] = {}
        steps = plan.steps
        for i in range(len(steps) - 1, plan.first_param - 1, -1):
            st = steps[i]
            if st.rule.parametric:
                _store(grads, st, *st.rule.param_grad(st.module, caches[i], g))
            if i == plan.first_param:
                break
            g = st.rule.vjp(st.module, caches[i], g)
    return ordered(plan, grads), state


def _collapse_step(plan: Plan) -> int:
    """The step below which only the diagonal of the Hessian is needed (-1 if none).

    When the first parametric layer needs only its output's Hessian diagonal
    (Linear) and only element-wise layers lie between it and the next linear
    map above, that map's input Hessian is needed only on its diagonal, which
    element-wise layers propagate exactly: ``f'^2 d + f'' g``.
    """
    steps = plan.steps
    if not getattr(steps[plan.first_param].rule, "diag_suffices", False):
        return -1
    j = plan.first_param + 1
    while j < len(steps) and steps[j].rule.elementwise:
        j += 1
    return j if j < len(steps) else -1


def _to_full(v: Tensor, s: Tensor | None, d: Tensor | None) -> Tensor:
    """``sum_k s_k v_k v_k^T + diag(d)`` per sample, shape (N, F, F)."""
    n, k = v.shape[:2]
    vf = v.reshape(n, k, -1)
    if s is None:
        hmat = vf.transpose(1, 2) @ vf
    else:
        hmat = (vf * s.unsqueeze(2)).transpose(1, 2) @ vf
    if d is not None:
        hmat.diagonal(dim1=1, dim2=2).add_(d.reshape(n, -1))
    return hmat


def _full_vjp(rule, m, cache, hmat: Tensor, out_shape, in_shape) -> Tensor:
    """``J^T H J`` per sample for a layer linear in its input."""
    n, dout = hmat.shape[:2]
    din = math.prod(in_shape)
    left = rule.vjp_cols(m, cache, hmat.reshape(n, dout, *out_shape))  # (N, dout, *in) = H J
    left = left.reshape(n, dout, din).transpose(1, 2).reshape(n, din, *out_shape)
    return rule.vjp_cols(m, cache, left).reshape(n, din, din)


def _diag_cols(rule, m, cache, d: Tensor, out_shape) -> Tensor:
    """``J^T diag(d)`` as columns, (N, F_out, *in)."""
    n = d.shape[0]
    flat = d.reshape(n, -1)
    if hasattr(rule, "vjp_diag_cols"):
        return rule.vjp_diag_cols(m, cache, flat)
    eye = torch.diag_embed(flat).reshape(n, flat.shape[1], *out_shape)
    return rule.vjp_cols(m, cache, eye)


def factor_pass(
    plan: Plan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    *,
    columns: Literal["exact", "mc", "grad"],
    residual: bool,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    representation: Literal["auto", "factored", "full"] = "auto",
    kfac: bool = False,
) -> dict[str, Tensor]:
    """Backpropagate factors of the output Hessian (see the module docstring).

    Args:
        columns: ``exact`` starts from the symmetric factor of the loss Hessian,
            ``mc`` from ``num_samples`` Monte-Carlo columns, ``grad`` from the
            output gradient itself (one column: squared per-sample gradients).
        residual: add the ``f''(u) g`` terms of curved activations (the exact
            Hessian); without them the result is the GGN diagonal.
        representation: ``factored`` keeps columns throughout, ``full`` uses
            per-sample matrices throughout, ``auto`` switches to matrices where
            a layer has more columns than features.
        kfac: return the K-FAC diagonal ``diag(A) diag(G)^T`` instead.
    """
    with torch.no_grad():
        out, caches, shapes, state = run_start(plan, model, loss, x, targets, generator)
        s: Tensor | None = None  # column signs: S diag(s) S^T (None: all +1)
        if columns == "exact":
            # the exact Hessian takes signed columns (negative per-sample loss weights)
            v = loss.sqrt_factor(out, state, signed=residual)
            signs = loss.factor_signs(out) if residual else None
            s = None if signs is None else signs.expand(v.shape[:2]).contiguous()
        elif columns == "grad":
            v = state.grad.unsqueeze(1)
        else:
            assert generator is not None
            v = loss.mc_factor(out, state, num_samples, generator)
        dres: Tensor | None = None
        hmat: Tensor | None = None
        n = out.shape[0]
        auto_full = representation == "auto" and not kfac
        if representation == "full" or (auto_full and v.shape[1] > out[0].numel()):
            hmat, v, s = _to_full(v, s, None), None, None
        g = state.grad
        res: dict[str, Tensor] = {}
        steps = plan.steps
        out_shape = out.shape[1:]
        collapse_at = _collapse_step(plan) if representation != "full" and not kfac else -1
        for i in range(len(steps) - 1, plan.first_param - 1, -1):
            st = steps[i]
            rule = st.rule
            m = st.module
            c = caches[i]
            in_shape = shapes[i]
            if isinstance(rule, Parametric):
                if kfac:
                    a = rule.kfac_input(m, c)
                    gdiag = rule.kfac_output(m, c, v)
                    w = (gdiag.view(a.shape[0], -1, 1) * a.unsqueeze(1)).reshape(m.weight.shape)
                    _store(res, st, w, gdiag)
                elif hmat is not None:
                    _store(res, st, *rule.param_diag_full(m, c, hmat))
                elif v is None:  # collapsed to the diagonal
                    _store(res, st, *rule.param_diag(m, c, dres))
                else:
                    w, b = rule.param_diag_cols(m, c, v, s)
                    if dres is not None:
                        wd, bd = rule.param_diag(m, c, dres)
                        w = w + wd
                        b = None if b is None else b + bd
                    _store(res, st, w, b)
            if i == plan.first_param:
                break
            if isinstance(rule, Elementwise):
                if not residual and hmat is None and dres is None:
                    v = rule.vjp_cols(m, c, v)  # GGN / K-FAC: plain column backprop
                    out_shape = in_shape
                    continue
                d1, d2 = rule.derivs(m, c)
                r = d2 * g if residual and d2 is not None else None
                if hmat is not None:
                    f = d1.reshape(n, -1)
                    hmat = hmat * f.unsqueeze(2) * f.unsqueeze(1)
                    if r is not None:
                        hmat.diagonal(dim1=1, dim2=2).add_(r.reshape(n, -1))
                else:
                    if v is not None:
                        v = v * d1.unsqueeze(1)
                    if dres is not None:
                        dres = dres * d1 * d1
                    if r is not None:
                        dres = r if dres is None else dres + r
                if residual:
                    g = g * d1
            else:
                if hmat is not None:
                    hmat = _full_vjp(rule, m, c, hmat, out_shape, in_shape)
                elif i == collapse_at:
                    # only the diagonal is needed below: diag(J^T H J) from the columns and
                    # (J o J)^T for the diagonal residual, no columns materialised
                    vin = rule.vjp_cols(m, c, v)
                    sq = vin.square()
                    diag = sq.sum(1) if s is None else torch.einsum("nk,nk...->n...", s, sq)
                    if dres is not None:
                        diag = diag + rule.vjp_sq(m, c, dres)
                    v, s, dres = None, None, diag
                else:
                    v = rule.vjp_cols(m, c, v)
                    if dres is not None:
                        cols = _diag_cols(rule, m, c, dres.abs().sqrt(), out_shape)
                        signs = dres.reshape(n, -1).sign()
                        if s is None:
                            s = torch.ones(v.shape[:2], dtype=v.dtype, device=v.device)
                        v = torch.cat([v, cols], 1)
                        s = torch.cat([s, signs], 1)
                        dres = None
                    if auto_full and v.shape[1] > math.prod(in_shape):
                        hmat, v, s = _to_full(v, s, None), None, None
                if residual:
                    g = rule.vjp(m, c, g)
            out_shape = in_shape
    return ordered(plan, res)


def cast_problem(
    model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype | None
) -> tuple[nn.Module, Tensor, Tensor]:
    """A copy of the problem in ``dtype`` (the originals when already there or ``dtype`` is None)."""
    if dtype is None:
        return model, x, y
    if x.is_floating_point():
        x = x.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    if any(p.dtype != dtype for p in model.parameters()):
        model = copy.deepcopy(model).to(dtype)
    return model, x, y
