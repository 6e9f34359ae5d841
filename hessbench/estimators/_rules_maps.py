"""Rules of the parameter-free layers that are linear in their input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.grad import conv1d_input, conv2d_input

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


class MaxPoolRule(LinearMap):
    """Max pooling: ``J`` routes each output to its argmax input (``J o J = J``)."""

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
        return y, (x.shape, idx)

    def vjp(self, m, cache, v):
        shape, idx = cache
        n, c = v.shape[:2]
        out = v.new_zeros(n, c, math.prod(shape[1:]) // c)
        out.scatter_add_(2, idx.reshape(n, c, -1), v.reshape(n, c, -1))
        return out.view(n, *shape[1:])

    def vjp_cols(self, m, cache, v):
        shape, idx = cache
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


class AvgPoolRule(LinearMap):
    """Average pooling as a depthwise convolution with weights ``1/K`` (``1/K^2`` squared)."""

    def __init__(self, nd: int):
        self.nd = nd
        self.pool = F.avg_pool1d if nd == 1 else F.avg_pool2d
        self.conv_input = conv1d_input if nd == 1 else conv2d_input

    def check(self, m, path):
        if m.ceil_mode or not m.count_include_pad or getattr(m, "divisor_override", None):
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}): only ceil_mode=False, "
                "count_include_pad=True and no divisor_override are supported"
            )

    @staticmethod
    def _tuple(v, nd):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd

    def forward(self, m, x, generator):
        y = self.pool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
        return y, x.shape

    def _apply(self, m, shape, v, power):
        nd = self.nd
        k = self._tuple(m.kernel_size, nd)
        stride = self._tuple(m.stride if m.stride else m.kernel_size, nd)
        pad = self._tuple(m.padding, nd)
        c = shape[1]
        w = torch.full((c, 1, *k), math.prod(k) ** -power, dtype=v.dtype, device=v.device)
        return self.conv_input((v.shape[0], *shape[1:]), w, v, stride, pad, 1, c)

    def vjp(self, m, shape, v):
        return self._apply(m, shape, v, 1)

    def vjp_sq(self, m, shape, h):
        return self._apply(m, shape, h, 2)

    def jvp(self, m, shape, r):
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
