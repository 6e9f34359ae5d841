r"""A diagonally preconditioned optimizer driven by any registered estimator.

One step on a batch ``(x, y)``, ``t`` counting steps from 1 and ``k`` counting
curvature updates (every ``update_every`` steps, starting with the first):

.. code-block:: text

    d, g, L  = estimator.estimate_with_grad(model, loss_fn, x, y)   # d only when updating
    g        = g * min(1, grad_clip / (||g|| + 1e-6))  (grad_clip: total norm, torch's rule)
    g        = g + wd * theta                         (weight_decay, decoupled=False)
    m        = b1 m + (1 - b1) g
    v        = b2 v + (1 - b2) c(d),  c(d) = d^2 ("square") or |d| ("abs")
    m_hat    = m / (1 - b1^t),   v_hat = v / (1 - b2^k)      (bias_correction)
    D        = sqrt(v_hat) ("square") or v_hat ("abs")       curvature, Hessian units
    u        = lr * m_hat / (D^p + eps)                            (no clipping)
    u        = lr * clip(m_hat / max(gamma * D^p, eps), -clip, clip)   (clip set: Sophia)
    u        = u * min(max_scale, sqrt(2 delta / sum(D' * u^2)))     (step_scaling)
    theta    = theta - lr * wd * theta - u            (weight_decay, decoupled=True)

``D'`` is ``D`` (``scale_bias_correction=True``, hessbench's rule) or ``D``
computed from the raw average ``v`` without the bias correction
(``scale_bias_correction=False``, the HesScale authors' code). With
``schedule="paper"`` the curvature is updated on steps 1, 1 + k, 1 + 2k, ...;
with ``schedule="script"`` (Sophia's training script) on steps k + 1, 2k + 1, ...,
so ``D = 0`` (Sophia: pure sign steps) until the first estimate.

``p`` is ``hessian_power`` (AdaHessian's ``k``). With ``curvature="square"``,
``grad_sq`` and ``p = 1`` this is Adam; with ``decoupled=True`` and weight
decay, AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hessbench.errors import ConfigError, DivergenceError, InputError
from hessbench.estimators import (
    Estimator,
    LossSpec,
    all_finite,
    get_estimator,
    has_active_dropout,
    loss_and_grad,
    preserve_state,
    trainable_parameters,
)

__all__ = ["DiagonalOptimizer"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class DiagonalOptimizer(torch.optim.Optimizer):
    r"""Adam-style or Newton-style diagonal preconditioning with any estimator's curvature.

    The update is given in the module docstring of :mod:`hessbench.optim.diagonal`.
    Each call of :meth:`step_batch` costs one :meth:`Estimator.estimate_with_grad`
    on curvature steps (one pass for HesScale-family estimators, which hand back
    the gradient they compute) and one autograd gradient on the other steps.

    Args:
        model: the model; its trainable parameters (``named_parameters()`` order)
            form the single parameter group.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (what estimators support).
        estimator: a registered estimator's name (built with default
            hyper-parameters) or an :class:`~hessbench.estimators.Estimator`.
        lr: learning rate (``param_groups[0]["lr"]``, so LR schedulers work).
        betas: ``(b1, b2)``, decay of the gradient and curvature averages.
        eps: added to the denominator; with ``clip`` the floor ``max(gamma D^p, eps)``.
        weight_decay: ``wd``.
        decoupled_weight_decay: ``True`` (default): ``theta -= lr * wd * theta``
            beside the preconditioned step, as AdamW, AdaHessian and Sophia do;
            ``False``: L2, ``wd * theta`` added to the gradient (as torch's Adam).
        curvature: ``"square"`` averages ``d^2`` and divides by its square root
            (Adam-style, AdaHessian, AdaHesScale); ``"abs"`` averages ``|d|`` and
            divides by it (Newton-style, Sophia); ``"signed"`` averages ``d`` itself
            (Sophia-H's Hutchinson estimate, which can be negative), only with
            ``clip``, whose floor ``max(gamma D, eps)`` then takes the place of a
            negative entry (a step of ``lr * clip`` in the momentum's sign), with
            ``hessian_power`` 1 and without ``step_scaling``.
        hessian_power: the power ``p`` of ``D`` in the denominator (AdaHessian's
            Hessian power; 1 is a full diagonal Newton/Adam step).
        update_every: estimate the curvature every this many steps (steps 1,
            1 + k, ...); the other steps compute only the gradient. Bias
            correction of ``v`` counts curvature updates.
        bias_correction: divide the averages by ``1 - b^t`` (Adam); Sophia does not.
        clip: ``None``, or Sophia's clipping threshold (Sophia uses 1): each
            entry of the preconditioned step is clipped to ``[-clip, clip]``
            before multiplying by ``lr``.
        gamma: Sophia's ``gamma`` (``rho`` in its code), scaling ``D`` inside
            the clipped ratio; only with ``clip``.
        step_scaling: ``None`` or ``(delta, max_scale)``: the HesScale papers'
            step-size scaling. The whole update ``u`` (all parameters, ``lr``
            included, weight decay not) is multiplied by
            ``min(max_scale, sqrt(2 delta / sum(D u^2)))``: the step along which
            the diagonal quadratic model ``1/2 u^T diag(D) u`` predicts a loss
            change of at most ``delta``, never more than ``max_scale`` times the
            proposal. ``D`` is the averaged, bias-corrected curvature in Hessian
            units (the square root of ``v_hat`` for ``"square"``). The factor of
            the last step is :attr:`last_step_scale`.
        scale_bias_correction: ``True`` (hessbench): ``D`` in the step-scaling
            term is bias-corrected, as in the step itself; ``False``: the raw
            running average, as the HesScale authors' ``*Scaled`` optimizers
            compute it (``exp_avg_sq.sqrt()`` or ``exp_avg_sq``), which makes
            their factor ``1 / (1 - b2^k)^(1/4)`` (``"square"``) or
            ``1 / (1 - b2^k)^(1/2)`` (``"abs"``) larger: 5.6x and 31.6x at the
            first step with ``b2 = 0.999``.
        schedule: when the curvature is estimated. ``"paper"`` (default):
            steps 1, 1 + ``update_every``, ... before the step, on the step's
            batch (Sophia's paper, Algorithm 3). ``"script"``: Sophia's official
            training script, which estimates after step ``t`` (``t`` a multiple
            of ``update_every``) on the next batch at the new parameters; that is
            the estimate at steps ``update_every + 1``, ``2 update_every + 1``, ...
            before the step on the step's batch, and ``D = 0`` before the first
            one (a zero state; bias correction counts estimates, none is 1).
        grad_clip: ``None``, or clip the gradient's total norm over all
            parameters to this value before the moments, as
            ``torch.nn.utils.clip_grad_norm_`` (Sophia's script: 1.0).
        seed: seed of the optimizer's own ``torch.Generator`` (estimator draws,
            dropout masks); ``None`` seeds it non-deterministically. The global
            RNG is never used or changed.

    Raises:
        ConfigError: a bad hyper-parameter or an unknown estimator.
        UnsupportedError: an estimator that cannot handle ``model``/``loss_fn``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> opt = DiagonalOptimizer(model, nn.CrossEntropyLoss(), estimator="hesscale", seed=0)
        >>> loss = opt.step_batch(torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> isinstance(loss, float)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        estimator: str | Estimator,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        curvature: Literal["square", "abs", "signed"] = "square",
        hessian_power: float = 1.0,
        update_every: int = 1,
        bias_correction: bool = True,
        clip: float | None = None,
        gamma: float = 1.0,
        step_scaling: tuple[float, float] | None = None,
        scale_bias_correction: bool = True,
        schedule: Literal["paper", "script"] = "paper",
        grad_clip: float | None = None,
        seed: int | None = None,
    ) -> None:
        _check(lr >= 0.0, f"lr must be >= 0 (got {lr!r})")
        _check(
            len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
            f"betas must be two numbers in [0, 1) (got {betas!r})",
        )
        _check(eps >= 0.0, f"eps must be >= 0 (got {eps!r})")
        _check(weight_decay >= 0.0, f"weight_decay must be >= 0 (got {weight_decay!r})")
        _check(
            curvature in ("square", "abs", "signed"),
            f"curvature must be square, abs or signed ({curvature!r})",
        )
        _check(
            curvature != "signed"
            or (clip is not None and hessian_power == 1.0 and step_scaling is None),
            "curvature signed needs clip (its floor max(gamma D, eps) handles negative D), "
            "hessian_power 1 and no step_scaling",
        )
        _check(hessian_power > 0.0, f"hessian_power must be > 0 (got {hessian_power!r})")
        _check(
            isinstance(update_every, int)
            and not isinstance(update_every, bool)
            and update_every > 0,
            f"update_every must be a positive integer (got {update_every!r})",
        )
        _check(clip is None or clip > 0.0, f"clip must be None or > 0 (got {clip!r})")
        _check(gamma > 0.0, f"gamma must be > 0 (got {gamma!r})")
        _check(clip is not None or gamma == 1.0, "gamma applies only with clip (Sophia's rule)")
        _check(schedule in ("paper", "script"), f"schedule must be paper or script ({schedule!r})")
        _check(
            grad_clip is None or grad_clip > 0.0, f"grad_clip must be None or > 0 ({grad_clip!r})"
        )
        if step_scaling is not None:
            _check(
                len(step_scaling) == 2 and all(s > 0.0 for s in step_scaling),
                f"step_scaling must be (delta, max_scale), both > 0 (got {step_scaling!r})",
            )
        self.estimator: Estimator = (
            get_estimator(estimator) if isinstance(estimator, str) else estimator
        )
        self.estimator.check_supported(model, loss_fn)
        self.model = model
        self.loss_fn = loss_fn
        LossSpec.of(loss_fn)  # refuse an unsupported loss now; re-read per step (weights)
        params = trainable_parameters(model)
        self.param_names: list[str] = list(params)
        self.curvature = curvature
        self.update_every = update_every
        self.bias_correction = bias_correction
        self.decoupled_weight_decay = decoupled_weight_decay
        self.step_scaling = None if step_scaling is None else tuple(map(float, step_scaling))
        self.scale_bias_correction = scale_bias_correction
        self.schedule = schedule
        self.grad_clip = grad_clip
        self.last_step_scale: float = 1.0
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "hessian_power": hessian_power,
            "clip": clip,
            "gamma": gamma,
        }
        super().__init__(list(params.values()), defaults)
        first = next(iter(params.values()))
        self._generator = torch.Generator(device=first.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict, plus the optimizer generator's state."""
        sd = super().state_dict()
        sd["generator_state"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (moments, counters, groups, generator)."""
        state_dict = dict(state_dict)
        gen = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if gen is not None:
            self._generator.set_state(gen)

    @property
    def steps_taken(self) -> int:
        """Number of successful steps so far."""
        p = self.param_groups[0]["params"][0]
        return int(self.state[p].get("step", 0)) if p in self.state else 0

    # -- stepping ----------------------------------------------------------------------------

    def step_batch(self, inputs: Tensor, targets: Tensor) -> float:
        """One optimization step on ``(inputs, targets)``; returns the loss before the step.

        Raises:
            DivergenceError: a non-finite loss, gradient, curvature estimate or
                update, naming the step; parameters and state are left unchanged.
        """
        loss = self.step(batch=(inputs, targets))
        assert loss is not None
        return loss

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        batch: tuple[Tensor, Tensor] | None = None,
    ) -> float | None:
        """Step on ``batch=(inputs, targets)``; :meth:`step_batch` is the usual entry point.

        ``closure`` is not supported (the optimizer computes its own loss and
        gradient); ``step`` exists so that LR schedulers and step hooks see the
        optimizer's steps.
        """
        if closure is not None or batch is None:
            raise ConfigError(
                "DiagonalOptimizer computes its own gradient: call step_batch(inputs, targets)"
            )
        inputs, targets = batch
        if not all_finite(inputs):
            raise InputError("the inputs contain NaN or infinity")
        t = self.steps_taken + 1
        update_curv = (t - 1) % self.update_every == 0 and (self.schedule == "paper" or t > 1)
        diag, grad, loss = self._evaluate(inputs, targets, t, update_curv)
        self._apply(t, update_curv, diag, grad)
        return float(loss)

    def _evaluate(
        self, inputs: Tensor, targets: Tensor, t: int, update_curv: bool
    ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor], Tensor]:
        try:
            if update_curv:
                diag, grad, loss = self.estimator.estimate_with_grad(
                    self.model, self.loss_fn, inputs, targets, generator=self._generator
                )
            else:
                diag = None
                dropout = has_active_dropout(self.model)
                with preserve_state(
                    self.model, inputs.device, self._generator if dropout else None
                ):
                    spec = LossSpec.of(self.loss_fn)  # per-sample weights may change per batch
                    grad, loss = loss_and_grad(self.model, spec, inputs, targets)
        except InputError as exc:
            with torch.no_grad(), preserve_state(self.model, inputs.device, None):
                out = self.model(inputs)
            if not all_finite(out):
                raise DivergenceError(
                    f"diverged at step {t}: the model output is not finite", t
                ) from exc
            raise
        if not all_finite(loss):
            raise DivergenceError(f"diverged at step {t}: the loss is {float(loss.detach())}", t)
        for name, g in grad.items():
            if not all_finite(g):
                raise DivergenceError(f"diverged at step {t}: gradient of {name} not finite", t)
        if diag is not None:
            for name, d in diag.items():
                if not all_finite(d):
                    raise DivergenceError(
                        f"diverged at step {t}: curvature estimate of {name} not finite", t
                    )
        return diag, grad, loss

    def _params(self) -> Iterator[tuple[dict[str, Any], str, nn.Parameter]]:
        names = iter(self.param_names)
        for group in self.param_groups:
            for p in group["params"]:
                yield group, next(names), p

    @torch.no_grad()
    def _apply(
        self,
        t: int,
        update_curv: bool,
        diag: dict[str, Tensor] | None,
        grad: dict[str, Tensor],
    ) -> None:
        square = self.curvature == "square"
        pending = []
        quad = 0.0
        gscale = 1.0
        if self.grad_clip is not None:  # torch.nn.utils.clip_grad_norm_'s rule
            norm = math.sqrt(sum(float(g.double().square().sum()) for g in grad.values()))
            gscale = min(1.0, self.grad_clip / (norm + 1e-6))
        for group, name, p in self._params():
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            power, clip, gamma = group["hessian_power"], group["clip"], group["gamma"]
            st = self.state[p]
            m_old = st.get("exp_avg")
            v_old = st.get("exp_curv")
            k = int(st.get("curv_updates", 0))
            g = grad[name] if gscale == 1.0 else grad[name] * gscale
            if wd and not self.decoupled_weight_decay:
                g = g.add(p, alpha=wd)
            m = (1 - b1) * g if m_old is None else m_old.mul(b1).add_(g, alpha=1 - b1)
            if update_curv:
                assert diag is not None
                d = diag[name]
                c = d.square() if square else d if self.curvature == "signed" else d.abs()
                v = (1 - b2) * c if v_old is None else v_old.mul(b2).add_(c, alpha=1 - b2)
                k += 1
            else:  # before the first estimate (schedule="script") the curvature is zero
                v = torch.zeros_like(p) if v_old is None else v_old
            bc1 = 1 - b1**t if self.bias_correction else 1.0
            bc2 = 1 - b2**k if self.bias_correction and k > 0 else 1.0
            # curvature in Hessian units, computed as torch's Adam does (sqrt(v) / sqrt(bc2))
            dcurv = v.sqrt().div_(math.sqrt(bc2)) if square else v.div(bc2)
            dpow = dcurv if power == 1.0 else dcurv.pow(power)
            if clip is None:
                u = m.div(dpow.add(eps)).mul_(lr / bc1)
            else:
                ratio = m.div(bc1).div_(dpow.mul(gamma).clamp_(min=eps))
                u = ratio.clamp_(-clip, clip).mul_(lr)
            if self.step_scaling is not None:
                # the authors' rule: the raw average, without the bias correction
                dscale = dcurv if self.scale_bias_correction else (v.sqrt() if square else v)
                quad += float((dscale * u.square()).sum())
            pending.append((group, p, m, v, k, u, lr * wd if self.decoupled_weight_decay else 0.0))
        scale = 1.0
        if self.step_scaling is not None:
            delta, max_scale = self.step_scaling
            scale = max_scale if quad <= 0.0 else min(max_scale, math.sqrt(2.0 * delta / quad))
        new_values = []
        for _, p, _, _, _, u, decay in pending:
            new = p.mul(1.0 - decay) if decay else p.clone()
            new.sub_(u, alpha=scale)
            if not all_finite(new):
                name = self.param_names[len(new_values)]
                raise DivergenceError(f"diverged at step {t}: update of {name} not finite", t)
            new_values.append(new)
        self.last_step_scale = scale
        for (_, p, m, v, k, _, _), new in zip(pending, new_values, strict=True):
            p.copy_(new)
            st = self.state[p]
            st["step"] = t
            st["curv_updates"] = k
            st["exp_avg"] = m
            st["exp_curv"] = v
