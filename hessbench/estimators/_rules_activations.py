"""Rules of the element-wise layers: activations and Dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hessbench.estimators._rules import Elementwise

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


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

    def r_vjp(self, m, y, g, rg, r):
        # f' R{g} + f'' R{x} g with f'' = -2 y f'
        return torch.ops.aten.tanh_backward(torch.add(rg, y * r * g, alpha=-2.0), y)

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

    def r_vjp(self, m, y, g, rg, r):
        # f' R{g} + f'' R{x} g with f'' = f' (1 - 2y)
        return torch.ops.aten.sigmoid_backward(torch.addcmul(rg, (1.0 - 2.0 * y) * r, g), y)

    def backward_diag(self, m, y, g, h, residual):
        # f'' = f' (1 - 2y), so f'^2 h + f'' g = f' (f' h + (1 - 2y) g)
        sb = torch.ops.aten.sigmoid_backward
        if residual:
            h = sb(sb(h, y) + torch.add(g, y * g, alpha=-2.0), y)
        else:
            h = sb(sb(h, y), y)
        return (None if g is None else sb(g, y)), h


class ReLURule(Elementwise):
    curved = False

    def forward(self, m, x, generator):
        return torch.relu(x), x

    def derivs(self, m, x):
        return (x > 0).to(x.dtype), None

    def backward_diag(self, m, x, g, h, residual):
        # f' is the 0/1 mask x > 0 and f'' = 0: f'^2 h = f' h, one fused kernel each
        tb = torch.ops.aten.threshold_backward
        return (None if g is None else tb(g, x, 0)), tb(h, x, 0)


class LeakyReLURule(Elementwise):
    curved = False

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

    def backward_diag(self, m, x, g, h, residual):
        # f' = f'' = e = alpha exp(x) for x <= 0, f' = 1 and f'' = 0 above:
        # f'^2 h + f'' g = e (e h + g) below zero, h above
        e = torch.exp(torch.clamp(x, max=0.0)).mul_(m.alpha)
        pos = x > 0
        below = torch.addcmul(g, e, h) if residual else e * h
        h = torch.where(pos, h, below.mul_(e))
        return (None if g is None else torch.where(pos, g, e * g)), h


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

    In training mode the mask is exactly the one ``nn.Dropout`` would draw at
    this point from the global RNG, which the estimator seeds from its
    generator (and restores afterwards): the layer-by-layer and autograd paths
    see the same masks for equal generators.
    """

    curved = False

    def forward(self, m, x, generator):
        if not m.training or m.p == 0.0:
            return x, None
        d1 = F.dropout(torch.ones_like(x), m.p, True)  # the same draw nn.Dropout makes
        return x * d1, d1

    def derivs(self, m, d1):
        return d1, None
