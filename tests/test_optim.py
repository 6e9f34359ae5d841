"""The optimizer: gradient hand-back by estimators, DiagonalOptimizer and its presets."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import hessbench.estimators._factor_pass as factor_pass_module
import hessbench.estimators._sequential as seq
from hessbench.errors import ConfigError, DivergenceError
from hessbench.estimators import available_estimators, get_estimator
from hessbench.optim import DiagonalOptimizer, available_optimizers, make_stepper, preset


def _mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _cnn(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).to(dtype)


def _data(kind: str, dtype=torch.float64, n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, generator=g) if kind == "mlp" else torch.randn(n, 1, 5, 5, generator=g)
    return x.to(dtype), torch.randint(0, 3, (n,), generator=g)


# -- gradient hand-back ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", available_estimators())
def test_estimate_with_grad_returns_the_gradient(name, kind, dtype):
    model = (_mlp if kind == "mlp" else _cnn)(dtype)
    x, y = _data(kind, dtype)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    value = loss_fn(model(x), y)
    ref = torch.autograd.grad(value, params)
    est = get_estimator(name)
    rng = torch.get_rng_state()
    diag, grad, loss = est.estimate_with_grad(
        model, loss_fn, x, y, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in params)
    expected = est(model, loss_fn, x, y, generator=torch.Generator().manual_seed(3))
    names = [n for n, _ in model.named_parameters()]
    assert list(grad) == names
    assert list(diag) == names
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for n, r in zip(names, ref, strict=True):
        assert grad[n].dtype == dtype
        assert not grad[n].requires_grad
        torch.testing.assert_close(grad[n], r, rtol=tol, atol=tol)
        torch.testing.assert_close(diag[n], expected[n], rtol=0, atol=0)
    assert loss.dim() == 0
    assert not loss.requires_grad
    torch.testing.assert_close(loss, value.detach(), rtol=tol, atol=tol)


def test_estimate_with_grad_same_dropout_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    for name in ("hesscale", "ggn_mc"):  # one pass; estimate then an autograd gradient
        est = get_estimator(name)
        _, grad, _ = est.estimate_with_grad(
            model, nn.CrossEntropyLoss(), x, y, generator=torch.Generator().manual_seed(5)
        )
        _, grad_hs, _ = get_estimator("hesscale").estimate_with_grad(
            model, nn.CrossEntropyLoss(), x, y, generator=torch.Generator().manual_seed(5)
        )
        for k in grad:  # same masks: the same gradient whichever path computed it
            torch.testing.assert_close(grad[k], grad_hs[k], rtol=1e-12, atol=1e-12)


def test_one_pass_estimators_hand_back_the_gradient_in_their_pass(monkeypatch):
    calls = {"forward": 0, "autograd": 0}
    run_start = seq.run_start
    autograd_grad = torch.autograd.grad

    def counting_start(*args, **kwargs):
        calls["forward"] += 1
        return run_start(*args, **kwargs)

    def counting_grad(*args, **kwargs):
        calls["autograd"] += 1
        return autograd_grad(*args, **kwargs)

    monkeypatch.setattr(seq, "run_start", counting_start)
    monkeypatch.setattr(factor_pass_module, "run_start", counting_start)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    model = _mlp()
    x, y = _data("mlp")
    for name in ("hesscale", "hesscale_gn", "bl89", "sophia_gnb", "efisher"):
        calls.update(forward=0, autograd=0)
        get_estimator(name).estimate_with_grad(model, nn.CrossEntropyLoss(), x, y)
        assert calls == {"forward": 1, "autograd": 0}, name


# -- presets against hand-written references --------------------------------------------------


def _reference(name: str, model, loss_fn, xs, ys, lr, seed, **hp):
    """Plain tensor math from the formulas in docs/optim.md, on the estimator's output."""
    p = preset(name, **hp)
    est = get_estimator(p.estimator, **p.estimator_params)
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    b1, b2 = p.betas
    m = {n: torch.zeros_like(t) for n, t in params.items()}
    v = {n: torch.zeros_like(t) for n, t in params.items()}
    k = 0
    losses = []
    for t, (x, y) in enumerate(zip(xs, ys, strict=True), start=1):
        if (t - 1) % p.update_every == 0:
            diag, grad, loss = est.estimate_with_grad(model, loss_fn, x, y, generator=gen)
            k += 1
            for n in params:
                curv = diag[n] ** 2 if p.curvature == "square" else diag[n].abs()
                v[n] = b2 * v[n] + (1 - b2) * curv
        else:
            loss = loss_fn(model(x), y)
            grad = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        losses.append(float(loss.detach()))
        upd, dcurv = {}, {}
        for n in params:
            m[n] = b1 * m[n] + (1 - b1) * grad[n]
            mh = m[n] / (1 - b1**t) if p.bias_correction else m[n]
            vh = v[n] / (1 - b2**k) if p.bias_correction else v[n]
            dcurv[n] = torch.sqrt(vh) if p.curvature == "square" else vh
            den = dcurv[n] ** p.hessian_power
            if p.clip is None:
                upd[n] = lr * mh / (den + p.eps)
            else:
                upd[n] = lr * torch.clamp(
                    mh / torch.clamp(p.gamma * den, min=p.eps), -p.clip, p.clip
                )
        if p.step_scaling is not None:
            delta, max_scale = p.step_scaling
            quad = sum(float((dcurv[n] * upd[n] ** 2).sum()) for n in params)
            scale = min(max_scale, math.sqrt(2 * delta / quad))
            upd = {n: u * scale for n, u in upd.items()}
        with torch.no_grad():
            for n, t_ in params.items():
                t_.copy_(t_ - lr * p.weight_decay * t_ - upd[n])
    return losses


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("adahessian", {}),
        ("adahesscale", {"weight_decay": 0.01}),
        ("adahesscale_gn", {"hessian_power": 0.5}),
        ("adam_equiv", {}),
        ("sophia", {"update_every": 2}),
        ("adahesscale_scaled", {"step_scaling": (1e-4, 1.0)}),
        ("adahessian_scaled", {"step_scaling": (1e-5, 2.0)}),
    ],
)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_preset_matches_reference(name, hp, kind):
    make = _mlp if kind == "mlp" else _cnn
    model, ref_model = make(), make()
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = zip(*[_data(kind, n=4 + i) for i in range(5)], strict=True)
    lr = 0.05
    stepper = make_stepper(name, model, loss_fn, lr=lr, seed=7, **hp)
    got = [stepper.step(x, y) for x, y in zip(xs, ys, strict=True)]
    want = _reference(name, ref_model, loss_fn, xs, ys, lr, 7, **hp)
    assert got == pytest.approx(want, rel=1e-10)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if name.endswith("_scaled"):
        assert 0 < stepper.optimizer.last_step_scale <= hp["step_scaling"][1]


