"""Hessian-vector products over ``nn.Sequential`` models by Pearlmutter's R-operator.

``Hv`` is the directional derivative of the gradient along ``v``. One forward
pass and one gradient pass are shared by every probe; each probe then costs an
R-forward pass (``R{z} = W R{x} + V_w x + v_b``, ``R{a} = f'(u) R{u}``) and an
R-backward pass (``R{g_u} = f'(u) R{g_a} + f''(u) R{u} g_a``,
``R{g_x} = W^T R{g_z} + V_w^T g_z``), which yields
``Hv_W = R{g_z} x^T + g_z R{x}^T``. No autograd, no hooks.

Reference: Pearlmutter, "Fast exact multiplication by the Hessian" (1994).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import rademacher
from hessbench.estimators._base import trainable_parameters
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan, ordered, run_start

__all__ = ["hvp_products", "structured_hutchinson", "structured_hvp"]


def structured_hvp(
    plan: Plan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    generator: torch.Generator | None = None,
    extras: dict[str, object] | None = None,
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """``product(v) = H v`` for directions ``v`` keyed like the plan's parameters.

    The forward pass and the gradient pass run here, once; each product is one
    R-forward and one R-backward pass. With ``extras``, the gradient pass also
    stores the parameter gradients (``extras["grad"]``) and the loss value
    (``extras["loss"]``) there.
    """
    steps = plan.steps
    first = plan.first_param
    with torch.no_grad():
        _, caches, _, state = run_start(plan, model, loss, x, targets, generator)
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

    def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            return _one_product(plan, loss, state, caches, grads, v)

    return product


def hvp_products(
    plan: Plan,
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    targets: Tensor,
    vectors: Iterator[dict[str, Tensor]],
    generator: torch.Generator | None = None,
    extras: dict[str, object] | None = None,
) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Yield ``(v, Hv)`` for each direction ``v`` (keyed like the plan's parameters).

    The forward pass and the gradient pass (:func:`structured_hvp`) run once,
    before the first direction is drawn. ``extras`` as in :func:`structured_hvp`.
    """
    product = structured_hvp(plan, model, loss, x, targets, generator, extras)
    for v in vectors:
        yield v, product(v)


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
    trainable parameters in order), so both paths agree to rounding for equal
    generators.
    ``extras`` is passed to :func:`hvp_products` (gradient and loss).
    """
    params = trainable_parameters(model)
    plist = list(params.values())

    def directions() -> Iterator[dict[str, Tensor]]:
        for _ in range(num_samples):
            yield dict(zip(params, probes(plist, generator), strict=True))

    acc: dict[str, Tensor] = {}
    for v, hv in hvp_products(plan, model, loss, x, targets, directions(), generator, extras):
        for name, z in v.items():
            term = combine(z, hv[name])
            acc[name] = term if name not in acc else acc[name].add_(term)
    if num_samples > 1:
        for t in acc.values():
            t.div_(num_samples)
    return acc
