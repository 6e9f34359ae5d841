"""The one-pass engines over a graph plan (:mod:`hessbench.estimators._graph`).

Both walk the tensor nodes in reverse topological order; every node
accumulates what its consumers send back, so a node is processed once all its
consumers are.

- :func:`graph_diag_pass` (HesScale, HesScaleGN, BL89): each node receives
  ``(g, h)``; at a fan-out the gradients are summed (exact) and so are the
  backpropagated diagonals, ``h_x = sum_c h_x^(c)`` (the cross terms
  ``2 sum_{c<c'} diag(J_c^T H J_c')`` are dropped). An add node passes
  ``(g, h)`` to both inputs, a cat node splits them. Below a select of
  positions ``x[:, i]`` (``x[:, a:b]``) the pair covers those positions only
  while the layers treat positions one by one (``Rule.narrow``; the attention
  core takes them as its query rows), and is scattered back into zeros where it
  meets a full tensor (from :data:`ROWS_MIN` entries on).
- :func:`graph_factor_pass` (exact Hessian, exact/MC GGN, K-FAC, empirical
  Fisher): the curvature at a node is a set of *column blocks keyed by their
  origin*: the loss's factor is one block; every curved node's residual is its
  own block (``f''(u) g`` of an element-wise node as *diagonal columns*
  ``u = sqrt|d|`` with signs, a generic node's ``nabla^2 (g . f)`` as its signed
  eigen-columns). Backpropagating columns is linear, so blocks arriving along
  different paths are **added** when they share an origin (the same columns,
  pushed through the sum of the path Jacobians) and concatenated otherwise:
  the pass is exact at fan-outs. A block is *complete* at a node when no other
  pending node holds its origin; complete blocks are merged (columns
  concatenated, diagonal blocks summed into one diagonal ``sum s u^2``), which
  on a chain reproduces the sequential factored pass. Eigen-columns are kept up
  to their rank (``signed_factor``), a merged block of more than twice its
  node's features is compressed (:func:`_compress`), and a large batch runs in
  chunks of samples (:func:`chunked_graph_factor_pass`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hessbench.estimators._base import check_output, has_active_dropout
from hessbench.estimators._curvature import _diag_cols
from hessbench.estimators._graph import GraphPlan, graph_forward
from hessbench.estimators._rules_attention import AttentionRule, SelectRule
from hessbench.estimators._rules_norm import AffineRule, LocalRule, signed_factor

__all__ = ["chunked_graph_factor_pass", "graph_diag_pass", "graph_factor_pass"]


def _start(plan: GraphPlan, model, loss, x, targets, generator):
    outs, caches = graph_forward(plan, x, generator)
    out = outs[plan.output]
    check_output(model, out)
    loss.check_targets(out, targets)
    return outs, caches, loss.evaluate(out, targets)


def _store(res: dict, gn, w, b) -> None:
    if gn.weight_key and w is not None:
        res[gn.weight_key] = w
    if gn.bias_key and b is not None:
        res[gn.bias_key] = b


def _ordered(plan: GraphPlan, res: dict) -> dict:
    return {k: res[k] for k in plan.keys}


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _split_cat(cache, t: Tensor | None, lead: int) -> list:
    if t is None:
        return [None] * len(cache[1])
    return list(torch.split(t, cache[1], dim=cache[0] + lead))


# --------------------------------------------------------------- diagonal pass
def _curved(gn) -> bool:
    """Whether a node's diagonal rule reads the gradient at its output (``f'' g``)."""
    rule = gn.rule
    if gn.kind != "rule" or rule is None:
        return False
    return (rule.elementwise and rule.curved) or isinstance(rule, LocalRule)


def _needs_grad(plan: GraphPlan, residual: bool, with_grad: bool) -> list[bool]:
    """``need[i]``: the gradient at node ``i``'s output is used, at ``i`` or below it.

    A curved node reads it (with ``residual``), and so does every node above one
    (to backpropagate it); below the lowest curved node nothing does, so the
    pass skips those ``J^T g`` products (in a ReLU network, all of them).
    """
    if with_grad:
        return [True] * len(plan.nodes)
    key = ("needs_grad", residual)
    if key not in plan.memo:
        need: list[bool] = []
        for gn in plan.nodes:  # topological order: inputs first
            need.append((residual and _curved(gn)) or any(need[j] for j in gn.inputs))
        plan.memo[key] = need
    return plan.memo[key]