def test_step_scaling_bounds_the_quadratic_model():
    model = _mlp()
    x, y = _data("mlp")
    opt = DiagonalOptimizer(
        model, nn.CrossEntropyLoss(), estimator="hesscale", lr=1.0, step_scaling=(1e-6, 1.0)
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.step_batch(x, y)
    st = [opt.state[p] for p in model.parameters()]
    b2 = 0.999
    quad = sum(
        float(((s["exp_curv"] / (1 - b2)).sqrt() * (p.detach() - q) ** 2).sum())
        for s, p, q in zip(st, model.parameters(), before, strict=True)
    )
    assert opt.last_step_scale < 1.0  # lr = 1 is far too long a step here
    assert quad / 2 == pytest.approx(1e-6, rel=1e-9)  # the scaled step sits on the bound


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_equiv_is_adam(weight_decay):
    """Adam without weight decay; AdamW with (L2 decay would enter only the first moment)."""
    model = _mlp(torch.float32)
    ref = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    stepper = make_stepper("adam_equiv", model, loss_fn, lr=1e-2, weight_decay=weight_decay)
    cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    adam = cls(ref.parameters(), lr=1e-2, weight_decay=weight_decay)
    for i in range(6):
        x, y = _data("mlp", torch.float32, n=3 + i)
        stepper.step(x, y)
        adam.zero_grad()
        loss_fn(ref(x), y).backward()
        adam.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- guarantees ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_optimizers())
