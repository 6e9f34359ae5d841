"""Fidelity to the published methods: the authors' rules, each an option, against hand-written code.

The references below are transcriptions of the authors' algorithms written for these
tests (plain tensor code, the authors' variable names), not the authors' code.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from hessbench.estimators import get_estimator
from hessbench.optim import make_stepper, preset


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batches(n_steps: int, n: int = 6) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(n, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(n_steps)
    ]


# -- item 1: the HesScale authors' step-size scaling ---------------------------------------------


def _authors_scaled(model, loss_fn, batches, *, lr, estimator, variant, delta, max_scale=1.0):
    """The authors' AdaHesScale{AdamStyle,}Scaled.step, transcribed: exp_avg, exp_avg_sq, u."""
    est = get_estimator(estimator)
    params = dict(model.named_parameters())
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    scales = []
    for step, (x, y) in enumerate(batches, start=1):
        hess, grad, _ = est.estimate_with_grad(model, loss_fn, x, y)
        trust_region_term = 0.0
        u = {}
        for n in params:
            exp_avg[n] = beta1 * exp_avg[n] + (1 - beta1) * grad[n]
            h = hess[n] ** 2 if variant == "adamstyle" else hess[n].abs()
            exp_avg_sq[n] = beta2 * exp_avg_sq[n] + (1 - beta2) * h
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            if variant == "adamstyle":
                denom = exp_avg_sq[n].sqrt() / math.sqrt(bias_correction2) + eps
                raw = exp_avg_sq[n].sqrt()
            else:
                denom = exp_avg_sq[n] / bias_correction2 + eps
                raw = exp_avg_sq[n]
            u[n] = lr / bias_correction1 * exp_avg[n] / denom
            trust_region_term += float((raw * u[n] ** 2).sum())
        scaled_step_size = min(max_scale, math.sqrt(2 * delta / trust_region_term))
        scales.append(scaled_step_size)
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(scaled_step_size * u[n])
    return scales


@pytest.mark.parametrize(
    ("name", "estimator", "variant"),
    [
        ("authors_adahesscale_scaled", "hesscale", "abs"),
        ("authors_adahesscale_adamstyle_scaled", "hesscale", "adamstyle"),
        ("authors_adahesscalegn_scaled", "hesscale_gn", "abs"),
        ("authors_adahesscalegn_adamstyle_scaled", "hesscale_gn", "adamstyle"),
    ],
)
@pytest.mark.parametrize("delta", [1e-8, 1e-4])
def test_authors_scaled_presets_match_the_authors_rule(name, estimator, variant, delta):
    model, ref = _mlp(), _mlp()
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(6)
    stepper = make_stepper(name, model, loss_fn, lr=0.05, seed=0, step_scaling=(delta, 1.0))
    got = []
    for x, y in batches:
        stepper.step(x, y)
        got.append(stepper.optimizer.last_step_scale)
    want = _authors_scaled(
        ref, loss_fn, batches, lr=0.05, estimator=estimator, variant=variant, delta=delta
    )
    assert got == pytest.approx(want, rel=1e-10)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert preset(name).step_scaling == (1e-8, 1.0)  # the authors' RL runs


@pytest.mark.parametrize(("curvature", "power"), [("square", 0.25), ("abs", 0.5)])
def test_scale_bias_correction_is_the_whole_difference(curvature, power):
    """At step 1 the authors' factor is (1 - b2)^(-power) times hessbench's (5.6x, 31.6x)."""
    x, y = _batches(1)[0]
    scales = {}
    for bc in (True, False):
        stepper = make_stepper(
            "adahesscale_scaled",
            _mlp(),
            nn.CrossEntropyLoss(),
            lr=0.05,
            curvature=curvature,
            step_scaling=(1e-8, 1e6),
            scale_bias_correction=bc,
        )
        stepper.step(x, y)
        scales[bc] = stepper.optimizer.last_step_scale
    assert scales[False] / scales[True] == pytest.approx(0.001**-power, rel=1e-9)
    assert scales[True] < 1.0  # both factors are in force (not capped)


