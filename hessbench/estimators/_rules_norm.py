"""Rules of the graph engine's extra layers.

GELU, SiLU, eval-mode BatchNorm, the affine part of LayerNorm/GroupNorm,
adaptive average pooling, constant scalings, and a generic local-derivative
rule for any other per-sample map (LayerNorm's and GroupNorm's normalization).

They share the interface of :mod:`hessbench.estimators._rules`. Rules with
``diag_jacobian = True`` have a diagonal Jacobian ``jac_diag(m, cache)`` (a
tensor broadcastable to the output), so a diagonal curvature block passes
through them as a diagonal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jacrev, vmap

from hessbench.errors import UnsupportedError
from hessbench.estimators._rules import Elementwise, LinearMap, Parametric, _weighted_sum
from hessbench.estimators._rules_maps import FlattenRule

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ------------------------------------------------------------------ activations
class GELURule(Elementwise):
    """``x Phi(x)`` (``approximate="none"``): ``f' = Phi + x phi``, ``f'' = phi (2 - x^2)``."""

    def check(self, m, path):
        if getattr(m, "approximate", "none") != "none":
            raise UnsupportedError(
                f"layer '{path}' ({type(m).__name__}): approximate={m.approximate!r} is not "
                "supported (only 'none')"
            )

    def forward(self, m, x, generator):
        return F.gelu(x), x

    def derivs(self, m, x):
        phi = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        return cdf + x * phi, phi * (2.0 - x * x)


class SiLURule(Elementwise):
    """``x sigma(x)``: ``f' = s (1 + x (1 - s))``, ``f'' = s (1 - s) (2 + x (1 - 2 s))``."""

    def forward(self, m, x, generator):
        return F.silu(x), x

    def derivs(self, m, x):
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s)), s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


class ScaleRule(Elementwise):
    """``y = a x + b`` with constants ``a``, ``b`` (``x * 2``, ``x - 1``, ``-x``): not curved."""

    curved = False
    diag_jacobian = True

    def forward(self, m, x, generator):
        a, b = m
        return x * a + b, torch.full_like(x, a)

    def derivs(self, m, cache):
        return cache, None

    def jac_diag(self, m, cache):
        return cache


# ------------------------------------------------------------ reshapes
class ReshapeRule(FlattenRule):
    """``flatten``/``view``/``reshape`` keeping the batch dimension; the cache is the input shape."""

    def check(self, m, path):
        pass


# ------------------------------------------------------- per-channel affine maps
class AffineSpec:
    """``y = weight * (x - mean) * invstd + bias``, one parameter per channel or per feature.

    Eval-mode BatchNorm ``bn`` (``mean``, ``invstd`` from its running statistics, read at
    every forward pass, per channel)
    and the affine part of LayerNorm (per feature of the trailing ``shape``) or
    GroupNorm (per channel), where ``mean = invstd = None``: ``x`` is already
    normalized. ``weight``/``bias`` are the module's parameters (or None).
    ``shape`` None means per channel (dimension 1 of the input).
    """

    def __init__(self, weight, bias, shape=None, bn=None):
        self.weight, self.bias, self.shape, self.bn = weight, bias, shape, bn

    @property
    def mean(self):
        return None if self.bn is None else self.bn.running_mean

    @property
    def invstd(self):
        return None if self.bn is None else (self.bn.running_var + self.bn.eps).rsqrt()

    def view(self, x: Tensor) -> tuple[int, ...]:
        """The parameters' broadcast shape against ``x`` (N, *S), right-aligned."""
        if self.shape is not None:
            return tuple(self.shape)
        c = (self.weight if self.weight is not None else self.bn.running_var).numel()
        return (c,) + (1,) * (x.dim() - 2)


