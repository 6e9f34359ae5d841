"""Rules of the graph engine's sequence layers: transformers.

- :class:`PosLinearRule`: ``nn.Linear`` on inputs with leading positions
  ``(N, *P, in)`` (a plain :class:`~hessbench.estimators._rules_affine.LinearRule`
  on ``(N, in)``); also the packed in-projection of ``nn.MultiheadAttention``.
- :class:`EmbeddingRule`: ``nn.Embedding`` on integer tokens ``(N, *P)``: a
  Linear map of one-hot inputs, so parameter curvature is scattered into the rows
  of the tokens read.
- :class:`AddParamRule`: ``x + p`` for a parameter ``p`` read in ``forward`` and
  broadcast over the batch (a learned positional embedding): bias-like.
- :class:`SelectRule`: ``x[:, i]`` (basic indexing keeping the batch
  dimension): a selection, ``J o J = J``.
- :class:`AttentionRule`: the attention core ``softmax(Q K^T / sqrt(d_h) + mask) V``
  per head on the packed ``(q, k, v)``, in closed form for the diagonal pass and as
  a generic local rule (:class:`~hessbench.estimators._rules_norm.LocalRule`) for the
  column and full-matrix passes.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hessbench.errors import UnsupportedError
from hessbench.estimators._rules import LinearMap, Parametric, _weighted_sum
from hessbench.estimators._rules_affine import LinearRule
from hessbench.estimators._rules_norm import LocalRule, LocalSpec, signed_factor

__all__ = [
    "AddParamRule",
    "AddParamSpec",
    "AttentionRule",
    "AttentionSpec",
    "EmbeddingRule",
    "LinearSpec",
    "PosLinearRule",
    "SelectRule",
]


class LinearSpec:
    """``weight``, ``bias`` of a linear map that is not an ``nn.Linear`` (MHA's packed in-projection)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


# ------------------------------------------------------------ Linear on positions
class PosLinearRule(LinearRule):
    """``z = x W^T + b`` on ``(N, *P, in)``; on ``(N, in)`` exactly :class:`LinearRule`.

    With positions, parameter diagonals sum over the positions sharing the weight:
    HesScale ``h_W[o,i] = sum_{n,p} h_z[n,p,o] x[n,p,i]^2`` (the cross-position terms
    dropped, as for convolutions); from signed columns
    ``sum_{n,k} s_nk (sum_p v[n,k,p,o] x[n,p,i])^2`` (exact). K-FAC: ``A`` is the
    mean over samples and positions of ``x^2``, ``G`` the sum of ``v^2`` (as Conv).
    """

    def forward(self, m, x, generator):
        return F.linear(x, m.weight, m.bias), x

    def narrow(self, m, x, rows):
        return x[:, rows] if x.dim() >= 3 else None

    def vjp_diag_cols(self, m, x, d):
        if x.dim() == 2:
            return LinearRule.vjp_diag_cols(self, m, x, d)
        n = x.shape[0]
        out = (*x.shape[1:-1], m.weight.shape[0])
        eye = torch.diag_embed(d).reshape(n, d.shape[1], *out)
        return eye @ m.weight

    def param_grad(self, m, x, g):
        if x.dim() == 2:
            return LinearRule.param_grad(self, m, x, g)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return g2.t() @ x2, (g2.sum(0) if m.bias is not None else None)

    def param_diag(self, m, x, h):
        if x.dim() == 2:
            return LinearRule.param_diag(self, m, x, h)
        h2, x2 = h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1])
        return h2.t() @ x2.square(), (h2.sum(0) if m.bias is not None else None)

    def param_diag_cols(self, m, x, v, s):
        if x.dim() == 2:
            return LinearRule.param_diag_cols(self, m, x, v, s)
        n, k = v.shape[:2]
        vf = v.reshape(n, k, -1, v.shape[-1])  # (N, K, P, out)
        xf = x.reshape(n, -1, x.shape[-1])  # (N, P, in)
        if xf.shape[1] <= xf.shape[2]:
            # sum_k s_k (sum_p v_kpo x_pi)^2 = sum_pq G_opq x_pi x_qi with the columns' Gram
            # matrices G_o = sum_k s_k v_ko v_ko^T (P x P): K out P^2 flops instead of
            # K out P in, and no (K, out, in) intermediate
            vt = vf.permute(0, 3, 2, 1).contiguous()  # (N, out, P, K): one bmm per output
            sv = vt if s is None else vt * s.view(n, 1, 1, k)
            gram = sv @ vt.transpose(-1, -2)  # (N, out, P, P)
            hw = (torch.matmul(gram, xf.unsqueeze(1)) * xf.unsqueeze(1)).sum((0, 2))
            hb = gram.sum((0, 2, 3)) if m.bias is not None else None
            return hw, hb
        hw = _weighted_sum(torch.einsum("nkpo,npi->nkoi", vf, xf).square_(), s)
        hb = _weighted_sum(vf.sum(2).square(), s) if m.bias is not None else None
        return hw, hb

    def param_diag_full(self, m, x, hmat):
        if x.dim() == 2:
            return LinearRule.param_diag_full(self, m, x, hmat)
        raise UnsupportedError("Linear on positions: full output Hessians are not supported")

    def kfac_input(self, m, x):
        return x.reshape(-1, x.shape[-1]).square().mean(0).unsqueeze(0)

    def kfac_output(self, m, x, v):
        return v.square().reshape(-1, v.shape[-1]).sum(0)