def _input_flags(plan: GraphPlan, residual: bool, with_grad: bool) -> list[tuple[bool, bool]]:
    """Per node: whether any input needs the curvature, and whether any needs the gradient."""
    key = ("input_flags", residual, with_grad)  # what :func:`_needs_grad` depends on
    if key not in plan.memo:
        need_g = _needs_grad(plan, residual, with_grad)
        plan.memo[key] = [
            (any(plan.need[j] for j in gn.inputs), any(need_g[j] for j in gn.inputs))
            for gn in plan.nodes
        ]
    return plan.memo[key]


def graph_diag_pass(
    plan: GraphPlan, model, loss, x, targets, *, output, residual, generator=None, with_grad=False
):
    """HesScale-style diagonal backprop over a graph (see the module docstring).

    Returns:
        the parameter diagonals, the parameter gradients (empty unless
        ``with_grad``) and the loss state.
    """
    with torch.no_grad():
        outs, caches, state = _start(plan, model, loss, x, targets, generator)
        out = outs[plan.output]
        if output == "exact":
            h0 = loss.hess_diag(out, state)
        elif output == "bl89":
            h0 = loss.target_hess_diag(out, targets, state)
        else:
            h0 = torch.zeros_like(out)
        need_g = _needs_grad(plan, residual, with_grad)
        flags = _input_flags(plan, residual, with_grad)
        # per node: [g, h, rows]; with ``rows`` (a slice of dim 1), g and h hold those
        # positions only and are zero elsewhere (below ``x[:, -1]``, see ROWS_MIN)
        acc: list[list | None] = [None] * len(plan.nodes)
        acc[plan.output] = [state.grad if need_g[plan.output] else None, h0, None]
        diag: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        need = plan.need

        def send(j, g, h, rows=None):
            if not need[j]:
                return
            if not need_g[j]:
                g = None
            if acc[j] is None:
                acc[j] = [g, h, rows]
                return
            g0, h0, r0 = acc[j]
            if r0 != rows:  # different positions: both in full
                shape = outs[j].shape
                g0, h0 = _scatter(g0, r0, shape), _scatter(h0, r0, shape)
                g, h, rows = _scatter(g, rows, shape), _scatter(h, rows, shape), None
            acc[j] = [_add(g0, g), _add(h0, h), rows]

        for i in range(len(plan.nodes) - 1, -1, -1):
            gn = plan.nodes[i]
            if acc[i] is None or gn.kind == "input":
                continue
            g, h, rows = acc[i]
            acc[i] = None
            c = caches[i]
            rule, m = gn.rule, gn.module
            if rows is not None:
                narrowed = None if gn.kind != "rule" else rule.narrow(m, c, rows)
                if narrowed is not None:
                    c = narrowed
                elif gn.kind != "add" and not isinstance(rule, AttentionRule):
                    shape = outs[i].shape
                    g, h, rows = _scatter(g, rows, shape), _scatter(h, rows, shape), None
            need_in, g_below = flags[i]
            g_down = g if g_below else None  # to backpropagate
            if gn.kind == "add":
                a, b = gn.inputs
                send(a, g_down, h, rows)
                send(b, g_down if g_down is None or gn.coef > 0 else -g_down, h, rows)
                continue
            if gn.kind == "cat":
                for j, gj, hj in zip(
                    gn.inputs, _split_cat(c, g_down, 0), _split_cat(c, h, 0), strict=True
                ):
                    send(j, gj, hj)
                continue
            j = gn.inputs[0]
            if gn.has_params:
                hw, hb, gw, gb, h_in, g_in = rule.diag_backward(
                    m, c, g_down, h, need_input=need_in, with_grad=with_grad
                )
                _store(diag, gn, hw, hb)
                if with_grad:
                    _store(grads, gn, gw, gb)
                if need_in:
                    send(j, g_in, h_in, rows)
                continue
            if not need_in:
                continue
            out_rows = rows
            if rule.elementwise:
                g_in, h_in = rule.backward_diag(m, c, g, h, residual)
            elif isinstance(rule, AttentionRule):
                g_in, h_in = rule.diag_backward_local(
                    m, c, g, h, residual=residual, backprop=g_down is not None, rows=rows
                )
                out_rows = None  # keys and values: every position
            elif isinstance(rule, LocalRule):
                g_in, h_in = rule.diag_backward_local(
                    m, c, g, h, residual=residual, backprop=g_down is not None
                )
            elif (
                isinstance(rule, SelectRule)
                and h.shape[0] * math.prod(c) >= ROWS_MIN
                and (sel := rule.rows(m, c)) is not None
            ):
                out_rows, dropped = sel
                g_in = g_down if g_down is None or not dropped else g_down.unsqueeze(1)
                h_in = h.unsqueeze(1) if dropped else h
            else:
                h_in = rule.vjp_sq(m, c, h)
                g_in = None if g_down is None else rule.vjp(m, c, g_down)
            send(j, g_in, h_in, out_rows)
    return _ordered(plan, diag), (_ordered(plan, grads) if with_grad else grads), state


