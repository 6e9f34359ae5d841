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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jacrev, vmap

from hessbench.errors import UnsupportedError
from hessbench.estimators._rules import Elementwise, LinearMap, Parametric, _weighted_sum
from hessbench.estimators._rules_maps import FlattenRule

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def _constant(value: float, like: Tensor) -> Tensor:
    """``value`` as a cached 0-dim tensor of ``like``'s dtype and device."""
    key = (value, like.dtype, like.device)
    out = _CONSTANTS.get(key)
    if out is None:
        out = _CONSTANTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return out


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
        # e = sqrt(2 pi) phi(x), Phi = (1 + erf(x / sqrt 2)) / 2; the constants as cached 0-dim
        # tensors (a Python scalar operand costs a conversion per kernel, as much as the kernel
        # at batch 1), Phi from erf (torch.special.ndtr costs several of these kernels)
        x2 = x * x
        e = torch.exp(x2 * _constant(-0.5, x))
        half = _constant(0.5, x)
        cdf = torch.addcmul(half, half, torch.erf(x * _constant(_INV_SQRT_2, x)))
        d1 = torch.addcmul(cdf, x, e, value=_INV_SQRT_2PI)
        d2 = e * torch.addcmul(_constant(2.0 * _INV_SQRT_2PI, x), x2, _constant(-_INV_SQRT_2PI, x))
        return d1, d2


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
        if self.bn is None:
            return None
        var = self.bn.running_var
        return torch.rsqrt(var + _constant(self.bn.eps, var))

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
    ``(x_hat, scale, view, dims)``, ``dims`` those an output-shaped tensor sums over
    per parameter entry.
    """

    diag_jacobian = True

    def forward(self, m: AffineSpec, x, generator):
        view = m.view(x)
        w = None if m.weight is None else m.weight.view(view)
        b = None if m.bias is None else m.bias.view(view)
        xhat, scale = x, w
        if m.bn is not None:
            inv = m.invstd.view(view)
            xhat = (x - m.mean.view(view)) * inv
            scale = inv if w is None else w * inv
        if w is None:
            y = xhat if b is None else xhat + b
        else:
            y = xhat * w if b is None else torch.addcmul(b, xhat, w)
        return y, (xhat, scale, view, self._sum_dims(x.shape, view))

    def narrow(self, m, cache, rows):
        xhat, scale, view, dims = cache
        if m.bn is not None or len(view) > xhat.dim() - 2:  # parameters vary over dim 1
            return None
        return xhat[:, rows], scale, view, dims

    @staticmethod
    def _sum_dims(shape: torch.Size, pview: tuple[int, ...]) -> list[int]:
        """The dims of an output-shaped tensor that a parameter's entry sums over."""
        view = (1,) * (len(shape) - len(pview)) + tuple(pview)
        return [i for i, (a, b) in enumerate(zip(view, shape, strict=True)) if a == 1 and b != 1]

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
        pview = cache[2]
        if lead == 0:
            dims = cache[3]
        else:
            dims = [lead + i for i in AffineRule._sum_dims(t.shape[lead:], pview)]
        out = t.sum(dims) if dims else t
        return AffineRule._as(out, (*t.shape[:lead], math.prod(pview)))

    @staticmethod
    def _param_shape(m):
        return (m.weight if m.weight is not None else m.bias).shape

    @staticmethod
    def _as(t: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
        """``t`` in ``shape``, reshaped only where it differs (a reshape is a kernel call)."""
        return t if t is None or t.shape == shape else t.reshape(shape)

    def param_grad(self, m, cache, g):
        shape = self._param_shape(m)
        gw = None if m.weight is None else self._reduce(cache, g * cache[0], 0)
        gb = None if m.bias is None else self._reduce(cache, g, 0)
        return self._as(gw, shape), self._as(gb, shape)

    def param_diag(self, m, cache, h):
        shape = self._param_shape(m)
        hw = None if m.weight is None else self._reduce(cache, h * cache[0].square(), 0)
        hb = None if m.bias is None else self._reduce(cache, h, 0)
        return self._as(hw, shape), self._as(hb, shape)

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
def signed_factor(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Signed columns of block-diagonal symmetric matrices: ``sum_k s_k c_k c_k^T``.

    ``blocks`` (N, B, F, F): sample ``n``'s matrix has the ``B`` blocks on its
    diagonal (in the coordinates each rule knows). From ``eigh`` of every block:
    ``c_k = sqrt|lambda_k| u_k``, ``s_k = sign(lambda_k)``, largest ``|lambda|`` first,
    keeping the eigenvalues above ``F eps max|lambda|`` of their block (the rank
    tolerance of ``torch.linalg.matrix_rank``), as many per block as its largest rank
    over the samples (none for a block that is zero in every sample). The columns
    left out change a block by at most that tolerance in norm, the size of ``eigh``'s
    own rounding; a residual of low rank (the attention of a model read at its last
    position: 116 of 768) then carries only its rank's columns through the layers below.

    Returns:
        ``(cols (N, K, B, F), signs (N, K))``: column ``k`` is zero outside its own
        block; ``K >= 1`` (one zero column when every block is zero).

    Example:
        >>> u = torch.linalg.qr(torch.arange(12.0, dtype=torch.float64).view(6, 2).cos())[0]
        >>> res = u @ torch.diag(torch.tensor([2.0, -3.0], dtype=torch.float64)) @ u.T
        >>> cols, s = signed_factor(res.view(1, 1, 6, 6))
        >>> c = cols.view(2, 6)
        >>> cols.shape, s.tolist(), torch.allclose((c.T * s) @ c, res)
        (torch.Size([1, 2, 1, 6]), [[-1.0, 1.0]], True)
    """
    n, nb, f = blocks.shape[:3]
    lam, vec = torch.linalg.eigh(blocks)
    mag = lam.abs()
    tol = mag.amax(-1, keepdim=True) * f * torch.finfo(lam.dtype).eps
    ranks = (mag > tol).sum(-1).amax(0).tolist() if n else [0] * nb  # per block
    width = max(ranks) or 1
    order = mag.argsort(-1, descending=True)[..., :width]
    lam = lam.gather(-1, order)
    vec = vec.gather(-1, order.unsqueeze(-2).expand(n, nb, f, width))
    cols = (vec * lam.abs().sqrt().unsqueeze(-2)).transpose(-1, -2)  # (N, B, width, F)
    total = sum(ranks) or 1
    out = cols.new_zeros(n, total, nb, f)
    signs = lam.new_zeros(n, total)
    at = 0
    for b, k in enumerate(ranks):
        out[:, at : at + k, b] = cols[:, b, :k]
        signs[:, at : at + k] = torch.sign(lam[:, b, :k])
        at += k
    return out, signs


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

    def diag_backward_local(
        self, m, cache, g: Tensor | None, h: Tensor, *, residual: bool, backprop: bool
    ) -> tuple[Tensor | None, Tensor]:
        """The diagonal pass at this node: ``(J^T g, (J o J)^T h [+ diag nabla^2 (g . f)])``.

        ``J^T g`` only with ``backprop``, the residual ``diag nabla^2 (g . f)``
        only with ``residual`` (``g`` is given when either is). Rules in closed
        form override it to share the work of the three products.
        """
        h_in = self.vjp_sq(m, cache, h)
        if residual:
            h_in = h_in + self.residual_diag(m, cache, g)
        return (self.vjp(m, cache, g) if backprop else None), h_in

    def residual_cols(self, m, cache, g: Tensor) -> tuple[Tensor, Tensor]:
        """Signed columns of the residual (:func:`signed_factor`), (N, K, *in) and (N, K)."""
        res = self.residual(m, cache, g)
        cols, signs = signed_factor(res.unsqueeze(1))
        return cols.view(g.shape[0], -1, *cache[2]), signs

    def residual_parts(self, m, cache, g: Tensor) -> list[tuple[str, Tensor, Tensor | None]]:
        """The residual as the factor pass's blocks: ``[("cols", columns, signs)]``.

        A rule whose residual is a diagonal plus few columns returns a ``("diag",
        u, signs)`` part too (``u`` (N, *in): the columns ``u_i e_i``).
        """
        cols, signs = self.residual_cols(m, cache, g)
        return [("cols", cols, signs)]


SPLIT_MIN = 2**20
"""``rows x D^3`` from which :meth:`LayerNormRule.residual_parts` splits the residual into
a diagonal and three columns per row instead of ``eigh`` row by row. In-process A/B of
``exact`` (float32, residual MLPs of ``benchmarks/cost_ratios.py``'s shape): width 128
0.80-0.85 of the time at batch 1 and 0.54 at batch 32 (0.63 in float64); width 64 1.00
and 0.51; width 32 1.07 and 0.65; the tiny GPT (8 rows of 32) 1.02-1.05 at batch 1."""


class _LNCache(NamedTuple):
    """:class:`LayerNormRule`'s cache (``shape`` at index 2, as the generic rule's)."""

    xhat: Tensor
    """The normalized input, one row per sample and position: (N * P, D)."""
    inv: Tensor
    """``1 / sigma``, (N * P, 1)."""
    shape: torch.Size
    """The per-sample input shape."""
    x: Tensor
    mean: Tensor
    rstd: Tensor
    """The input and ``torch.native_layer_norm``'s statistics, for its backward."""
    lazy: dict[str, Tensor]
    """``1 / (D sigma)^2`` for the diagonal pass, built at first use."""


class LayerNormRule(LocalRule):
    """LayerNorm's normalization ``x_hat = (x - mean) / sigma`` over the trailing ``D`` features, closed form.

    Every leading position (``(N, *P, D)``, a transformer's tokens) is normalized
    on its own, so the formulas below hold row by row and the per-sample
    residual is block diagonal, one ``D x D`` block per position.

    With ``D`` features, ``J = (I - (1 1^T + x_hat x_hat^T) / D) / sigma`` (symmetric), so
    ``J^T v = (v - mean(v) - x_hat mean(v x_hat)) / sigma`` and
    ``(J o J)^T h = (h (1 - 2 (1 + x_hat^2) / D) + (S0 + 2 x_hat S1 + x_hat^2 S2) / D^2) / sigma^2``
    with ``Sk = sum h x_hat^k``. The residual ``nabla^2 (g . x_hat)`` is
    ``(-m I + m (1 1^T + x_hat x_hat^T) / D - (x_hat a^T + a x_hat^T) / D) / sigma^2``,
    ``m = mean(g x_hat)``, ``a = g - mean(g) - x_hat m``; its diagonal is
    ``(m (-1 + (1 + 3 x_hat^2) / D) - 2 x_hat (g - mean(g)) / D) / sigma^2``.

    Together (the diagonal pass, :meth:`diag_backward_local`), with ``Tk = sum g x_hat^k``:
    ``h_in = ((1 - 2/D) h - (2/D) x_hat (x_hat h + g) + v0 + v1 x_hat + v2 x_hat^2) / sigma^2``,
    ``v0 = (S0 + (1 - D) T1) / D^2``, ``v1 = 2 (S1 + T0) / D^2``, ``v2 = (S2 + 3 T1) / D^2``.

    The forward pass and ``J^T v`` are torch's own LayerNorm kernels; the diagonal
    pass is five row sums and a dozen element-wise kernels (:meth:`_h_in`), whatever
    ``D``: at batch 1 it is bound by the number of kernels, not their size.
    """

    def forward(self, m, x, generator):
        k = len(m.shape)
        if x.dim() <= k or tuple(x.shape[-k:]) != m.shape:  # not LayerNorm's own layout
            return LocalRule.forward(self, m, x, generator)
        y, mean, rstd = torch.native_layer_norm(x, m.shape, None, None, m.eps)
        d = math.prod(m.shape)
        return y, _LNCache(y.reshape(-1, d), rstd.reshape(-1, 1), x.shape[1:], x, mean, rstd, {})

    def narrow(self, m, cache, rows):
        if not isinstance(cache, _LNCache) or cache.x.dim() - len(m.shape) < 2:
            return None  # the generic rule's cache, or dim 1 is normalized over
        x = cache.x
        n, p, d = x.shape[0], x.shape[1], cache.xhat.shape[1]
        xr = x[:, rows].contiguous()  # torch's LayerNorm backward reads these as laid out
        return _LNCache(
            cache.xhat.view(n, p, -1, d)[:, rows].reshape(-1, d),
            cache.inv.view(n, p, -1)[:, rows].reshape(-1, 1),
            xr.shape[1:],
            xr,
            cache.mean[:, rows].contiguous(),
            cache.rstd[:, rows].contiguous(),
            {},
        )

    def vjp(self, m, cache, v):
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.vjp(self, m, cache, v)
        return torch.ops.aten.native_layer_norm_backward(
            v, cache.x, m.shape, cache.mean, cache.rstd, None, None, [True, False, False]
        )[0]

    def vjp_cols(self, m, cache, v):
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.vjp_cols(self, m, cache, v)
        xhat, inv, shape = cache[:3]
        n, k = v.shape[:2]
        rows, d = xhat.shape[0] // n, xhat.shape[1]
        vf = v.reshape(n, k, rows, d)
        xh = xhat.view(n, 1, rows, d)
        out = vf - vf.mean(3, keepdim=True) - xh * (vf * xh).mean(3, keepdim=True)
        return (out * inv.view(n, 1, rows, 1)).view(n, k, *shape)

    def diag_backward_local(self, m, cache, g, h, *, residual, backprop):
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.diag_backward_local(
                self, m, cache, g, h, residual=residual, backprop=backprop
            )
        g_in = self.vjp(m, cache, g) if backprop else None
        return g_in, self._h_in(cache, g, h, residual)

    @staticmethod
    def _h_in(cache: _LNCache, g: Tensor | None, h: Tensor, residual: bool) -> Tensor:
        """``(J o J)^T h`` (plus the residual's diagonal with ``residual``), in Horner form.

        ``D^2 sigma^2 h_in = (D^2 - 2 D) h + A0 + 2 x_hat (A1 - D g + x_hat (A2 - 2 D h) / 2)``
        with ``A = [S0, S1, S2]`` (``+ [(1 - D) T1, T0, 3 T1]`` and the ``g`` term with
        ``residual``): row sums and element-wise kernels only.
        """
        xhat = cache.xhat
        rows, d = xhat.shape
        hf = h.reshape(rows, d)
        if "inv2" not in cache.lazy:
            cache.lazy["inv2"] = cache.inv.square().div_(d * d)  # 1 / (D sigma)^2
        hx = hf * xhat
        a0 = hf.sum(1, keepdim=True)
        a1 = hx.sum(1, keepdim=True)
        a2 = torch.linalg.vecdot(hx, xhat).unsqueeze(1)
        inner = torch.add(a2, hf, alpha=-2.0 * d)  # A2 - 2 D h
        if residual:
            gf = g.reshape(rows, d)
            t1 = torch.linalg.vecdot(gf, xhat).unsqueeze(1)
            a0 = a0.add_(t1, alpha=1.0 - d)
            inner.add_(t1, alpha=3.0)
            mid = torch.add(a1.add_(gf.sum(1, keepdim=True)), gf, alpha=-float(d))
            mid.addcmul_(xhat, inner, value=0.5)
        else:
            mid = torch.addcmul(a1, xhat, inner, value=0.5)
        out = torch.addcmul(a0, xhat, mid, value=2.0).add_(hf, alpha=float(d * d - 2 * d))
        return out.mul_(cache.lazy["inv2"]).view(h.shape)

    def vjp_sq(self, m, cache, h):
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.vjp_sq(self, m, cache, h)
        return self._h_in(cache, None, h, False)

    def _terms(self, cache, g):
        xhat, inv = cache[:2]
        gf = g.reshape(xhat.shape)
        mm = (gf * xhat).mean(1, keepdim=True)
        a = gf - gf.mean(1, keepdim=True) - xhat * mm
        return xhat, inv, mm, a

    def _blocks(self, cache: _LNCache, g: Tensor) -> Tensor:
        """The residual's diagonal blocks, one per row (N * P, D, D)."""
        xhat, inv, mm, a = self._terms(cache, g)
        d = xhat.shape[1]
        ones = torch.ones_like(xhat)
        low = (ones.unsqueeze(2) * ones.unsqueeze(1) + xhat.unsqueeze(2) * xhat.unsqueeze(1)) / d
        cross = (xhat.unsqueeze(2) * a.unsqueeze(1) + a.unsqueeze(2) * xhat.unsqueeze(1)) / d
        res = mm.unsqueeze(2) * low - cross
        res.diagonal(dim1=1, dim2=2).sub_(mm)
        return res * (inv * inv).unsqueeze(2)

    def residual_cols(self, m, cache, g):
        """Signed columns of the residual, row by row (its blocks: :func:`signed_factor`)."""
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.residual_cols(self, m, cache, g)
        res = self._blocks(cache, g)
        n, d = g.shape[0], res.shape[1]
        cols, signs = signed_factor(res.view(n, -1, d, d))
        return cols.view(n, cols.shape[1], *cache.shape), signs

    def residual_parts(self, m, cache, g):
        """The residual as ``-m inv^2 I`` (a diagonal part) plus three signed columns per row.

        Per row, ``inv^2 (-m I + U C U^T)`` with ``U = [1, x_hat, a]`` and
        ``C = [[m/D, 0, 0], [0, m/D, -1/D], [0, -1/D, 0]]`` (the blocks of :meth:`_blocks`).
        With ``U = Q R`` and ``R C R^T inv^2 = V diag(lambda) V^T`` (a 3 x 3 ``eigh``),
        the columns are ``Q V sqrt|lambda|`` with signs ``sign(lambda)``: no ``D x D``
        ``eigh`` per row (on the residual MLP, a quarter of the exact pass), and the
        diagonal parts of several LayerNorms on one residual stream merge into one.
        """
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.residual_parts(self, m, cache, g)
        rows, d = cache.xhat.shape
        n = g.shape[0]
        p = rows // n  # positions per sample: each row's columns are zero elsewhere
        if rows * d**3 < SPLIT_MIN or (
            p > 1 and bool((g.reshape(n, p, d).abs().amax((0, 2)) == 0).any())
        ):
            # few or small rows: their eigen-columns cost less than D + 3 columns; a
            # position without gradient in any sample (a model read at its last
            # position): the eigen-columns leave it out, the diagonal part would not
            return LocalRule.residual_parts(self, m, cache, g)
        xhat, inv, mm, a = self._terms(cache, g)
        inv2 = inv * inv
        diag = (mm * inv2).neg_().expand(rows, d)  # -m inv^2, the same across a row
        q, r = torch.linalg.qr(torch.stack([torch.ones_like(xhat), xhat, a], 2))
        c = mm.new_zeros(rows, 3, 3)
        c[:, 0, 0] = c[:, 1, 1] = mm.squeeze(1) / d
        c[:, 1, 2] = c[:, 2, 1] = -1.0 / d
        lam, vec = torch.linalg.eigh(r @ (c * inv2.unsqueeze(2)) @ r.transpose(1, 2))
        cols = (q @ vec) * lam.abs().sqrt().unsqueeze(1)  # (rows, D, 3)
        full = cols.new_zeros(n, p, 3, p, d)
        full.diagonal(dim1=1, dim2=3).copy_(cols.view(n, p, d, 3).permute(0, 3, 2, 1))
        shape = cache.shape
        return [
            ("diag", diag.abs().sqrt().reshape(n, *shape), diag.sign().reshape(n, *shape)),
            ("cols", full.view(n, 3 * p, *shape), lam.sign().reshape(n, 3 * p)),
        ]

    def residual(self, m, cache, g):
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.residual(self, m, cache, g)
        res = self._blocks(cache, g)  # (N * P, D, D): one block per row
        n, d = g.shape[0], res.shape[1]
        rows = res.shape[0] // n
        if rows == 1:
            return res
        full = res.new_zeros(n, rows, d, rows, d)
        full.diagonal(dim1=1, dim2=3).copy_(res.view(n, rows, d, d).permute(0, 2, 3, 1))
        return full.view(n, rows * d, rows * d)

    def residual_diag(self, m, cache, g):
        if not isinstance(cache, _LNCache):  # the generic rule's cache
            return LocalRule.residual_diag(self, m, cache, g)
        return self._h_in(cache, g, torch.zeros_like(g), True)
