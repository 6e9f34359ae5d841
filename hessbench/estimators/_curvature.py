"""Representations of a backpropagated per-sample curvature matrix.

Each object stands for one symmetric matrix ``H_n`` per sample, the Hessian (or
GGN) of the loss with respect to one intermediate tensor of shape ``(N, *shape)``.
All share one small interface, so an engine can pick, per layer, the cheapest:

- :class:`Factored`: ``sum_k s_nk v_nk v_nk^T + diag(d_n)``: signed columns
  ``v`` (N, K, *shape) and an optional diagonal part ``d`` (N, *shape);
- :class:`Full`: dense per-sample matrices (N, F, F), ``F = prod(shape)``;
- :class:`Diagonal`: ``diag(d_n)`` only (where nothing below needs more).

``backprop_through(rule, module, cache, in_shape)`` maps ``H`` at a layer's
output to ``J^T H J`` at its input (``f' f'^T o H`` for an element-wise layer;
the ``f'' g`` residual is a :class:`Diagonal` the engine adds with :meth:`add`,
as a graph engine would sum the representations meeting at a fan-out).
``param_diagonals`` gives a parametric layer's weight and bias diagonals from
``H`` at its output. Nothing here assumes a chain of layers.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

__all__ = ["Curvature", "Diagonal", "Factored", "Full"]


def _diag_cols(rule, m, cache, d: Tensor, out_shape) -> Tensor:
    """``J^T diag(d)`` as columns, (N, F_out, *in)."""
    n = d.shape[0]
    flat = d.reshape(n, -1)
    if hasattr(rule, "vjp_diag_cols"):
        return rule.vjp_diag_cols(m, cache, flat)
    eye = torch.diag_embed(flat).reshape(n, flat.shape[1], *out_shape)
    return rule.vjp_cols(m, cache, eye)


class Curvature(abc.ABC):
    """A per-sample symmetric matrix with respect to a tensor of shape ``(N, *shape)``."""

    shape: tuple[int, ...]

    @property
    def features(self) -> int:
        """``F = prod(shape)``."""
        return math.prod(self.shape)

    @abc.abstractmethod
    def backprop_through(self, rule, m, cache, in_shape, d1=None) -> Curvature:
        """``J^T H J`` at the layer's input (``f' f'^T o H`` for element-wise layers).

        Consumes ``self``: an element-wise layer may scale its tensors in place.

        ``d1``: the element-wise layer's ``f'(x)``, where the caller has it already.
        """

    def diagonal_through(self, rule, m, cache, in_shape) -> Diagonal:
        """``diag(J^T H J)`` only, for a layer linear in its input."""
        return self.backprop_through(rule, m, cache, in_shape).to_diagonal()

    @abc.abstractmethod
    def param_diagonals(self, rule, m, cache) -> tuple[Tensor, Tensor | None]:
        """Weight and bias diagonals of a parametric layer whose output Hessian is ``H``."""

    @abc.abstractmethod
    def to_full(self) -> Full:
        """The same matrices, dense."""

    @abc.abstractmethod
    def to_diagonal(self) -> Diagonal:
        """The diagonal of ``H`` (drops the off-diagonal part)."""

    @abc.abstractmethod
    def add(self, other: Curvature) -> Curvature:
        """``H + H'`` (same shape), in the cheaper of the two representations.

        Operands are consumed: the result may reuse their storage (a dense
        matrix takes a diagonal in place), as an engine never reads an operand
        again after summing it.
        """


class Diagonal(Curvature):
    """``diag(d_n)``: what element-wise residuals ``f''(u) g`` contribute."""

    def __init__(self, d: Tensor):
        self.d = d
        self.shape = tuple(d.shape[1:])

    def backprop_through(self, rule, m, cache, in_shape, d1=None) -> Curvature:
        if rule.elementwise:
            d1 = rule.derivs(m, cache)[0] if d1 is None else d1
            return Diagonal(self.d * d1 * d1)
        return Factored(None, None, self.shape, self.d).backprop_through(rule, m, cache, in_shape)

    def diagonal_through(self, rule, m, cache, in_shape) -> Diagonal:
        return Diagonal(rule.vjp_sq(m, cache, self.d))

    def param_diagonals(self, rule, m, cache):
        return rule.param_diag(m, cache, self.d)

    def to_full(self) -> Full:
        n = self.d.shape[0]
        return Full(torch.diag_embed(self.d.reshape(n, -1)), self.shape)

    def to_diagonal(self) -> Diagonal:
        return self

    def add(self, other: Curvature) -> Curvature:
        if isinstance(other, Diagonal):
            return Diagonal(self.d + other.d)
        return other.add(self)


class Factored(Curvature):
    """``sum_k s_nk v_nk v_nk^T + diag(d_n)`` (``s`` None: all +1; ``v`` or ``d`` None: absent).

    The diagonal part stays a diagonal until the next linear map, where it
    becomes ``F`` signed columns ``sign(d) sqrt|d|`` pushed through ``J^T``
    (BackPACK's DiagHessian); a parametric layer reads it directly.
    """

    def __init__(self, v: Tensor | None, s: Tensor | None, shape, d: Tensor | None = None):
        self.v, self.s, self.d = v, s, d
        self.shape = tuple(shape)

    @property
    def columns(self) -> int:
        """Number of columns ``K`` (the diagonal part not counted)."""
        return 0 if self.v is None else self.v.shape[1]

    def _signs(self) -> Tensor:
        assert self.v is not None
        if self.s is not None:
            return self.s
        return torch.ones(self.v.shape[:2], dtype=self.v.dtype, device=self.v.device)

    def backprop_through(self, rule, m, cache, in_shape, d1=None) -> Curvature:
        if rule.elementwise:
            d1 = rule.derivs(m, cache)[0] if d1 is None else d1
            # in place: the columns are consumed (one block alive, not two, at peak)
            v = None if self.v is None else self.v.mul_(d1.unsqueeze(1))
            d = None if self.d is None else self.d * d1 * d1
            return Factored(v, self.s, in_shape, d)
        v, s = None, None
        if self.v is not None:
            v, s = rule.vjp_cols(m, cache, self.v), self.s
        if self.d is not None:
            n = self.d.shape[0]
            cols = _diag_cols(rule, m, cache, self.d.abs().sqrt(), self.shape)
            signs = self.d.reshape(n, -1).sign()
            if v is None:
                v, s = cols, signs
            else:
                v, s = torch.cat([v, cols], 1), torch.cat([self._signs(), signs], 1)
        return Factored(v, s, in_shape)

    def diagonal_through(self, rule, m, cache, in_shape) -> Diagonal:
        diag = None
        if self.v is not None:
            sq = rule.vjp_cols(m, cache, self.v).square()
            diag = sq.sum(1) if self.s is None else torch.einsum("nk,nk...->n...", self.s, sq)
        if self.d is not None:
            dd = rule.vjp_sq(m, cache, self.d)
            diag = dd if diag is None else diag + dd
        assert diag is not None
        return Diagonal(diag)

    def param_diagonals(self, rule, m, cache):
        if self.v is None or (self.d is not None and rule.diag_suffices):
            return rule.param_diag(m, cache, self.to_diagonal().d)  # one product, not two
        w, b = rule.param_diag_cols(m, cache, self.v, self.s)
        if self.d is not None:
            wd, bd = rule.param_diag(m, cache, self.d)
            w = w + wd
            b = None if b is None else b + bd
        return w, b

    def to_full(self) -> Full:
        if self.v is None:
            return Diagonal(self.d).to_full()
        n, k = self.v.shape[:2]
        vf = self.v.reshape(n, k, -1)
        if self.s is None:
            hmat = vf.transpose(1, 2) @ vf
        else:
            hmat = (vf * self.s.unsqueeze(2)).transpose(1, 2) @ vf
        if self.d is not None:
            hmat.diagonal(dim1=1, dim2=2).add_(self.d.reshape(n, -1))
        return Full(hmat, self.shape)

    def to_diagonal(self) -> Diagonal:
        diag = None
        if self.v is not None:
            sq = self.v.square()
            diag = sq.sum(1) if self.s is None else torch.einsum("nk,nk...->n...", self.s, sq)
        if self.d is not None:
            diag = self.d if diag is None else diag + self.d
        assert diag is not None
        return Diagonal(diag)

    def add(self, other: Curvature) -> Curvature:
        if isinstance(other, Full):
            return other.add(self)
        if isinstance(other, Diagonal):
            d = other.d if self.d is None else self.d + other.d
            return Factored(self.v, self.s, self.shape, d)
        assert isinstance(other, Factored)
        d = self.d if other.d is None else (other.d if self.d is None else self.d + other.d)
        if other.v is None or self.v is None:
            v, s = (self.v, self.s) if other.v is None else (other.v, other.s)
        elif self.s is None and other.s is None:
            v, s = torch.cat([self.v, other.v], 1), None
        else:
            v, s = torch.cat([self.v, other.v], 1), torch.cat([self._signs(), other._signs()], 1)
        return Factored(v, s, self.shape, d)


class Full(Curvature):
    """Dense per-sample matrices ``hmat`` (N, F, F) over the flattened features."""

    def __init__(self, hmat: Tensor, shape):
        self.hmat = hmat
        self.shape = tuple(shape)

    def backprop_through(self, rule, m, cache, in_shape, d1=None) -> Curvature:
        hmat = self.hmat
        n, dout = hmat.shape[:2]
        if rule.elementwise:
            f = (rule.derivs(m, cache)[0] if d1 is None else d1).reshape(n, -1)
            return Full(hmat * f.unsqueeze(2) * f.unsqueeze(1), in_shape)
        din = math.prod(in_shape)
        left = rule.vjp_cols(m, cache, hmat.reshape(n, dout, *self.shape))  # H J, (N, dout, *in)
        left = left.reshape(n, dout, din).transpose(1, 2).reshape(n, din, *self.shape)
        return Full(rule.vjp_cols(m, cache, left).reshape(n, din, din), in_shape)

    def diagonal_through(self, rule, m, cache, in_shape) -> Diagonal:
        # diag(J^T H J)_j = sum_o (J^T e_o)_j (J^T H e_o)_j: two column products, no d_in^2 matrix
        n, dout = self.hmat.shape[:2]
        left = rule.vjp_cols(m, cache, self.hmat.reshape(n, dout, *self.shape))
        ones = torch.ones(n, *self.shape, dtype=self.hmat.dtype, device=self.hmat.device)
        return Diagonal((left * _diag_cols(rule, m, cache, ones, self.shape)).sum(1))

    def param_diagonals(self, rule, m, cache):
        return rule.param_diag_full(m, cache, self.hmat)

    def to_full(self) -> Full:
        return self

    def to_diagonal(self) -> Diagonal:
        n = self.hmat.shape[0]
        return Diagonal(self.hmat.diagonal(dim1=1, dim2=2).reshape(n, *self.shape))

    def to_factored(self) -> Factored:
        """``2F`` signed columns by polarization, exact without a decomposition.

        With ``U = a I`` and ``W = H / a`` (``a^2 = max |H|`` per sample, for
        balanced magnitudes), ``H = (U W^T + W U^T) / 2 = (P P^T - M M^T)``,
        ``P = (U + W) / 2``, ``M = (U - W) / 2``: the columns of ``P`` with sign
        +1 and of ``M`` with sign -1.

        Example:
            >>> h = torch.randn(2, 3, 3, dtype=torch.float64)
            >>> h = h + h.transpose(1, 2)
            >>> f = Full(h, (3,)).to_factored()
            >>> f.columns, torch.allclose(f.to_full().hmat, h, rtol=0, atol=1e-12)
            (6, True)
        """
        h = self.hmat
        n, f = h.shape[:2]
        a = h.abs().amax((1, 2)).sqrt().clamp_min(torch.finfo(h.dtype).tiny ** 0.25)
        a = a.view(n, 1, 1)
        w = h / (2 * a)
        u = torch.diag_embed((a / 2).expand(n, 1, f).reshape(n, f))
        v = torch.cat([u + w, u - w], 1).reshape(n, 2 * f, *self.shape)
        s = torch.ones(n, 2 * f, dtype=h.dtype, device=h.device)
        s[:, f:] = -1.0
        return Factored(v, s, self.shape)

    def add(self, other: Curvature) -> Curvature:
        if isinstance(other, Diagonal):
            n = self.hmat.shape[0]
            self.hmat.diagonal(dim1=1, dim2=2).add_(other.d.reshape(n, -1))  # see add()
            return self
        return Full(self.hmat + other.to_full().hmat, self.shape)
