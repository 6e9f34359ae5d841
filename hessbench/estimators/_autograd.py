"""Autograd and ``torch.func`` building blocks for estimators on any ``nn.Module``.

These never write ``.grad`` (they use ``torch.autograd.grad`` or
``torch.func``), never register hooks and never modify parameters. Those that
differentiate twice or ``vmap`` run scaled-dot-product attention in PyTorch's
math backend (:func:`differentiable_attention`): the fused CPU kernels are not
twice differentiable and have no batching rule.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessbench.errors import TooLargeError, UnsupportedError
from hessbench.estimators._base import trainable_parameters
from hessbench.estimators._losses import LossSpec, LossState
from hessbench.estimators._sequential import check_output

__all__ = [
    "autograd_hvp",
    "differentiable_attention",
    "draw_probes",
    "exact_diag_hvp",
    "forward_loss",
    "gaussian",
    "ggn_diag_jacobian",
    "gradient",
    "hvp_samples",
    "per_sample_grad_sq",
    "rademacher",
]


F = TypeVar("F", bound=Callable)


def differentiable_attention(fn: F) -> F:
    """Run ``fn`` with ``scaled_dot_product_attention`` in the math backend.

    The fused kernels torch picks by default (flash attention on CPU) have no
    double backward and no ``vmap`` rule; the math backend is plain differentiable
    operations. The caller's backend setting is restored afterwards.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def forward_loss(model: nn.Module, loss: LossSpec, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Model output and differentiable loss, with the output and targets checked."""
    out = model(x)
    check_output(model, out.detach())
    loss.check_targets(out, y)
    return out, loss.loss(out, y)


def gradient(
    model: nn.Module, loss: LossSpec, x: Tensor, y: Tensor, create_graph: bool = False
) -> tuple[dict[str, Tensor], Tensor]:
    """``dL/dtheta`` for the trainable parameters, and the model output."""
    params = trainable_parameters(model)
    out, value = forward_loss(model, loss, x, y)
    grads = torch.autograd.grad(value, list(params.values()), create_graph=create_graph)
    return dict(zip(params, grads, strict=True)), out