ROWS_MIN = 4096
"""Entries of ``x`` (all samples) from which ``x[:, i]`` starts the diagonal pass on positions.

Below it the rows are too few for the narrower kernels to pay for the extra ones
(scatters where the positions meet the full tensors): on TinyGPT (4,096 entries
at batch 16) the pass is 2-3 % slower at batch 1 (256 entries) and 6-9 %
faster at batch 32 with them (``cost_ratios.py --only gpt``, in-process A/B).
"""


def _scatter(t: Tensor | None, rows: slice | None, shape: torch.Size) -> Tensor | None:
    """``t`` holding positions ``rows`` of dim 1 as a tensor of ``shape``, zeros elsewhere."""
    if t is None or rows is None:
        return t
    return SelectRule.vjp((slice(None), rows), shape[1:], t)  # the select's J^T


# ----------------------------------------------------------------- factor pass
class Block(NamedTuple):
    """Columns of one origin at a node.

    ``cols``: (N, K, *shape) with signs (N, K) or None; ``diag``: the columns ``u_i e_i`` given by ``v`` = u (N, *shape), signs (N, *shape) or None.
    """

    kind: str
    v: Tensor
    s: Tensor | None


def _materialize(b: Block) -> Block:
    """Diagonal columns as explicit columns (N, F, *shape)."""
    if b.kind == "cols":
        return b
    n = b.v.shape[0]
    f = b.v[0].numel()
    v = torch.diag_embed(b.v.reshape(n, f)).reshape(n, f, *b.v.shape[1:])
    return Block("cols", v, None if b.s is None else b.s.reshape(n, f))


def _signs_or_ones(b: Block) -> Tensor:
    if b.s is not None:
        return b.s
    return torch.ones(b.v.shape[:2], dtype=b.v.dtype, device=b.v.device)


def _sum_same_origin(a: Block, b: Block) -> Block:
    if a.kind == "diag" and b.kind == "diag":
        return Block("diag", a.v + b.v, a.s)
    a, b = _materialize(a), _materialize(b)
    return Block("cols", a.v + b.v, a.s)


def _diag_of(b: Block) -> Tensor:
    """``s u^2`` of a diagonal block."""
    d = b.v.square()
    return d if b.s is None else d * b.s


COMPRESS_MIN = 256
"""Features from which a node's merged column block of more than twice as many columns is
compressed (:func:`_compress`). In-process A/B on the exact pass: the tiny GPT (``F = 256``
on its residual stream) 0.80-0.88 of the time at batch 1 and 0.84 at batch 32; the
residual MLP of ``benchmarks/cost_ratios.py`` (``F = 128``) 1.09-1.25 at batch 1 and
0.71-1.14 at batch 32, so it is left alone."""


