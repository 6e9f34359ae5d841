"""Rules of the layers with parameters: Linear and Conv1d/Conv2d."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_input, conv2d_input

from hessbench.errors import UnsupportedError
from hessbench.estimators._rules import Parametric, _weighted_sum


# --------------------------------------------------------------------- Linear
class LinearRule(Parametric):
    """``z = x W^T + b`` on inputs of shape (N, in_features)."""

    diag_suffices = True

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

    def jvp(self, m, x, r):
        return F.linear(r, m.weight)

    def jvp_param(self, m, x, r, vw, vb):
        out = None if r is None else F.linear(r, m.weight)
        if vw is not None:
            out = F.linear(x, vw) if out is None else torch.addmm(out, x, vw.t())
        if vb is not None:
            out = vb.expand(x.shape[0], -1) if out is None else out + vb
        return out

    def r_vjp(self, m, x, g, rg, vw):
        out = rg @ m.weight
        return out if vw is None else torch.addmm(out, g, vw)

    def param_rgrad(self, m, x, g, rg, r):
        hw = rg.t() @ x
        if r is not None:
            hw = torch.addmm(hw, g.t(), r)
        return hw, (rg.sum(0) if m.bias is not None else None)

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

    def _backward(self, m, cache, v, x, weight, mask):
        """``convolution_backward`` of the output tangent ``v`` for input ``x`` and ``weight``.

        Returns ``(J^T v, sum_n v * x as weight gradient, sum of v per channel)``, each
        None where ``mask`` says so: autograd's own convolution backward kernels.
        """
        pad = cache[1]
        bias_sizes = [m.out_channels] if mask[2] else None
        return torch.ops.aten.convolution_backward(
            v,
            x,
            weight,
            bias_sizes,
            m.stride,
            pad,
            m.dilation,
            False,
            [0] * self.nd,
            m.groups,
            mask,
        )

    def param_grad(self, m, cache, g):
        _, gw, gb = self._backward(
            m, cache, g, cache[0], m.weight, (False, True, m.bias is not None)
        )
        return gw, gb

    def param_diag(self, m, cache, h):
        """``h_W[o,c,k] = sum_n sum_pos h[n,o,pos] x[n,c,pos+k]^2``: the weight gradient for ``x^2``."""
        x = cache[0]
        _, hw, hb = self._backward(
            m, cache, h, x.square(), m.weight, (False, True, m.bias is not None)
        )
        return hw, hb

    def diag_backward(self, m, cache, g, h, *, need_input, with_grad):
        """Two ``convolution_backward`` calls: ``(h; x^2, W o W)`` and ``(g; x, W)``.

        The first gives ``h_W`` (the weight gradient of a convolution of ``x^2``),
        ``h_b`` and ``h_in`` (the transposed convolution of ``h`` with ``W o W``);
        the second, where needed, the gradient and ``g_in``.
        """
        x = cache[0]
        bias = m.bias is not None
        w2 = m.weight.square() if need_input else m.weight
        h_in, hw, hb = self._backward(m, cache, h, x.square(), w2, (need_input, True, bias))
        gw = gb = g_in = None
        need_g = need_input and g is not None
        if with_grad or need_g:
            mask = (need_g, with_grad, with_grad and bias)
            g_in, gw, gb = self._backward(m, cache, g, x, m.weight, mask)
        return hw, hb, gw, gb, h_in, g_in

    def param_diag_cols(self, m, cache, v, s):
        a = self._unfold(m, cache)
        n, grp = a.shape[:2]
        k = v.shape[1]
        vz = v.reshape(n, k, grp, -1, a.shape[-1])
        # the product is fresh: squared in place (one product-sized buffer fewer)
        wg = torch.einsum("nkgop,ngqp->nkgoq", vz, a).square_()
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

    def _conv(self, m, cache, x, weight, bias=None):
        return self.conv(x, weight, bias, m.stride, cache[1], m.dilation, m.groups)

    def jvp(self, m, cache, r):
        return self._conv(m, cache, r, m.weight)

    def jvp_param(self, m, cache, r, vw, vb):
        out = None if r is None else self._conv(m, cache, r, m.weight)
        if vw is not None:
            t = self._conv(m, cache, cache[0], vw)
            out = t if out is None else out + t
        if vb is not None:
            vb = vb.view(1, -1, *([1] * self.nd))
            out = vb.expand(cache[0].shape[0], -1, *cache[2][2:]) if out is None else out + vb
        return out

    def r_vjp(self, m, cache, g, rg, vw):
        out = self._apply_t(m, cache, rg, m.weight)
        return out if vw is None else out + self._apply_t(m, cache, g, vw)

    def param_rgrad(self, m, cache, g, rg, r):
        hw, hb = self.param_grad(m, cache, rg)
        if r is not None:
            hw = hw + self.param_grad(m, (r, *cache[1:]), g)[0]
        return hw, hb

    def kfac_output(self, m, cache, v):
        return v.square().sum((0, 1, *range(3, v.dim())))


# ------------------------------------------------------------ parameter-free maps
