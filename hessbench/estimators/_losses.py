"""The losses hessbench understands, in closed form.

For a batch of outputs ``z`` (``N`` samples) the loss is ``L = c * sum_n l(z_n, y_n)``
with ``c = 1/N`` for cross-entropy with ``reduction="mean"``, ``c = 1/numel(z)``
for MSE with ``reduction="mean"`` (torch averages over every element), and
``c = 1`` for ``reduction="sum"``. Everything here works on the network output
directly, without autograd:

- cross-entropy: ``p = softmax(z)``, ``dL/dz = c (p - e_y)``,
  ``d2L/dz2 = c (diag p - p p^T)`` with symmetric factor ``sqrt(c) (diag sqrt(p) - p sqrt(p)^T)``;
- MSE: ``dL/dz = 2c (z - y)``, ``d2L/dz2 = 2c I`` with factor ``sqrt(2c) I``.

Per-sample weights (:class:`hessbench.estimators.losses.WeightedCrossEntropyLoss`) make the loss
``L = c * sum_n w_n l(z_n, y_n)``: every closed form below is scaled by ``w_n`` per
sample, and the square-root and Monte-Carlo factors by ``sqrt(w_n)``, which needs
``w_n >= 0``.

Monte-Carlo factors sample labels from the model's predictive distribution:
categorical ``p`` for cross-entropy, and for MSE the Gaussian whose negative
log-likelihood is the squared error, ``y ~ N(z, I/2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessbench.errors import InputError, UnsupportedError
from hessbench.estimators.losses import WeightedCrossEntropyLoss

__all__ = ["LossSpec", "LossState"]


@dataclass(frozen=True, slots=True)
class LossState:
    """The loss at a batch of outputs, in closed form (no autograd involved).

    Attributes:
        grad: ``dL/dz``, shaped like the output.
        scale: the reduction factor ``c``.
        probs: softmax probabilities for cross-entropy, ``None`` for MSE.
        out: the outputs, and ``targets`` the targets (for :meth:`value`).
        weights: per-sample weights as an ``(N, 1)`` column, ``None`` if unweighted.
    """

    grad: Tensor
    scale: float
    probs: Tensor | None
    out: Tensor
    targets: Tensor
    weights: Tensor | None = None

    def value(self) -> Tensor:
        """The loss ``L`` (computed on demand: the estimators never need it)."""
        if self.probs is not None:
            logp = torch.log_softmax(self.out, dim=1)
            nll = -logp.gather(1, self.targets.long().unsqueeze(1))
            return _weigh(nll, self.weights).sum() * self.scale
        return (self.out - self.targets).square().sum() * self.scale


@dataclass(frozen=True, slots=True)
class LossSpec:
    """A supported loss: its kind, reduction and per-sample weights (or ``None``).

    Build it with :meth:`of`, which refuses anything it cannot handle exactly.
    """

    kind: Literal["ce", "mse"]
    reduction: Literal["mean", "sum"]
    weighted: bool = False  # a WeightedCrossEntropyLoss: its current weights below
    weights: Tensor | None = None

    @classmethod
    def of(cls, loss_fn: nn.Module) -> LossSpec:
        """Recognise ``loss_fn`` or raise :class:`UnsupportedError` naming why."""
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None:
                raise UnsupportedError("CrossEntropyLoss with class weights is not supported")
            if loss_fn.label_smoothing != 0.0:
                raise UnsupportedError("CrossEntropyLoss with label_smoothing is not supported")
            kind: Literal["ce", "mse"] = "ce"
        elif isinstance(loss_fn, nn.MSELoss):
            kind = "mse"
        else:
            what = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
            raise UnsupportedError(
                f"loss {what} is not supported; use nn.CrossEntropyLoss or nn.MSELoss modules"
            )
        if loss_fn.reduction not in ("mean", "sum"):
            raise UnsupportedError(
                f"{type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) is not supported; "
                "use 'mean' or 'sum'"
            )
        if isinstance(loss_fn, WeightedCrossEntropyLoss):
            return cls("ce", loss_fn.reduction, True, loss_fn.sample_weights)  # type: ignore[arg-type]
        return cls(kind, loss_fn.reduction)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ checks
    def check_targets(self, out: Tensor, targets: Tensor) -> None:
        """Raise :class:`InputError` when ``targets`` do not fit ``out``."""
        if self.kind == "ce":
            if out.dim() != 2:
                raise InputError(
                    f"cross-entropy needs model outputs of shape (N, C), got {tuple(out.shape)}"
                )
            if targets.dtype not in (torch.int64, torch.int32) or targets.shape != out.shape[:1]:
                raise InputError(
                    "cross-entropy targets must be integer class indices of shape "
                    f"({out.shape[0]},), got {targets.dtype} {tuple(targets.shape)}"
                )
            lo, hi = torch.aminmax(targets) if targets.numel() else (0, 0)
            if int(lo) < 0 or int(hi) >= out.shape[1]:
                raise InputError(f"cross-entropy targets must lie in [0, {out.shape[1]})")
            if self.weighted and (self.weights is None or self.weights.shape != out.shape[:1]):
                got = "none" if self.weights is None else tuple(self.weights.shape)
                raise InputError(
                    f"WeightedCrossEntropyLoss needs weights of shape ({out.shape[0]},) "
                    f"(call set_weights first), got {got}"
                )
        else:
            if targets.shape != out.shape:
                raise InputError(
                    f"MSE targets must have the output's shape {tuple(out.shape)}, "
                    f"got {tuple(targets.shape)}"
                )
            if not math.isfinite(float(targets.sum())) and not bool(torch.isfinite(targets).all()):
                raise InputError("MSE targets contain NaN or infinity")

    def _column(self, like: Tensor) -> Tensor | None:
        """The weights as an ``(N, 1)`` column next to ``like``, ``None`` if unweighted."""
        if self.weights is None:
            return None
        return self.weights.to(device=like.device, dtype=like.dtype).unsqueeze(1)

    def _sqrt_column(self, like: Tensor, what: str) -> Tensor | None:
        """``sqrt(w_n)`` as a column; :class:`UnsupportedError` for a negative weight."""
        w = self._column(like)
        if w is not None and bool((w < 0).any()):
            raise UnsupportedError(
                f"{what} needs non-negative per-sample weights (the loss Hessian is indefinite)"
            )
        return None if w is None else w.sqrt()

    def scale(self, out: Tensor) -> float:
        """The reduction factor ``c`` for a batch of outputs (or of targets: same ``c``)."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (out.shape[0] if self.kind == "ce" else out.numel())

    # ------------------------------------------------------------------ value
    def evaluate(self, out: Tensor, targets: Tensor) -> LossState:
        """Output gradient (and probabilities) in closed form."""
        c = self.scale(out)
        if self.kind == "ce":
            p = torch.softmax(out, dim=1)
            w = self._column(out)
            grad = p.scatter_add(
                1, targets.long().unsqueeze(1), p.new_full((out.shape[0], 1), -1.0)
            )
            grad = _weigh(grad if c == 1.0 else grad.mul_(c), w)
            return LossState(grad, c, p, out, targets, w)
        return LossState((out - targets).mul_(2.0 * c), c, None, out, targets)

    def grad_at(self, state: LossState, targets: Tensor) -> Tensor:
        """``dL/dz`` at other targets, reusing the state's probabilities."""
        if state.probs is None:
            return (state.out - targets).mul_(2.0 * state.scale)
        p = state.probs
        grad = p.scatter_add(1, targets.long().unsqueeze(1), p.new_full((p.shape[0], 1), -1.0))
        return _weigh(grad if state.scale == 1.0 else grad.mul_(state.scale), state.weights)

    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """The loss through differentiable torch operations (for autograd paths)."""
        if self.kind == "ce" and self.weighted:
            total = self.per_sample_loss(out, targets).sum()
            return total / out.shape[0] if self.reduction == "mean" else total
        if self.kind == "ce":
            return F.cross_entropy(out, targets.long(), reduction=self.reduction)
        return F.mse_loss(out, targets, reduction=self.reduction)

    def per_sample_loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """Unreduced loss summed over output dimensions, one entry per sample (times ``w_n``)."""
        if self.kind == "ce":
            per = F.cross_entropy(out, targets.long(), reduction="none")
            w = self._column(per)
            return per if w is None else per * w[:, 0]
        return (out - targets).square().flatten(1).sum(1)

    # -------------------------------------------------------------- curvature
    def hess_diag(self, out: Tensor, state: LossState) -> Tensor:
        """Exact diagonal of ``d2L/dz2`` per sample, shaped like the output."""
        if self.kind == "ce":
            p = state.probs
            assert p is not None
            return _weigh((p - p * p).mul_(state.scale), state.weights)
        return torch.full_like(out, 2.0 * state.scale)

    def hess_vec(self, state: LossState, r: Tensor) -> Tensor:
        """``(d2L/dz2) r`` per sample: ``c (p o r - p (p . r))`` for CE, ``2c r`` for MSE."""
        if self.kind == "ce":
            p = state.probs
            assert p is not None
            pr = p * r
            return _weigh((pr - p * pr.sum(1, keepdim=True)).mul_(state.scale), state.weights)
        return r * (2.0 * state.scale)

    def target_hess_diag(self, out: Tensor, targets: Tensor, state: LossState) -> Tensor:
        """BL89's output curvature: the softmax treated element-wise.

        Cross-entropy: ``c (p_y - p_y^2)`` on the target logit, zero elsewhere.
        MSE: the exact ``2c`` (the output layer is already element-wise).
        """
        if self.kind == "mse":
            return self.hess_diag(out, state)
        p = state.probs
        assert p is not None
        idx = targets.long().unsqueeze(1)
        py = p.gather(1, idx)
        return _weigh(
            torch.zeros_like(p).scatter_(1, idx, (py - py * py) * state.scale), state.weights
        )

    def sqrt_factor(self, out: Tensor, state: LossState, *, signed: bool = False) -> Tensor:
        """Columns ``S`` with ``S S^T = d2L/dz2`` per sample: shape ``(N, K, *out)``.

        Weighted: the columns carry ``sqrt(w_n)``, which needs ``w_n >= 0``; with
        ``signed=True`` they carry ``sqrt(|w_n|)`` and ``S diag(s) S^T = d2L/dz2``
        with the signs ``s`` of :meth:`factor_signs`.
        """
        n = out.shape[0]
        if self.kind == "ce":
            p = state.probs
            assert p is not None
            sp = p.sqrt()
            # rows k of (diag sqrt(p) - p sqrt(p)^T)^T = columns of the factor
            cols = torch.diag_embed(sp) - sp.unsqueeze(2) * p.unsqueeze(1)
            w = self._column(p) if signed else None
            sw = (
                w.abs().sqrt()
                if w is not None
                else self._sqrt_column(p, "the GGN square-root factor")
            )
            return _weigh(cols.mul_(state.scale**0.5), sw, 2)
        d = out[0].numel()
        eye = torch.eye(d, dtype=out.dtype, device=out.device) * (2.0 * state.scale) ** 0.5
        return eye.expand(n, d, d).reshape(n, d, *out.shape[1:])

    def factor_signs(self, out: Tensor) -> Tensor | None:
        """``sign(w_n)`` as an ``(N, 1)`` column for a signed factor; ``None`` if no ``w_n < 0``."""
        w = self._column(out)
        return None if w is None or not bool((w < 0).any()) else w.sign()

    def mc_factor(
        self, out: Tensor, state: LossState, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Monte-Carlo columns, ``E[S S^T] = d2L/dz2``: shape ``(N, num_samples, *out)``.

        Each column is ``sqrt(c / k)`` times the output gradient of the per-sample
        loss at a label drawn from the model's predictive distribution.
        """
        k = num_samples
        if self.kind == "ce":
            p = state.probs
            assert p is not None
            labels = self.sample_labels_ce(p, k, generator)  # (N, k)
            minus = p.new_full((p.shape[0], k, 1), -1.0)
            cols = p.unsqueeze(1).expand(-1, k, -1).scatter_add(2, labels.unsqueeze(2), minus)
            factor = (state.scale / k) ** 0.5
            sw = self._sqrt_column(p, "the Monte-Carlo GGN factor")
            return _weigh(cols if factor == 1.0 else cols.mul_(factor), sw, 2)
        noise = _randn((out.shape[0], k, *out.shape[1:]), out, generator)
        # gradient of (z - y)^2 at y = z + eps / sqrt(2) is -sqrt(2) eps
        return noise.mul_(-((2.0 * state.scale / k) ** 0.5))

    def sample_targets(self, out: Tensor, state: LossState, generator: torch.Generator) -> Tensor:
        """One draw of targets from the model's predictive distribution."""
        if self.kind == "ce":
            assert state.probs is not None
            return self.sample_labels_ce(state.probs, 1, generator)[:, 0]
        return out + _randn(tuple(out.shape), out, generator).mul_(0.5**0.5)

    @staticmethod
    def sample_labels_ce(p: Tensor, k: int, generator: torch.Generator) -> Tensor:
        """``k`` categorical draws per row of ``p``: shape ``(N, k)``.

        Inverse-CDF sampling from one uniform draw per label (``torch.multinomial``
        costs several times a small layer's forward pass at batch size 1).
        """
        u = torch.rand((p.shape[0], k), generator=generator, device=generator.device)
        cdf = p.detach().to(device=generator.device, dtype=torch.float64).cumsum(1)
        labels = torch.searchsorted(cdf, u.to(torch.float64) * cdf[:, -1:], right=True)
        return labels.clamp_(max=p.shape[1] - 1).to(p.device)


def _weigh(t: Tensor, w: Tensor | None, dims: int = 1) -> Tensor:
    """``t`` (in place) times the per-sample column ``w`` (``(N, 1)``), broadcast over ``dims``."""
    if w is None:
        return t
    return t.mul_(w.view(-1, *[1] * dims))


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the generator's device, moved next to ``like``."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)