# ------------------------------------------------------------------ Embedding
class EmbeddingRule(Parametric):
    """``y[n, p] = W[t[n, p]]`` for integer tokens ``t``: a Linear map of one-hot inputs.

    ``g_W[t] = sum_{(n,p): t[n,p]=t} g[n,p]``; HesScale ``h_W[t] = sum_{(n,p): t} h[n,p]``;
    from signed columns ``h_W[t] = sum_{n,k} s_nk (sum_{p: t[n,p]=t} v[n,k,p])^2``
    (exact). The input (tokens) has no gradient. K-FAC takes the GGN diagonal of
    the same columns (``kfac_by_columns``). The cache is the tokens.
    """

    kfac_by_columns = True

    def check(self, m, path):
        if m.max_norm is not None or m.scale_grad_by_freq:
            raise UnsupportedError(
                f"layer '{path}' (Embedding): max_norm and scale_grad_by_freq are not supported"
            )

    def forward(self, m, x, generator):
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise UnsupportedError("Embedding expects integer token inputs")
        return F.embedding(x, m.weight, m.padding_idx), x

    def _pad(self, m, t: Tensor) -> Tensor:
        if m.padding_idx is not None:  # the padding row is constant
            t[m.padding_idx] = 0
        return t

    def _scatter(self, m, x, t: Tensor) -> Tensor:
        """``sum`` of the rows of ``t`` (N, *P, d) into the rows of the tokens read."""
        out = torch.zeros_like(m.weight).index_add_(0, x.reshape(-1), t.reshape(-1, t.shape[-1]))
        return self._pad(m, out)

    def param_grad(self, m, x, g):
        return self._scatter(m, x, g), None

    def param_diag(self, m, x, h):
        return self._scatter(m, x, h), None

    def param_diag_cols(self, m, x, v, s):
        n, k = v.shape[:2]
        onehot = F.one_hot(x.reshape(n, -1), m.weight.shape[0]).to(v.dtype)  # (N, P, V)
        per = torch.einsum("nkpd,npv->nkvd", v.reshape(n, k, -1, v.shape[-1]), onehot)
        return self._pad(m, _weighted_sum(per.square(), s)), None

    def vjp(self, m, x, v):
        raise UnsupportedError("Embedding: integer inputs have no gradient")

    vjp_sq = vjp


# --------------------------------------------------------- x + parameter (bias-like)
class AddParamSpec:
    """``x + p``: ``bias`` is the parameter ``p`` (broadcast over the batch and leading dims)."""

    weight = None

    def __init__(self, bias):
        self.bias = bias


