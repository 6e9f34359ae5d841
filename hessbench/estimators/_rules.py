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
  output factors, from full per-sample output Hessians, and the K-FAC factors;
- for Hessian-vector products by Pearlmutter's R-operator: ``jvp`` (the
  forward directional derivative) and the R-backward rules.

All per-sample tensors carry the batch in dimension 0. Everything runs under
``torch.no_grad`` in the engine; rules never use autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Rule:
    """A layer's rule. Subclasses set ``elementwise`` and ``parametric``."""

    elementwise = False
    parametric = False

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`UnsupportedError` for a configuration the rule cannot handle."""

    def forward(self, m: nn.Module, x: Tensor, generator: torch.Generator | None):
        raise NotImplementedError

    def narrow(self, m: nn.Module, cache, rows: slice):
        """The cache of the same layer applied to positions ``rows`` alone, or None.

        On inputs ``(N, P, ...)`` whose positions the layer treats one by one
        (a Linear on the last dimension, LayerNorm over it, an activation), the
        diagonal pass can run on the rows where the backpropagated gradient and
        curvature are not zero (below ``h[:, -1]``); None where it cannot.
        """
        return None


class Elementwise(Rule):
    """``y = f(x)`` applied entry by entry."""

    elementwise = True
    curved = True
    """Whether ``f''`` can be non-zero (``derivs`` may return a second derivative)."""

    def derivs(self, m: nn.Module, cache) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def narrow(self, m: nn.Module, cache, rows: slice):
        return cache[:, rows] if isinstance(cache, Tensor) and cache.dim() >= 3 else None

    def vjp(self, m: nn.Module, cache, v: Tensor) -> Tensor:
        """``f'(x) v`` for ``v`` of shape (N, *shape)."""
        return v * self.derivs(m, cache)[0]

    def vjp_cols(self, m: nn.Module, cache, v: Tensor) -> Tensor:
        """``f'(x) v`` for columns ``v`` of shape (N, K, *shape)."""
        return v * self.derivs(m, cache)[0].unsqueeze(1)

    def jvp(self, m: nn.Module, cache, r: Tensor) -> Tensor:
        """``f'(x) r``: the output's directional derivative."""
        return self.vjp(m, cache, r)

    def r_vjp(self, m: nn.Module, cache, g: Tensor, rg: Tensor, r: Tensor) -> Tensor:
        """``R{f'(x) g} = f'(x) R{g} + f''(x) R{x} g`` (``g``, ``rg`` at the output)."""
        d1, d2 = self.derivs(m, cache)
        out = rg * d1
        return out if d2 is None else torch.addcmul(out, d2 * r, g)

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

    def jvp(self, m: nn.Module, cache, r: Tensor) -> Tensor:
        """``J r``: the layer applied to an input tangent ``r`` (N, *in)."""
        raise NotImplementedError


class Parametric(LinearMap):
    """A layer with a weight and an optional bias, affine in its input."""

    parametric = True
    diag_suffices = False
    """Whether the parameter diagonal needs only the diagonal of the output Hessian."""

    def param_grad(self, m, cache, g: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def param_diag(self, m, cache, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Diagonal from a diagonal output curvature ``h`` (N, *out)."""
        raise NotImplementedError

    def diag_backward(
        self, m, cache, g: Tensor | None, h: Tensor, *, need_input: bool, with_grad: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """One layer of the HesScale pass: ``(h_W, h_b, g_W, g_b, h_in, g_in)``.

        ``h_W, h_b`` from :meth:`param_diag`; the gradient ``g_W, g_b`` only with
        ``with_grad``; the input's ``h_in = (J o J)^T h`` and ``g_in = J^T g`` only
        with ``need_input`` (``g_in`` only where ``g`` is given). Rules override it
        to share work between the four products (Conv: two backward kernels).
        """
        hw, hb = self.param_diag(m, cache, h)
        gw = gb = h_in = g_in = None
        if with_grad:
            gw, gb = self.param_grad(m, cache, g)
        if need_input:
            h_in = self.vjp_sq(m, cache, h)
            if g is not None:
                g_in = self.vjp(m, cache, g)
        return hw, hb, gw, gb, h_in, g_in

    def param_diag_cols(self, m, cache, v: Tensor, s: Tensor | None):
        """``sum_n sum_k s_nk (J_n^T v_nk)^2`` for signed columns ``v`` (N, K, *out)."""
        raise NotImplementedError

    def param_diag_full(self, m, cache, hmat: Tensor):
        """Diagonal from full per-sample output Hessians ``hmat`` (N, d, d)."""
        raise NotImplementedError

    def jvp_param(
        self, m, cache, r: Tensor | None, vw: Tensor | None, vb: Tensor | None
    ) -> Tensor | None:
        """``R{z}`` for ``z = W x + b``: ``W r + V_w x + v_b`` (terms that are None dropped)."""
        raise NotImplementedError

    def r_vjp(self, m, cache, g: Tensor, rg: Tensor, vw: Tensor | None) -> Tensor:
        """``R{W^T g} = W^T R{g} + V_w^T g``."""
        raise NotImplementedError

    def param_rgrad(
        self, m, cache, g: Tensor, rg: Tensor, r: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """``R{dL/dW} = R{g} x^T + g R{x}^T`` and ``R{dL/db}``: the Hessian-vector product."""
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