@functools.lru_cache(maxsize=16)
def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``table[b, i] = +1`` where bit ``i`` of the byte ``b`` is set, else ``-1``: (256, 8)."""
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    return bits.to(dtype).mul_(2).sub_(1)


def rademacher(params: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """One Rademacher (+-1) tensor per parameter, all drawn at once from ``generator``.

    Each entry is one bit of a uniform 32-bit integer: drawing ``P / 32``
    integers and unpacking their bits costs about a third of drawing ``P``
    integers in ``{0, 1}`` (for ``P ~ 1e5`` the draw alone rivals a gradient).
    Entry ``32 w + j`` is bit ``j`` of word ``w``. The bits are unpacked a byte at
    a time through a 256 x 8 table of signs (one gather writes the signs in the
    parameters' dtype), ~7x faster at 4M parameters than shifting out each bit
    as an int64 and converting; the signs are the same.
    """
    total = sum(p.numel() for p in params)
    dev = generator.device
    ref = params[0]
    words = torch.randint(0, 2**32, ((total + 31) // 32, 1), generator=generator, device=dev)
    byte_values = ((words >> _byte_shifts(dev)) & 255).view(-1)
    signs = _sign_table(ref.dtype, words.device).index_select(0, byte_values)
    return _views(signs.view(-1)[:total].to(device=ref.device), params)


@functools.lru_cache(maxsize=16)
def _byte_shifts(device: torch.device) -> Tensor:
    """``[0, 8, 16, 24]``: the shifts that take a 32-bit word apart into bytes."""
    return torch.arange(0, 32, 8, device=device)


def _views(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Consecutive pieces of the contiguous ``flat``, one per parameter, in its shape.

    One ``as_strided`` per parameter (contiguous strides), where ``split`` and
    ``view_as`` cost two calls each: a tenth of a probe's draw on a small net.
    """
    out = []
    offset = flat.storage_offset()
    for p in params:
        shape = p.shape
        stride, step = [], 1
        for size in reversed(shape):
            stride.append(step)
            step *= size
        out.append(flat.as_strided(shape, stride[::-1], offset))
        offset += step
    return out


def gaussian(params: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """One standard normal tensor per parameter, all drawn at once from ``generator``."""
    total = sum(p.numel() for p in params)
    ref = params[0]
    z = torch.randn(total, generator=generator, device=generator.device, dtype=ref.dtype)
    return _views(z.to(ref.device), params)


Probes = Literal["rademacher", "gaussian"]


def draw_probes(kind: Probes) -> Callable[[list[Tensor], torch.Generator], list[Tensor]]:
    """The probe sampler ``kind``: :func:`rademacher` or :func:`gaussian`."""
    return rademacher if kind == "rademacher" else gaussian


@differentiable_attention
def autograd_hvp(
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    y: Tensor,
    extras: dict[str, object] | None = None,
) -> tuple[dict[str, nn.Parameter], Callable[..., list[Tensor]]]:
    """The trainable parameters and ``product(v, last=False) = H v`` by double backprop.

    One forward pass and one differentiable gradient are computed here; each
    product is one more backward pass through that gradient. ``last=True``
    frees the graph after the product. With ``extras``, the gradient
    (``extras["grad"]``, detached) and the loss (``extras["loss"]``) are stored there.
    """
    params = trainable_parameters(model)
    plist = list(params.values())
    _, value = forward_loss(model, loss, x, y)
    gs = torch.autograd.grad(value, plist, create_graph=True)
    if extras is not None:
        extras["grad"] = {n: g.detach() for n, g in zip(params, gs, strict=True)}
        extras["loss"] = value.detach()

    def product(v: list[Tensor], last: bool = False) -> list[Tensor]:
        return list(torch.autograd.grad(gs, plist, grad_outputs=v, retain_graph=not last))

    return params, product


@differentiable_attention
def hvp_samples(
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    y: Tensor,
    num_samples: int,
    generator: torch.Generator,
    combine: Callable[[Tensor, Tensor], Tensor],
    extras: dict[str, object] | None = None,
    probes: Callable[[list[Tensor], torch.Generator], list[Tensor]] = rademacher,
) -> dict[str, Tensor]:
    """``mean_k combine(z_k, H z_k)`` over probes ``z_k``, by double backprop.

    ``probes`` draws each ``z_k`` (default :func:`rademacher`). With ``extras``,
    the gradient (``extras["grad"]``, detached) and the loss (``extras["loss"]``)
    computed on the way are stored there.
    """
    params, product = autograd_hvp(model, loss, x, y, extras)
    plist = list(params.values())
    acc: list[Tensor] = []
    for k in range(num_samples):
        zs = probes(plist, generator)
        hz = product(zs, last=k + 1 == num_samples)
        terms = [combine(z, h) for z, h in zip(zs, hz, strict=True)]
        acc = terms if k == 0 else [a.add_(t) for a, t in zip(acc, terms, strict=True)]
    if num_samples > 1:
        acc = [a.div_(num_samples) for a in acc]
    return dict(zip(params, acc, strict=True))


def _cast_params(model: nn.Module, dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {
        n: (p.detach().to(dtype) if dtype is not None else p.detach())
        for n, p in trainable_parameters(model).items()
    }


def _buffers(model: nn.Module, dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {
        n: (b.to(dtype) if dtype is not None and b.is_floating_point() else b)
        for n, b in model.named_buffers()
    }


@differentiable_attention
def exact_diag_hvp(
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    y: Tensor,
    *,
    dtype: torch.dtype | None,
    max_params: int,
) -> dict[str, Tensor]:
    """Exact Hessian diagonal, one double-backprop Hessian row per parameter entry.

    Raises:
        TooLargeError: when the model has more than ``max_params`` trainable entries.
    """
    params = _cast_params(model, dtype)
    total = sum(p.numel() for p in params.values())
    if total > max_params:
        raise TooLargeError(
            f"exact Hessian diagonal by Hessian-vector products needs {total} backward passes "
            f"(model has {total} trainable entries, max_params={max_params}); raise max_params, "
            "or use method='auto' on an nn.Sequential of supported layers (the layer pass)"
        )
    for p in params.values():
        p.requires_grad_(True)
    xc = x.to(dtype) if dtype is not None and x.is_floating_point() else x
    yc = y.to(dtype) if dtype is not None and y.is_floating_point() else y
    out = functional_call(model, ({**params, **_buffers(model, dtype)},), (xc,))
    check_output(model, out.detach())
    loss.check_targets(out, yc)
    value = loss.loss(out, yc)
    names = list(params)
    plist = list(params.values())
    grads = torch.autograd.grad(value, plist, create_graph=True)
    result = {}
    for name, p, g in zip(names, plist, grads, strict=True):
        flat = g.reshape(-1)
        diag = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        if g.requires_grad:
            for i in range(p.numel()):
                (row,) = torch.autograd.grad(flat[i], p, retain_graph=True, allow_unused=True)
                if row is not None:
                    diag[i] = row.reshape(-1)[i]
        result[name] = diag.view_as(p)
    return result


def refuse_batch_coupling(model: nn.Module) -> None:
    """Refuse training-mode layers that per-sample computations cannot reproduce.

    Batch normalisation couples the samples of a batch; dropout would draw
    other masks one sample at a time than for the whole batch.
    """
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}) in training mode couples the samples of a "
                "batch, so per-sample gradients are undefined; call model.eval() first"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and 0 < m.p < 1:
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}) in training mode: per-sample evaluation "
                "(torch.func.vmap) cannot reproduce the batch's dropout masks; call model.eval() "
                "or use an nn.Sequential of supported layers"
            )


