"""Diag++: Baston & Nakatsukasa's deflated stochastic diagonal estimator."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor

from hessbench.estimators._base import Count, estimator_dataclass, register
from hessbench.estimators._matfree import (
    FlatOperator,
    MatrixFreeEstimator,
    rademacher_matrix,
    range_basis,
)

__all__ = ["DiagPP", "diagpp", "diagpp_split"]


def diagpp_split(num_matvecs: int) -> tuple[int, int]:
    """``(k, h)``: sketch size ``k = m // 3`` (``2k`` products) and ``h = m - 2k`` probes."""
    k = num_matvecs // 3
    return k, num_matvecs - 2 * k


def diagpp(
    matmat: Callable[..., Tensor],
    dim: int,
    num_matvecs: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    reuse: bool = False,
) -> Tensor:
    r"""Diag++ estimate of ``diag A`` (``A`` symmetric) from ``num_matvecs`` products.

    With ``(k, h) = diagpp_split(m)``: ``Q`` an orthonormal basis of ``A Omega``
    (``k`` Rademacher columns), ``P = Q Q^T``, ``Z = A Q``, and ``h`` Rademacher
    probes ``g_j``::

        diag A = diag(PA + AP - PAP) + diag((I - P) A (I - P))
        d      = 2 rowsum(Q o Z) - rowsum(Q (Q^T Z) o Q)
                 + (1/h) sum_j g_j o (I - P) A (I - P) g_j

    The first part is exact given ``Q`` (for symmetric ``A``,
    ``diag(PA) = diag(AP) = rowsum(Q o Z)``), the second is Hutchinson on the
    deflated remainder, so ``d`` is unbiased for any ``Q``; it is exact when
    ``range(A) = range(A Omega)``, i.e. when ``rank A <= k``. ``m < 3`` leaves
    no sketch (plain Hutchinson with ``m`` probes). The sketch's columns are
    drawn first, then the probes. ``matmat`` returns a new tensor on each call
    (the products are overwritten in place). With ``reuse`` it also takes ``out=``, a
    contiguous ``(k, dim)`` tensor for the rows of ``A V`` (as
    :meth:`~hessbench.estimators._matfree.FlatOperator.matmat`), and the products
    overwrite the buffer of ``Q^T`` and the probes they are computed from: at
    ``dim`` in the hundreds of thousands a fresh buffer costs a page fault per
    4 KiB, as much time as the arithmetic on it.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> b = torch.randn(9, 3, dtype=torch.float64, generator=g)
        >>> a = b @ b.T  # rank 3 <= k = 10 // 3: exact
        >>> torch.allclose(diagpp(lambda v: a @ v, 9, 10, g), a.diagonal())
        True
    """
    device = torch.device(device)
    k, h = diagpp_split(num_matvecs)
    # the algebra on transposes (rows of dim entries): see rademacher_matrix's layout note
    q = torch.empty(dim, 0, dtype=dtype, device=device)
    if k:
        q, _, _ = range_basis(matmat(rademacher_matrix(dim, k, generator, dtype, device)))
    r = q.shape[1]
    if r + h == 0:
        return torch.zeros(dim, dtype=dtype, device=device)
    # Z = A Q and the deflated probes' products in one call (neither needs the other):
    # Q^T and the deflated probes are the rows of one buffer, which the call reads as is
    # and, with ``reuse``, overwrites with the products (Q^T itself stays in QR's output)
    rows = torch.empty(r + h, dim, dtype=dtype, device=device)
    rows[:r].copy_(q.T)
    qt = q.T if reuse and q.T.is_contiguous() else rows[:r]
    del q
    if h:
        gt = rademacher_matrix(dim, h, generator, dtype, device).T
        torch.addmm(gt, (qt @ gt.T).T, qt, alpha=-1, out=rows[r:])  # (g - Q Q^T g)^T
    products = (matmat(rows.T, out=rows) if reuse else matmat(rows.T)).T
    zt, hgt = products[:r], products[r:]
    if r:
        # 2 rowsum(Q o Z) - rowsum(Q Q^T Z o Q) = rowsum(Q o (2 Z - Q Q^T Z)), in place
        d = zt.addmm_((qt @ zt.T).T, qt, beta=2, alpha=-1).mul_(qt).sum(0)
    else:
        d = torch.zeros(dim, dtype=dtype, device=device)
    if h:
        # (I - Q Q^T) H (g - Q Q^T g), then g o . summed over the probes, in place
        hgt.addmm_((qt @ hgt.T).T, qt, alpha=-1)
        d.add_(hgt.mul_(gt).sum(0).div_(h))
    return d


@register
@estimator_dataclass
class DiagPP(MatrixFreeEstimator):
    r"""Diag++: exact diagonal of a randomized low-rank part plus Hutchinson on the rest.

    A third of the budget finds a range ``Q`` (``H Omega``, ``k = m // 3``
    Rademacher columns), a third computes ``Z = H Q``, and the rest
    (``h = m - 2k``) runs Hutchinson on the two-sided deflation
    ``(I - QQ^T) H (I - QQ^T)``::

        d = diag(PH + HP - PHP) + (1/h) sum_j g_j o (I - P) H (I - P) g_j,   P = QQ^T

    the first term exact from ``Q`` and ``Z``. Unbiased; exact when
    ``rank H <= k``. Its Hutchinson variance is that of the deflated matrix,
    ``sum_{j != i} B_ij^2 / h`` with ``B = (I - P) H (I - P)``.

    Deflation: hessbench deflates on both sides, as Hutch++ does for the trace
    (Meyer et al. 2021), and adds the cross terms ``diag(PH(I-P) + (I-P)HP)``
    exactly, which costs no extra product; the one-sided split
    ``diag(PH) + Hutchinson((I - P) H)`` is unbiased too and has the same cost.
    See ``docs/estimators.md``.

    Args:
        num_matvecs: budget ``m`` of Hessian-vector products (``m < 3``: plain Hutchinson).
        method: ``auto``, ``structured`` (R-operator pass) or ``autograd``,
            the Hessian-vector products :class:`Hutchinson` uses.

    Cost: ``m`` Hessian-vector products (fewer when ``H Omega`` is rank
    deficient), a QR of the ``P x m/3`` sketch, ``O(P m)`` memory.
    Reference: Baston & Nakatsukasa, "Stochastic diagonal estimation: probabilistic
    bounds and an improved algorithm" (arXiv:2201.10684, 2022); Meyer, Musco,
    Musco & Woodruff, "Hutch++" (SOSA 2021).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(2, 3), torch.tensor([0, 1])
        >>> est = DiagPP(num_matvecs=12)
        >>> est.label
        'diagpp[num_matvecs=12]'
        >>> est(model, nn.CrossEntropyLoss(), x, y)["2.bias"].shape
        torch.Size([2])
    """

    name: ClassVar[str] = "diagpp"
    cost: ClassVar[str] = "m HVPs"
    num_matvecs: Count = 3
    method: Literal["auto", "structured", "autograd"] = "auto"

    def _diagonal(self, op: FlatOperator, generator: torch.Generator) -> Tensor:
        return self._run(diagpp, op, generator)
