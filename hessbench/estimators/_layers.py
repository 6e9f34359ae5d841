"""Per-layer rules shared by every backprop-style estimator.

The table :data:`RULES` maps a layer type to its rule; it is also the list of
supported layers. A rule knows, for its layer ``y = f(x)``:

- ``forward``: the output and what the backward passes need (the *cache*);
- for element-wise layers (:class:`Elementwise`): ``derivs``, the first and
  second derivative ``f'(x)``, ``f''(x)`` (``None`` where ``f'' = 0``);
- for every other layer, linear in its input once the cache is fixed:
  ``vjp`` (``J^T v`` for ``v`` of shape ``(N, *out)``), ``vjp_cols``
  (``J^T`` applied to ``K`` columns per sample, ``(N, K, *out)``) and
  ``vjp_sq`` (``(J o J)^T h``, the HesScale/BL89 diagonal rule);
- for layers with parameters (:class:`Parametric`): the parameter gradient, the
  parameter diagonal from a diagonal output curvature (HesScale), from signed
  output factors, from full per-sample output Hessians, and the K-FAC factors.

All per-sample tensors carry the batch in dimension 0. Everything runs under
``torch.no_grad`` in the engine; rules never use autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_input, conv2d_input

from hessbench.errors import UnsupportedError
from hessbench.estimators._base import fresh_generator

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


class Rule:
    """A layer's rule. Subclasses set ``elementwise`` and ``parametric``."""

    elementwise = False
    parametric = False

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`UnsupportedError` for a configuration the rule cannot handle."""

    def forward(self, m: nn.Module, x: Tensor, generator: torch.Generator | None):
        raise NotImplementedError


class Elementwise(Rule):
    """``y = f(x)`` applied entry by entry."""

    elementwise = True

    def derivs(self, m: nn.Module, cache) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def vjp(self, m: nn.Module, cache, v: Tensor) -> Tensor:
        """``f'(x) v`` for ``v`` of shape (N, *shape)."""
        return v * self.derivs(m, cache)[0]

    def vjp_cols(self, m: nn.Module, cache, v: Tensor) -> Tensor:
        """``f'(x) v`` for columns ``v`` of shape (N, K, *shape)."""
        return v * self.derivs(m, cache)[0].unsqueeze(1)

    def backward_diag(
        self, m: nn.Module, cache, g: Tensor | None, h: Tensor, residual: bool
    ) -> tuple[Tensor | None, Tensor]:
        """``(f' g, f'^2 h + f'' g)``; no ``f'' g`` unless ``residual``, no ``g`` if it is None."""
        d1, d2 = self.derivs(m, cache)
        if residual and d2 is not None:
            h = torch.addcmul(d2 * g, d1 * d1, h)
        else:
            h = d1 * d1 * h
        return (None if g is None else g * d1), h


class LinearMap(Rule):
    """A layer linear in its input (given its cache)."""

    def vjp(self, m: nn.Module, cache, v: Tensor) -> Tensor:
        raise NotImplementedError

    def vjp_cols(self, m: nn.Module, cache, v: Tensor) -> Tensor:
        n, k = v.shape[:2]
        out = self.vjp(m, cache, v.reshape(n * k, *v.shape[2:]))
        return out.reshape(n, k, *out.shape[1:])

    def vjp_sq(self, m: nn.Module, cache, h: Tensor) -> Tensor:
        raise NotImplementedError


