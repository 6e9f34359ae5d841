"""Hessian-vector products over ``nn.Sequential`` models by Pearlmutter's R-operator.

``Hv`` is the directional derivative of the gradient along ``v``. One forward
pass and one gradient pass are shared by every probe; each probe then costs an
R-forward pass (``R{z} = W R{x} + V_w x + v_b``, ``R{a} = f'(u) R{u}``) and an
R-backward pass (``R{g_u} = f'(u) R{g_a} + f''(u) R{u} g_a``,
``R{g_x} = W^T R{g_z} + V_w^T g_z``), which yields
``Hv_W = R{g_z} x^T + g_z R{x}^T``. No autograd, no hooks.

Several directions at once (:meth:`StructuredHVP.stacked`): the per-direction
pass is vectorised over a leading direction axis with ``torch.func.vmap``, in
chunks of at most :data:`STACK_BYTES` of per-direction tensors and at least
:data:`MIN_STACK` directions. On small models each of the pass's few dozen
operations costs microseconds of dispatch whatever its size, so ten directions
take about 0.4x the time of ten separate passes (3k parameters, batch 1; 0.6x at
109k parameters, 8 directions); on large models a chunk would hold fewer than
:data:`MIN_STACK` directions and the products run one at a time, as before.

Reference: Pearlmutter, "Fast exact multiplication by the Hessian" (1994).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import rademacher
from hessbench.estimators._base import trainable_parameters
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan, ordered, run_start

__all__ = ["MIN_STACK", "STACK_BYTES", "StructuredHVP", "structured_hutchinson", "structured_hvp"]

STACK_BYTES = 16 * 2**20
"""Bound on the per-direction tensors one vectorised chunk of products holds (bytes)."""

MIN_STACK = 4
"""Fewer directions than this per chunk run one at a time: a vectorised pass costs
about three to four plain ones in fixed overhead (measured on MLPs of 3k and 109k
parameters), so it pays from four directions on."""


class StructuredHVP:
    """``H v`` for directions keyed like the plan's parameters, after one shared forward pass.

    Call it with one direction, or give :meth:`stacked` directions stacked along a
    leading axis. Built by :func:`structured_hvp`.
    """

    def __init__(self, plan: Plan, loss: LossSpec, state, caches, grads, footprint: int):
        self._args = (plan, loss, state, caches, grads)
        self.footprint = footprint
        """Bytes of one direction's pass: its tangents at every layer and three parameter-sized tensors."""

    def __call__(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            return _one_product(*self._args, v)

    def chunk(self, k: int) -> int:
        """How many of ``k`` directions one pass takes (1: one at a time).

        As many as :data:`STACK_BYTES` allows, or 1 where that is under :data:`MIN_STACK`.
        """
        c = min(k, STACK_BYTES // max(self.footprint, 1))
        return c if c >= MIN_STACK else 1

    def stacked(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``H v_j`` for every ``j``: each tensor of ``v`` and of the result is ``(k, *shape)``."""
        k = next(iter(v.values())).shape[0]
        step = self.chunk(k)
        if step == 1:
            outs = [self({n: t[j] for n, t in v.items()}) for j in range(k)]
            return {n: torch.stack([o[n] for o in outs]) for n in outs[0]}
        batched = torch.func.vmap(self)
        parts = [batched({n: t[j : j + step] for n, t in v.items()}) for j in range(0, k, step)]
        if len(parts) == 1:
            return parts[0]
        return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def structured_hvp(
    plan: Plan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    generator: torch.Generator | None = None,
    extras: dict[str, object] | None = None,
) -> StructuredHVP:
    """``product(v) = H v`` for directions ``v`` keyed like the plan's parameters.

    The forward pass and the gradient pass run here, once; each product is one
    R-forward and one R-backward pass. With ``extras``, the gradient pass also
    stores the parameter gradients (``extras["grad"]``) and the loss value
    (``extras["loss"]``) there.
    """
    steps = plan.steps
    first = plan.first_param
    with torch.no_grad():
        out, caches, shapes, state = run_start(plan, model, loss, x, targets, generator)
        # gradient at every layer output, from the last layer down to the first parameter
        grads: list[Tensor | None] = [None] * len(steps)
        g = state.grad
        for i in range(len(steps) - 1, first - 1, -1):
            grads[i] = g
            if i > first:
                g = steps[i].rule.vjp(steps[i].module, caches[i], g)
        if extras is not None:
            pgrads: dict[str, Tensor] = {}
            for i in range(len(steps) - 1, first - 1, -1):
                st = steps[i]
                if st.rule.parametric:
                    gw, gb = st.rule.param_grad(st.module, caches[i], grads[i])
                    if st.weight_key:
                        pgrads[st.weight_key] = gw
                    if st.bias_key and gb is not None:
                        pgrads[st.bias_key] = gb
            extras["grad"] = ordered(plan, pgrads)
            extras["loss"] = state.value()
    features = out[0].numel() + sum(math.prod(s) for s in shapes[first:])
    params = sum(p.numel() for p in trainable_parameters(model).values())
    footprint = (2 * x.shape[0] * features + 3 * params) * out.element_size()
    return StructuredHVP(plan, loss, state, caches, grads, footprint)


def _one_product(plan, loss, state, caches, grads, v: dict[str, Tensor]) -> dict[str, Tensor]:
    steps = plan.steps
    first = plan.first_param
    r_in: list[Tensor | None] = [None] * len(steps)
    r: Tensor | None = None
    for i in range(first, len(steps)):
        st = steps[i]
        r_in[i] = r
        if st.rule.parametric:
            vw = v.get(st.weight_key) if st.weight_key else None
            vb = v.get(st.bias_key) if st.bias_key else None
            r = st.rule.jvp_param(st.module, caches[i], r, vw, vb)
        elif r is not None:
            r = st.rule.jvp(st.module, caches[i], r)
    assert r is not None
    rg = loss.hess_vec(state, r)
    res: dict[str, Tensor] = {}
    for i in range(len(steps) - 1, first - 1, -1):
        st = steps[i]
        m, c, g = st.module, caches[i], grads[i]
        if st.rule.parametric:
            hw, hb = st.rule.param_rgrad(m, c, g, rg, r_in[i])
            if st.weight_key:
                res[st.weight_key] = hw
            if st.bias_key and hb is not None:
                res[st.bias_key] = hb
            if i == first:
                break
            rg = st.rule.r_vjp(m, c, g, rg, v.get(st.weight_key) if st.weight_key else None)
        elif st.rule.elementwise:
            rg = st.rule.r_vjp(m, c, g, rg, r_in[i])
        else:
            rg = st.rule.vjp(m, c, rg)
    return ordered(plan, res)


def structured_hutchinson(
    plan: Plan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    num_samples: int,
    generator: torch.Generator,
    combine: Callable[[Tensor, Tensor], Tensor],
    extras: dict[str, object] | None = None,
    probes: Callable[[list[Tensor], torch.Generator], list[Tensor]] = rademacher,
) -> dict[str, Tensor]:
    """``mean_k combine(z_k, H z_k)`` over probes ``z_k``, by the R-operator pass.

    The probes are drawn exactly as the autograd path draws them (``probes``,
    default :func:`~hessbench.estimators._autograd.rademacher`, over the
    trainable parameters in order, one probe after another), so both paths agree
    to rounding for equal generators. They are drawn and multiplied in the chunks
    :meth:`StructuredHVP.chunk` allows, so at most one chunk of probes is held.
    ``extras`` is passed to :func:`structured_hvp` (gradient and loss).
    """
    params = trainable_parameters(model)
    names, plist = list(params), list(params.values())
    product = structured_hvp(plan, model, loss, x, targets, generator, extras)
    step = product.chunk(num_samples)
    # a chunk's probes as rows of one (c, P) tensor: a probe over the flattened
    # parameters is the concatenation of the per-parameter one (the same draws)
    sizes = [p.numel() for p in plist]
    acc: dict[str, Tensor] = {}
    for start in range(0, num_samples, step):
        c = min(step, num_samples - start)
        if c == 1:
            v = dict(zip(names, probes(plist, generator), strict=True))
            hv = product(v)
            terms = {n: combine(v[n], hv[n]) for n in names}
        else:
            z = plist[0].new_empty(c, sum(sizes))
            for j in range(c):
                z[j] = probes([z[j]], generator)[0]
            rows = z.split(sizes, dim=1)
            v = {n: r.view(c, *p.shape) for n, r, p in zip(names, rows, plist, strict=True)}
            hv = product.stacked(v)
            del z, rows
            # parameter by parameter, dropping each one's products as its term is made
            terms = {n: combine(v.pop(n), hv.pop(n)).sum(0) for n in names}
        for n, t in terms.items():
            acc[n] = t if n not in acc else acc[n].add_(t)
    if num_samples > 1:
        for t in acc.values():
            t.div_(num_samples)
    return acc
