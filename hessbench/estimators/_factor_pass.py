"""The factor pass: backpropagate the output Hessian's factors, choosing a representation per layer.

:func:`factor_pass` runs the forward pass and the loss by hand, then walks the
layers backwards carrying a :mod:`~hessbench.estimators._curvature`
representation of each sample's Hessian (or GGN) with respect to the current
layer's output, and the gradient. ``ggn_exact``, ``ggn_mc``, ``exact``,
``efisher`` and ``kfac`` are this one pass with different :class:`Mode` s.

Which representation to carry where is decided once per call, before the
backward walk, by :func:`choose_representations`: a small dynamic programme
over the layers whose states are "factored with ``K`` columns (plus a pending
diagonal)" and "full", and whose transitions are carrying on, densifying
(``S diag(s) S^T``, ``K F^2``) and refactoring a dense matrix into ``2F``
signed columns (exact, by polarization), each priced by an estimate of the
multiply-adds and the memory it touches. So a pass can go dense where columns
outnumber features and back to columns before a layer that widens the tensor
(a pooling layer, a transposed map), instead of switching for good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from hessbench.estimators._base import cast_copy
from hessbench.estimators._curvature import Curvature, Diagonal, Factored, Full
from hessbench.estimators._graph import GraphPlan
from hessbench.estimators._graph_pass import chunked_graph_factor_pass
from hessbench.estimators._losses import LossSpec, LossState
from hessbench.estimators._sequential import Plan, build_plan, ordered, run_start, store

__all__ = ["Mode", "PassResult", "Problem", "choose_representations", "factor_pass"]

Kind = Literal["factored", "full"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One estimation problem: the model, the loss, the data and the randomness."""

    model: nn.Module
    loss: LossSpec
    inputs: Tensor
    targets: Tensor
    generator: torch.Generator | None = None
    result_dtype: torch.dtype | None = None
    """The dtype the pass stores each layer's results in as it goes (None: as computed)."""

    def cast(
        self, dtype: torch.dtype | None, plan: Plan | GraphPlan
    ) -> tuple[Problem, Plan | GraphPlan]:
        """The problem and its plan computing in ``dtype``; results in the model's dtype.

        A sequential plan reads its layers in ``dtype`` one at a time
        (:meth:`~hessbench.estimators._sequential.Plan.cast`), and the pass
        casts each layer's results back as it produces them: at no point does a
        float64 copy of the whole model or of the whole result exist. A graph
        plan runs on a cast copy of the model (:func:`cast_copy`) that reuses
        the original's trace.
        """
        if dtype is None:
            return self, plan
        x, y, model = self.inputs, self.targets, self.model
        if x.is_floating_point():
            x = x.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes == {dtype}:
            return replace(self, inputs=x, targets=y), plan
        if isinstance(plan, GraphPlan):
            model = cast_copy(model, dtype)
            plan = build_plan(model, graph=True, like=self.model)
            return replace(self, model=model, inputs=x, targets=y), plan
        result = dtypes.pop() if len(dtypes) == 1 else None
        return replace(self, inputs=x, targets=y, result_dtype=result), plan.cast(dtype)


@dataclass(frozen=True, slots=True)
class Mode:
    """What the factor pass computes; every option of the pass is decided here.

    Attributes:
        columns: the start, ``exact`` (the loss Hessian's symmetric factor,
            signed when ``residual``), ``mc`` (``num_samples`` Monte-Carlo
            columns) or ``grad`` (the output gradient: squared per-sample gradients).
        residual: add the ``f''(u) g`` terms of curved activations (the exact
            Hessian); without them the result is the GGN diagonal.
        representation: ``factored`` or ``full`` everywhere, or ``auto``: per
            layer, by estimated cost.
        kfac: return the K-FAC diagonal ``diag(A) diag(G)^T`` (columns only).
    """

    columns: Literal["exact", "mc", "grad"]
    residual: bool
    representation: Literal["auto", "factored", "full"] = "auto"
    kfac: bool = False
    num_samples: int = 1

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """The representations the pass may carry."""
        if self.kfac or self.representation == "factored":
            return ("factored",)
        return ("full",) if self.representation == "full" else ("factored", "full")

    @property
    def may_collapse(self) -> bool:
        """Whether the pass may drop to the diagonal where only it is needed below."""
        return self.representation != "full" and not self.kfac

    def start(self, loss: LossSpec, out: Tensor, state: LossState, gen) -> Factored:
        """The output Hessian's factor as columns."""
        s = None
        if self.columns == "exact":
            # the exact Hessian takes signed columns (negative per-sample loss weights)
            # contiguous: MSE's factor is an expanded identity, and columns are scaled in place
            v = loss.sqrt_factor(out, state, signed=self.residual).contiguous()
            signs = loss.factor_signs(out) if self.residual else None
            s = None if signs is None else signs.expand(v.shape[:2]).contiguous()
        elif self.columns == "grad":
            v = state.grad.unsqueeze(1).clone()  # owned: the pass scales columns in place
        else:
            assert gen is not None
            v = loss.mc_factor(out, state, self.num_samples, gen)
        return Factored(v, s, out.shape[1:])