class Parametric(LinearMap):
    """A layer with a weight and an optional bias, affine in its input."""

    parametric = True

    def param_grad(self, m, cache, g: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def param_diag(self, m, cache, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Diagonal from a diagonal output curvature ``h`` (N, *out)."""
        raise NotImplementedError

    def param_diag_cols(self, m, cache, v: Tensor, s: Tensor | None):
        """``sum_n sum_k s_nk (J_n^T v_nk)^2`` for signed columns ``v`` (N, K, *out)."""
        raise NotImplementedError

    def param_diag_full(self, m, cache, hmat: Tensor):
        """Diagonal from full per-sample output Hessians ``hmat`` (N, d, d)."""
        raise NotImplementedError

    def kfac_input(self, m, cache) -> Tensor:
        """``diag(A)``: mean over samples (and positions) of the squared layer input."""
        raise NotImplementedError

    def kfac_output(self, m, cache, v: Tensor) -> Tensor:
        """``diag(G)`` per output channel: ``sum_{n,k,pos} v^2``."""
        raise NotImplementedError


def _weighted_sum(sq: Tensor, s: Tensor | None) -> Tensor:
    """``sum_{n,k} s_nk sq[n, k, ...]`` (plain sum where ``s`` is None)."""
    if s is None:
        return sq.sum((0, 1))
    return torch.einsum("nk,nk...->...", s, sq)


# --------------------------------------------------------------------- Linear
class LinearRule(Parametric):
    """``z = x W^T + b`` on inputs of shape (N, in_features)."""

    def forward(self, m, x, generator):
        if x.dim() != 2:
            raise UnsupportedError(
                f"Linear expects inputs of shape (N, features), got {tuple(x.shape)}; add nn.Flatten"
            )
        return F.linear(x, m.weight, m.bias), x

    def vjp(self, m, x, v):
        return v @ m.weight

    def vjp_cols(self, m, x, v):
        return v @ m.weight

    def vjp_sq(self, m, x, h):
        return h @ m.weight.square()

    def vjp_diag_cols(self, m, x, d):
        """``J^T diag(d)`` as columns (N, out, in): rows of W scaled by ``d``."""
        return d.unsqueeze(2) * m.weight

    def param_grad(self, m, x, g):
        return g.t() @ x, (g.sum(0) if m.bias is not None else None)

    def param_diag(self, m, x, h):
        return h.t() @ x.square(), (h.sum(0) if m.bias is not None else None)

    def param_diag_cols(self, m, x, v, s):
        sq = v.square()
        dz = sq.sum(1) if s is None else torch.einsum("nk,nko->no", s, sq)
        return self.param_diag(m, x, dz)

    def param_diag_full(self, m, x, hmat):
        return self.param_diag(m, x, hmat.diagonal(dim1=1, dim2=2))

    def kfac_input(self, m, x):
        return x.square().mean(0).unsqueeze(0)  # (groups=1, in)

    def kfac_output(self, m, x, v):
        return v.square().sum((0, 1))


# ----------------------------------------------------------------- Convolution
def _conv_padding(m: nn.Module, path: str) -> tuple[int, ...]:
    """Numeric padding of a conv module ('valid' and odd 'same' resolved)."""
    nd = len(m.kernel_size)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0,) * nd
        pads = []
        for k, d in zip(m.kernel_size, m.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedError(
                    f"layer '{path}' ({type(m).__name__}): padding='same' with an even "
                    "effective kernel is not supported"
                )
            pads.append(total // 2)
        return tuple(pads)
    return tuple(m.padding)


class ConvRule(Parametric):
    """Conv1d / Conv2d with stride, padding, dilation and groups."""

    def __init__(self, nd: int):
        self.nd = nd
        self.conv = F.conv1d if nd == 1 else F.conv2d
        self.conv_input = conv1d_input if nd == 1 else conv2d_input

    def check(self, m, path):
        if m.padding_mode != "zeros":
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}): padding_mode={m.padding_mode!r} is not "
                "supported (only 'zeros')"
            )
        _conv_padding(m, path)

    def forward(self, m, x, generator):
        pad = _conv_padding(m, "")
        y = self.conv(x, m.weight, m.bias, m.stride, pad, m.dilation, m.groups)
        return y, (x, pad, y.shape)

    def _apply_t(self, m, cache, v, weight):
        x, pad, _ = cache
        size = (v.shape[0], *x.shape[1:])
        return self.conv_input(size, weight, v, m.stride, pad, m.dilation, m.groups)

    def vjp(self, m, cache, v):
        return self._apply_t(m, cache, v, m.weight)

    def vjp_sq(self, m, cache, h):
        return self._apply_t(m, cache, h, m.weight.square())

    def _unfold(self, m, cache, x: Tensor | None = None) -> Tensor:
        """Patches of the input: (N, groups, C/groups * prod(kernel), positions)."""
        xin, pad, _ = cache
        x = xin if x is None else x
        if self.nd == 1:
            cols = F.unfold(
                x.unsqueeze(2),
                (1, m.kernel_size[0]),
                dilation=(1, m.dilation[0]),
                padding=(0, pad[0]),
                stride=(1, m.stride[0]),
            )
        else:
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
        n, q, p = cols.shape
        return cols.view(n, m.groups, q // m.groups, p)

    def param_grad(self, m, cache, g):
        a = self._unfold(m, cache)
        n, grp = a.shape[:2]
        gz = g.reshape(n, grp, -1, a.shape[-1])
        gw = torch.einsum("ngop,ngqp->goq", gz, a).reshape(m.weight.shape)
        gb = g.sum((0, *range(2, g.dim()))) if m.bias is not None else None
        return gw, gb

    def param_diag(self, m, cache, h):
        x = cache[0]
        a2 = self._unfold(m, cache, x.square())
        n, grp = a2.shape[:2]
        hz = h.reshape(n, grp, -1, a2.shape[-1])
        hw = torch.einsum("ngop,ngqp->goq", hz, a2).reshape(m.weight.shape)
        hb = h.sum((0, *range(2, h.dim()))) if m.bias is not None else None
        return hw, hb

    def param_diag_cols(self, m, cache, v, s):
        a = self._unfold(m, cache)
        n, grp = a.shape[:2]
        k = v.shape[1]
        vz = v.reshape(n, k, grp, -1, a.shape[-1])
        wg = torch.einsum("nkgop,ngqp->nkgoq", vz, a).square()
        hw = _weighted_sum(wg, s).reshape(m.weight.shape)
        hb = None
        if m.bias is not None:
            hb = _weighted_sum(v.flatten(3).sum(3).square(), s)
        return hw, hb

    def param_diag_full(self, m, cache, hmat):
        a = self._unfold(m, cache)
        n, grp, _, p = a.shape
        o = m.out_channels
        blocks = hmat.view(n, o, p, o, p).diagonal(dim1=1, dim2=3)  # (N, P, P, O)
        blocks = blocks.permute(0, 3, 1, 2).reshape(n, grp, o // grp, p, p)
        hw = torch.einsum("ngopr,ngqp,ngqr->goq", blocks, a, a).reshape(m.weight.shape)
        hb = blocks.sum((0, 3, 4)).reshape(o) if m.bias is not None else None
        return hw, hb

    def kfac_input(self, m, cache):
        a = self._unfold(m, cache)
        return a.square().mean((0, 3))  # (groups, C/groups * kernel)

    def kfac_output(self, m, cache, v):
        return v.square().sum((0, 1, *range(3, v.dim())))


# ------------------------------------------------------------ parameter-free maps
class FlattenRule(LinearMap):
    def check(self, m, path):
        if m.start_dim != 1 or m.end_dim != -1:
            raise UnsupportedError(
                f"layer '{path}' (Flatten): only start_dim=1, end_dim=-1 is supported"
            )

    def forward(self, m, x, generator):
        return x.flatten(1), x.shape[1:]

    def vjp(self, m, shape, v):
        return v.reshape(v.shape[0], *shape)

    def vjp_cols(self, m, shape, v):
        return v.reshape(*v.shape[:2], *shape)

    def vjp_sq(self, m, shape, h):
        return h.reshape(h.shape[0], *shape)


class MaxPoolRule(LinearMap):
    """Max pooling: ``J`` routes each output to its argmax input (``J o J = J``)."""

    def __init__(self, nd: int):
        self.nd = nd
        self.pool = F.max_pool1d if nd == 1 else F.max_pool2d

    def check(self, m, path):
        if m.return_indices:
            raise UnsupportedError(
                f"layer '{path}' (MaxPool): return_indices=True is not supported"
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


# ------------------------------------------------------------------ activations
class TanhRule(Elementwise):
    def forward(self, m, x, generator):
        y = torch.tanh(x)
        return y, y

    def derivs(self, m, y):
        d1 = 1.0 - y * y
        return d1, -2.0 * y * d1

    def vjp(self, m, y, v):
        return torch.ops.aten.tanh_backward(v, y)

    def vjp_cols(self, m, y, v):
        return torch.ops.aten.tanh_backward(v, y.unsqueeze(1))

    def backward_diag(self, m, y, g, h, residual):
        # f'' = -2 y f', so f'^2 h + f'' g = f' (f' h - 2 y g): fused tanh_backward calls
        tb = torch.ops.aten.tanh_backward
        if residual:
            h = tb(torch.add(tb(h, y), y * g, alpha=-2.0), y)
        else:
            h = tb(tb(h, y), y)
        return (None if g is None else tb(g, y)), h


class SigmoidRule(Elementwise):
    def forward(self, m, x, generator):
        y = torch.sigmoid(x)
        return y, y

    def derivs(self, m, y):
        d1 = y * (1.0 - y)
        return d1, d1 * (1.0 - 2.0 * y)

    def vjp(self, m, y, v):
        return torch.ops.aten.sigmoid_backward(v, y)

    def vjp_cols(self, m, y, v):
        return torch.ops.aten.sigmoid_backward(v, y.unsqueeze(1))

    def backward_diag(self, m, y, g, h, residual):
        # f'' = f' (1 - 2y), so f'^2 h + f'' g = f' (f' h + (1 - 2y) g)
        sb = torch.ops.aten.sigmoid_backward
        if residual:
            h = sb(sb(h, y) + torch.add(g, y * g, alpha=-2.0), y)
        else:
            h = sb(sb(h, y), y)
        return (None if g is None else sb(g, y)), h


class ReLURule(Elementwise):
    def forward(self, m, x, generator):
        return torch.relu(x), x

    def derivs(self, m, x):
        return (x > 0).to(x.dtype), None


class LeakyReLURule(Elementwise):
    def forward(self, m, x, generator):
        return F.leaky_relu(x, m.negative_slope), x

    def derivs(self, m, x):
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return torch.where(x > 0, one, one * m.negative_slope), None


class ELURule(Elementwise):
    def forward(self, m, x, generator):
        return F.elu(x, m.alpha), x

    def derivs(self, m, x):
        e = torch.exp(torch.clamp(x, max=0.0)) * m.alpha
        pos = x > 0
        return torch.where(pos, torch.ones_like(x), e), torch.where(pos, torch.zeros_like(x), e)


class SELURule(Elementwise):
    def forward(self, m, x, generator):
        return F.selu(x), x

    def derivs(self, m, x):
        e = torch.exp(torch.clamp(x, max=0.0)) * (_SELU_ALPHA * _SELU_SCALE)
        pos = x > 0
        return (
            torch.where(pos, torch.full_like(x, _SELU_SCALE), e),
            torch.where(pos, torch.zeros_like(x), e),
        )


class SoftplusRule(Elementwise):
    def forward(self, m, x, generator):
        return F.softplus(x, m.beta, m.threshold), x

    def derivs(self, m, x):
        bx = x * m.beta
        s = torch.sigmoid(bx)
        linear = bx > m.threshold
        return (
            torch.where(linear, torch.ones_like(x), s),
            torch.where(linear, torch.zeros_like(x), m.beta * s * (1.0 - s)),
        )


class LogSigmoidRule(Elementwise):
    def forward(self, m, x, generator):
        return F.logsigmoid(x), x

    def derivs(self, m, x):
        s = torch.sigmoid(x)
        return 1.0 - s, -s * (1.0 - s)


class DropoutRule(Elementwise):
    """Dropout: its scaled mask in training mode, the identity in eval mode.

    In training mode the mask is drawn from the estimator's generator (never the
    global RNG), so estimators given equal generators see the same mask.
    """

    def forward(self, m, x, generator):
        if not m.training or m.p == 0.0:
            return x, None
        if m.p >= 1.0:
            return torch.zeros_like(x), torch.zeros_like(x)
        if generator is None:
            generator = fresh_generator(x.device)
        u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=torch.float64)
        d1 = (u >= m.p).to(device=x.device, dtype=x.dtype) / (1.0 - m.p)
        return x * d1, d1

    def derivs(self, m, d1):
        return d1, None


class IdentityRule(LinearMap):
    def forward(self, m, x, generator):
        return x, None

    def vjp(self, m, cache, v):
        return v

    def vjp_cols(self, m, cache, v):
        return v

    vjp_sq = vjp


RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Flatten: FlattenRule(),
    nn.MaxPool1d: MaxPoolRule(1),
    nn.MaxPool2d: MaxPoolRule(2),
    nn.AvgPool1d: AvgPoolRule(1),
    nn.AvgPool2d: AvgPoolRule(2),
    nn.Tanh: TanhRule(),
    nn.Sigmoid: SigmoidRule(),
    nn.ReLU: ReLURule(),
    nn.LeakyReLU: LeakyReLURule(),
    nn.ELU: ELURule(),
    nn.SELU: SELURule(),
    nn.Softplus: SoftplusRule(),
    nn.LogSigmoid: LogSigmoidRule(),
    nn.Dropout: DropoutRule(),
    nn.Identity: IdentityRule(),
}
"""Supported layer types (exact type match; subclasses are refused) and their rules."""