class AffineRule(Parametric):
    """A per-channel (per-feature) affine map: ``J = diag(weight * invstd)``.

    ``dy/dweight = x_hat`` (the normalized input), ``dy/dbias = 1``: parameter
    diagonals are sums over the positions sharing a parameter. The cache is
    ``(x_hat, scale, view)``.
    """

    diag_jacobian = True

    def forward(self, m: AffineSpec, x, generator):
        view = m.view(x)
        xhat = x
        invstd = m.invstd
        if invstd is not None:
            xhat = (x - m.mean.view(view)) * invstd.view(view)
        y = xhat if m.weight is None else xhat * m.weight.view(view)
        if m.bias is not None:
            y = y + m.bias.view(view)
        scale = None
        if m.weight is not None:
            scale = m.weight.view(view)
        if invstd is not None:
            inv = invstd.view(view)
            scale = inv if scale is None else scale * inv
        return y, (xhat, scale, view)

    def jac_diag(self, m, cache):
        scale = cache[1]
        return (
            torch.ones((), dtype=cache[0].dtype, device=cache[0].device) if scale is None else scale
        )

    def vjp(self, m, cache, v):
        return v if cache[1] is None else v * cache[1]

    vjp_cols = vjp

    def vjp_sq(self, m, cache, h):
        return h if cache[1] is None else h * cache[1].square()

    @staticmethod
    def _reduce(cache, t: Tensor, lead: int) -> Tensor:
        """Sum ``t`` (``lead`` leading dims, then the output's) to ``(*lead dims, param size)``."""
        shape = t.shape[lead:]
        pview = cache[2]
        view = (1,) * (len(shape) - len(pview)) + tuple(pview)
        dims = [
            lead + i for i, (a, b) in enumerate(zip(view, shape, strict=True)) if a == 1 and b != 1
        ]
        out = t.sum(dims, keepdim=True) if dims else t
        return out.reshape(*t.shape[:lead], math.prod(pview))

    @staticmethod
    def _param_shape(m):
        return (m.weight if m.weight is not None else m.bias).shape

    def param_grad(self, m, cache, g):
        shape = self._param_shape(m)
        gw = None if m.weight is None else self._reduce(cache, g * cache[0], 0).reshape(shape)
        gb = None if m.bias is None else self._reduce(cache, g, 0).reshape(shape)
        return gw, gb

    def param_diag(self, m, cache, h):
        shape = self._param_shape(m)
        hw = None if m.weight is None else self._reduce(cache, h * cache[0].square(), 0)
        hb = None if m.bias is None else self._reduce(cache, h, 0)
        return (None if hw is None else hw.reshape(shape)), (
            None if hb is None else hb.reshape(shape)
        )

    def param_diag_cols(self, m, cache, v, s):
        shape = self._param_shape(m)
        hw = hb = None
        if m.weight is not None:
            t = self._reduce(cache, v * cache[0].unsqueeze(1), 2).square()
            hw = _weighted_sum(t, s).reshape(shape)
        if m.bias is not None:
            hb = _weighted_sum(self._reduce(cache, v, 2).square(), s).reshape(shape)
        return hw, hb