@differentiable_attention
def per_sample_grad_sq(
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    y: Tensor,
    *,
    extras: dict[str, object] | None = None,
) -> tuple[dict[str, Tensor], float]:
    """``sum_n (grad l_n)^2`` with ``l_n`` the per-sample loss summed over outputs, and ``c``.

    With ``extras``, also the gradient of ``L = c sum_n l_n``, ``c sum_n grad l_n``
    (``extras["grad"]``), and the loss (``extras["loss"]``).
    """
    refuse_batch_coupling(model)
    params = _cast_params(model, None)
    buffers = _buffers(model, None)
    with torch.no_grad():
        out = model(x)
    check_output(model, out)
    loss.check_targets(out, y)

    def sample_loss(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        o = functional_call(model, ({**p, **buffers},), (xn.unsqueeze(0),))
        return loss.per_sample_loss(o, yn.unsqueeze(0)).sum()

    grads = vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(
        params, x, y
    )
    c = loss.scale(y)
    if extras is not None:
        extras["grad"] = {n: g.sum(0).mul_(c) for n, g in grads.items()}
        extras["loss"] = loss.evaluate(out, y).value()
    return {n: g.square().sum(0) for n, g in grads.items()}, c


@differentiable_attention
def ggn_diag_jacobian(
    model: nn.Module,
    loss: LossSpec,
    x: Tensor,
    y: Tensor,
    columns: Callable[[Tensor, LossState], Tensor],
    *,
    max_entries: int = 50_000_000,
) -> dict[str, Tensor]:
    """``sum_n sum_k (J_n^T s_nk)^2`` from per-sample Jacobians (``torch.func``).

    ``columns(out, state)`` returns the factor columns ``(N, K, *out)``.

    Raises:
        TooLargeError: when the per-sample Jacobians would exceed ``max_entries``.
    """
    refuse_batch_coupling(model)
    params = _cast_params(model, None)
    buffers = _buffers(model, None)
    with torch.no_grad():
        out = model(x)
    check_output(model, out)
    loss.check_targets(out, y)
    entries = out.numel() * sum(p.numel() for p in params.values())
    if entries > max_entries:
        raise TooLargeError(
            f"per-sample Jacobians need {entries} entries (max {max_entries}); use a smaller "
            "batch or an nn.Sequential of supported layers for the fast path"
        )
    state = loss.evaluate(out, y)
    cols = columns(out, state)
    cols = cols.reshape(*cols.shape[:2], -1)  # (N, K, O); O = 1 for outputs of shape (N,)

    def single(p: dict[str, Tensor], xn: Tensor) -> Tensor:
        return functional_call(model, ({**p, **buffers},), (xn.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(single), in_dims=(None, 0), randomness="different")(params, x)
    result = {}
    for name, j in jac.items():
        jf = j.reshape(j.shape[0], math.prod(out.shape[1:]), -1)  # (N, O, P)
        result[name] = (cols @ jf).square().sum((0, 1)).view_as(params[name])
    return result
