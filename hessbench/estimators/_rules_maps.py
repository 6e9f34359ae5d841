"""Rules of the parameter-free layers that are linear in their input."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from hessbench.errors import UnsupportedError
from hessbench.estimators._rules import LinearMap


# ------------------------------------------------------------ parameter-free maps
class FlattenRule(LinearMap):
    def check(self, m, path):
        if m.start_dim != 1 or m.end_dim != -1:
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}): only start_dim=1, end_dim=-1 is supported"
            )

    def forward(self, m, x, generator):
        return x.flatten(1), x.shape[1:]

    def vjp(self, m, shape, v):
        return v.reshape(v.shape[0], *shape)

    def vjp_cols(self, m, shape, v):
        return v.reshape(*v.shape[:2], *shape)

    def vjp_sq(self, m, shape, h):
        return h.reshape(h.shape[0], *shape)

    def jvp(self, m, shape, r):
        return r.flatten(1)


def _tuple(v, nd: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _as_2d(nd: int, t: Tensor) -> Tensor:
    """A 1-d map ``(N, C, L)`` as an image ``(N, C, 1, L)``; 2-d maps unchanged."""
    return t.unsqueeze(2) if nd == 1 else t


def _args_2d(nd: int, *args) -> list:
    """Pooling arguments for a 2-d aten kernel (a 1-d pool runs as a ``1 x k`` 2-d pool).

    2-d arguments pass as they are (an int or a pair: aten's ``int[2]`` takes both).
    """
    if nd == 2:
        return [a for a, _ in args]
    return [(fill, a if isinstance(a, int) else a[0]) for a, fill in args]


class MaxPoolRule(LinearMap):
    """Max pooling: ``J`` routes each output to its argmax input (``J o J = J``).

    ``vjp`` (and ``vjp_sq``, the same map) is autograd's own max-pooling backward
    on the recorded argmax indices.
    """

    def __init__(self, nd: int):
        self.nd = nd
        self.pool = F.max_pool1d if nd == 1 else F.max_pool2d

    def check(self, m, path):
        if m.return_indices:
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}): return_indices=True is not supported"
            )

    def forward(self, m, x, generator):
        y, idx = self.pool(
            x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )
        return y, (x, idx)

    def vjp(self, m, cache, v):
        x, idx = cache
        if v.shape != idx.shape:  # never in the passes; the aten kernel does not check
            raise ValueError(f"max-pool vjp: got {tuple(v.shape)}, expected {tuple(idx.shape)}")
        nd = self.nd
        k, s, p, d = _args_2d(
            nd, (m.kernel_size, 1), (m.stride or m.kernel_size, 1), (m.padding, 0), (m.dilation, 1)
        )
        out = torch.ops.aten.max_pool2d_with_indices_backward(
            _as_2d(nd, v), _as_2d(nd, x), k, s, p, d, m.ceil_mode, _as_2d(nd, idx)
        )
        return out.reshape(x.shape)

    def vjp_cols(self, m, cache, v):
        x, idx = cache
        shape = x.shape
        n, k, c = v.shape[:3]
        out = v.new_zeros(n, k, c, math.prod(shape[1:]) // c)
        index = idx.reshape(n, 1, c, -1).expand(n, k, c, idx[0, 0].numel())
        out.scatter_add_(3, index, v.reshape(n, k, c, -1))
        return out.view(n, k, *shape[1:])

    vjp_sq = vjp

    def jvp(self, m, cache, r):
        _, idx = cache
        n, c = idx.shape[:2]
        return r.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1)).view(idx.shape)


# The diagonal rule below average pooling: "consistent" ((J o J)^T h, weights 1/K^2) or
# "authors" (J^T h, weights 1/K, as the HesScale authors' code does); the HesScale-family
# estimators' ``avgpool`` option sets it for the duration of their pass.
AVGPOOL_RULE: contextvars.ContextVar[str] = contextvars.ContextVar("avgpool", default="consistent")


def avgpool_rule(rule: str) -> contextlib.AbstractContextManager[None]:
    """Use ``rule`` ("consistent" or "authors") below average pooling within the block.

    Where ``rule`` is already in force (the default, on every estimator call) the
    block gets a ``nullcontext``: nothing to set and reset.
    """
    return contextlib.nullcontext() if AVGPOOL_RULE.get() == rule else _set_avgpool_rule(rule)


@contextlib.contextmanager
def _set_avgpool_rule(rule: str) -> Iterator[None]:
    token = AVGPOOL_RULE.set(rule)
    try:
        yield
    finally:
        AVGPOOL_RULE.reset(token)


class AvgPoolRule(LinearMap):
    """Average pooling: ``J`` spreads each output over its window with weight ``1/K``.

    ``vjp`` is autograd's own average-pooling backward; ``vjp_sq`` (weights
    ``1/K^2``) is the same kernel with the divisor ``K^2``. Only ``ceil_mode=False``
    with ``count_include_pad=True`` is supported, so every window divides by ``K``.
    """

    def __init__(self, nd: int):
        self.nd = nd
        self.pool = F.avg_pool1d if nd == 1 else F.avg_pool2d

    def check(self, m, path):
        if m.ceil_mode or not m.count_include_pad or getattr(m, "divisor_override", None):
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}): only ceil_mode=False, "
                "count_include_pad=True and no divisor_override are supported"
            )

    def forward(self, m, x, generator):
        y = self.pool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
        return y, x

    def _backward(self, m, x, v, divisor):
        nd = self.nd
        k, s, p = _args_2d(nd, (m.kernel_size, 1), (m.stride or m.kernel_size, 1), (m.padding, 0))
        shape = (v.shape[0], *x.shape[1:])
        if shape != x.shape:  # vjp_cols passes N*K columns; the aten kernel does not check
            x = v.new_empty(()).expand(shape)
        out = torch.ops.aten.avg_pool2d_backward(
            _as_2d(nd, v), _as_2d(nd, x), k, s, p, False, True, divisor
        )
        return out.reshape(shape)

    def vjp(self, m, x, v):
        return self._backward(m, x, v, None)

    def vjp_sq(self, m, x, h):
        # every window divides by K (no ceil_mode), so a divisor of K^2 gives the weights 1/K^2;
        # the HesScale authors' code divides by K (AVGPOOL_RULE "authors")
        k = math.prod(_tuple(m.kernel_size, self.nd))
        return self._backward(m, x, h, k if AVGPOOL_RULE.get() == "authors" else k**2)

    def jvp(self, m, x, r):
        return self.pool(r, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)


# ------------------------------------------------------------------ activations


class IdentityRule(LinearMap):
    def forward(self, m, x, generator):
        return x, None

    def vjp(self, m, cache, v):
        return v

    def vjp_cols(self, m, cache, v):
        return v

    vjp_sq = vjp
    jvp = vjp