# ------------------------------------------------------------ adaptive pooling
class AdaptiveAvgPoolRule(FlattenRule):
    """Adaptive average pooling whose output size divides the input: equal windows of ``K``.

    ``J^T`` repeats each output over its window with weight ``1/K``; ``(J o J)^T``
    with ``1/K^2``. The cache is the window per pooled dimension.
    """

    def __init__(self, nd: int):
        self.nd = nd

    def check(self, m, path):
        pass

    def forward(self, m, x, generator):
        nd = self.nd
        out = m.output_size
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,) * nd
        ins = x.shape[-nd:]
        out = tuple(i if o is None else o for o, i in zip(out, ins, strict=True))
        if any(i % o for i, o in zip(ins, out, strict=True)):
            raise UnsupportedError(
                f"adaptive pooling from {tuple(ins)} to {out}: only output sizes that divide "
                "the input size are supported"
            )
        win = tuple(i // o for i, o in zip(ins, out, strict=True))
        pool = F.adaptive_avg_pool1d if nd == 1 else F.adaptive_avg_pool2d
        return pool(x, out), win

    def _spread(self, win, v, power: int):
        for i, k in enumerate(win):
            v = v.repeat_interleave(k, dim=v.dim() - self.nd + i)
        return v / (math.prod(win) ** power)

    def vjp(self, m, win, v):
        return self._spread(win, v, 1)

    vjp_cols = vjp

    def vjp_sq(self, m, win, h):
        return self._spread(win, h, 2)


# ------------------------------------------------- generic local derivatives
class LocalSpec:
    """A per-sample map ``fn`` (batched: ``fn(x)`` maps (N, *in) to (N, *out))."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def single(self, xs: Tensor) -> Tensor:
        return self.fn(xs.unsqueeze(0)).squeeze(0)


class LocalRule(LinearMap):
    """Any per-sample map, by its own local derivatives (``torch.func``).

    The forward pass also stores the per-sample Jacobian ``J`` (N, F_out, F_in)
    from ``vmap(jacrev)``, so ``vjp``, ``vjp_cols``, ``vjp_sq`` are batched
    products. ``residual(g)`` is the exact ``nabla_x^2 (g . f(x))`` per sample
    (``jacrev(jacrev)``), (N, F_in, F_in). The cost is bounded by the node's own
    input and output sizes, never by the number of parameters. It has no parameters.
    """

    curved_local = True

    def forward(self, m: LocalSpec, x, generator):
        y = m.fn(x)
        jac = vmap(jacrev(m.single))(x)
        n = x.shape[0]
        return y, (x, jac.reshape(n, y[0].numel(), x[0].numel()), x.shape[1:], y.shape[1:])

    def vjp(self, m, cache, v):
        _, jac, ins, _ = cache
        n = v.shape[0]
        return torch.bmm(v.reshape(n, 1, -1), jac).reshape(n, *ins)

    def vjp_cols(self, m, cache, v):
        _, jac, ins, _ = cache
        n, k = v.shape[:2]
        return torch.bmm(v.reshape(n, k, -1), jac).reshape(n, k, *ins)

    def vjp_sq(self, m, cache, h):
        _, jac, ins, _ = cache
        n = h.shape[0]
        return torch.bmm(h.reshape(n, 1, -1), jac.square()).reshape(n, *ins)

    def residual(self, m, cache, g: Tensor) -> Tensor:
        """``nabla_x^2 (g . f(x))`` per sample, (N, F_in, F_in)."""
        x = cache[0]

        def inner(xs, gs):
            return (gs * m.single(xs)).sum()

        hess = vmap(jacrev(jacrev(inner)))(x, g)
        n = x.shape[0]
        f = x[0].numel()
        return hess.reshape(n, f, f)

    def residual_diag(self, m, cache, g: Tensor) -> Tensor:
        res = self.residual(m, cache, g)
        return res.diagonal(dim1=1, dim2=2).reshape(g.shape[0], *cache[2])

    def residual_cols(self, m, cache, g: Tensor) -> tuple[Tensor, Tensor]:
        """Signed columns of the residual: eigenvectors times ``sqrt|lambda|``, signs ``sign(lambda)``."""
        res = self.residual(m, cache, g)
        lam, vec = torch.linalg.eigh(res)
        n, f = lam.shape
        cols = (vec * lam.abs().sqrt().unsqueeze(1)).transpose(1, 2)  # (N, F cols, F)
        return cols.reshape(n, f, *cache[2]), torch.sign(lam)


class LayerNormRule(LocalRule):
    """LayerNorm's normalization ``x_hat = (x - mean) / sigma`` over all non-batch features, closed form.

    With ``D`` features, ``J = (I - (1 1^T + x_hat x_hat^T) / D) / sigma`` (symmetric), so
    ``J^T v = (v - mean(v) - x_hat mean(v x_hat)) / sigma`` and
    ``(J o J)^T h = (h (1 - 2 (1 + x_hat^2) / D) + (S0 + 2 x_hat S1 + x_hat^2 S2) / D^2) / sigma^2``
    with ``Sk = sum h x_hat^k``. The residual ``nabla^2 (g . x_hat)`` is
    ``(-m I + m (1 1^T + x_hat x_hat^T) / D - (x_hat a^T + a x_hat^T) / D) / sigma^2``,
    ``m = mean(g x_hat)``, ``a = g - mean(g) - x_hat m``. The cache is ``(x_hat, 1/sigma, shape)``.
    """

    def forward(self, m, x, generator):
        if tuple(x.shape[1:]) != m.shape:  # leading positions: the generic per-sample rule
            return LocalRule.forward(self, m, x, generator)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        mu = flat.mean(1, keepdim=True)
        var = (flat - mu).square().mean(1, keepdim=True)
        inv = (var + m.eps).rsqrt()
        xhat = (flat - mu) * inv
        return xhat.view(x.shape), (xhat, inv, x.shape[1:])

    def vjp(self, m, cache, v):
        if len(cache) == 4:  # the generic rule's cache
            return LocalRule.vjp(self, m, cache, v)
        xhat, inv, shape = cache
        n = v.shape[0]
        vf = v.reshape(n, -1)
        out = vf - vf.mean(1, keepdim=True) - xhat * (vf * xhat).mean(1, keepdim=True)
        return (out * inv).view(n, *shape)

    def vjp_cols(self, m, cache, v):
        if len(cache) == 4:  # the generic rule's cache
            return LocalRule.vjp_cols(self, m, cache, v)
        xhat, inv, shape = cache
        n, k = v.shape[:2]
        vf = v.reshape(n, k, -1)
        xh = xhat.unsqueeze(1)
        out = vf - vf.mean(2, keepdim=True) - xh * (vf * xh).mean(2, keepdim=True)
        return (out * inv.unsqueeze(1)).view(n, k, *shape)

    def vjp_sq(self, m, cache, h):
        if len(cache) == 4:  # the generic rule's cache
            return LocalRule.vjp_sq(self, m, cache, h)
        xhat, inv, shape = cache
        n = h.shape[0]
        hf = h.reshape(n, -1)
        d = hf.shape[1]
        s0 = hf.sum(1, keepdim=True)
        s1 = (hf * xhat).sum(1, keepdim=True)
        s2 = (hf * xhat * xhat).sum(1, keepdim=True)
        out = hf * (1 - 2 * (1 + xhat * xhat) / d) + (s0 + 2 * xhat * s1 + xhat * xhat * s2) / d**2
        return (out * inv * inv).view(n, *shape)

    def _terms(self, cache, g):
        xhat, inv, _ = cache
        gf = g.reshape(g.shape[0], -1)
        mm = (gf * xhat).mean(1, keepdim=True)
        a = gf - gf.mean(1, keepdim=True) - xhat * mm
        return xhat, inv, mm, a

    def residual(self, m, cache, g):
        if len(cache) == 4:  # the generic rule's cache
            return LocalRule.residual(self, m, cache, g)
        xhat, inv, mm, a = self._terms(cache, g)
        d = xhat.shape[1]
        ones = torch.ones_like(xhat)
        low = (ones.unsqueeze(2) * ones.unsqueeze(1) + xhat.unsqueeze(2) * xhat.unsqueeze(1)) / d
        cross = (xhat.unsqueeze(2) * a.unsqueeze(1) + a.unsqueeze(2) * xhat.unsqueeze(1)) / d
        res = mm.unsqueeze(2) * low - cross
        res.diagonal(dim1=1, dim2=2).sub_(mm)
        return res * (inv * inv).unsqueeze(2)

    def residual_diag(self, m, cache, g):
        if len(cache) == 4:  # the generic rule's cache
            return LocalRule.residual_diag(self, m, cache, g)
        xhat, inv, mm, a = self._terms(cache, g)
        d = xhat.shape[1]
        out = -mm + mm * (1 + xhat * xhat) / d - 2 * xhat * a / d
        return (out * inv * inv).view(g.shape[0], *cache[2])