class AddParamRule(Parametric):
    """``y = x + p`` with ``p`` broadcast against ``x`` (N, *S) (right-aligned, no batch axis).

    ``J = I``; the parameter's gradient and diagonals sum over the broadcast
    dimensions: HesScale ``h_p = sum_n reduce(h)``; from signed columns
    ``sum_{n,k} s_nk reduce(v_nk)^2`` (exact). The cache is the reduction's dims.
    """

    diag_jacobian = True
    kfac_by_columns = True

    def forward(self, m, x, generator):
        p = m.bias
        shape = tuple(p.shape)
        if len(shape) == x.dim():
            if shape[0] != 1:
                raise UnsupportedError(
                    f"a parameter of shape {shape} added to inputs {tuple(x.shape)} varies over "
                    "the batch"
                )
            shape = shape[1:]
        ins = tuple(x.shape[1:])
        if len(shape) > len(ins) or any(
            a not in (1, b) for a, b in zip(shape, ins[len(ins) - len(shape) :], strict=True)
        ):
            raise UnsupportedError(
                f"a parameter of shape {tuple(p.shape)} is not broadcast to {ins}"
            )
        view = (1,) * (len(ins) - len(shape)) + shape
        dims = tuple(i for i, (a, b) in enumerate(zip(view, ins, strict=True)) if a == 1 and b != 1)
        return x + p.reshape(view), dims

    def jac_diag(self, m, cache):
        return torch.ones((), dtype=m.bias.dtype, device=m.bias.device)

    def vjp(self, m, cache, v):
        return v

    vjp_cols = vjp
    vjp_sq = vjp

    def _reduce(self, m, dims, t: Tensor, lead: int) -> Tensor:
        if dims:
            t = t.sum(tuple(lead + d for d in dims), keepdim=True)
        return t

    def param_grad(self, m, dims, g):
        return None, self._reduce(m, dims, g, 1).sum(0).reshape(m.bias.shape)

    def param_diag(self, m, dims, h):
        return None, self._reduce(m, dims, h, 1).sum(0).reshape(m.bias.shape)

    def param_diag_cols(self, m, dims, v, s):
        t = self._reduce(m, dims, v, 2).square()
        return None, _weighted_sum(t, s).reshape(m.bias.shape)


# ------------------------------------------------------------------ selections
class SelectRule(LinearMap):
    """``x[idx]`` for basic indexing that keeps the batch dimension (``h[:, -1]``).

    ``J^T v`` puts ``v`` back at the selected entries (zeros elsewhere); ``J o J = J``.
    ``m`` is the index tuple; the cache the input shape.
    """

    @staticmethod
    def valid(idx) -> bool:
        if not isinstance(idx, tuple) or not idx or idx[0] != slice(None):
            return False
        return all(isinstance(i, (int, slice)) for i in idx[1:]) and all(
            isinstance(a, int) or a is None
            for i in idx[1:]
            if isinstance(i, slice)
            for a in (i.start, i.stop, i.step)
        )

    def forward(self, m, x, generator):
        return x[m], x.shape[1:]

    @staticmethod
    def rows(m, shape) -> tuple[slice, bool] | None:
        """``x[:, i]`` or ``x[:, a:b]`` on ``x`` (N, P, ...): the positions read along dim 1.

        Returns the contiguous ``slice`` of positions and whether dim 1 was dropped
        (an integer index), or None for any other selection.
        """
        if len(m) != 2 or len(shape) < 2:
            return None
        idx, p = m[1], shape[0]
        if isinstance(idx, int):
            i = idx % p
            return slice(i, i + 1), True
        start, stop, step = idx.indices(p)
        return (slice(start, stop), False) if step == 1 and start < stop else None

    @staticmethod
    def vjp(m, shape, v):
        """``v`` put back at the entries ``m`` selects of a zero tensor (N, *shape)."""
        out = v.new_zeros(v.shape[0], *shape)
        out[m] = v
        return out

    def vjp_cols(self, m, shape, v):
        out = v.new_zeros(*v.shape[:2], *shape)
        out[(slice(None), *m)] = v
        return out

    vjp_sq = vjp

    def jvp(self, m, shape, r):
        return r[m]


