"""The losses beyond plain cross-entropy and MSE, through every estimator.

Class-weighted and label-smoothed cross-entropy, ``NLLLoss`` after a final
``LogSoftmax``, ``BCEWithLogitsLoss`` (multi-label, binary, ``weight``/``pos_weight``),
``HuberLoss`` and ``SmoothL1Loss``. References are brute force (``reference.py``:
``torch.func`` over the flattened parameters, evaluated on the torch loss module
itself); the GGN of ``NLLLoss`` is split at the logits, before the ``LogSoftmax``
(``ggn_reference``). Each loss meets each estimator at least once: exactness in
float64 at ``TOL["exact"]``; the Monte-Carlo rules by z-tests at the output
(``E[S S^T] = d2L/dz2``) and, for BCE, by the convergence tests of
``test_stochastic.py``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import reference
import torch
from conftest import ALL_CASES, TOL, assert_close, gen, relerr
from pairwise import covering
from torch import Tensor, nn
from torch.func import jacrev

from hessbench.errors import InputError, UnsupportedError
from hessbench.estimators import available_estimators, get_estimator
from hessbench.estimators._autograd import rademacher
from hessbench.estimators._losses import (
    BCEWithLogitsSpec,
    CrossEntropySpec,
    LossSpec,
    RegressionSpec,
)
from hessbench.optim import make_stepper

F64 = torch.float64
W3 = (0.5, 2.0, 1.25)  # class weights of the 3 classes


def _t(values) -> Tensor:
    return torch.tensor(values, dtype=F64)


@dataclass(frozen=True)
class LossCase:
    """A loss module (float64 options) and the targets it takes: ``class``, ``binary``,
    ``soft`` (in [0, 1]) or ``real``."""

    name: str
    make: Callable[[], nn.Module]
    targets: str
    log_softmax: bool = False

    @property
    def elementwise(self) -> bool:
        return self.targets != "class"


LOSSES = {
    c.name: c
    for c in [
        LossCase("ce_weight", lambda: nn.CrossEntropyLoss(weight=_t(W3)), "class"),
        LossCase("ce_smooth_sum", lambda: nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"), "class"),
        LossCase("ce_weight_smooth", lambda: nn.CrossEntropyLoss(_t(W3), label_smoothing=0.1), "class"),
        LossCase("nll_weight", lambda: nn.NLLLoss(weight=_t(W3)), "class", log_softmax=True),
        LossCase("nll_sum", lambda: nn.NLLLoss(reduction="sum"), "class", log_softmax=True),
        LossCase("bce", lambda: nn.BCEWithLogitsLoss(), "binary"),
        LossCase(
            "bce_weights_sum",
            lambda: nn.BCEWithLogitsLoss(_t(W3), reduction="sum", pos_weight=_t((3.0, 0.5, 1.0))),
            "soft",
        ),
        LossCase("huber", lambda: nn.HuberLoss(delta=0.5), "real"),
        LossCase("smooth_l1_sum", lambda: nn.SmoothL1Loss(beta=0.7, reduction="sum"), "real"),
        LossCase("smooth_l1_beta0", lambda: nn.SmoothL1Loss(beta=0.0), "real"),
    ]
}  # fmt: skip
MODELS = ["mlp_tanh", "mlp_softplus", "nested", "conv1d", "cnn_relu"]


@dataclass(frozen=True)
class V:
    """A model case, a loss case and a batch size."""

    case: str
    loss: str
    n: int

    @property
    def id(self) -> str:
        return f"{self.case}-{self.loss}-N{self.n}"


def problem(v: V) -> tuple[nn.Sequential, nn.Module, Tensor, Tensor]:
    """A fresh ``(model, loss_fn, x, y)``; NLL models end with ``LogSoftmax(dim=1)``."""
    case, lc = ALL_CASES[v.case], LOSSES[v.loss]
    model = case.model()
    if lc.log_softmax:
        model.append(nn.LogSoftmax(dim=1))
    g = gen(zlib.crc32(v.id.encode()))
    x = torch.randn(v.n, *case.in_shape, generator=g, dtype=F64)
    shape = (v.n, *case.out_shape)
    y = {
        "class": lambda: torch.randint(0, 3, (v.n,), generator=g),
        "binary": lambda: torch.randint(0, 2, shape, generator=g).to(F64),
        "soft": lambda: torch.rand(shape, generator=g, dtype=F64),
        "real": lambda: torch.randn(shape, generator=g, dtype=F64),
    }[lc.targets]()
    return model, lc.make(), x, y


def ggn_reference(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict:
    """Brute-force GGN; for ``NLLLoss`` split at the logits (cross-entropy on ``model[:-1]``)."""
    if isinstance(loss_fn, nn.NLLLoss):
        ce = nn.CrossEntropyLoss(weight=loss_fn.weight, reduction=loss_fn.reduction)
        return reference.ggn_diag(model[:-1], ce, x, y)
    return reference.ggn_diag(model, loss_fn, x, y)


def params_of(**extra) -> list:
    """Pairwise covering of models x losses x batch sizes (x ``extra`` factors)."""
    factors = {"case": MODELS, "loss": list(LOSSES), "n": [1, 3], **extra}
    out = []
    for r in covering(factors):
        v = V(r["case"], r["loss"], r["n"])
        out.append(
            pytest.param(
                v, *(r[k] for k in extra), id="-".join([v.id, *map(str, (r[k] for k in extra))])
            )
        )
    return out  # fmt: skip


# ------------------------------------------------------------- the loss specs
def test_every_family_is_recognised():
    assert set(LossSpec.__subclasses__()) == {CrossEntropySpec, BCEWithLogitsSpec, RegressionSpec}
    for lc in LOSSES.values():
        assert LossSpec.of(lc.make()).reduction in ("mean", "sum")


@pytest.mark.parametrize("name", list(LOSSES))
def test_closed_forms_match_autograd_at_the_output(name):
    """Value, gradient, Hessian diagonal, Hessian-vector product, factor and BL89 target diagonal."""
    lc = LOSSES[name]
    loss_fn, g = lc.make(), gen(1)
    out = torch.randn(4, 3, generator=g, dtype=F64)
    y = problem(V("mlp_tanh", name, 4))[3]
    logits = out
    if lc.log_softmax:  # the spec absorbs the LogSoftmax: compare on the logits
        out = out.log_softmax(1)
    _, spec = LossSpec.of(loss_fn).absorb(nn.Sequential(nn.LogSoftmax(dim=1)))
    state = spec.evaluate(logits, y)

    def total(z: Tensor) -> Tensor:
        return loss_fn(z.log_softmax(1) if lc.log_softmax else z, y)

    hess = jacrev(jacrev(total))(logits).reshape(12, 12)
    torch.testing.assert_close(state.value(), loss_fn(out, y), rtol=1e-13, atol=0)
    torch.testing.assert_close(state.grad, jacrev(total)(logits), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(spec.hess_diag(logits, state).reshape(-1), hess.diagonal())
    r = torch.randn(4, 3, generator=g, dtype=F64)
    torch.testing.assert_close(spec.hess_vec(state, r).reshape(-1), hess @ r.reshape(-1))
    cols = spec.sqrt_factor(logits, state)  # (N, K, 3): per sample S S^T = its block
    blocks = torch.stack([hess[3 * n : 3 * n + 3, 3 * n : 3 * n + 3] for n in range(4)])
    torch.testing.assert_close(cols.transpose(1, 2) @ cols, blocks)
    for n in range(4):  # no coupling between samples
        assert (
            not hess[3 * n : 3 * n + 3].reshape(3, 4, 3)[:, [m for m in range(4) if m != n]].any()
        )
    target = spec.target_hess_diag(logits, y, state)
    if lc.elementwise:
        torch.testing.assert_close(target, spec.hess_diag(logits, state))
    else:  # BL89: c q o (p - p^2), q the target distribution with its weights
        w = loss_fn.weight if loss_fn.weight is not None else torch.ones(3, dtype=F64)
        eps = getattr(loss_fn, "label_smoothing", 0.0)
        q = (1 - eps) * w[y].unsqueeze(1) * nn.functional.one_hot(y, 3) + eps / 3 * w
        c = float(loss_fn(out, y) / (q * -logits.log_softmax(1)).sum())
        p = logits.softmax(1)
        torch.testing.assert_close(target, c * q * (p - p * p))


def _ztest(draws: Tensor, target: Tensor, what: str, z: float = 5.0) -> None:
    mean = draws.mean(0)
    std = draws.std(0) / draws.shape[0] ** 0.5
    bad = (mean - target).abs() > z * std + 1e-12 * (1 + float(target.abs().max()))
    assert not bool(bad.any()), f"{what}: {mean[bad]} vs {target[bad]} (std {std[bad]})"


@pytest.mark.parametrize("name", [n for n, c in LOSSES.items() if not c.log_softmax])
def test_monte_carlo_rules_are_unbiased_at_the_output(name):
    """``E[S S^T] = d2L/dz2`` per sample for the MC columns; Sophia's sampled gradient
    has mean 0 and ``E[g g^T] = c d2L/dz2``."""
    lc = LOSSES[name]
    loss_fn = lc.make()
    out = 1.5 * torch.randn(3, 3, generator=gen(2), dtype=F64)
    y = problem(V("mlp_tanh", name, 3))[3]
    spec = LossSpec.of(loss_fn)
    state = spec.evaluate(out, y)
    hess = jacrev(jacrev(lambda z: loss_fn(z, y)))(out).reshape(9, 9)
    blocks = torch.stack([hess[3 * n : 3 * n + 3, 3 * n : 3 * n + 3] for n in range(3)])
    k = 20_000
    cols = spec.mc_factor(out, state, k, gen(3)) * k**0.5  # (N, k, 3): one draw per column
    outer = cols.unsqueeze(3) * cols.unsqueeze(2)  # (N, k, 3, 3)
    _ztest(outer.transpose(0, 1), blocks, f"{name}: mc_factor")
    g = gen(4)
    sampled = torch.stack([spec.sampled_grad(out, state, g) for _ in range(4000)])  # (M, N, 3)
    _ztest(sampled, torch.zeros(3, 3, dtype=F64), f"{name}: E[sampled_grad]")
    _ztest(sampled.unsqueeze(3) * sampled.unsqueeze(2), state.scale * blocks, f"{name}: E[g g^T]")
    if name != "smooth_l1_beta0":  # (beta = 0: no curvature at all)
        assert bool((blocks.diagonal(dim1=1, dim2=2) > 0).any()), "a vacuous check"


def test_huber_cases_see_both_regions():
    """The data put residuals inside and outside the quadratic region (not a vacuous MSE)."""
    for name in ("huber", "smooth_l1_sum"):
        model, loss_fn, x, y = problem(V("mlp_tanh", name, 3))
        r = (model(x) - y).abs()
        t = getattr(loss_fn, "delta", getattr(loss_fn, "beta", None))
        assert bool((r < t).any()), name
        assert bool((r > t).any()), name


@pytest.mark.parametrize(("name", "t"), [("huber", 0.5), ("smooth_l1", 0.5), ("smooth_l1", 0.0)])
def test_kink_curvature_follows_autograd(name, t):
    """At ``|r| = t`` the curvature is 0, as torch's double backward gives (strict ``<``)."""
    loss_fn = nn.HuberLoss(delta=t) if name == "huber" else nn.SmoothL1Loss(beta=t)
    model = nn.Sequential(nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(_t((0.25, 0.25, 0.0)))
    x = torch.randn(2, 2, dtype=F64)
    y = _t([[0.25 - t, 0.1, 0.0], [0.25 + t, 0.25, 0.0]])  # residuals t, -t / inside / 0
    out = model(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(out, y), out, create_graph=True)
    auto = torch.stack(
        [torch.autograd.grad(grad.reshape(-1)[i], out, retain_graph=True)[0].reshape(-1)[i]
         for i in range(6)]
    ).reshape(2, 3) if grad.requires_grad else torch.zeros(2, 3, dtype=F64)  # fmt: skip
    spec = LossSpec.of(loss_fn)
    torch.testing.assert_close(spec.hess_diag(out, spec.evaluate(out.detach(), y)), auto)
    assert auto[0, 0] == 0
    assert auto[1, 0] == 0
    structured = get_estimator("exact", method="structured")(model, loss_fn, x, y)
    hvp = get_estimator("exact", method="hvp")(model, loss_fn, x, y)
    assert_close(structured, hvp, TOL["exact"])


# -------------------------------------------------------- deterministic estimators
EXACT_METHODS = {
    "factored": {"method": "structured", "representation": "factored"},
    "full": {"method": "structured", "representation": "full"},
    "hvp": {"method": "hvp"},
}


@pytest.mark.parametrize(("v", "params"), params_of(params=list(EXACT_METHODS)))
def test_exact_matches_reference(v, params):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("exact", **EXACT_METHODS[params])(model, loss_fn, x, y)
    assert list(got) == [n for n, _ in model.named_parameters()]
    assert_close(got, reference.hessian_diag(model, loss_fn, x, y), TOL["exact"])


@pytest.mark.parametrize(("v", "method"), params_of(method=["structured", "jacobian"]))
def test_ggn_exact_matches_reference(v, method):
    model, loss_fn, x, y = problem(v)
    got = get_estimator("ggn_exact", method=method)(model, loss_fn, x, y)
    assert_close(got, ggn_reference(model, loss_fn, x, y), TOL["exact"])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_kfac_exact_backward_equals_ggn_at_batch_one(loss):
    model, loss_fn, x, y = problem(V("mlp_elu", loss, 1))
    got = get_estimator("kfac", backward="exact")(model, loss_fn, x, y)
    assert_close(got, ggn_reference(model, loss_fn, x, y), TOL["exact"])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_hesscale_family_where_exact(loss):
    """One hidden layer: exact for element-wise losses (diagonal output Hessian), and the
    last layer for every loss; ``hesscale = hesscale_gn + bl89[output_curvature=zero]``."""
    model, loss_fn, x, y = problem(V("mlp1_tanh", loss, 3))
    h = reference.hessian_diag(model, loss_fn, x, y)
    g = ggn_reference(model, loss_fn, x, y)
    hs, gn = (get_estimator(n)(model, loss_fn, x, y) for n in ("hesscale", "hesscale_gn"))
    keys = list(h) if LOSSES[loss].elementwise else ["2.weight", "2.bias"]
    assert_close(hs, h, TOL["exact"], keys)
    assert_close(gn, g, TOL["exact"], keys)
    bl89 = get_estimator("bl89")(model, loss_fn, x, y)
    if LOSSES[loss].elementwise:  # the loss is element-wise already: BL89 is HesScale
        assert_close(bl89, hs, TOL["exact"])
    zero = get_estimator("bl89", output_curvature="zero")(model, loss_fn, x, y)
    assert_close(hs, {k: gn[k] + zero[k] for k in hs}, TOL["facts"])


@pytest.mark.parametrize("v", params_of())
def test_efisher_and_grad_sq_match_per_sample_gradients(v):
    model, loss_fn, x, y = problem(v)
    grads = reference.per_sample_grads(model, loss_fn, x, y)
    with torch.no_grad():
        out = model(x)
        c = float(loss_fn(out, y) / reference.per_sample_loss(loss_fn, out, y))  # L / sum_n l_n
    want = {k: c * sum(g[k].square() for g in grads) for k in grads[0]}
    for method in ("structured", "vmap"):
        assert_close(
            get_estimator("efisher", method=method)(model, loss_fn, x, y), want, TOL["exact"]
        )
    total = {k: c * sum(g[k] for g in grads) for k in grads[0]}
    got = get_estimator("grad_sq")(model, loss_fn, x, y)
    assert_close(got, {k: t.square() for k, t in total.items()}, TOL["exact"])


@pytest.mark.parametrize(("v", "method"), params_of(method=["structured", "autograd"]))
def test_hutchinson_and_adahessian_match_brute_force_probes(v, method):
    """The estimators' own probes applied to the brute-force Hessian."""
    model, loss_fn, x, y = problem(v)
    k = 2
    hut = get_estimator("hutchinson", num_samples=k, method=method)(
        model, loss_fn, x, y, generator=gen(5)
    )
    ada = get_estimator("adahessian", num_samples=k, spatial_averaging=False)(
        model, loss_fn, x, y, generator=gen(5)
    )
    f, theta0, unflatten = reference.flat_loss_fn(model, loss_fn, x, y)
    hess = reference.hessian(f)(theta0)
    g, plist = gen(5), list(model.parameters())
    zh = [
        z * (hess @ z)
        for z in (torch.cat([t.reshape(-1) for t in rademacher(plist, g)]) for _ in range(k))
    ]
    assert_close(hut, {n: t.clone() for n, t in unflatten(sum(zh) / k).items()}, TOL["exact"])
    mean_abs = sum(t.abs() for t in zh) / k
    assert_close(ada, {n: t.clone() for n, t in unflatten(mean_abs).items()}, TOL["exact"])  # fmt: skip


@pytest.mark.parametrize("loss", ["ce_weight_smooth", "nll_weight", "bce_weights_sum", "huber"])
@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_exact_when_budget_covers_all_parameters(loss, name):
    """``P = 43`` entries: ``xdiag`` with ``s = 44`` and ``diagpp`` with ``k = 43`` are exact."""
    _, loss_fn, x, y = problem(V("mlp_tanh", loss, 3))
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if LOSSES[loss].log_softmax:
        model.append(nn.LogSoftmax(dim=1))
    assert sum(p.numel() for p in model.parameters()) == 43
    est = get_estimator(name, num_matvecs=88 if name == "xdiag" else 129)
    got = est(model, loss_fn, x, y, generator=gen(0))
    assert_close(got, reference.hessian_diag(model, loss_fn, x, y), 1e-9)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize(
    "spec",
    [
        "hesscale",
        "ggn_exact",
        "kfac",
        "exact",
        "sophia_gnb",
        "sophia_gnb[method=autograd]",
        "efisher",
        "efisher[method=vmap]",
    ],
)
def test_gradient_and_loss_handed_back(loss, spec):
    """From the estimate's own pass (layer-by-layer and generic paths), for every loss."""
    model, loss_fn, x, y = problem(V("mlp_tanh", loss, 3))
    name, _, method = spec.rstrip("]").partition("[method=")
    est = get_estimator(name, **({"method": method} if method else {}))
    diag, grad, value = est.estimate_with_grad(model, loss_fn, x, y, generator=gen(0))
    assert_close(diag, est(model, loss_fn, x, y, generator=gen(0)), 0.0)
    params = dict(model.named_parameters())
    want = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
    assert_close(grad, dict(zip(params, want, strict=True)), TOL["exact"])
    torch.testing.assert_close(value, loss_fn(model(x), y).detach(), rtol=1e-13, atol=0)


# ------------------------------------------------------ Monte-Carlo estimators
@pytest.mark.parametrize("loss", list(LOSSES))
def test_mc_paths_draw_the_same_targets(loss):
    """ggn_mc and sophia_gnb: the layer-by-layer and autograd paths agree for equal seeds."""
    model, loss_fn, x, y = problem(V("mlp_tanh", loss, 3))
    for name, generic in (("ggn_mc", "jacobian"), ("sophia_gnb", "autograd")):
        a, b = (
            get_estimator(name, method=m)(model, loss_fn, x, y, generator=gen(3))
            for m in ("structured", generic)
        )
        assert_close(a, b, TOL["exact"])
    mc = get_estimator("kfac")(model, loss_fn, x, y, generator=gen(3))
    assert all(bool((t >= 0).all()) for t in mc.values())


@pytest.mark.parametrize("loss", ["ce_weight_smooth", "nll_weight", "huber"])
def test_ggn_mc_mean_of_runs_is_near_ggn_exact(loss):
    """A coarse check through the estimator (the rules' z-tests are at the output above)."""
    model, loss_fn, x, y = problem(V("mlp_tanh", loss, 2))
    target = get_estimator("ggn_exact")(model, loss_fn, x, y)
    est = get_estimator("ggn_mc", num_samples=4000)(model, loss_fn, x, y, generator=gen(9))
    for k in target:
        assert relerr(est[k], target[k]) < 0.15, (k, relerr(est[k], target[k]))


# ------------------------------------------------------------ binary outputs
class _Squeezed(nn.Module):
    """A binary classifier with outputs of shape ``(N,)`` (not an ``nn.Sequential``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


@pytest.mark.parametrize("shape", ["N1", "N"])
def test_binary_bce_outputs(shape):
    """``(N, 1)`` outputs on every path; ``(N,)`` outputs on the autograd paths."""
    torch.manual_seed(4)
    model = (
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)) if shape == "N1" else _Squeezed()
    ).double()
    x = torch.randn(5, 4, dtype=F64)
    y = torch.randint(0, 2, (5, 1) if shape == "N1" else (5,)).to(F64)
    loss_fn = nn.BCEWithLogitsLoss()
    h, g = reference.hessian_diag(model, loss_fn, x, y), reference.ggn_diag(model, loss_fn, x, y)
    assert_close(get_estimator("exact")(model, loss_fn, x, y), h, TOL["exact"])
    assert_close(get_estimator("ggn_exact")(model, loss_fn, x, y), g, TOL["exact"])
    if shape == "N1":  # one output: the HesScale recursion is exact too
        assert_close(get_estimator("hesscale")(model, loss_fn, x, y), h, TOL["exact"])
    for name in ("ggn_mc", "sophia_gnb", "efisher", "hutchinson"):
        d = get_estimator(name)(model, loss_fn, x, y, generator=gen(0))
        assert all(bool(torch.isfinite(t).all()) for t in d.values()), name  # fmt: skip


# ------------------------------------------------------------------ NLL
def test_nll_ggn_is_split_at_the_logits():
    """``NLLLoss`` is linear in the log-probabilities: a GGN split there would be 0."""
    model, loss_fn, x, y = problem(V("mlp_tanh", "nll_weight", 3))
    after = reference.ggn_diag(model, loss_fn, x, y)
    assert all(not t.any() for t in after.values())
    got = get_estimator("ggn_exact")(model, loss_fn, x, y)
    assert max(float(t.abs().max()) for t in got.values()) > 1e-3


def test_nll_strips_a_nested_log_softmax_and_leaves_the_model_alone():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1))
    ).double()  # fmt: skip
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 2, 1])
    before = [(type(m), m.training) for m in model.modules()]
    got = get_estimator("ggn_exact")(model, nn.NLLLoss(), x, y)
    assert list(got) == ["0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias"]
    assert [(type(m), m.training) for m in model.modules()] == before
    flat = nn.Sequential(*model[0], *model[1])  # the same layers, renamed 0..3
    want = ggn_reference(flat, nn.NLLLoss(), x, y)
    assert_close(dict(zip(want, got.values(), strict=True)), want, TOL["exact"])


def test_nll_optimizer_steps():
    """The optimizer's gradient-only steps use the loss on the full model (log-probabilities)."""
    model, loss_fn, x, y = problem(V("mlp_tanh", "nll_weight", 3))
    stepper = make_stepper("adahesscale", model, loss_fn, lr=1e-2, seed=0, update_every=2)
    for _ in range(2):
        with torch.no_grad():
            want = float(loss_fn(model(x), y))
        assert stepper.step(x, y) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------ refusals
def _mlp(*tail: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), *tail).double()


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _mlp(nn.LogSoftmax(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


REFUSED = {
    "nll_no_log_softmax": (_mlp, nn.NLLLoss, "the model ends with Linear("),
    "nll_log_softmax_dim0": (lambda: _mlp(nn.LogSoftmax(dim=0)), nn.NLLLoss, "ends with LogSoftmax(dim=0)"),
    "nll_not_sequential": (_Wrapped, nn.NLLLoss, "the model is a _Wrapped"),
    "ce_negative_weight": (_mlp, lambda: nn.CrossEntropyLoss(_t((1, -1, 1))), "CrossEntropyLoss(weight=...) needs finite, non-negative"),
    "nll_nan_weight": (lambda: _mlp(nn.LogSoftmax(1)), lambda: nn.NLLLoss(_t((1, float("nan"), 1))), "NLLLoss(weight=...)"),
    "bce_negative_pos_weight": (_mlp, lambda: nn.BCEWithLogitsLoss(pos_weight=_t((1, -2, 1))), "BCEWithLogitsLoss(pos_weight=...)"),
    "ce_smoothing_above_one": (_mlp, lambda: nn.CrossEntropyLoss(label_smoothing=1.5), "label_smoothing=1.5"),
    "smooth_l1_none": (_mlp, lambda: nn.SmoothL1Loss(reduction="none"), "SmoothL1Loss(reduction='none')"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("name", available_estimators())
def test_unsupported_losses_are_refused_in_one_line(case, name):
    make_model, make_loss, needle = REFUSED[case]
    model, loss_fn = make_model(), make_loss()
    est = get_estimator(name)
    x = torch.randn(3, 4, dtype=F64)
    y = (
        torch.tensor([0, 1, 2])
        if isinstance(loss_fn, (nn.NLLLoss, nn.CrossEntropyLoss))
        else torch.zeros(3, 3, dtype=F64)
    )
    for call in (
        lambda: est.check_supported(model, loss_fn),
        lambda: est(model, loss_fn, x, y, generator=gen(0)),
    ):
        with pytest.raises(UnsupportedError) as info:
            call()
        assert needle in str(info.value)
        assert "\n" not in str(info.value)  # fmt: skip


BAD_INPUTS = {
    "class_weights_length": (lambda: nn.CrossEntropyLoss(_t((1.0, 2.0))), "class", "class weights of shape (2,)"),
    "ignore_index_target": (lambda: nn.CrossEntropyLoss(ignore_index=1), "class", "ignore_index=1"),
    "weights_sum_to_zero": (lambda: nn.CrossEntropyLoss(_t((0.0, 0.0, 1.0))), "zeros", "sum to zero"),
    "bce_targets_outside": (nn.BCEWithLogitsLoss, "real", "must lie in [0, 1]"),
    "bce_integer_targets": (nn.BCEWithLogitsLoss, "class", "floating-point values"),
    "bce_weight_shape": (lambda: nn.BCEWithLogitsLoss(_t((1.0, 2.0))), "soft", "does not broadcast"),
    "huber_target_shape": (nn.HuberLoss, "class", "Huber targets must have the output's shape"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("name", ["exact", "ggn_mc", "hesscale", "hutchinson", "efisher"])
def test_targets_that_do_not_fit_are_input_errors(case, name):
    make_loss, kind, needle = BAD_INPUTS[case]
    y = {
        "class": torch.tensor([0, 1, 2]),
        "zeros": torch.tensor([0, 1, 0]),
        "real": torch.full((3, 3), 2.0, dtype=F64),
        "soft": torch.full((3, 3), 0.5, dtype=F64),
    }[kind]
    with pytest.raises(InputError) as info:
        get_estimator(name)(_mlp(), make_loss(), torch.randn(3, 4, dtype=F64), y, generator=gen(0))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", [n for n in available_estimators() if "." in n])
def test_peer_libraries_take_plain_losses_and_nll(name):
    """Peers refuse options they do not model; NLL after LogSoftmax is plain cross-entropy."""
    model, loss_fn, x, y = problem(V("mlp_tanh", "ce_weight", 1))
    with pytest.raises(UnsupportedError, match="without options") as info:
        get_estimator(name)(model, loss_fn, x, y, generator=gen(0))
    assert "\n" not in str(info.value)
    model, loss_fn, x, y = problem(V("mlp_tanh", "nll_sum", 1))
    a = get_estimator(name)(model, loss_fn, x, y, generator=gen(0))
    b = get_estimator(name)(
        model[:-1], nn.CrossEntropyLoss(reduction="sum"), x, y, generator=gen(0)
    )
    assert_close(a, b, TOL["exact"])
