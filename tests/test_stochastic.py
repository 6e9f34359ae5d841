"""Monte-Carlo estimators converge to their documented expectations.

Every check is a z-test: ``|estimate - target| <= Z * std + atol`` per entry, where
``std`` is the standard deviation of the estimate *at its sample count*, derived in
the test (from the full Hessian, from per-sample Jacobians, or from independent
single-sample runs), so the tolerance shrinks like ``1/sqrt(k)``. ``Z = 5``: for an
(approximately) Gaussian error one entry exceeds it with probability 6e-7; all seeds
are fixed, so the tests are deterministic.

Targets come from hessbench's deterministic estimators ``exact`` and ``ggn_exact``
(themselves cross-checked here against ``torch.func`` on the tiny nets).

Two tiers: the default sample counts keep each test around a second; the
``heavy`` tier (``-m heavy``) uses 10-50x more samples and so a 3-7x tighter band.
Deselect it with ``-m "not heavy"``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from hessbench.estimators import get_estimator

Z = 5.0
DT = torch.float64

LIGHT = "light"
HEAVY = "heavy"
TIERS = [pytest.param(LIGHT, id=LIGHT), pytest.param(HEAVY, id=HEAVY, marks=pytest.mark.heavy)]

# samples per tier
# (cross-entropy HVPs cost ~10x MSE ones here: torch's double backward of cross_entropy)
SAMPLES = {
    "hutchinson": {LIGHT: 200, HEAVY: 10_000},
    "hutchinson_runs": {LIGHT: 100, HEAVY: 2_000},  # independent single-sample runs
    "ggn_mc": {LIGHT: 4_000, HEAVY: 200_000},
    "ggn_mc_runs": {LIGHT: 200, HEAVY: 2_000},
    "sophia": {LIGHT: 200, HEAVY: 5_000},
    "kfac": {LIGHT: 4_000, HEAVY: 200_000},
    "kfac_runs": {LIGHT: 200, HEAVY: 2_000},
}


# ------------------------------------------------------------------ problem


class Problem:
    """A tiny float64 net with everything the variance formulas need."""

    def __init__(self, loss: str, batch: int = 2, seed: int = 0):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
            # larger weights: a curved, non-trivial Hessian
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(2.0)
            self.x = torch.randn(batch, 3, dtype=DT)
            if loss == "ce":
                self.y = torch.randint(0, 3, (batch,))
                self.loss_fn: nn.Module = nn.CrossEntropyLoss()
            elif loss == "bce":  # multi-label: 3 independent 0/1 labels
                self.y = torch.randint(0, 2, (batch, 3)).to(DT)
                self.loss_fn = nn.BCEWithLogitsLoss()
            else:
                self.y = torch.randn(batch, 3, dtype=DT)
                self.loss_fn = nn.MSELoss()
        self.kind = loss
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        theta = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        self.theta = theta

        def unflat(t: Tensor) -> dict[str, Tensor]:
            out, i = {}, 0
            for n, s in zip(self.names, self.shapes, strict=True):
                k = math.prod(s)
                out[n] = t[i : i + k].view(s)
                i += k
            return out

        def total_loss(t: Tensor) -> Tensor:
            return self.loss_fn(functional_call(self.model, unflat(t), (self.x,)), self.y)

        def single_out(t: Tensor, xn: Tensor) -> Tensor:
            return functional_call(self.model, unflat(t), (xn.unsqueeze(0),)).squeeze(0)

        self.H = jacrev(jacrev(total_loss))(theta)  # (P, P); reverse-over-reverse
        self.J = vmap(jacrev(single_out), in_dims=(None, 0))(theta, self.x)  # (N, C, P)
        with torch.no_grad():
            self.out = self.model(self.x)
        n, c_out = self.out.shape
        self.c = 1.0 / n if loss == "ce" else 1.0 / (n * c_out)
        # the predictive probabilities: softmax (ce), sigmoid per output (bce)
        self.p = {"ce": torch.softmax(self.out, 1), "bce": torch.sigmoid(self.out)}.get(loss)

    def flat(self, d: dict[str, Tensor]) -> Tensor:
        assert list(d) == self.names
        return torch.cat([d[n].flatten() for n in self.names])

    def run(self, name: str, seed: int = 0, **params) -> Tensor:
        est = get_estimator(name, **params)
        g = torch.Generator().manual_seed(seed)
        return self.flat(est(self.model, self.loss_fn, self.x, self.y, generator=g))


_PROBLEMS: dict[str, Problem] = {}


@pytest.fixture(params=["ce", "mse", "bce"])
def prob(request) -> Problem:
    if request.param not in _PROBLEMS:
        _PROBLEMS[request.param] = Problem(request.param)
    return _PROBLEMS[request.param]


def assert_within(est: Tensor, target: Tensor, std: Tensor, what: str, atol: float = 0.0):
    """``|est - target| <= Z std + atol`` entry-wise, with a readable failure."""
    scale = float(target.abs().max())
    atol = atol + 1e-12 * (1.0 + scale)
    err = (est - target).abs()
    bound = Z * std + atol
    bad = err > bound
    if bool(bad.any()):
        i = int(((err - bound) / (std + 1e-300)).argmax())
        pytest.fail(
            f"{what}: {int(bad.sum())}/{err.numel()} entries outside {Z} sigma; worst entry "
            f"{i}: estimate {float(est[i]):.6g}, target {float(target[i]):.6g}, "
            f"std {float(std[i]):.3g}"
        )


def assert_discriminative(target: Tensor, std: Tensor, what: str):
    """The band is narrow enough that the all-zero estimate would fail it somewhere."""
    assert bool((target.abs() > Z * std + 1e-12).any()), f"{what}: the band is too wide to test"


# ----------------------------------------------------------- the references


def test_reference_targets_match_torch_func(prob):
    """The targets used below (exact, ggn_exact) agree with brute force on these nets."""
    h = prob.run("exact")
    torch.testing.assert_close(h, prob.H.diagonal(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        prob.run("ggn_exact"), ggn_from_jacobians(prob), rtol=1e-10, atol=1e-13
    )
    # the net is curved enough that GGN and Hessian differ, and off-diagonals matter
    assert not torch.allclose(h, ggn_from_jacobians(prob), rtol=1e-3, atol=0)
    assert float(off_diag_var(prob).min()) > 0


def ggn_from_jacobians(prob: Problem) -> Tensor:
    """``c sum_n diag(J_n^T (d2l/dz2) J_n)`` from the per-sample Jacobians."""
    J = prob.J
    if prob.kind == "mse":
        return 2.0 * prob.c * J.square().sum((0, 1))
    if prob.kind == "bce":
        return prob.c * torch.einsum("nap,na,nap->p", J, prob.p * (1 - prob.p), J)
    p = prob.p
    hz = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, C, C)
    return prob.c * torch.einsum("nap,nab,nbp->p", J, hz, J)


# ----------------------------------------------------------------- Hutchinson


def off_diag_var(prob: Problem) -> Tensor:
    """Variance of one Rademacher sample ``z_i (Hz)_i``: ``sum_{j != i} H_ij^2``."""
    H = prob.H
    return H.square().sum(1) - H.diagonal().square()


@pytest.mark.parametrize("tier", TIERS)
def test_hutchinson_converges_to_exact_diagonal(prob, tier):
    k = SAMPLES["hutchinson"][tier]
    h = prob.run("exact")
    std = (off_diag_var(prob) / k).sqrt()
    est = prob.run("hutchinson", seed=11, num_samples=k)
    assert_within(est, h, std, f"hutchinson[num_samples={k}]")
    assert_discriminative(h, std, "hutchinson")


def test_hutchinson_single_sample_is_noisy_but_exact_in_expectation(prob):
    """One sample is not the diagonal (the test above is not trivially satisfied) ..."""
    h = prob.run("exact")
    var = off_diag_var(prob)
    one = [prob.run("hutchinson", seed=s) for s in range(8)]
    for e in one:
        assert float((e - h).abs().max()) > 1e-3 * float(h.abs().max())
    # ... and each draw lies in the support: |z_i (Hz)_i - H_ii| <= sum_{j != i} |H_ij|
    bound = prob.H.abs().sum(1) - prob.H.diagonal().abs()
    for e in one:
        assert bool(((e - h).abs() <= bound + 1e-12).all())
    assert float(var.min()) > 0


@pytest.mark.parametrize("tier", TIERS)
def test_hutchinson_mean_of_seeds(prob, tier):
    """Averaging independent single-sample runs (different seeds) converges as well."""
    m = SAMPLES["hutchinson_runs"][tier]
    h = prob.run("exact")
    mean = torch.stack([prob.run("hutchinson", seed=1000 + s) for s in range(m)]).mean(0)
    assert_within(mean, h, (off_diag_var(prob) / m).sqrt(), f"mean of {m} hutchinson draws")


# -------------------------------------------------------------------- GGN-MC


def ggn_mc_moments(prob: Problem) -> tuple[Tensor, Tensor]:
    """Mean and variance of one GGN-MC draw (``num_samples=1``), per entry.

    Per data point ``n`` the draw is ``c (J_n^T r)^2``, ``r`` the output gradient
    of the per-sample loss at a label sampled from the model, independent over n.
    Cross-entropy: ``r = p_n - e_y``, ``y ~ Cat(p_n)``; binary cross-entropy:
    ``r = s_n - y``, ``y ~ Bernoulli(s_n)`` per output; moments by enumeration.
    MSE: ``r = -sqrt(2) eps``, so ``(J_n^T r)_i ~ N(0, s^2)``, ``s^2 = 2 sum_o J_noi^2``:
    a scaled chi-square with mean ``c s^2`` and variance ``2 c^2 s^4``.
    """
    J, c = prob.J, prob.c
    if prob.kind == "mse":
        s2 = 2.0 * J.square().sum(1)  # (N, P)
        return (c * s2).sum(0), (2.0 * (c * s2).square()).sum(0)
    n = J.shape[0]
    mean = torch.zeros(J.shape[2], dtype=DT)
    var = torch.zeros_like(mean)
    for i in range(n):
        probs, residuals = outcomes(prob, i)
        vals = torch.stack([c * (J[i].T @ r).square() for r in residuals])  # (outcomes, P)
        w = probs.unsqueeze(1)
        m1 = (w * vals).sum(0)
        mean += m1
        var += (w * vals.square()).sum(0) - m1.square()
    return mean, var


def outcomes(prob: Problem, i: int) -> tuple[Tensor, list[Tensor]]:
    """Every label draw for sample ``i``: its probability and the residual ``r``."""
    C = prob.p.shape[1]
    if prob.kind == "ce":
        return prob.p[i], [prob.p[i] - torch.eye(C, dtype=DT)[y] for y in range(C)]
    s = prob.p[i]
    draws = [torch.tensor(bits, dtype=DT) for bits in itertools.product((0, 1), repeat=C)]
    probs = torch.stack([torch.where(d > 0, s, 1 - s).prod() for d in draws])
    return probs, [s - d for d in draws]


def test_ggn_mc_moments_are_consistent(prob):
    mean, var = ggn_mc_moments(prob)
    torch.testing.assert_close(mean, prob.run("ggn_exact"), rtol=1e-10, atol=1e-14)
    assert float(var.min()) > 0


@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("tier", TIERS)
def test_ggn_mc_converges_to_ggn_exact(prob, tier, method):
    k = SAMPLES["ggn_mc"][tier]
    target = prob.run("ggn_exact")
    _, var = ggn_mc_moments(prob)
    std = (var / k).sqrt()
    est = prob.run("ggn_mc", seed=5, num_samples=k, method=method)
    assert_within(est, target, std, f"ggn_mc[num_samples={k}, method={method}]")
    assert_discriminative(target, std, "ggn_mc")


@pytest.mark.parametrize("tier", TIERS)
def test_ggn_mc_single_draws(prob, tier):
    """Independent single-sample runs: their mean converges, their spread matches theory."""
    m = SAMPLES["ggn_mc_runs"][tier]
    target = prob.run("ggn_exact")
    _, var = ggn_mc_moments(prob)
    draws = torch.stack([prob.run("ggn_mc", seed=100 + s) for s in range(m)])
    assert_within(draws.mean(0), target, (var / m).sqrt(), f"mean of {m} ggn_mc draws")
    # the empirical variance has the derived size (summed over entries: a loose check
    # that the draws are as noisy as one sample of GGN-MC should be, no more, no less)
    ratio = float(draws.var(0).sum() / var.sum())
    assert 0.5 < ratio < 2.0, ratio


@pytest.mark.parametrize("num_samples", [1, 7])
def test_ggn_mc_methods_draw_the_same_labels(prob, num_samples):
    a = prob.run("ggn_mc", seed=3, num_samples=num_samples, method="structured")
    b = prob.run("ggn_mc", seed=3, num_samples=num_samples, method="jacobian")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_ggn_mc_is_nonnegative(prob):
    for s in range(5):
        assert bool((prob.run("ggn_mc", seed=s) >= 0).all())


# ---------------------------------------------------------------- Sophia GNB


def sophia_moments(prob: Problem) -> tuple[Tensor, Tensor]:
    """Mean and variance of one Sophia-GNB draw ``(grad L_hat)^2 / c``.

    ``grad L_hat = c sum_n J_n^T r_n`` with ``r_n`` as for GGN-MC; the samples do not
    separate, so for (binary) cross-entropy every label combination is enumerated; for MSE
    ``grad L_hat`` is Gaussian with variance ``2 c^2 sum_n sum_o J_noi^2``.
    """
    J, c = prob.J, prob.c
    if prob.kind == "mse":
        m = 2.0 * c * J.square().sum((0, 1))
        return m, 2.0 * m.square()
    n, _, P = J.shape
    per = [outcomes(prob, i) for i in range(n)]
    mean = torch.zeros(P, dtype=DT)
    second = torch.zeros(P, dtype=DT)
    for labels in itertools.product(*(range(len(pr)) for pr, _ in per)):
        w = math.prod(float(per[i][0][y]) for i, y in enumerate(labels))
        g = c * sum(J[i].T @ per[i][1][y] for i, y in enumerate(labels))
        v = g.square() / c
        mean += w * v
        second += w * v.square()
    return mean, second - mean.square()


def test_sophia_expectation_is_the_ggn_diagonal(prob):
    """The documented expectation, computed exactly by enumeration / Gaussian moments."""
    mean, var = sophia_moments(prob)
    torch.testing.assert_close(mean, prob.run("ggn_exact"), rtol=1e-10, atol=1e-14)
    assert float(var.min()) > 0


@pytest.mark.parametrize("tier", TIERS)
def test_sophia_gnb_converges_to_ggn_exact(prob, tier):
    m = SAMPLES["sophia"][tier]
    target = prob.run("ggn_exact")
    _, var = sophia_moments(prob)
    draws = torch.stack([prob.run("sophia_gnb", seed=200 + s) for s in range(m)])
    std = (var / m).sqrt()
    assert_within(draws.mean(0), target, std, f"mean of {m} sophia_gnb draws")
    assert_discriminative(target, std, "sophia_gnb")
    ratio = float(draws.var(0).sum() / var.sum())
    assert 0.5 < ratio < 2.0, ratio


def test_sophia_gnb_single_draws_are_nonnegative_and_differ(prob):
    draws = [prob.run("sophia_gnb", seed=s) for s in range(6)]
    assert all(bool((d >= 0).all()) for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 1


# --------------------------------------------------------------------- K-FAC


@pytest.mark.parametrize("tier", TIERS)
def test_kfac_mc_converges_to_kfac_exact(prob, tier):
    """``kfac[backward=mc]`` is unbiased for ``kfac[backward=exact]`` (linear in ``G``).

    The per-entry variance of one sample is estimated from ``M`` independent
    single-sample runs; the band is widened by ``1 + 3 sqrt(2/M)`` for the
    uncertainty of that estimate.
    """
    k = SAMPLES["kfac"][tier]
    m = SAMPLES["kfac_runs"][tier]
    target = prob.run("kfac", backward="exact")
    draws = torch.stack([prob.run("kfac", seed=300 + s, num_samples=1) for s in range(m)])
    var = draws.var(0)
    widen = 1.0 + 3.0 * math.sqrt(2.0 / m)
    assert_within(draws.mean(0), target, widen * (var / m).sqrt(), f"mean of {m} kfac draws")
    est = prob.run("kfac", seed=7, num_samples=k)
    std = widen * (var / k).sqrt()
    assert_within(est, target, std, f"kfac[num_samples={k}]")
    assert_discriminative(target, std, "kfac")


def test_kfac_mc_samples_average(prob):
    """More samples, smaller spread: the error over seeds shrinks roughly like 1/sqrt(k)."""
    target = prob.run("kfac", backward="exact")

    def rms(k: int) -> float:
        errs = torch.stack(
            [prob.run("kfac", seed=500 + s, num_samples=k) - target for s in range(40)]
        )
        return float(errs.square().mean().sqrt())

    r1, r16 = rms(1), rms(16)
    # expected ratio 4; 40 seeds give about 11% relative error on each rms
    assert 2.5 < r1 / r16 < 6.0, (r1, r16)


# ---------------------------------------------------------------- AdaHessian


def _conv_problem(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 3),
        ).to(DT)
        x = torch.randn(2, 2, 4, 4, dtype=DT)
        y = torch.tensor([0, 2])
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adahessian_is_abs_hutchinson_on_mlp(prob, seed):
    """Same generator seed, same probe ``z``: one sample of AdaHessian is ``|z o Hz|``."""
    a = prob.run("adahessian", seed=seed)
    h = prob.run("hutchinson", seed=seed)
    torch.testing.assert_close(a, h.abs(), rtol=1e-14, atol=0)
    assert bool((h < 0).any()), "no negative entry: the check would not see a missing abs"


def test_adahessian_many_samples_dominates_abs_hutchinson(prob):
    """``mean |z o Hz| >= |mean z o Hz|`` with the same probes (triangle inequality)."""
    a = prob.run("adahessian", seed=4, num_samples=9)
    h = prob.run("hutchinson", seed=4, num_samples=9)
    assert bool((a >= h.abs() - 1e-12).all())
    assert bool((a > h.abs() + 1e-9).any()), "the averaging of absolute values is not visible"


def test_adahessian_conv_spatial_averaging():
    model, loss_fn, x, y = _conv_problem()

    def run(name, **params):
        g = torch.Generator().manual_seed(8)
        return get_estimator(name, **params)(model, loss_fn, x, y, generator=g)

    avg = run("adahessian")
    raw = run("adahessian", spatial_averaging=False)
    hut = run("hutchinson")
    w = avg["0.weight"]
    assert w.shape == model[0].weight.shape
    # constant over the kernel's spatial dimensions ...
    assert torch.equal(w, w[:, :, :1, :1].expand_as(w))
    # ... and equal to the spatial mean of |z o Hz| (same probes)
    torch.testing.assert_close(
        w, hut["0.weight"].abs().mean((2, 3), keepdim=True).expand_as(w), rtol=1e-12, atol=0
    )
    assert not torch.equal(raw["0.weight"], raw["0.weight"][:, :, :1, :1].expand_as(w))
    for n in avg:
        assert torch.equal(raw[n], hut[n].abs()), n
        if n != "0.weight":
            assert torch.equal(avg[n], raw[n]), n


# ------------------------------------------------------------ the Rademacher draw
def _rademacher_by_bits(sizes: list[int], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """The published draw: bit ``j`` of 32-bit word ``w`` gives entry ``32 w + j``."""
    total = sum(sizes)
    words = torch.randint(0, 2**32, ((total + 31) // 32, 1), generator=gen)
    bits = (words >> torch.arange(32)) & 1
    return bits.view(-1)[:total].to(dtype).mul_(2).sub_(1)


@pytest.mark.parametrize("sizes", [[1], [5, 3], [31, 1], [32], [64, 33, 7], [1000, 4099]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_signs_are_the_bits_of_the_words(sizes, dtype):
    """Same signs for the same generator state (published Hutchinson numbers depend on it)."""
    from hessbench.estimators._autograd import rademacher

    params = [torch.zeros(n, dtype=dtype) for n in sizes]
    g1, g2 = torch.Generator().manual_seed(12), torch.Generator().manual_seed(12)
    got = rademacher(params, g1)
    assert [t.shape for t in got] == [p.shape for p in params]
    assert all(t.dtype == dtype for t in got)
    assert torch.equal(torch.cat(got), _rademacher_by_bits(sizes, g2, dtype))
    assert torch.equal(g1.get_state(), g2.get_state())  # the same amount drawn


def test_probe_pieces_take_each_parameters_shape_in_order():
    """Multi-dimensional, transposed (non-contiguous) and 0-dim parameters: contiguous pieces."""
    from hessbench.estimators._autograd import gaussian, rademacher

    params = [torch.zeros(3, 4), torch.zeros(5, 2).t(), torch.zeros(()), torch.zeros(2, 1, 3)]
    sizes = [p.numel() for p in params]
    for draw in (rademacher, gaussian):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        got = draw(params, g1)
        flat = torch.cat([t.reshape(-1) for t in draw([torch.zeros(sum(sizes))], g2)])
        assert [t.shape for t in got] == [p.shape for p in params]
        assert all(t.is_contiguous() for t in got)
        for t, want in zip(got, flat.split(sizes), strict=True):
            assert torch.equal(t.reshape(-1), want)