def test_global_rng_untouched(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = _data("mlp")
    stepper = make_stepper(name, model, nn.CrossEntropyLoss(), lr=1e-3, seed=0)
    state = torch.get_rng_state()
    for _ in range(3):
        stepper.step(x, y)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["adahesscale", "sophia", "adam", "sgd"])
def test_divergence_raises(name):
    model = _mlp(torch.float32)
    x, _ = _data("mlp", torch.float32)
    y = torch.randn(6, 3) * 1e3
    stepper = make_stepper(name, model, nn.MSELoss(), lr=1e30, seed=0)

    def run() -> None:
        for _ in range(50):
            stepper.step(x, y)

    with pytest.raises(DivergenceError, match="diverged at step") as info:
        run()
    assert info.value.step >= 1
    if name not in ("adam", "sgd"):  # the diagonal optimizer never applies a bad update
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip():
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data("mlp", n=4 + i) for i in range(6)]
    model = _mlp()
    opt = DiagonalOptimizer(model, loss_fn, estimator="sophia_gnb", update_every=2, seed=3)
    for x, y in batches[:3]:
        opt.step_batch(x, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    rest_a = [opt.step_batch(x, y) for x, y in batches[3:]]
    model_b = _mlp()
    model_b.load_state_dict(saved_model)
    opt_b = DiagonalOptimizer(model_b, loss_fn, estimator="sophia_gnb", update_every=2, seed=99)
    opt_b.load_state_dict(saved)
    rest_b = [opt_b.step_batch(x, y) for x, y in batches[3:]]
    assert rest_a == rest_b
    for a, b in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_the_optimizer():
    model = _mlp()
    x, y = _data("mlp")
    stepper = make_stepper("adahesscale", model, nn.CrossEntropyLoss(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(stepper.optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            stepper.step(x, y)
            sched.step()
    assert stepper.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_bad_names_and_overrides():
    model = _mlp()
    with pytest.raises(ConfigError, match=r"unknown optimizer 'nope'; available: .*adahesscale"):
        make_stepper("nope", model, nn.CrossEntropyLoss(), lr=1e-3)
    with pytest.raises(ConfigError, match="unknown hyper-parameter 'bogus'"):
        make_stepper("adahesscale", model, nn.CrossEntropyLoss(), lr=1e-3, bogus=1)
    with pytest.raises(ConfigError, match="betas"):
        make_stepper("sophia", model, nn.CrossEntropyLoss(), lr=1e-3, betas=(1.5, 0.9))
    with pytest.raises(ConfigError, match="lr"):
        make_stepper("adam", model, nn.CrossEntropyLoss(), lr=-1.0)
    with pytest.raises(ConfigError, match="unknown estimator"):
        make_stepper("adahesscale", model, nn.CrossEntropyLoss(), lr=1e-3, estimator="nope")
    with pytest.raises(ConfigError, match="step_batch"):
        DiagonalOptimizer(model, nn.CrossEntropyLoss(), estimator="hesscale").step()


def test_sophia_h_is_sophia_with_hutchinson_curvature():
    """Sophia-H: ``sophia``'s hyper-parameters with one Hutchinson probe every 10 steps."""
    sophia, sophia_h = preset("sophia"), preset("sophia_h")
    assert sophia_h.estimator == "hutchinson"
    assert sophia_h.estimator_params == {}
    for field in ("betas", "eps", "weight_decay", "update_every", "clip", "gamma"):
        assert getattr(sophia_h, field) == getattr(sophia, field), field
    assert (sophia.curvature, sophia_h.curvature) == ("abs", "signed")
    torch.manual_seed(0)
    model = _mlp(torch.float64)
    x, y = _data("mlp")
    stepper = make_stepper("sophia_h", model, nn.CrossEntropyLoss(), lr=1e-2, seed=0)
    losses = [float(stepper.step(x, y)) for _ in range(30)]
    assert losses[-1] < losses[0]