def _compress(b: Block) -> Block:
    """A block of more than ``2 F`` columns as at most ``F`` (per-sample eigen-columns).

    The signed eigen-columns of the ``F x F`` matrix ``V^T S V`` the block stands
    for, per sample (:func:`signed_factor`). ``K`` columns cost ``K`` products at
    every node below; the matrix costs ``2 K F^2`` flops and one ``eigh`` here. On
    the tiny GPT's residual stream (``F = 256``) the columns of the blocks above add
    up to 590-2502; the matrix's rank is at most 256.
    """
    n, k = b.v.shape[:2]
    shape = b.v.shape[2:]
    v = b.v.reshape(n, k, -1)
    sv = v if b.s is None else v * b.s.unsqueeze(2)
    cols, signs = signed_factor((v.transpose(1, 2) @ sv).unsqueeze(1))
    return Block("cols", cols.view(n, -1, *shape), signs)


def _merge(blocks: list[Block], key) -> dict:
    """Complete blocks merged: columns concatenated, diagonal blocks summed."""
    out: dict[Any, Block] = {}
    cols = [b for b in blocks if b.kind == "cols"]
    diags = [b for b in blocks if b.kind == "diag"]
    if len(cols) == 1:
        out[("c", key)] = cols[0]
    elif cols:
        v = torch.cat([b.v for b in cols], 1)
        s = None
        if any(b.s is not None for b in cols):
            s = torch.cat([_signs_or_ones(b) for b in cols], 1)
        out[("c", key)] = Block("cols", v, s)
    if len(diags) == 1:
        out[("d", key)] = diags[0]
    elif diags:
        d = _diag_of(diags[0])
        for b in diags[1:]:
            d = d + _diag_of(b)
        out[("d", key)] = Block("diag", d.abs().sqrt(), d.sign())
    return out


def _through(rule, m, c, b: Block, out_shape) -> Block:
    """A block at a rule node's output, pushed to its input (``J^T`` on the columns)."""
    if b.kind == "cols":
        return Block("cols", rule.vjp_cols(m, c, b.v), b.s)
    if rule.elementwise:
        return Block("diag", b.v * rule.derivs(m, c)[0], b.s)
    if getattr(rule, "diag_jacobian", False):
        return Block("diag", b.v * rule.jac_diag(m, c), b.s)
    n = b.v.shape[0]
    cols = _diag_cols(rule, m, c, b.v, out_shape)
    return Block("cols", cols, None if b.s is None else b.s.reshape(n, -1))


