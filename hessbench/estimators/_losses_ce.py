"""Cross-entropy in closed form: class weights, label smoothing, per-sample weights, NLL.

For the logits ``z_n`` of ``K`` classes, ``p = softmax(z_n)``, the per-sample loss is
``l_n = -sum_k q_nk log p_nk`` with the target distribution

    ``q_n = s_n ((1 - eps) w_{y_n} e_{y_n} + (eps / K) w)``

(``w`` the class weights, 1 without; ``eps`` the label smoothing; ``s_n`` the
per-sample weight of :class:`~hessbench.estimators.losses.WeightedCrossEntropyLoss`,
1 without) and ``L = c sum_n l_n``, ``c = 1/N`` for ``mean`` (``1 / sum_n w_{y_n}``
with class weights, as torch normalises), 1 for ``sum``. With the mass
``Q_n = sum_k q_nk``:

- ``dl_n/dz = Q_n p - q_n``; ``d2l_n/dz2 = Q_n (diag p - p p^T)``: the Hessian of
  ``-log softmax`` does not depend on the label, so smoothing changes the gradient only;
- factor ``sqrt(Q_n) (diag sqrt(p) - p sqrt(p)^T)``;
- Monte-Carlo column ``sqrt(Q_n) (p - e_yhat)``, ``yhat ~ Cat(p)``:
  ``E[(p - e_yhat)(p - e_yhat)^T] = diag p - p p^T``. ``Q_n`` is the mass of the *true*
  label: the GGN is an expectation over the data, the draw only sketches
  ``diag p - p p^T``. (The gradient of the smoothed loss at ``yhat`` would have a
  non-zero mean, that of the class-weighted loss the weight ``w_yhat``.)
- BL89 (the softmax treated element-wise): ``c q_n o (p - p^2)``.

``NLLLoss`` after a final ``nn.LogSoftmax(dim=1)`` is this loss on the logits before
the ``LogSoftmax``: :meth:`CrossEntropySpec.absorb` removes that layer from the model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> spec = CrossEntropySpec.recognise(nn.CrossEntropyLoss(label_smoothing=0.3))
    >>> z, y = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0])
    >>> state = spec.evaluate(z, y)
    >>> state.grad  # p - q, q = 0.7 e_0 + 0.1
    tensor([[-0.4667,  0.2333,  0.2333]], dtype=torch.float64)
    >>> spec.hess_diag(z, state)  # p - p^2, as without smoothing
    tensor([[0.2222, 0.2222, 0.2222]], dtype=torch.float64)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessbench.errors import InputError, UnsupportedError
from hessbench.estimators._losses_base import LossSpec, LossState, option_tensor, scale_, weigh
from hessbench.estimators.losses import WeightedCrossEntropyLoss

__all__ = ["CrossEntropySpec", "sample_labels", "strip_log_softmax"]


@dataclass(frozen=True, eq=False)
class CrossEntropySpec(LossSpec):
    """Cross-entropy: ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` after ``LogSoftmax``.

    Options: class weights, label smoothing, and the per-sample weights of
    :class:`~hessbench.estimators.losses.WeightedCrossEntropyLoss`.
    """

    class_weight: Tensor | None = None
    label_smoothing: float = 0.0
    ignore_index: int = -100
    sample_weights: Tensor | None = None  # a WeightedCrossEntropyLoss's current weights
    weighted: bool = False
    log_probs: bool = False  # NLLLoss: the outputs are log-probabilities until absorbed

    @classmethod
    def recognise(cls, loss_fn: nn.Module) -> CrossEntropySpec | None:
        """A spec for ``nn.CrossEntropyLoss`` or ``nn.NLLLoss``."""
        if isinstance(loss_fn, nn.NLLLoss):
            weight = option_tensor(loss_fn.weight, "NLLLoss(weight=...)")
            reduction = cls.reduction_of(loss_fn)
            return cls(reduction, weight, ignore_index=loss_fn.ignore_index, log_probs=True)
        if not isinstance(loss_fn, nn.CrossEntropyLoss):
            return None
        weight = option_tensor(loss_fn.weight, "CrossEntropyLoss(weight=...)")
        eps = float(loss_fn.label_smoothing)
        if not 0.0 <= eps <= 1.0:
            raise UnsupportedError(f"CrossEntropyLoss(label_smoothing={eps}) must lie in [0, 1]")
        reduction = cls.reduction_of(loss_fn)
        if isinstance(loss_fn, WeightedCrossEntropyLoss):
            return cls(reduction, weight, eps, loss_fn.ignore_index, loss_fn.sample_weights, True)
        return cls(reduction, weight, eps, loss_fn.ignore_index)

    def absorb(self, model: nn.Module) -> tuple[nn.Module, LossSpec]:
        """``NLLLoss``: the model without its final ``LogSoftmax``, and cross-entropy."""
        if not self.log_probs:
            return model, self
        return strip_log_softmax(model), replace(self, log_probs=False)

    def plain_module(self) -> nn.Module | None:
        """``nn.CrossEntropyLoss(reduction)`` when no option is set."""
        plain = self.class_weight is None and self.label_smoothing == 0.0
        if plain and not self.weighted and not self.log_probs:
            return nn.CrossEntropyLoss(reduction=self.reduction)
        return None

    # ------------------------------------------------------------- the loss
    def check_targets(self, out: Tensor, targets: Tensor) -> None:
        """Class indices in ``[0, C)`` for ``(N, C)`` outputs, and weights that fit."""
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
        if 0 <= self.ignore_index < out.shape[1] and bool((targets == self.ignore_index).any()):
            raise InputError(f"targets equal to ignore_index={self.ignore_index} are not supported")
        if self.class_weight is not None:
            if self.class_weight.shape != out.shape[1:]:
                raise InputError(
                    f"class weights of shape {tuple(self.class_weight.shape)} do not fit "
                    f"{out.shape[1]} classes"
                )
            if self.reduction == "mean" and self.scale(targets) == float("inf"):
                raise InputError("the class weights of the batch's targets sum to zero")
        if self.weighted and (
            self.sample_weights is None or self.sample_weights.shape != out.shape[:1]
        ):
            got = "none" if self.sample_weights is None else tuple(self.sample_weights.shape)
            raise InputError(
                f"WeightedCrossEntropyLoss needs weights of shape ({out.shape[0]},) "
                f"(call set_weights first), got {got}"
            )

    def scale(self, targets: Tensor) -> float:
        """``1/N`` (``1 / sum_n w_{y_n}`` with class weights) for ``mean``, 1 for ``sum``."""
        if self.reduction == "sum":
            return 1.0
        if self.class_weight is None:
            return 1.0 / targets.shape[0]
        w = self.class_weight.to(device=targets.device, dtype=torch.float64)
        total = float(w[targets.long()].sum())
        return 1.0 / total if total != 0.0 else float("inf")

    def _weights(self, like: Tensor) -> Tensor | None:
        w = self.class_weight
        return None if w is None else w.to(device=like.device, dtype=like.dtype)

    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """The loss through differentiable torch operations (for autograd paths)."""
        y, w = targets.long(), self._weights(out)
        if self.log_probs:
            return F.nll_loss(out, y, w, ignore_index=self.ignore_index, reduction=self.reduction)
        if self.weighted:
            total = self.per_sample_loss(out, targets).sum()
            return total / out.shape[0] if self.reduction == "mean" else total
        return F.cross_entropy(
            out, y, w, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )  # fmt: skip

    def per_sample_loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """``l_n`` (times ``s_n``), one entry per sample."""
        y, w = targets.long(), self._weights(out)
        if self.log_probs:
            return F.nll_loss(out, y, w, ignore_index=self.ignore_index, reduction="none")
        per = F.cross_entropy(
            out, y, w, ignore_index=self.ignore_index, reduction="none",
            label_smoothing=self.label_smoothing,
        )  # fmt: skip
        s = self._sample_column(per)
        return per if s is None else per * s[:, 0]

    # ------------------------------------------------------- masses, targets
    def _sample_column(self, like: Tensor) -> Tensor | None:
        """The per-sample weights ``s_n`` as an ``(N, 1)`` column, ``None`` if unweighted."""
        s = self.sample_weights
        return None if s is None else s.to(device=like.device, dtype=like.dtype).unsqueeze(1)

    def _class_mass(self, targets: Tensor, like: Tensor) -> Tensor | None:
        """``(1 - eps) w_{y_n} + eps/K sum_k w_k`` as an ``(N, 1)`` column, ``None`` without ``w``."""
        w = self._weights(like)
        if w is None:
            return None
        m = w[targets.long()].unsqueeze(1)
        eps = self.label_smoothing
        return m if eps == 0.0 else m * (1.0 - eps) + (eps / w.shape[0]) * w.sum()

    def _mass(self, targets: Tensor, like: Tensor) -> Tensor | None:
        m, s = self._class_mass(targets, like), self._sample_column(like)
        return s if m is None else (m if s is None else m * s)

    def _target_dist(self, targets: Tensor, p: Tensor) -> Tensor:
        """``q_n`` (with its masses), shape ``(N, K)``."""
        y, w, eps = targets.long().unsqueeze(1), self._weights(p), self.label_smoothing
        on = (1.0 - eps) * (w[y] if w is not None else p.new_ones(y.shape))
        q = torch.zeros_like(p).scatter_(1, y, on)
        if eps:
            q += (eps / p.shape[1]) * (w if w is not None else 1.0)
        return weigh(q, self._sample_column(p))

    def evaluate(self, out: Tensor, targets: Tensor) -> LossState:
        """``dL/dz = c (Q_n p - q_n)`` and the probabilities."""
        if self.log_probs:
            raise RuntimeError("NLLLoss: absorb the model's LogSoftmax first (LossSpec.absorb)")
        c = self.scale(targets)
        p = torch.softmax(out, dim=1)
        mass = self._mass(targets, out)
        if self.label_smoothing == 0.0:
            minus = p.new_full((out.shape[0], 1), -1.0)
            grad = p.scatter_add(1, targets.long().unsqueeze(1), minus)
            grad = weigh(grad if c == 1.0 else grad.mul_(c), mass)
        else:
            grad = ((p if mass is None else p * mass) - self._target_dist(targets, p)).mul_(c)
        return LossState(grad, c, out, targets, self, p, mass)

    # ------------------------------------------------------------ curvature
    def hess_diag(self, out: Tensor, state: LossState) -> Tensor:
        """``c Q_n (p - p^2)``."""
        p = state.aux
        assert p is not None
        return weigh(scale_(p - p * p, state.scale), state.mass)

    def hess_vec(self, state: LossState, r: Tensor) -> Tensor:
        """``c Q_n (p o r - p (p . r))``."""
        p = state.aux
        assert p is not None
        pr = p * r
        return weigh(scale_(pr - p * pr.sum(1, keepdim=True), state.scale), state.mass)

    def target_hess_diag(self, out: Tensor, targets: Tensor, state: LossState) -> Tensor:
        """BL89: ``c q_n o (p - p^2)``; without smoothing ``c Q_n (p_y - p_y^2)`` on the target."""
        p = state.aux
        assert p is not None
        if self.label_smoothing != 0.0:
            return scale_(self._target_dist(targets, p).mul_(p - p * p), state.scale)
        idx = targets.long().unsqueeze(1)
        py = p.gather(1, idx)
        h = torch.zeros_like(p).scatter_(1, idx, scale_(py - py * py, state.scale))
        return weigh(h, state.mass)

    def _sqrt_mass(self, state: LossState, what: str) -> Tensor | None:
        """``sqrt(Q_n)``; :class:`UnsupportedError` for a negative per-sample weight."""
        m = state.mass
        if m is not None and bool((m < 0).any()):
            raise UnsupportedError(
                f"{what} needs non-negative per-sample weights (the loss Hessian is indefinite)"
            )
        return None if m is None else m.sqrt()

    def sqrt_factor(self, out: Tensor, state: LossState, *, signed: bool = False) -> Tensor:
        """``sqrt(c Q_n) (diag sqrt(p) - p sqrt(p)^T)``; ``sqrt|Q_n|`` when ``signed``."""
        p = state.aux
        assert p is not None
        sp = p.sqrt()
        # rows k of (diag sqrt(p) - p sqrt(p)^T)^T = columns of the factor
        cols = torch.diag_embed(sp) - sp.unsqueeze(2) * p.unsqueeze(1)
        if signed and state.mass is not None:
            sm = state.mass.abs().sqrt()
        else:
            sm = self._sqrt_mass(state, "the GGN square-root factor")
        return weigh(cols.mul_(state.scale**0.5), sm, 2)

    def factor_signs(self, out: Tensor) -> Tensor | None:
        """``sign(s_n)`` as an ``(N, 1)`` column; ``None`` if no ``s_n < 0``."""
        s = self._sample_column(out)
        return None if s is None or not bool((s < 0).any()) else s.sign()

    def _residuals(self, p: Tensor, k: int, generator: torch.Generator) -> Tensor:
        """``p - e_yhat`` for ``k`` labels drawn from ``Cat(p)`` per sample: ``(N, k, K)``."""
        labels = sample_labels(p, k, generator)
        minus = p.new_full((p.shape[0], k, 1), -1.0)
        return p.unsqueeze(1).expand(-1, k, -1).scatter_add(2, labels.unsqueeze(2), minus)

    def mc_factor(
        self, out: Tensor, state: LossState, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        """``sqrt(c Q_n / k) (p - e_yhat)``, ``yhat ~ Cat(p)``: ``(N, k, K)``."""
        p = state.aux
        assert p is not None
        cols = self._residuals(p, num_samples, generator)
        factor = (state.scale / num_samples) ** 0.5
        sm = self._sqrt_mass(state, "the Monte-Carlo GGN factor")
        return weigh(cols if factor == 1.0 else cols.mul_(factor), sm, 2)

    def sampled_grad(self, out: Tensor, state: LossState, generator: torch.Generator) -> Tensor:
        """``c s_n sqrt(C_n) (p - e_yhat)``, ``yhat ~ Cat(p)``, ``C_n = Q_n / s_n``.

        Per-sample weights ``s_n`` enter linearly, as in the gradient of the weighted
        loss at the drawn labels (so ``E[g_n g_n^T] = c^2 s_n^2 (diag p - p p^T)``, as
        documented for the A2C actor loss); the class-weight and smoothing mass ``C_n``
        enters as its square root, so that ``E[g_n g_n^T] = c d2L/dz_n2`` for those and
        Sophia's expectation is the GGN.
        """
        p = state.aux
        assert p is not None
        labels = sample_labels(p, 1, generator)  # (N, 1)
        g = p.scatter_add(1, labels, p.new_full((p.shape[0], 1), -1.0))
        g = g if state.scale == 1.0 else g.mul_(state.scale)
        m = self._class_mass(state.targets, out)
        return weigh(weigh(g, None if m is None else m.sqrt()), self._sample_column(out))


def sample_labels(p: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` categorical draws per row of ``p``: shape ``(N, k)``.

    Inverse-CDF sampling from one uniform draw per label (``torch.multinomial``
    costs several times a small layer's forward pass at batch size 1).
    """
    u = torch.rand((p.shape[0], k), generator=generator, device=generator.device)
    cdf = p.detach().to(device=generator.device, dtype=torch.float64).cumsum(1)
    labels = torch.searchsorted(cdf, u.to(torch.float64) * cdf[:, -1:], right=True)
    return labels.clamp_(max=p.shape[1] - 1).to(p.device)


def strip_log_softmax(model: nn.Module) -> nn.Module:
    """``model`` (an ``nn.Sequential``) without its final ``nn.LogSoftmax(dim=1)``.

    The result is a new ``nn.Sequential`` tree holding the same layers under the same
    names (nested containers are rebuilt the same way), so parameter names agree.

    Raises:
        UnsupportedError: one line naming what the model ends with instead.
    """
    stripped = _strip(model)
    if stripped is not None:
        return stripped
    last: nn.Module = model
    while type(last) is nn.Sequential and len(last):
        last = last[-1]
    got = f"ends with {last}" if last is not model else f"is a {type(model).__name__}"
    raise UnsupportedError(
        "NLLLoss needs the model to end with nn.LogSoftmax(dim=1) as the last layer of an "
        f"nn.Sequential (then it is cross-entropy on the logits); the model {got}"
    )


def _strip(model: nn.Module) -> nn.Module | None:
    if type(model) is not nn.Sequential:
        return None
    items = [(name, m) for name, m in model._modules.items() if m is not None]
    if not items:
        return None
    name, last = items[-1]
    if type(last) is nn.LogSoftmax and last.dim in (1, -1):
        rest = items[:-1]
    else:
        inner = _strip(last)
        if inner is None:
            return None
        rest = [*items[:-1], (name, inner)]
    new = nn.Sequential(OrderedDict(rest))
    new.training = model.training  # the flag only: the shared layers keep theirs
    return new