class PassResult(NamedTuple):
    """The parameter diagonals, the gradients (empty unless asked for) and the loss state."""

    diag: dict[str, Tensor]
    grad: dict[str, Tensor]
    state: LossState


def collapse_step(plan: Plan) -> int:
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


def _unit_costs(module: nn.Module, fin: int, fout: int) -> tuple[int, int, int]:
    """Estimated multiply-adds of one column's ``J^T v`` and parameter diagonal, and of a dense one.

    Per sample, from the shapes; the planner compares them, it does not time.
    """
    if isinstance(module, nn.Linear):
        return fin * fout, fout, fout
    if isinstance(module, nn.modules.conv._ConvNd):
        positions = fout // module.out_channels
        per = module.weight.numel() * positions
        return per, per, per * positions
    return fin + fout, 0, 0


def choose_representations(
    plan: Plan, shapes: list, out_shape, columns: int, mode: Mode, collapse: int
) -> dict[int, Kind]:
    """The representation to hold at each step, minimising the estimated cost of the pass.

    States: ``("factored", K, P)`` (``K`` columns, a pending diagonal of width
    ``P``) and ``("full",)``. Per-sample costs are multiply-adds plus the
    entries of each result; the batch size scales them all alike.
    """
    steps = plan.steps
    last = len(steps) - 1
    fout = math.prod(out_shape)
    states: dict[tuple, tuple[float, dict[int, Kind]]] = {}
    if "factored" in mode.kinds:
        states[("factored", columns, 0)] = (0.0, {})
    if "full" in mode.kinds:
        states[("full",)] = (float(columns * fout * fout), {})
    best: tuple[float, dict[int, Kind]] | None = None
    for i in range(last, plan.first_param - 1, -1):
        st = steps[i]
        fin = math.prod(shapes[i])
        fout = math.prod(shapes[i + 1]) if i < last else math.prod(out_shape)
        cj, cp, cpf = _unit_costs(st.module, fin, fout)
        new: dict[tuple, tuple[float, dict[int, Kind]]] = {}

        def offer(key, cost, kinds, new=new):
            if key not in new or cost < new[key][0]:
                new[key] = (cost, kinds)

        for key, (cost, kinds) in states.items():
            options = [(key, cost)]
            if key[0] == "factored" and "full" in mode.kinds:
                options.append((("full",), cost + key[1] * fout * fout + fout * fout))
            if key[0] == "full" and "factored" in mode.kinds:
                options.append((("factored", 2 * fout, 0), cost + 3 * fout * fout))
            for k, c in options:
                kinds_i = {**kinds, i: k[0]}
                width = k[1] + k[2] if k[0] == "factored" else 0
                if st.rule.parametric:  # a pending diagonal costs one column here
                    c += (k[1] + 1) * cp + fout * fin if k[0] == "factored" else cpf + fout * fin
                if i == plan.first_param or i == collapse:
                    if i == collapse:
                        c += width * cj + fin * width if k[0] == "factored" else fout * cj * 2
                    if best is None or c < best[0]:
                        best = (c, kinds_i)
                    continue
                if st.rule.elementwise:
                    grows = mode.residual and getattr(st.rule, "curved", True)
                    if k[0] == "factored":
                        offer(("factored", k[1], fin if grows else k[2]), c + width * fin, kinds_i)
                    else:
                        offer(k, c + 2 * fin * fin, kinds_i)
                elif k[0] == "factored":
                    offer(("factored", width, 0), c + width * (cj + fin) + k[2] * fout, kinds_i)
                else:
                    offer(k, c + (fout + fin) * cj + fin * fin, kinds_i)
        states = new
    assert best is not None
    return best[1]


_SCHEDULES: dict[tuple, dict[int, Kind]] = {}


