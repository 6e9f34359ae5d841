"""XDiag: the exchangeable diagonal estimator of Epperly, Tropp & Webber (2024)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

import pydantic
import torch
from torch import Tensor

from hessbench.estimators._base import Count, estimator_dataclass, register
from hessbench.estimators._matfree import (
    FlatOperator,
    MatrixFreeEstimator,
    rademacher_matrix,
    range_basis,
)

__all__ = ["XDiag", "xdiag", "xdiag_from_probes"]


def _even(value: int) -> int:
    if value % 2:
        raise ValueError("num_matvecs must be even (m/2 test vectors, m/2 products with Q)")
    return value


EvenCount = Annotated[Count, pydantic.AfterValidator(_even)]
"""A positive even integer."""


def xdiag_from_probes(
    matmat: Callable[..., Tensor], omega: Tensor, *, reuse: bool = False
) -> Tensor:
    r"""XDiag's estimate of ``diag A`` (``A`` symmetric) from the test vectors ``omega`` ``(n, s)``.

    With ``Y = A Omega = Q R`` and, for each ``i``, ``Q_i`` an orthonormal basis of
    ``range(Y)`` without column ``i``::

        d = (1/s) sum_i [ diag(Q_i Q_i^T A) + w_i o (I - Q_i Q_i^T) A w_i ]

    Each term is unbiased (``w_i`` is independent of ``Q_i``). With ``s_i`` the
    normalised ``i``-th column of ``R^{-T}``, ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T``,
    which gives the closed form of the paper's algorithm (``Z = A Q``, ``T = Z^T Omega``,
    ``S = [s_1 .. s_s]``)::

        d = rowsum(Q o Z) + (1/s) [ - rowsum(QS o ZS) + rowsum(Omega o Y)
                                    - rowsum(Omega o QT) + rowsum(Omega o QS diag(colsum(S o T))) ]

    ``T = Z^T Omega = Q^T A Omega = Q^T Y = R`` (``A`` symmetric, ``Q^T Q = I``), so
    ``Y - QT = Y - QR`` is the QR's rounding and ``R`` stands for ``T``. With
    ``N = S diag(colsum(S o R))`` and ``rowsum(Omega o Q N) = rowsum(Q o Omega N^T)``::

        d = rowsum(Q o [Z (I - S S^T / s) + Omega N^T / s])

    the same estimate to rounding, from one ``n x 2s`` by ``2s x s`` product
    (the paper's evaluation also forms ``Z^T Omega``: three products of ``2 n s^2`` flops).

    When ``Y`` is numerically rank deficient (rank ``r < s``, in particular
    ``s > n``), ``range(Y) = range(A)`` almost surely and every leave-one-out
    basis spans it as well: ``Q_i = Q`` (``r`` columns), and the estimate is
    ``diag(Q Q^T A) + (1/s) sum_i w_i o (I - QQ^T) A w_i``, exact up to rounding.

    Cost: ``s`` products for ``Y`` and ``s`` (``r`` when rank deficient) for ``Z``.
    The final products run on blocks of entries (one buffer of about
    :data:`BLOCK_ENTRIES` instead of an ``n x s`` one). With ``reuse``, ``matmat`` also takes ``out=``, a contiguous
    ``(k, n)`` tensor for the rows of ``A V`` (as :meth:`FlatOperator.matmat`), and ``Z``
    overwrites ``Y``: at ``n`` in the hundreds of thousands, a fresh ``n x s`` buffer
    costs a page fault per 4 KiB, as much time as the arithmetic on it.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> b = torch.randn(8, 2, dtype=torch.float64, generator=g)
        >>> a = b @ b.T  # rank 2 < s = 3 test vectors: exact
        >>> omega = rademacher_matrix(8, 3, g, torch.float64, torch.device("cpu"))
        >>> torch.allclose(xdiag_from_probes(lambda v: a @ v, omega), a.diagonal())
        True
    """
    s = omega.shape[1]
    y = matmat(omega)
    q, r, full = range_basis(y)
    # the algebra on transposes (s rows of n entries): see rademacher_matrix's layout note
    wt, yt, qt = omega.T, y.T, q.T
    if not full:
        if qt.shape[0] == 0:  # A Omega = 0: only the Hutchinson terms remain
            return torch.linalg.vecdot(wt, yt, dim=0) / s
        zt = matmat(q).T
        residual = torch.addmm(yt, r.T, qt, alpha=-1)  # (Y - Q T)^T, T = Q^T Y = R
        return torch.linalg.vecdot(qt, zt, dim=0) + torch.linalg.vecdot(wt, residual, dim=0) / s
    # Y is no longer needed: with ``reuse`` the products with Q overwrite it
    zt = (matmat(q, out=yt) if reuse and yt.is_contiguous() else matmat(q)).T
    eye = torch.eye(s, dtype=r.dtype, device=r.device)
    sv = torch.linalg.solve_triangular(r.T, eye, upper=False)  # R^{-T}
    sv = sv / torch.linalg.vector_norm(sv, dim=0)
    n_over_s = sv * ((sv * r).sum(0) / s)  # S diag(colsum(S o R)) / s
    mix = eye - sv @ sv.T / s
    # the rows of [Z (I - S S^T / s) + Omega N^T / s]^T, then rowsum(Q o .), a block of
    # entries at a time: one small buffer (BLOCK_ENTRIES, or s x BLOCK_MIN for large s)
    # instead of a fresh s x n one
    n = qt.shape[1]
    block = max(BLOCK_MIN, BLOCK_ENTRIES // s)
    d = qt.new_empty(n)
    buf = qt.new_empty(s * min(n, block))
    for a in range(0, n, block):
        b = min(a + block, n)
        inner = torch.mm(mix, zt[:, a:b], out=buf[: s * (b - a)].view(s, b - a))
        inner.addmm_(n_over_s, wt[:, a:b]).mul_(qt[:, a:b])
        torch.sum(inner, 0, out=d[a:b])
    return d


BLOCK_ENTRIES = 2**16
"""Entries of the ``s x block`` buffer of :func:`xdiag_from_probes`'s final products
(256 KiB in float32: small next to the method's ``n x s`` matrices, and heap memory
used again rather than pages faulted in on every call), with blocks of at least
:data:`BLOCK_MIN` entries (each block is four small kernels)."""
BLOCK_MIN = 2048


def xdiag(
    matmat: Callable[..., Tensor],
    dim: int,
    num_matvecs: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    reuse: bool = False,
) -> Tensor:
    """XDiag with ``num_matvecs // 2`` Rademacher test vectors drawn from ``generator``.

    See :func:`xdiag_from_probes` (and its ``reuse``). ``matmat(V)`` returns ``A V``
    for ``V`` ``(dim, k)``.

    Example:
        >>> import torch
        >>> a = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> xdiag(lambda v: a @ v, 5, 4, g)  # rank 5 > 2 test vectors: an estimate
        tensor([...], dtype=torch.float64)
    """
    omega = rademacher_matrix(dim, num_matvecs // 2, generator, dtype, torch.device(device))
    return xdiag_from_probes(matmat, omega, reuse=reuse)


@register
@estimator_dataclass
class XDiag(MatrixFreeEstimator):
    r"""XDiag: low-rank range finder, leave-one-out projections and Hutchinson, exchangeably.

    With ``s = num_matvecs / 2`` Rademacher test vectors ``Omega``,
    ``Y = H Omega = Q R``, ``Z = H Q``, ``Q_i`` a basis of the range of ``Y`` without
    column ``i``::

        d = (1/s) sum_i [ diag(Q_i Q_i^T H) + w_i o (I - Q_i Q_i^T) H w_i ]

    evaluated in closed form from ``Q, R, Z`` (see :func:`xdiag_from_probes`).
    Unbiased: ``w_i`` is independent of ``Q_i``. Exact (to rounding) when the
    rank of ``H`` is below ``s``, in particular when ``s > P``. Every test
    vector serves both the low-rank part and the Hutchinson part (the
    "exchangeability principle"); compared with Diag++ no third of the budget is
    spent on the range finder alone.

    Args:
        num_matvecs: budget ``m`` of Hessian-vector products, even, ``>= 2``.
        method: ``auto``, ``structured`` (R-operator pass) or ``autograd``,
            the Hessian-vector products :class:`Hutchinson` uses.

    Cost: ``m`` Hessian-vector products (fewer when ``H Omega`` is rank deficient),
    plus a QR of the ``P x m/2`` sketch (``O(P m^2)``) and ``4 P m/2`` memory.
    The gradient the products start from is handed back by :meth:`estimate_with_grad`.
    Reference: Epperly, Tropp & Webber, "XTrace: making the most of every sample
    in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024 (XDiag).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(2, 3), torch.tensor([0, 1])
        >>> est = XDiag(num_matvecs=10)
        >>> est.label
        'xdiag[num_matvecs=10]'
        >>> est(model, nn.CrossEntropyLoss(), x, y)["0.weight"].shape
        torch.Size([4, 3])
    """

    name: ClassVar[str] = "xdiag"
    cost: ClassVar[str] = "m HVPs"
    num_matvecs: EvenCount = 2
    method: Literal["auto", "structured", "autograd"] = "auto"

    def _diagonal(self, op: FlatOperator, generator: torch.Generator) -> Tensor:
        return self._run(xdiag, op, generator)
