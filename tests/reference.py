"""Brute-force Hessian and GGN diagonals, written without importing hessbench.

Everything here is deliberately naive: the full Hessian (or the full Jacobian
and output Hessian) is materialised with ``torch.func`` over one flat vector of
the trainable parameters, and only then is its diagonal taken. Use it on tiny
float64 problems only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

Unflatten = Callable[[Tensor], dict[str, Tensor]]


def hessian(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Reverse-over-reverse Hessian of a scalar function of one vector.

    ``torch.func.hessian`` is forward-over-reverse; in torch 2.13 the first
    forward-mode call loads decompositions through the deprecated
    ``torch.jit.script``, which ``filterwarnings = error`` turns into a failure.

    Trust only its diagonal on a model with an affine LayerNorm: in torch 2.13
    ``jacrev(jacrev)`` gets the cross derivatives of a LayerNorm's weight with
    its input wrong (pytorch/functorch#534; ``docs/peers.md``), while the
    diagonal stays right. Every test that reads off-diagonal entries uses a
    model without one.
    """
    return jacrev(jacrev(f))


def _unflattener(
    model: nn.Module,
) -> tuple[Tensor, Unflatten, Callable[[Tensor], dict[str, Tensor]]]:
    """``theta0`` (flat trainable parameters), ``unflatten``, and ``params(theta)``.

    ``params(theta)`` is the full state for ``functional_call``: the trainable
    parameters taken from ``theta``, frozen parameters and buffers as constants.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in trainable]
    shapes = [p.shape for _, p in trainable]
    sizes = [p.numel() for _, p in trainable]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in trainable])
    # Frozen parameters and buffers enter functional_call as constants.
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def unflatten(theta: Tensor) -> dict[str, Tensor]:
        chunks = theta.split(sizes)
        return {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}

    def params(theta: Tensor) -> dict[str, Tensor]:
        return {**frozen, **unflatten(theta)}

    return theta0, unflatten, params


def _output_fn(model: nn.Module, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor, Unflatten]:
    theta0, unflatten, params = _unflattener(model)

    def out(theta: Tensor) -> Tensor:
        return functional_call(model, params(theta), (x,))

    return out, theta0, unflatten


def flat_loss_fn(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor
) -> tuple[Callable[[Tensor], Tensor], Tensor, Unflatten]:
    """``(f, theta0, unflatten)`` with ``f(theta) = loss_fn(model_theta(x), y)``.

    ``theta`` is the concatenation of the trainable parameters (those with
    ``requires_grad``) in ``named_parameters()`` order; ``unflatten`` maps a flat
    vector back to a dict keyed by parameter name.
    """
    out, theta0, unflatten = _output_fn(model, x)

    def f(theta: Tensor) -> Tensor:
        return loss_fn(out(theta), y)

    return f, theta0, unflatten


def _split(flat: Tensor, unflatten: Unflatten) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in unflatten(flat).items()}


def hessian_diag(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Diagonal of the full Hessian ``d2 L / d theta2``, split per parameter."""
    f, theta0, unflatten = flat_loss_fn(model, loss_fn, x, y)
    full = hessian(f)(theta0)
    assert full.shape == (theta0.numel(), theta0.numel())
    return _split(full.diagonal(), unflatten)


def ggn_diag(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Diagonal of ``J^T H_out J``: ``J`` the Jacobian of all outputs, ``H_out`` the loss Hessian."""
    out, theta0, unflatten = _output_fn(model, x)
    out0 = out(theta0).detach()
    shape = out0.shape

    def out_flat(theta: Tensor) -> Tensor:
        return out(theta).reshape(-1)

    def loss_of_output(o: Tensor) -> Tensor:
        return loss_fn(o.reshape(shape), y)

    jac = jacrev(out_flat)(theta0)  # (N*C, P)
    h_out = hessian(loss_of_output)(out0.reshape(-1))  # (N*C, N*C)
    ggn = jac.T @ h_out @ jac
    return _split(ggn.diagonal(), unflatten)


def per_sample_loss(loss_fn: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """One sample's loss summed over output dimensions (no reduction factor).

    The loss module itself with ``reduction="sum"`` (class weights, label smoothing,
    ``pos_weight`` as the module has them).
    """
    summed = copy.copy(loss_fn)  # a shallow copy: the caller's module keeps its reduction
    summed.reduction = "sum"
    return summed(out, y)


def per_sample_grads(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor
) -> list[dict[str, Tensor]]:
    """Gradient of every sample's summed loss, by a plain loop of autograd calls."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = []
    for n in range(x.shape[0]):
        value = per_sample_loss(loss_fn, model(x[n : n + 1]), y[n : n + 1])
        gs = torch.autograd.grad(value, [p for _, p in trainable])
        grads.append({name: g.detach() for (name, _), g in zip(trainable, gs, strict=True)})
    return grads