def graph_factor_pass(plan: GraphPlan, problem, mode, *, with_grad: bool = False):
    """Backpropagate the output Hessian's factor columns over a graph, exactly at fan-outs.

    ``mode`` is the sequential pass's :class:`~hessbench.estimators._factor_pass.Mode`
    (columns, residual, kfac, num_samples; the representation is always factored).

    Returns:
        ``(diagonals, gradients, loss state)``.
    """
    p = problem
    with torch.no_grad():
        outs, caches, state = _start(plan, p.model, p.loss, p.inputs, p.targets, p.generator)
        out = outs[plan.output]
        start = mode.start(p.loss, out, state, p.generator)
        need = plan.need
        grads_at: list[Tensor | None] = [None] * len(plan.nodes)
        blocks_at: list[dict | None] = [None] * len(plan.nodes)
        holders: dict[Any, int] = {"loss": 1}
        blocks_at[plan.output] = {"loss": Block("cols", start.v, start.s)}
        grads_at[plan.output] = state.grad
        res: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}

        def send(j, g, blocks: dict):
            if not need[j]:
                return
            grads_at[j] = _add(grads_at[j], g)
            if blocks_at[j] is None:
                blocks_at[j] = {}
            here = blocks_at[j]
            for o, b in blocks.items():
                if o in here:
                    here[o] = _sum_same_origin(here[o], b)
                else:
                    here[o] = b
                    holders[o] = holders.get(o, 0) + 1

        for i in range(len(plan.nodes) - 1, -1, -1):
            gn = plan.nodes[i]
            if blocks_at[i] is None or gn.kind == "input":
                continue
            here, g = blocks_at[i], grads_at[i]
            blocks_at[i] = grads_at[i] = None
            complete, pending = [], {}
            for o, b in here.items():
                holders[o] -= 1
                if holders[o] == 0:
                    del holders[o]
                    complete.append(b)
                else:
                    pending[o] = b
            blocks = {**pending, **_merge(complete, i)}
            c = caches[i]
            shape = outs[i].shape[1:]
            merged, f = blocks.get(("c", i)), shape.numel()
            if (
                merged is not None
                and not mode.kfac
                and merged.v.shape[1] > 2 * f >= 2 * COMPRESS_MIN
            ):
                blocks[("c", i)] = _compress(merged)
            if gn.has_params:
                rule, m = gn.rule, gn.module
                if mode.kfac and not (
                    isinstance(rule, AffineRule) or getattr(rule, "kfac_by_columns", False)
                ):
                    v = torch.cat([_materialize(b).v for b in blocks.values()], 1)
                    a = rule.kfac_input(m, c)
                    gdiag = rule.kfac_output(m, c, v)
                    w = (gdiag.view(a.shape[0], -1, 1) * a.unsqueeze(1)).reshape(m.weight.shape)
                    _store(res, gn, w, gdiag)
                else:
                    w = b_ = None
                    d = None
                    for b in blocks.values():
                        if b.kind == "diag":
                            d = _add(d, _diag_of(b))
                        else:
                            wi, bi = rule.param_diag_cols(m, c, b.v, b.s)
                            w, b_ = _add(w, wi), _add(b_, bi)
                    if d is not None:
                        wi, bi = rule.param_diag(m, c, d)
                        w, b_ = _add(w, wi), _add(b_, bi)
                    _store(res, gn, w, b_)
                if with_grad:
                    _store(grads, gn, *rule.param_grad(m, c, g))
            if not any(need[j] for j in gn.inputs):
                continue
            if gn.kind == "add":
                a, b2 = gn.inputs
                send(a, g, blocks)
                if gn.coef > 0:
                    send(b2, g, blocks)
                else:
                    send(b2, -g, {o: Block(b.kind, -b.v, b.s) for o, b in blocks.items()})
                continue
            if gn.kind == "cat":
                dim = c[0]
                parts: list[dict] = [{} for _ in gn.inputs]
                for o, b in blocks.items():
                    if b.kind == "diag" and o not in holders:
                        # complete diagonal columns: one new origin per part (disjoint columns)
                        for k, (u, s) in enumerate(
                            zip(_split_cat(c, b.v, 0), _split_cat(c, b.s, 0), strict=True)
                        ):
                            parts[k][("cat", i, k, o)] = Block("diag", u, s)
                        continue
                    b = _materialize(b)
                    for k, v in enumerate(_split_cat(c, b.v, 1)):
                        parts[k][o] = Block("cols", v, b.s)
                for j, gj, blk in zip(gn.inputs, _split_cat(c, g, 0), parts, strict=True):
                    send(j, gj, blk)
                del dim
                continue
            j = gn.inputs[0]
            if gn.kind == "reshape":
                n = outs[j].shape[0]
                ins = outs[j].shape[1:]
                new = {}
                for o, b in blocks.items():
                    if b.kind == "cols":
                        new[o] = Block("cols", b.v.reshape(n, b.v.shape[1], *ins), b.s)
                    else:
                        s = None if b.s is None else b.s.reshape(n, *ins)
                        new[o] = Block("diag", b.v.reshape(n, *ins), s)
                send(j, None if g is None else g.reshape(n, *ins), new)
                continue
            rule, m = gn.rule, gn.module
            new = {o: _through(rule, m, c, b, shape) for o, b in blocks.items()}
            if rule.elementwise:
                d1, d2 = rule.derivs(m, c)
                if mode.residual and getattr(rule, "curved", True) and d2 is not None:
                    r = d2 * g
                    new[("r", i)] = Block("diag", r.abs().sqrt(), r.sign())
                g_in = g * d1
            elif isinstance(rule, LocalRule):
                if mode.residual:
                    for k, (kind, v, sg) in enumerate(rule.residual_parts(m, c, g)):
                        new[("r", i, k)] = Block(kind, v, sg)
                g_in = rule.vjp(m, c, g)
            else:
                g_in = rule.vjp(m, c, g)
            send(j, g_in, new)
    return _ordered(plan, res), (_ordered(plan, grads) if with_grad else {}), state