def test_existing_scaled_presets_keep_hessbench_rule():
    for name in ("adahesscale_scaled", "adahesscale_gn_scaled", "adahessian_scaled"):
        p = preset(name)
        assert p.scale_bias_correction is True
        assert p.step_scaling == (1e-4, 1.0)


# -- item 2: Sophia's training-script schedule ---------------------------------------------------


def _sophia_script(model, loss_fn, batches, *, lr, seed, k):
    """The official train_sophiag.py loop with SophiaG, transcribed (one micro-step)."""
    est = get_estimator("sophia_gnb")
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    beta1, beta2, rho, wd, grad_clip = 0.965, 0.99, 0.04, 0.1, 1.0
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    hessian = {n: torch.zeros_like(p) for n, p in params.items()}
    losses = []
    for iter_num, (x, y) in enumerate(batches):
        model.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        with torch.no_grad():
            for n, p in params.items():
                p.mul_(1 - lr * wd)
                exp_avg[n].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (exp_avg[n].abs() / (rho * hessian[n] + 1e-15)).clamp(None, 1)
                p.addcmul_(exp_avg[n].sign(), ratio, value=-lr)
        model.zero_grad()
        if iter_num % k == k - 1 and iter_num + 1 < len(batches):
            xn, yn = batches[iter_num + 1]  # the next batch, at the new parameters
            h = est(model, loss_fn, xn, yn, generator=gen)
            for n in params:
                hessian[n].mul_(beta2).add_(h[n], alpha=1 - beta2)
    return losses


@pytest.mark.parametrize("k", [1, 3])
def test_sophia_script_schedule_matches_the_training_loop(k):
    model, ref = _mlp(), _mlp()
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(8)
    stepper = make_stepper("sophia_script", model, loss_fn, lr=0.05, seed=3, update_every=k)
    got = [stepper.step(x, y) for x, y in batches]
    want = _sophia_script(ref, loss_fn, batches, lr=0.05, seed=3, k=k)
    assert got == pytest.approx(want, rel=1e-10)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_sophia_script_first_steps_are_sign_steps():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    stepper = make_stepper("sophia_script", model, nn.CrossEntropyLoss(), lr=0.01, weight_decay=0)
    stepper.step(*_batches(1)[0])
    for b, p in zip(before, model.parameters(), strict=True):
        moved = (b - p.detach()).abs()
        assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], 0.01))


def test_sophia_preset_keeps_the_paper_schedule():
    p = preset("sophia")
    assert p.schedule == "paper"
    assert p.grad_clip is None


def _sophia_h_paper(model, loss_fn, batches, *, lr, seed, k):
    """Sophia-H as the paper's Algorithm 3 states it, transcribed: the signed Hutchinson
    estimate averaged as it is, estimated on steps 1, 1 + k, ... before the step, and the
    clipped step ``lr * clip(m / max(gamma h, eps), 1)`` after decoupled weight decay."""
    est = get_estimator("hutchinson")
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    beta1, beta2, gamma, eps, wd = 0.965, 0.99, 0.04, 1e-15, 0.1
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    h = {n: torch.zeros_like(p) for n, p in params.items()}
    negative = 0
    for t, (x, y) in enumerate(batches, start=1):
        grads = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
        if t % k == 1 % k:
            h_hat = est(model, loss_fn, x, y, generator=gen)
            negative += sum(int((v < 0).sum()) for v in h_hat.values())
            for n in params:
                h[n] = beta2 * h[n] + (1 - beta2) * h_hat[n]
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads, strict=True):
                m[n] = beta1 * m[n] + (1 - beta1) * g
                p.mul_(1 - lr * wd)
                p.sub_(lr * (m[n] / torch.clamp(gamma * h[n], min=eps)).clamp(-1.0, 1.0))
    return negative


@pytest.mark.parametrize("k", [1, 3])
def test_sophia_h_matches_the_papers_algorithm_with_the_signed_estimate(k):
    model, ref = _mlp(), _mlp()
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(8)
    stepper = make_stepper("sophia_h", model, loss_fn, lr=0.05, seed=3, update_every=k)
    for x, y in batches:
        stepper.step(x, y)
    negative = _sophia_h_paper(ref, loss_fn, batches, lr=0.05, seed=3, k=k)
    assert negative > 0  # the signed estimate had negative entries: "abs" would differ
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_signed_curvature_needs_the_clipped_rule():
    from hessbench.errors import ConfigError

    for bad in ({"clip": None, "gamma": 1.0}, {"step_scaling": (1e-4, 1.0)}):
        with pytest.raises(ConfigError, match="curvature signed needs clip"):
            make_stepper("sophia_h", _mlp(), nn.CrossEntropyLoss(), lr=0.05, **bad)


