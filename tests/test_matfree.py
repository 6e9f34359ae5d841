"""Matrix-free estimators (``hutchinson`` with its options, ``xdiag``, ``diagpp``).

Two levels: the algorithms as pure functions of ``matmat`` on explicit symmetric
matrices, and the estimators on tiny float64 nets against the brute-force Hessian
of ``tests/reference.py``.

Tolerances (``Z = 5`` standard deviations, fixed seeds, deterministic):

- ``hutchinson``: one draw's variance is ``sum_{j != i} H_ij^2`` (Rademacher) and
  ``sum_{j != i} H_ij^2 + 2 H_ii^2`` (Gaussian), so the mean of ``k`` draws has
  ``std = sqrt(var / k)``.
- ``xdiag``: each of its ``s`` terms ``diag(Q_i Q_i^T H) + w_i o (I - Q_i Q_i^T) H w_i``
  is unbiased with variance ``E_Q[sum_{j != i} M_ij^2]``, ``M = (I - Q_i Q_i^T) H``,
  at most ``|| e_i^T (I - Q_i Q_i^T) H ||^2 <= ||H||_2^2``; the terms are dependent,
  so one run's std is at most ``||H||_2`` (triangle inequality) and the mean of ``R``
  independent runs has ``std <= ||H||_2 / sqrt(R)``.
- ``diagpp``: given ``Q`` the low-rank part is exact and the Hutchinson part on
  ``B = (I - P) H (I - P)`` has variance ``sum_{j != i} B_ij^2 / h <= ||H||_2^2 / h``
  (``||B e_i|| <= ||H||_2``), so ``R`` runs give ``std <= ||H||_2 / sqrt(R h)``.

Each such check also asserts that its band is narrow enough for the all-zero
estimate to fail it somewhere.
"""

from __future__ import annotations

import pytest
import reference
import torch
from torch import Tensor, nn

from hessbench.errors import ConfigError
from hessbench.estimators import get_estimator
from hessbench.estimators._matfree import rademacher_matrix, range_basis
from hessbench.estimators.diagpp import diagpp, diagpp_split
from hessbench.estimators.xdiag import xdiag, xdiag_from_probes

F64 = torch.float64
Z = 5.0
CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sym(n: int, rank: int | None = None, seed: int = 0) -> Tensor:
    """A symmetric indefinite ``n x n`` matrix (of rank ``rank`` if given) with a strong diagonal."""
    g = gen(seed)
    if rank is None:
        b = torch.randn(n, n, dtype=F64, generator=g)
        return (b + b.T) / 2 + torch.diag(torch.linspace(-4, 6, n, dtype=F64))
    b = torch.randn(n, rank, dtype=F64, generator=g)
    signs = torch.tensor([(-1.0) ** k for k in range(rank)], dtype=F64)
    return (b * signs) @ b.T


def within(est: Tensor, target: Tensor, std: Tensor | float, what: str) -> None:
    std = torch.as_tensor(std, dtype=F64).expand_as(target)
    err = (est - target).abs()
    bound = Z * std + 1e-12 * (1 + float(target.abs().max()))
    assert bool((err <= bound).all()), f"{what}: max excess {float((err - bound).max()):.3g}"
    assert bool((target.abs() > Z * std).any()), f"{what}: band too wide to test"


# ------------------------------------------------------------ explicit matrices


def test_rademacher_matrix_columns_are_hutchinsons_probes():
    from hessbench.estimators._autograd import rademacher

    params = [torch.empty(3, 2, dtype=F64), torch.empty(4, dtype=F64)]
    g1, g2 = gen(7), gen(7)
    omega = rademacher_matrix(10, 3, g1, F64, CPU)
    for j in range(3):
        z = torch.cat([t.reshape(-1) for t in rademacher(params, g2)])
        assert torch.equal(omega[:, j], z)


def test_range_basis_rank_and_orthonormality():
    a = sym(12, rank=3)
    q, _, full = range_basis(a @ torch.randn(12, 5, dtype=F64, generator=gen(1)))
    assert not full
    assert q.shape == (12, 3)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=F64))
    torch.testing.assert_close(q @ (q.T @ a), a)
    q, r, full = range_basis(torch.randn(12, 5, dtype=F64, generator=gen(2)))
    assert full
    assert q.shape == (12, 5)
    assert r.shape == (5, 5)