def _planned(plan: Plan, shapes: list, out_shape, columns: int, mode: Mode, collapse: int):
    """:func:`choose_representations`, memoised on everything it reads.

    Planning a small net costs tens of microseconds, a noticeable share of the
    pass at batch size 1; the key (layer types and shapes) is cheaper.
    """
    if len(mode.kinds) == 1:  # nothing to choose
        return dict.fromkeys(range(plan.first_param, len(plan.steps)), mode.kinds[0])
    plan = plan.source or plan  # the layers themselves, not read in another dtype
    # A stale or colliding key could only cost speed: every schedule gives the same numbers.
    types = tuple(type(st.module) for st in plan.steps)
    key = (mode, columns, collapse, tuple(out_shape), tuple(shapes), types)
    kinds = _SCHEDULES.get(key)
    if kinds is None:
        if len(_SCHEDULES) > 256:
            _SCHEDULES.clear()
        kinds = _SCHEDULES[key] = choose_representations(
            plan, shapes, out_shape, columns, mode, collapse
        )
    return kinds


def _as(tensors: tuple[Tensor | None, ...], dtype: torch.dtype | None) -> list[Tensor | None]:
    """``tensors`` in ``dtype`` (None entries, and a None dtype, left alone)."""
    return [t if t is None or dtype is None else t.to(dtype) for t in tensors]


def _convert(rep: Curvature, kind: Kind) -> Curvature:
    if isinstance(rep, Diagonal) or (kind == "full") == isinstance(rep, Full):
        return rep
    return rep.to_full() if kind == "full" else rep.to_factored()  # type: ignore[attr-defined]


def factor_pass(
    plan: Plan | GraphPlan,
    problem: Problem,
    mode: Mode,
    *,
    with_grad: bool = False,
    schedule: dict[int, Kind] | None = None,
) -> PassResult:
    """Backpropagate the output Hessian's factors (see the module docstring).

    With ``with_grad`` the same walk also backpropagates the gradient at the
    true targets and returns the parameter gradients (one ``J^T g`` per layer
    alongside the curvature: no second forward pass, no autograd). ``schedule``
    (step index -> ``factored``/``full``) overrides the planner's choice, for
    tests and measurements; every schedule gives the same numbers to rounding.
    """
    if isinstance(plan, GraphPlan):  # the graph engine: always factored, exact at fan-outs
        return PassResult(*chunked_graph_factor_pass(plan, problem, mode, with_grad=with_grad))
    p = problem
    with torch.no_grad():
        out, caches, shapes, state = run_start(
            plan, p.model, p.loss, p.inputs, p.targets, p.generator
        )
        rep: Curvature = mode.start(p.loss, out, state, p.generator)
        collapse = collapse_step(plan) if mode.may_collapse else -1
        if schedule is None:
            kinds = _planned(plan, shapes, out.shape[1:], rep.columns, mode, collapse)
        else:
            kinds = {i: k for i, k in schedule.items() if collapse < 0 or i >= collapse}
        # the gradient is needed down to the lowest curved activation (its f'' g), or everywhere
        curved = [i for i, st in enumerate(plan.steps) if st.rule.elementwise and st.rule.curved]
        g_down_to = plan.first_param if with_grad or not curved else curved[0]
        need_g = with_grad or (mode.residual and bool(curved))
        g = state.grad
        res: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        steps = plan.steps
        for i in range(len(steps) - 1, plan.first_param - 1, -1):
            st = steps[i]
            rule, m, c = st.rule, st.module, caches[i]
            if i in kinds:  # below a collapse: a Diagonal, nothing to choose
                rep = _convert(rep, kinds[i])
            if rule.parametric:
                if mode.kfac:
                    assert isinstance(rep, Factored)
                    assert rep.v is not None
                    a = rule.kfac_input(m, c)
                    gdiag = rule.kfac_output(m, c, rep.v)
                    w = (gdiag.view(a.shape[0], -1, 1) * a.unsqueeze(1)).reshape(m.weight.shape)
                    store(res, st, w, gdiag)
                else:
                    store(res, st, *_as(rep.param_diagonals(rule, m, c), p.result_dtype))
                if with_grad:
                    store(grads, st, *_as(rule.param_grad(m, c, g), p.result_dtype))
            if i == plan.first_param:
                break
            if rule.elementwise and mode.residual and rule.curved:
                d1, d2 = rule.derivs(m, c)
                rep = rep.backprop_through(rule, m, c, shapes[i], d1)
                if d2 is not None:
                    rep = rep.add(Diagonal(d2 * g))
                g = g * d1
                continue
            if i == collapse:
                rep = rep.diagonal_through(rule, m, c, shapes[i])
            else:
                rep = rep.backprop_through(rule, m, c, shapes[i])
            if need_g and i > g_down_to:
                g = rule.vjp(m, c, g)
    return PassResult(ordered(plan, res), ordered(plan, grads) if with_grad else {}, state)
