"""Matrix-free estimators on a flat Hessian operator (``xdiag``, ``diagpp``).

The Hessian-vector products are the ones :class:`~hessbench.estimators.hutchinson.Hutchinson`
uses: :func:`~hessbench.estimators._hvp_pass.structured_hvp` (R-operator pass over an
``nn.Sequential``) or :func:`~hessbench.estimators._autograd.autograd_hvp` (double
backprop, any module). :class:`FlatOperator` presents either as ``H @ V`` on
``(P, k)`` matrices over the flattened trainable parameters, one product per column
(on the R-operator path a chunk of columns in one vectorised pass),
so the estimators' algorithms are plain functions of ``matmat`` that the tests run
on explicit matrices.

Probe columns are drawn by :func:`rademacher_matrix`, the same bits
:func:`~hessbench.estimators._autograd.rademacher` draws for ``hutchinson``: column
``j`` is ``hutchinson``'s ``j``-th probe, flattened, for equal generators.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from hessbench.estimators._autograd import autograd_hvp, rademacher
from hessbench.estimators._base import trainable_parameters
from hessbench.estimators._hvp_pass import structured_hvp
from hessbench.estimators._layerwise import DualPathEstimator
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._sequential import Plan

__all__ = ["FlatOperator", "MatrixFreeEstimator", "rademacher_matrix", "range_basis"]

MatMat = Callable[[Tensor], Tensor]


class FlatOperator:
    """``H @ V`` for ``V`` of shape ``(P, k)`` over the flattened trainable parameters.

    ``product`` takes and returns one tensor per parameter (in order); each
    column of ``V`` costs one product. :attr:`count` counts the products.
    ``stacked`` (optional) does the same for directions stacked along a leading
    axis, ``chunk(k)`` columns at a time (the R-operator pass vectorised over
    directions, :class:`~hessbench.estimators._hvp_pass.StructuredHVP`).
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        product: Callable[[list[Tensor]], list[Tensor]],
        stacked: Callable[[list[Tensor]], list[Tensor]] | None = None,
        chunk: Callable[[int], int] = lambda k: 1,
    ):
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        ref = next(iter(params.values()))
        self.dim = sum(self.sizes)
        self.dtype, self.device = ref.dtype, ref.device
        self._product = product
        self._stacked = stacked
        self._chunk = chunk if stacked is not None else (lambda k: 1)
        self.count = 0

    def matmat(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        """``H v`` column by column (or a chunk of columns at a time); ``v`` is ``(P, k)``.

        The result is the transpose of a contiguous ``(k, P)`` tensor: each
        column is one contiguous product, the layout the estimators' algebra
        works in (see :func:`rademacher_matrix`). ``out``: a contiguous ``(k, P)``
        tensor to write the products into (a dead buffer of the caller's: at
        hundreds of thousands of parameters a fresh one costs a page fault per
        4 KiB, as much time as the arithmetic on it). It may be ``v.T`` itself:
        each chunk of columns is read before its products are written.
        """
        rows = v.T
        k = v.shape[1]
        out = v.new_empty(k, self.dim) if out is None else out
        step = self._chunk(k)
        for j in range(0, k, step):
            block = rows[j : j + step]
            c = block.shape[0]
            if c == 1:
                parts = [
                    t.view(s) for t, s in zip(block[0].split(self.sizes), self.shapes, strict=True)
                ]
                hv = self._product(parts)
                torch.cat([h.reshape(-1) for h in hv], out=out[j])
                del hv  # not held while the next column's product is computed
            else:
                parts = [
                    t.reshape(c, *s)
                    for t, s in zip(block.split(self.sizes, dim=1), self.shapes, strict=True)
                ]
                hv = self._stacked(parts)  # type: ignore[misc]
                torch.cat([h.reshape(c, -1) for h in hv], dim=1, out=out[j : j + c])
                del hv
            self.count += c
        return out.T

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat ``(P,)`` vector as one tensor per parameter, keyed by name."""
        parts = flat.split(self.sizes)
        return {
            n: c.view(s).clone() for n, c, s in zip(self.names, parts, self.shapes, strict=True)
        }


def rademacher_matrix(
    dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``(dim, k)`` Rademacher columns, drawn one after another from ``generator``.

    Each column is one call of :func:`~hessbench.estimators._autograd.rademacher`
    (bits of 32-bit words), so it equals ``hutchinson``'s probe of the same index.

    Layout: the transpose of a contiguous ``(k, dim)`` tensor (each column
    contiguous). The matrix-free estimators compute with such tall matrices
    through their transposes (``A.T``, rows of ``dim`` entries), where products
    with small ``k x k`` matrices are one short-and-wide matmul: for ``dim`` in
    the hundreds of thousands and ``k`` of a few, ``(dim, k) @ (k, k)`` in
    row-major layout takes several times as long as the products themselves.
    """
    like = [torch.empty(dim, dtype=dtype, device=device)]
    if k == 0:
        return torch.empty(0, dim, dtype=dtype, device=device).T
    return torch.stack([rademacher(like, generator)[0] for _ in range(k)]).T


def range_basis(y: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(Q, R, full)``: an orthonormal basis of ``range(y)`` and whether ``y`` has full column rank.

    ``y = Q R`` (reduced QR) when ``full``. Otherwise ``Q`` spans the numerical
    range of ``y`` (singular values above ``max(n, k) * eps * sigma_max``, the
    rank tolerance of LAPACK/NumPy/``torch.linalg.matrix_rank``) and ``R`` is
    ``Q^T y``.
    """
    n, k = y.shape
    q, r = torch.linalg.qr(y)
    if k == 0:
        return q, r, True
    u, sig, _ = torch.linalg.svd(r)
    tol = float(sig.max()) * max(n, k) * torch.finfo(y.dtype).eps
    rank = int((sig > tol).sum())
    if rank == k:
        return q, r, True
    basis = (u[:, :rank].T @ q.T).T  # Q U_r, each column contiguous
    return basis, basis.T @ y, False


class MatrixFreeEstimator(DualPathEstimator):
    """An estimator computed from Hessian-vector products on a :class:`FlatOperator`.

    Subclasses declare ``method: Literal["auto", "structured", "autograd"]`` and
    implement :meth:`_diagonal`. The gradient and the loss come out of the pass
    the products start from (``passes_grad``).
    """

    @property
    def sample_param(self) -> str | None:
        """A sweep varies the budget ``num_matvecs``."""
        return "num_matvecs"

    stochastic: ClassVar[bool] = True
    passes_grad: ClassVar[bool] = True
    impl_fields: ClassVar[tuple[str, ...]] = ("method",)

    @abc.abstractmethod
    def _diagonal(self, op: FlatOperator, generator: torch.Generator) -> Tensor:
        """The flat ``(P,)`` estimate of ``diag H`` from products with ``op``."""

    def _run(self, algorithm: Callable[..., Tensor], op: FlatOperator, generator) -> Tensor:
        """``algorithm(matmat, P, num_matvecs, generator)`` on ``op``, its buffers reused.

        ``algorithm`` is :func:`~hessbench.estimators.xdiag.xdiag` or
        :func:`~hessbench.estimators.diagpp.diagpp` (their ``reuse``).
        """
        return algorithm(
            op.matmat,
            op.dim,
            self.num_matvecs,  # type: ignore[attr-defined]
            generator,
            dtype=op.dtype,
            device=op.device,
            reuse=True,
        )

    def _structured(
        self,
        plan: Plan,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        params = trainable_parameters(model)
        names = list(params)
        product = structured_hvp(plan, model, loss, inputs, targets, generator, extras)

        def by_list(v: list[Tensor]) -> list[Tensor]:
            hv = product(dict(zip(names, v, strict=True)))
            return [hv[n] for n in names]

        def stacked(v: list[Tensor]) -> list[Tensor]:
            hv = product.stacked(dict(zip(names, v, strict=True)))
            return [hv[n] for n in names]

        op = FlatOperator(params, by_list, stacked, product.chunk)
        return op.split(self._diagonal(op, generator))

    def _generic(
        self,
        model: nn.Module,
        loss: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        extras: dict[str, object] | None = None,
    ) -> dict[str, Tensor]:
        assert generator is not None
        params, product = autograd_hvp(model, loss, inputs, targets, extras)
        op = FlatOperator(params, product)
        with torch.no_grad():
            return op.split(self._diagonal(op, generator))