# -- item 4: the diagonal rule below average pooling ---------------------------------------------


def _pool_net() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)
    ).double()


def _by_hand_pool_net(model, x, y, weight, bl89):
    """HesScale / BL89 on conv -> AvgPool2d(2) -> flatten -> linear -> CE, batch 1, by hand."""
    conv, lin = model[0], model[3]
    with torch.no_grad():
        p = torch.softmax(model(x), 1)[0]
        h_out = p - p**2  # exact output diagonal, c = 1
        if bl89:  # the target logit only
            h_out = torch.where(torch.arange(4) == y[0], h_out, 0.0)
        h_pool = ((lin.weight**2).T @ h_out).reshape(3, 2, 2)
        # each conv output position sits in one 2x2 window: weight 1/K or 1/K^2, K = 4
        h_conv = h_pool.repeat_interleave(2, 1).repeat_interleave(2, 2) * weight
        a2 = x[0] ** 2  # (2, 6, 6) -> conv weight (3, 2, 3, 3)
        hw = torch.zeros_like(conv.weight)
        for o in range(3):
            for c in range(2):
                for i in range(3):
                    for j in range(3):
                        hw[o, c, i, j] = (h_conv[o] * a2[c, i : i + 4, j : j + 4]).sum()
    return {"0.weight": hw, "0.bias": h_conv.sum((1, 2)), "3.bias": h_out}


@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn", "bl89"])
@pytest.mark.parametrize(("rule", "weight"), [("consistent", 1 / 16), ("authors", 1 / 4)])
def test_avgpool_rule_matches_the_hand_formula(name, rule, weight):
    model = _pool_net()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([2])
    got = get_estimator(name, avgpool=rule)(model, nn.CrossEntropyLoss(), x, y)
    want = _by_hand_pool_net(model, x, y, weight, bl89=name == "bl89")
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-10, atol=1e-14)


def test_avgpool_rule_is_restored_after_the_pass():
    from hessbench.estimators._rules_maps import AVGPOOL_RULE

    model = _pool_net()
    x, y = torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.tensor([0])
    get_estimator("hesscale", avgpool="authors")(model, nn.CrossEntropyLoss(), x, y)
    assert AVGPOOL_RULE.get() == "consistent"


def test_avgpool_option_leaves_published_labels_alone():
    assert get_estimator("hesscale").label == "hesscale"
    assert get_estimator("bl89", output_curvature="zero").label == "bl89[output_curvature=zero]"
    assert get_estimator("hesscale_gn", avgpool="authors").label == "hesscale_gn[avgpool=authors]"


# -- items 5 and 6: the papers' statistic with its interval; the per-cell table -----------------

_SUITE = """
name: fidtest
description: A tiny task for the fidelity tests.
defaults:
  seeds: [0, 1, 2]
  timeout_s: 120
  timing: {warmup: 0, min_repeats: 1, max_repeats: 1, min_time_s: 0.001}
tasks:
  - name: tiny
    model: {kind: mlp, widths: [3], activation: tanh}
    loss: {kind: cross_entropy}
    data: {kind: synthetic, input_shape: [2], num_classes: 3}
    eval: {batch_size: 1, num_batches: 2}
estimators:
  - name: exact
    params: {method: hvp, max_params: 5}
  - name: hesscale
  - name: zero
  - name: hutchinson
    params: {num_samples: [1, 4]}
"""


def _cells(rows: list[tuple[str, int, float]]):
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "task": "t",
                "estimator": label.split("[")[0],
                "label": label,
                "seed": seed,
                "status": "ok",
                "message": None,
                "l1": l1,
                "rel_l1": l1,
                "l1_over_hesscale": math.nan,
            }
            for label, seed, l1 in rows
        ]
    )