BATCH_ENTRIES = 2**24
"""Above this bound on the exact pass's column entries the batch runs in chunks (:func:`chunk_size`)."""
CHUNK_ENTRIES = 2**21
"""The bound on a chunk's column entries (at least one sample per chunk)."""


def chunk_size(plan: GraphPlan, problem, mode) -> int:
    """Samples per call of :func:`graph_factor_pass` in :func:`chunked_graph_factor_pass`.

    The exact Hessian's pass carries, per sample, columns for the loss's outputs
    and for every curved node's input (a residual's columns; fewer where it has
    lower rank, three more per position where a LayerNorm's is split into a
    diagonal and columns), each as long as the node's features: about ``K F``
    entries per sample at most, ``K`` those columns, ``F`` the largest node. When
    the batch's bound passes :data:`BATCH_ENTRIES` (16.8M), the pass runs on chunks of
    ``CHUNK_ENTRIES // (K F)`` samples (2.1M entries, at least one sample), whose
    blocks stay in the caches. Measured on the tiny GPT of ``benchmarks/cost_ratios.py``
    (2.8M entries per sample, float32, batch 32): one call 6.4-6.9 s and 2.7 GB
    resident, 32 calls of one sample 3.4-3.5 s and 0.4 GB. The residual MLP (232k
    per sample) and the ResNet (20k) of the same script run batch 32 in one call,
    and so does every pass without residual columns (the GGN's) or with dropout in
    training mode (its masks are drawn for the whole batch). The bound is read
    from the node shapes of a one-sample forward pass, kept in the plan's memo.
    """
    n = problem.inputs.shape[0]
    if n == 1 or not mode.residual or has_active_dropout(problem.model):
        return n
    x = problem.inputs
    key = ("chunk_entries", tuple(x.shape[1:]), x.dtype)
    if key not in plan.memo:
        with torch.no_grad():
            outs, _ = graph_forward(plan, x[:1], problem.generator)
        sizes = [o.numel() if isinstance(o, Tensor) else 0 for o in outs]
        cols = sizes[plan.output] + sum(
            sizes[j] for gn in plan.nodes if _curved(gn) for j in gn.inputs
        )
        plan.memo[key] = cols * max(sizes)
    per = plan.memo[key]
    if n * per <= BATCH_ENTRIES:
        return n
    return max(1, min(n, CHUNK_ENTRIES // per))


def chunked_graph_factor_pass(plan: GraphPlan, problem, mode, *, with_grad: bool = False):
    """:func:`graph_factor_pass` over chunks of :func:`chunk_size` samples, added up.

    Samples are independent in the graph engine, and a loss is ``L = c sum_n l_n``
    with ``c`` its reduction factor (``1/N``, ``1 / sum_n w_{y_n}`` with class
    weights, 1 for a sum): a chunk's diagonals and gradients, computed with its
    own ``c'``, count ``c / c'`` of theirs. The loss state is that of the whole
    batch, from the chunks' outputs. The same numbers to rounding (the sums over
    samples run in another order).

    Returns:
        ``(diagonals, gradients, loss state)``.
    """
    p = problem
    n = p.inputs.shape[0]
    size = chunk_size(plan, p, mode)
    if size >= n:
        return graph_factor_pass(plan, p, mode, with_grad=with_grad)
    parts = [
        graph_factor_pass(
            plan,
            replace(p, inputs=p.inputs[a : a + size], targets=p.targets[a : a + size]),
            mode,
            with_grad=with_grad,
        )
        for a in range(0, n, size)
    ]
    with torch.no_grad():
        state = p.loss.evaluate(torch.cat([st.out for _, _, st in parts]), p.targets)
        out: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
        for diag, grads, st in parts:
            r = state.scale / st.scale
            for acc, res in zip(out, (diag, grads), strict=True):
                for k, v in res.items():
                    acc[k] = v * r if k not in acc else acc[k].add_(v, alpha=r)
    return out[0], out[1], state