@pytest.mark.parametrize(
    ("n", "rank", "m"), [(20, 2, 6), (20, 5, 12), (8, None, 18), (8, None, 40)]
)
def test_xdiag_exact_when_rank_below_test_vectors(n, rank, m):
    """``rank H < s = m/2`` (including ``s > n``): every leave-one-out basis spans ``range H``."""
    a = sym(n, rank)
    for seed in range(3):
        est = xdiag(lambda v, a=a: a @ v, n, m, gen(seed))
        torch.testing.assert_close(est, a.diagonal(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("n", "rank"), [(20, 6), (6, None)])
def test_xdiag_not_exact_when_rank_reaches_test_vectors(n, rank):
    """``s = rank H`` (``s = n`` for a full-rank matrix): leave-one-out misses a direction."""
    a = sym(n, rank)
    est = xdiag(lambda v: a @ v, n, 12, gen(0))
    assert float((est - a.diagonal()).abs().max()) > 1e-3


def test_xdiag_closed_form_equals_leave_one_out_definition():
    """The closed form equals ``(1/s) sum_i diag(Q_i Q_i^T A) + w_i o (I - Q_i Q_i^T) A w_i``."""
    n, s = 15, 4
    a = sym(n)
    omega = rademacher_matrix(n, s, gen(3), F64, CPU)
    y = a @ omega
    terms = []
    for i in range(s):
        qi, _ = torch.linalg.qr(torch.cat([y[:, :i], y[:, i + 1 :]], 1))
        pi = qi @ qi.T
        w = omega[:, i]
        terms.append((pi @ a).diagonal() + w * ((torch.eye(n, dtype=F64) - pi) @ a @ w))
    brute = torch.stack(terms).mean(0)
    torch.testing.assert_close(xdiag_from_probes(lambda v: a @ v, omega), brute)


def test_xdiag_counts_its_matvecs():
    a = sym(30)
    calls = []

    def matmat(v: Tensor) -> Tensor:
        calls.append(v.shape[1])
        return a @ v

    xdiag(matmat, 30, 10, gen(0))
    assert sum(calls) == 10
    calls.clear()
    diagpp(matmat, 30, 10, gen(0))
    assert sum(calls) == 10
    assert diagpp_split(10) == (3, 4)


def _into(a: Tensor):
    """``matmat`` that also takes ``out=`` (a contiguous ``(k, n)`` tensor), as ``FlatOperator``'s."""

    def matmat(v: Tensor, out: Tensor | None = None) -> Tensor:
        hv = a @ v  # v may be out.T itself: read in full here
        out = v.new_empty(v.shape[1], v.shape[0]) if out is None else out
        return out.copy_(hv.T).T  # FlatOperator's layout either way

    return matmat


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_reused_buffers_change_nothing(monkeypatch, name, rank):
    """Products written over dead buffers, and XDiag's final products in blocks: same numbers."""
    import hessbench.estimators.xdiag as xdiag_module

    fn = xdiag if name == "xdiag" else diagpp
    a = sym(30, rank)
    fresh = fn(_into(a), 30, 12, gen(1))
    torch.testing.assert_close(fn(_into(a), 30, 12, gen(1), reuse=True), fresh, rtol=0, atol=0)
    # s = 6 test vectors, 30 entries: blocks of 7, 7, 7, 7, 2
    monkeypatch.setattr(xdiag_module, "BLOCK_ENTRIES", 6 * 7)
    monkeypatch.setattr(xdiag_module, "BLOCK_MIN", 1)
    torch.testing.assert_close(fn(_into(a), 30, 12, gen(1), reuse=True), fresh)


@pytest.mark.parametrize(("n", "rank", "m"), [(20, 2, 6), (20, 4, 12), (6, None, 21)])
def test_diagpp_exact_when_rank_within_sketch(n, rank, m):
    a = sym(n, rank)
    for seed in range(3):
        est = diagpp(lambda v, a=a: a @ v, n, m, gen(seed))
        torch.testing.assert_close(est, a.diagonal(), rtol=1e-9, atol=1e-9)


def test_diagpp_below_three_matvecs_is_hutchinson():
    a = sym(10)
    g1, g2 = gen(4), gen(4)
    est = diagpp(lambda v: a @ v, 10, 2, g1)
    z = rademacher_matrix(10, 2, g2, F64, CPU)
    torch.testing.assert_close(est, (z * (a @ z)).sum(1) / 2)


@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_unbiased_on_explicit_matrix(name):
    n, m, runs = 30, 12, 400
    a = sym(n)
    spec = torch.linalg.matrix_norm(a, 2)
    g = gen(0)
    fn = xdiag if name == "xdiag" else diagpp
    mean = torch.stack([fn(lambda v: a @ v, n, m, g) for _ in range(runs)]).mean(0)
    h = diagpp_split(m)[1] if name == "diagpp" else 1
    within(mean, a.diagonal(), spec / (runs * h) ** 0.5, name)


def test_deflation_beats_hutchinson_on_low_rank_plus_noise():
    """On a matrix whose spectrum decays fast both deflated estimators beat Hutchinson."""
    n, m, runs = 60, 30, 40
    a = sym(n, rank=5) * 10 + sym(n, seed=1) * 0.01
    g = gen(0)
    err = {}
    for name, fn in [("xdiag", xdiag), ("diagpp", diagpp)]:
        err[name] = sum(
            float((fn(lambda v: a @ v, n, m, g) - a.diagonal()).abs().sum()) for _ in range(runs)
        )
    z = [rademacher_matrix(n, m, g, F64, CPU) for _ in range(runs)]
    err["hutchinson"] = sum(float(((w * (a @ w)).mean(1) - a.diagonal()).abs().sum()) for w in z)
    assert err["xdiag"] < 0.1 * err["hutchinson"]
    assert err["diagpp"] < 0.1 * err["hutchinson"]


# ------------------------------------------------------------------- tiny nets


class Net:
    """A tiny float64 problem and its brute-force Hessian (``tests/reference.py``)."""

    def __init__(self, loss: str, seed: int = 0):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(2.0)
            self.x = torch.randn(2, 3, dtype=F64)
            if loss == "ce":
                self.y, self.loss_fn = torch.randint(0, 3, (2,)), nn.CrossEntropyLoss()
            else:
                self.y, self.loss_fn = torch.randn(2, 3, dtype=F64), nn.MSELoss()
        f, theta, _ = reference.flat_loss_fn(self.model, self.loss_fn, self.x, self.y)
        self.H = reference.hessian(f)(theta)

    def run(self, name: str, seed: int, **params) -> Tensor:
        est = get_estimator(name, **params)
        d = est(self.model, self.loss_fn, self.x, self.y, generator=gen(seed))
        return torch.cat([v.reshape(-1) for v in d.values()])


_NETS: dict[str, Net] = {}


@pytest.fixture(params=["ce", "mse"])
def net(request) -> Net:
    if request.param not in _NETS:
        _NETS[request.param] = Net(request.param)
    return _NETS[request.param]


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_hutchinson_probes_unbiased_with_their_variance(net, probes):
    h, k = net.H.diagonal(), 300
    var = net.H.square().sum(1) - h.square()
    if probes == "gaussian":
        var = var + 2 * h.square()
    est = net.run("hutchinson", 3, num_samples=k, probes=probes)
    within(est, h, (var / k).sqrt(), f"hutchinson[probes={probes}]")


def test_hutchinson_gaussian_probes_differ_and_paths_agree(net):
    a = net.run("hutchinson", 0, probes="gaussian", method="structured")
    b = net.run("hutchinson", 0, probes="gaussian", method="autograd")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(a, net.run("hutchinson", 0))


def test_hutchinson_num_matvecs_is_num_samples(net):
    a = net.run("hutchinson", 5, num_matvecs=7)
    b = net.run("hutchinson", 5, num_samples=7)
    assert torch.equal(a, b)
    assert get_estimator("hutchinson", num_matvecs=7).label == "hutchinson[num_matvecs=7]"
    assert get_estimator("hutchinson", num_samples=10).label == "hutchinson[num_samples=10]"
    assert get_estimator("hutchinson", num_matvecs=7).sample_param == "num_matvecs"
    with pytest.raises(ConfigError, match="not both"):
        get_estimator("hutchinson", num_samples=2, num_matvecs=7)


@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
@pytest.mark.parametrize("method", ["structured", "autograd"])
def test_matfree_exact_when_budget_covers_all_parameters(net, name, method):
    """``P = 31`` entries: ``xdiag`` with ``s = 32`` and ``diagpp`` with ``k = 31`` are exact."""
    est = net.run(name, 0, num_matvecs=64 if name == "xdiag" else 93, method=method)
    torch.testing.assert_close(est, net.H.diagonal(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_paths_agree(net, name):
    a = net.run(name, 2, num_matvecs=12, method="structured")
    b = net.run(name, 2, num_matvecs=12, method="autograd")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_exact_on_low_rank_hessian(name):
    """A linear model with MSE on one sample: ``H = (2/D) blockdiag(x x^T)``, rank ``D = 2``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 2, bias=False)).to(F64)
        x, y = torch.randn(1, 5, dtype=F64), torch.randn(1, 2, dtype=F64)
    f, theta, _ = reference.flat_loss_fn(model, nn.MSELoss(), x, y)
    h = reference.hessian(f)(theta)
    assert int(torch.linalg.matrix_rank(h)) == 2
    for method in ("structured", "autograd"):
        d = get_estimator(name, num_matvecs=6, method=method)(
            model, nn.MSELoss(), x, y, generator=gen(0)
        )
        torch.testing.assert_close(d["0.weight"].reshape(-1), h.diagonal(), rtol=1e-9, atol=1e-12)


def conditional_std(H: Tensor, name: str, m: int, seeds: range) -> Tensor:
    """Std of the mean of the runs ``seeds``, derived from ``H`` and each run's sketch.

    The runs draw their sketch ``Omega`` first, as :func:`rademacher_matrix` does
    from ``gen(seed)``, so the test rebuilds each run's bases from ``H Omega``.

    - ``diagpp``: given ``Q`` the estimate's error is Hutchinson's on
      ``B = (I - P) H (I - P)``: variance ``sum_{j != e} B_ej^2 / h``, exactly; the
      runs are independent given their ``Q``: ``Var(mean) = sum_runs var / R^2``.
    - ``xdiag``: term ``i`` given ``Q_i`` has variance ``sum_{j != e} M_ej^2``,
      ``M = (I - Q_i Q_i^T) H``; the terms are exchangeable, so by the triangle
      inequality one run's std is at most ``sqrt(E[that])``, which is estimated by
      its average over every term of every run.
    """
    n = H.shape[0]
    eye = torch.eye(n, dtype=F64)
    var = torch.zeros(n, dtype=F64)
    k, h = diagpp_split(m) if name == "diagpp" else (m // 2, 1)
    for seed in seeds:
        y = H @ rademacher_matrix(n, k, gen(seed), F64, CPU)
        if name == "diagpp":
            q, _, _ = range_basis(y)
            b = (eye - q @ q.T) @ H @ (eye - q @ q.T)
            var += (b.square().sum(1) - b.diagonal().square()) / h
        else:
            for i in range(k):
                qi, _ = torch.linalg.qr(torch.cat([y[:, :i], y[:, i + 1 :]], 1))
                mi = (eye - qi @ qi.T) @ H
                var += (mi.square().sum(1) - mi.diagonal().square()) / k
    runs = len(seeds)
    if name == "diagpp":
        return var.sqrt() / runs
    return (var / runs).sqrt() / runs**0.5


@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_estimator_is_its_algorithm_on_the_brute_force_hessian(net, name):
    """Identical probes: the estimator equals the pure function applied to ``H``."""
    fn = xdiag if name == "xdiag" else diagpp
    n = net.H.shape[0]
    for seed in range(3):
        ours = fn(lambda v: net.H @ v, n, 12, gen(seed))
        torch.testing.assert_close(net.run(name, seed, num_matvecs=12), ours, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_unbiased_on_net(net, name):
    """Mean of independent runs at ``m = 12`` (not exact: ``P = 31``) within ``Z`` derived stds."""
    runs, m = 100, 12
    mean = torch.stack([net.run(name, s, num_matvecs=m) for s in range(runs)]).mean(0)
    within(mean, net.H.diagonal(), conditional_std(net.H, name, m, range(runs)), name)
    one = net.run(name, 0, num_matvecs=m)
    assert float((one - net.H.diagonal()).abs().max()) > 1e-6  # not trivially exact


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_unbiased_on_net_heavy(net, name):
    runs, m = 2000, 12
    mean = torch.stack([net.run(name, s, num_matvecs=m) for s in range(runs)]).mean(0)
    within(mean, net.H.diagonal(), conditional_std(net.H, name, m, range(runs)), name)


def test_xdiag_refuses_odd_budgets():
    with pytest.raises(ConfigError, match="even"):
        get_estimator("xdiag", num_matvecs=3)


@pytest.mark.parametrize("name", ["xdiag", "diagpp"])
def test_matfree_hands_back_the_gradient(net, name):
    est = get_estimator(name, num_matvecs=6)
    diag, grad, value = est.estimate_with_grad(
        net.model, net.loss_fn, net.x, net.y, generator=gen(1)
    )
    same = est(net.model, net.loss_fn, net.x, net.y, generator=gen(1))
    for k in diag:
        assert torch.equal(diag[k], same[k])
    out = net.loss_fn(net.model(net.x), net.y)
    ref = torch.autograd.grad(out, list(net.model.parameters()))
    for g, r in zip(grad.values(), ref, strict=True):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(value, out.detach())