def test_paper_ratio_is_the_ratio_of_seed_means():
    from hessbench.report.tables import paper_ratios

    hs = [1.0, 2.0, 3.0, 10.0]
    other = [2.0, 2.0, 9.0, 10.0]
    df = _cells(
        [("hesscale", s, v) for s, v in enumerate(hs)]
        + [("zero", s, v) for s, v in enumerate(other)]
        + [("zero", 9, 100.0)]  # a seed without HesScale is left out of both means
    )
    est = paper_ratios(df)[("t", "zero")]
    assert est.value == pytest.approx(23 / 16)  # not the mean (1.708) nor median (1.5) of ratios
    assert est.n == 4
    assert est.low <= est.value <= est.high
    assert paper_ratios(df)[("t", "hesscale")].value == 1.0
    # the interval is the percentile bootstrap over seeds, fixed seed: by hand
    import numpy as np

    idx = np.random.default_rng(0).integers(0, 4, size=(2000, 4))
    e, r = np.array(other), np.array(hs)
    stats = e[idx].mean(1) / r[idx].mean(1)
    assert (est.low, est.high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])))


def test_paired_difference_and_overlap():
    import numpy as np

    from hessbench.report.stats import mean_ci, paired_diff_ci

    a = np.array([1.0, 1.1, 0.9, 1.05, 0.95])
    d = paired_diff_ci(a + 0.5, a)  # every seed differs by exactly 0.5
    assert d.value == pytest.approx(0.5)
    assert (d.low, d.high) == pytest.approx((0.5, 0.5))
    assert d.excludes(0.0)
    assert mean_ci(a).overlaps(mean_ci(a + 0.01))
    assert not mean_ci(a).overlaps(mean_ci(a + 10))


@pytest.fixture(scope="module")
def fid_run(tmp_path_factory):
    from hessbench.run.runner import RunOptions, run_suite

    tmp = tmp_path_factory.mktemp("fid")
    (tmp / "fidtest.yaml").write_text(_SUITE)
    run_suite(tmp / "fidtest.yaml", RunOptions(output=tmp / "run"))
    return tmp


def test_report_from_results_csv_equals_report_from_run(fid_run):
    from typer.testing import CliRunner

    from hessbench.cli import app

    runner = CliRunner()
    a, b, c = fid_run / "ra", fid_run / "rb", fid_run / "rc"
    assert runner.invoke(app, ["report", str(fid_run / "run"), "-o", str(a)]).exit_code == 0
    res = runner.invoke(app, ["report", str(a), "-o", str(b)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(a / "results.csv"), "-o", str(c)])
    assert res.exit_code == 0, res.output
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert "results.csv" in files
    assert "results_parts.csv" in files
    for other in (b, c):
        assert files == sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file())
        for name in files:
            x, y = (a / name).read_bytes(), (other / name).read_bytes()
            if name in ("report.md", "index.html"):  # the command line names its input
                x, y = (re.sub(rb"Made by .*?\. ", b"", v) for v in (x, y))
            assert x == y, name
    table = (a / "tables" / "accuracy.md").read_text()
    assert "L1 / HesScale (paper)" in table
    assert "same seed" in table


# -- item 8: claims the data can carry ------------------------------------------------------------


def test_compare_to_reference_words_the_verdict_by_the_interval():
    from hessbench.report.stats import compare_to_reference

    ref = {s: 1.0 + 0.01 * s for s in range(6)}
    values = {
        "adam": ref,
        "fast": {s: v - 0.5 for s, v in ref.items()},  # lower loss on every seed
        "noisy": {s: v + (0.3 if s % 2 else -0.3) for s, v in ref.items()},
        "alone": {99: 1.0},  # no seed in common
    }
    out = compare_to_reference(values, "adam", higher_is_better=False)
    assert out["adam"][2] == "reference"
    assert out["fast"][2] == "better"
    assert out["fast"][1].value == pytest.approx(-0.5)
    assert out["noisy"][2] == "no difference detected"
    assert out["alone"][1] is None
    higher = compare_to_reference(values, "adam", higher_is_better=True)
    assert higher["fast"][2] == "worse"