# ------------------------------------------------------------------ attention core
class AttentionSpec(LocalSpec):
    """The attention core on packed ``(q, k, v)`` (N, L, 3 d) -> (N, L, d).

    Per head ``h``: ``softmax(Q_h K_h^T / sqrt(d_h) + M) V_h``, heads merged as
    ``nn.MultiheadAttention`` does; ``M`` is the attention mask read at every call from
    ``mask_owner.<mask_name>`` (a float mask added, a bool mask with ``True`` = not allowed;
    shape (L, L)), or none.
    """

    def __init__(self, heads: int, mask_owner, mask_name: str | None, name: str):
        super().__init__(self._apply, name)
        self.heads = heads
        self._mask = None if mask_name is None else (weakref.ref(mask_owner), mask_name)

    def mask(self) -> Tensor | None:
        """The current attention mask, or None."""
        if self._mask is None:
            return None
        ref, attr = self._mask
        mask = getattr(ref(), attr)
        if mask is not None and mask.dim() != 2:
            raise UnsupportedError(
                f"attention '{self.name}': only (L, L) attention masks are supported"
            )
        return mask

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """``Q K^T / sqrt(d_h) + M`` per head, (N, H, L, L)."""
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        mask = self.mask()
        if mask is not None:
            if mask.dtype == torch.bool:
                s = s.masked_fill(mask, float("-inf"))
            else:
                s = s + mask.to(s.dtype)
        return s

    def split(self, x: Tensor) -> list[Tensor]:
        """``q, k, v`` of packed ``x`` (N, L, 3 d), each (N, H, L, d_h)."""
        n, length, three = x.shape
        d = three // 3
        return [
            t.reshape(n, length, self.heads, d // self.heads).transpose(1, 2)
            for t in x.split(d, -1)
        ]

    @staticmethod
    def merge(parts: list[Tensor]) -> Tensor:
        """Per-head tensors (N, H, L, d_h) back to (N, L, len(parts) * d), in one copy."""
        n, heads, length, dh = parts[0].shape
        merged = torch.stack([t.transpose(1, 2) for t in parts], 2)
        return merged.view(n, length, len(parts) * heads * dh)

    def _apply(self, x: Tensor) -> Tensor:
        q, k, v = self.split(x)
        return self.merge([torch.softmax(self.scores(q, k), -1) @ v])


def _tmm(x: Tensor, y: Tensor) -> Tensor:
    """``x^T y`` over the last two dims; for one row (``x``: (..., 1, L)) a broadcast product.

    (A batched matrix product with an inner dimension of 1 costs several times the
    element-wise product on the CPU.)
    """
    if x.shape[-2] == 1:
        return x.transpose(-1, -2) * y
    return x.transpose(-1, -2) @ y


class _AttnCache(NamedTuple):
    """:class:`AttentionRule`'s cache (``shape`` at index 2, as the generic rule's)."""

    x: Tensor
    a: Tensor
    """The attention weights, (N, H, L, L)."""
    shape: torch.Size
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    """Per head, (N, H, L, d_h)."""
    lazy: dict[str, object]
    """The generic rule's cache (for the column and full-matrix passes), built at first use."""


class AttentionRule(LocalRule):
    r"""The attention core in closed form for the diagonal pass; the generic rule for the rest.

    Per head, with ``c = 1 / sqrt(d_h)``, ``A = softmax(c Q K^T + M)``, ``O = A V``,
    the output gradient ``g`` and diagonal curvature ``h`` (all ``L x d_h``),
    ``u = g V^T``, ``w = u - rowsum(A o u)``, ``A_w = A o w`` (the score gradient):

    - ``J^T g``: ``g_V = A^T g``, ``g_Q = c A_w K``, ``g_K = c A_w^T Q``;
    - ``(J o J)^T h``: ``h_V = (A o A)^T h``,
      ``h_Q[i,c] = c^2 sum_a h[i,a] M_i[a,c]^2`` with
      ``M_i = V^T diag(A_i) K - O_i (A K)_i^T``, and
      ``h_K = c^2 ((A o A o E)^T (Q o Q))``, ``E[i,j] = sum_a h[i,a] (V[j,a] - O[i,a])^2``;
    - ``diag nabla^2 (g . attn)``: zero for ``V`` (the output is linear in it),
      ``c^2 (A_w (K o K) - 2 (A_w K) o (A K))`` for ``Q`` and
      ``c^2 (A_w o (1 - 2 A))^T (Q o Q)`` for ``K``.

    Masked entries have ``A = 0`` and drop out. Each is a few batched products of
    ``L x L`` and ``L x d_h`` matrices per head (``E`` as
    ``h (V o V)^T - 2 (h o O) V^T + rowsum(h o O o O)``), computed together in
    :meth:`diag_backward_local`, which shares ``A_w``, ``A K`` and ``Q o Q`` between
    the three products and merges the heads once per result; the generic rule builds the
    ``3 L d x 3 L d`` residual with ``jacrev(jacrev)`` (tested equal in float64).
    The column and full-matrix passes (``vjp_cols``, ``residual``,
    ``residual_cols``) build the generic rule's Jacobian on first use.
    """

    def forward(self, m: AttentionSpec, x, generator):
        n, length, three = x.shape
        heads = m.heads
        dh = three // (3 * heads)
        # q, k, v per head, each contiguous (N, H, L, d_h): one copy here instead of one
        # in every batched product that reads a strided view
        q, k, v = x.reshape(n, length, 3, heads, dh).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        a = torch.softmax(m.scores(q, k), -1)
        o = a @ v
        return m.merge([o]), _AttnCache(x, a, x.shape[1:], q, k, v, o, {})

    def _generic(self, m, cache: _AttnCache):
        if "generic" not in cache.lazy:
            cache.lazy["generic"] = LocalRule.forward(self, m, cache.x, None)[1]
        return cache.lazy["generic"]

    @staticmethod
    def _heads(cache: _AttnCache, t: Tensor) -> Tensor:
        """``t`` (N, L, d) per head, contiguous (N, H, L, d_h) (``L``: all rows or some)."""
        n, heads, _, dh = cache.q.shape
        return t.reshape(n, -1, heads, dh).transpose(1, 2).contiguous()

    @staticmethod
    def _score_grad(a: Tensor, v: Tensor, gh: Tensor) -> Tensor:
        """``A_w = A o (u - rowsum(A o u))``, ``u = g V^T`` (``A``, ``g``: the query rows used)."""
        u = gh @ v.transpose(-1, -2)
        return a * (u - (a * u).sum(-1, keepdim=True))

    @staticmethod
    def _vjp_heads(
        a: Tensor, q: Tensor, k: Tensor, gh: Tensor, aw: Tensor, awk: Tensor | None = None
    ) -> list[Tensor]:
        """``[g_Q, g_K, g_V]`` per head; ``awk`` is ``A_w K`` where already computed.

        ``a``, ``q``, ``gh``, ``aw``: the query rows used; ``g_Q`` has those rows only.
        """
        c = 1.0 / math.sqrt(q.shape[-1])
        gq = (aw @ k if awk is None else awk).mul(c)
        gk = _tmm(aw, q).mul_(c)
        return [gq, gk, _tmm(a, gh)]

    def vjp(self, m, cache, v):
        gh = self._heads(cache, v)
        aw = self._score_grad(cache.a, cache.v, gh)
        return AttentionSpec.merge(self._vjp_heads(cache.a, cache.q, cache.k, gh, aw))

    @staticmethod
    def _scatter_rows(t: Tensor, rows: slice | None, length: int) -> Tensor:
        """Per-head ``t`` (N, H, R, d_h) of query rows ``rows`` as (N, H, L, d_h), zeros elsewhere."""
        if rows is None:
            return t
        return SelectRule.vjp((slice(None), slice(None), rows), (t.shape[1], length, t.shape[3]), t)

    def diag_backward_local(self, m, cache, g, h, *, residual, backprop, rows=None):
        """The diagonal pass (see the class docstring).

        ``rows``: ``g`` and ``h`` are (N, R, d), the query rows ``rows`` of an
        output that is zero elsewhere (below ``h[:, -1]``): the products run on
        those rows, and ``h_Q``, ``g_Q`` are zero outside them.
        """
        a, q, k, v, o = cache.a, cache.q, cache.k, cache.v, cache.o
        n, heads, length, dh = v.shape
        if rows is not None:  # the query side: the rows used
            a, q, o = a[:, :, rows], q[:, :, rows], o[:, :, rows]
        r = a.shape[2]
        c2 = 1.0 / dh
        hh = self._heads(cache, h)
        # M_i^T = K^T diag(A_i) V - (A K)_i O_i^T for every row i at once, (N, H, R, d_h, d_h)
        ak = a @ k
        if rows is not None and r < dh:  # (diag(A_i) K)^T V, a (d_h, L) @ (L, d_h) product per row
            mt = (a.unsqueeze(-1) * k.unsqueeze(2)).transpose(-1, -2) @ v.unsqueeze(2)
        else:  # A (K_j V_j^T flattened), one (R, L) @ (L, d_h^2) product per sample and head
            kv = (k.unsqueeze(-1) * v.unsqueeze(-2)).view(n, heads, length, dh * dh)
            mt = (a @ kv).view(n, heads, r, dh, dh)
        mt -= ak.unsqueeze(-1) * o.unsqueeze(-2)
        hq = (mt.square_() @ hh.unsqueeze(-1)).squeeze(-1)  # a batched product: no broadcast
        # E[i, j] = sum_a h[i, a] (V[j, a] - O[i, a])^2
        #         = (h (V o V)^T)_ij - 2 ((h o O) V^T)_ij + rowsum(h o O o O)_i: two batched
        # products instead of an (N, H, R, L, d_h) tensor; the expansion cancels where
        # V_j is close to O_i, i.e. where E is small next to the other entries of its row
        ho = hh * o
        rflat, kflat = (n * heads, r, dh), (n * heads, length, dh)
        e = torch.baddbmm(
            (ho * o).sum(-1, keepdim=True).view(n * heads, r, 1),
            hh.view(rflat),
            (v * v).view(kflat).transpose(1, 2),
        )
        e = e.baddbmm_(ho.reshape(rflat), v.view(kflat).transpose(1, 2), alpha=-2.0)
        e = e.view(n, heads, r, length)
        a2 = a * a
        wk = a2 * e  # h_K = c^2 wk^T (Q o Q)
        hv = _tmm(a2, hh)
        g_parts = None
        if residual or backprop:
            gh = self._heads(cache, g)
            aw = self._score_grad(a, v, gh)
            awk = None
            if residual:  # the residual's Q and K terms join h_Q and wk
                awk = aw @ k
                hq.add_(aw @ (k * k)).addcmul_(awk, ak, value=-2.0)
                wk.add_(aw).addcmul_(aw, a, value=-2.0)  # + A_w o (1 - 2 A)
            if backprop:
                g_parts = self._vjp_heads(a, q, k, gh, aw, awk)
                g_parts[0] = self._scatter_rows(g_parts[0], rows, length)
        hk = _tmm(wk, q * q)
        hq = self._scatter_rows(hq.mul_(c2), rows, length)
        h_in = AttentionSpec.merge([hq, hk.mul_(c2), hv])
        return (None if g_parts is None else AttentionSpec.merge(g_parts)), h_in

    def vjp_sq(self, m, cache, h):
        return self.diag_backward_local(m, cache, None, h, residual=False, backprop=False)[1]

    def residual_diag(self, m, cache, g):
        zero = torch.zeros_like(g)
        return self.diag_backward_local(m, cache, g, zero, residual=True, backprop=False)[1]

    def vjp_cols(self, m, cache, v):
        return LocalRule.vjp_cols(self, m, self._generic(m, cache), v)

    def residual(self, m, cache, g):
        return LocalRule.residual(self, m, self._generic(m, cache), g)

    def residual_cols(self, m, cache, g):
        """Signed columns of the residual, head by head.

        Heads do not interact: the residual is zero between the ``(q, k, v)``
        entries of two heads, so it is block diagonal, one ``3 L d_h`` block per
        head (after a permutation), and its eigendecomposition is that of the
        blocks (``H`` times ``3 L d_h``, where the whole ``3 L d`` costs ``H^3``
        times as much). A head's columns are zero outside its own entries.
        """
        n, length, three = cache.x.shape
        heads = m.heads
        dh = three // (3 * heads)
        res = self.residual(m, cache, g).view(n, length, 3, heads, dh, length, 3, heads, dh)
        size = length * 3 * dh
        # (N, H, L, 3, d_h, L, 3, d_h): the head blocks
        blocks = res.diagonal(dim1=3, dim2=7).permute(0, 7, 1, 2, 3, 4, 5, 6)
        cols, signs = signed_factor(blocks.reshape(n, heads, size, size))
        k = cols.shape[1]  # (N, K, H, L 3 d_h) -> (N, K, L, 3 H d_h)
        cols = cols.view(n, k, heads, length, 3, dh).permute(0, 1, 3, 4, 2, 5)
        return cols.reshape(n, k, *cache.x.shape[1:]), signs
