"""Peer implementations (hessbench.estimators.peers) against hessbench's own estimators.

Skipped unless BackPACK is installed (the ``peers`` extra; see docs/peers.md); the
curvlinops tests are skipped unless curvlinops is installed too. Every peer also runs
through tests/test_contract.py, which parametrizes over every registered estimator.

What is asserted:

- ``backpack.diag_hessian == exact`` and ``backpack.diag_ggn_exact == ggn_exact`` to
  1e-10 (relative to each tensor's largest entry) in float64, MLPs and CNNs, both
  losses, both reductions; with a training-mode dropout mask too (same generator,
  same mask);
- ``backpack.diag_ggn_mc`` and ``ggn_mc`` are unbiased for ``ggn_exact`` with errors
  that shrink like ``1/sqrt(k)``, and have the same one-sample error scale;
- ``curvlinops.hutchinson`` is within a few standard errors of ``exact``, the standard
  errors computed from the exact Hessian (``Var = sum_{j != i} H_ij^2 / k``);
- K-FAC: ``backpack.kfac[backward=exact]`` (KFLR) equals ``kfac[backward=exact]`` on
  Linear layers; on convolutions its input factor is exactly ``P`` (output positions)
  times hessbench's and its output factor sums over positions before the outer
  product (its bias entry is the exact GGN diagonal of the bias);
  ``curvlinops.kfac[backward=exact]`` equals ``kfac[backward=exact]`` everywhere; the
  Monte-Carlo variants converge to their exact versions;
- the contract: keys, shapes, dtypes; the caller's model untouched (parameters,
  ``.grad``, hooks, no BackPACK attributes, BackPACK's global hook list not grown);
  the global RNG unchanged; reproducible from the generator.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("backpack")

from backpack.context import CTX
from pairwise import covering

from hessbench.errors import UnsupportedError
from hessbench.estimators import available_estimators, estimator_class, get_estimator
from hessbench.estimators.peers import PEERS, available_peers, skipped_peers
from hessbench.suite import parse_suite, plan_cells

HAS_CURVLINOPS = "curvlinops" in available_peers()
needs_curvlinops = pytest.mark.skipif(not HAS_CURVLINOPS, reason="curvlinops not installed")

BACKPACK = [
    "backpack.diag_hessian",
    "backpack.diag_ggn_exact",
    "backpack.diag_ggn_mc",
    "backpack.kfac",
]
CURVLINOPS = ["curvlinops.hutchinson", "curvlinops.kfac", "curvlinops.xdiag"]
PEER_NAMES = BACKPACK + (CURVLINOPS if HAS_CURVLINOPS else [])
F64 = torch.float64


# ------------------------------------------------------------------ problems


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def deep_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.ELU(), nn.Identity(), nn.Linear(5, 3)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    )


def cnn_strided() -> nn.Module:
    """Stride, dilation, average pooling, a curved activation between convolutions."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, dilation=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def cnn1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))


def cnn1d_pool() -> nn.Module:
    """Conv1d with pooling (BackPACK's K-FAC has no rule for AvgPool1d/MaxPool1d)."""
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(9, 3)
    )


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3))


ARCHS = {
    "mlp": (mlp, (4,)),
    "deep_mlp": (deep_mlp, (4,)),
    "cnn": (cnn, (2, 6, 6)),
    "cnn_strided": (cnn_strided, (2, 8, 8)),
    "cnn1d": (cnn1d, (2, 6)),
    "cnn1d_pool": (cnn1d_pool, (2, 6)),
    "dropout_mlp": (dropout_mlp, (4,)),
}


def make_problem(arch: str, loss: str, reduction: str = "mean", *, batch: int = 3, seed: int = 0):
    """A seeded float64 model, loss, inputs and targets; the global RNG is left alone."""
    build, shape = ARCHS[arch]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build().to(F64)
        x = torch.randn(batch, *shape, dtype=F64)
        if loss == "ce":
            y = torch.randint(0, 3, (batch,))
            loss_fn: nn.Module = nn.CrossEntropyLoss(reduction=reduction)
        else:
            y = torch.randn(batch, 3, dtype=F64)
            loss_fn = nn.MSELoss(reduction=reduction)
    return model, loss_fn, x, y


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rel_close(a: dict[str, Tensor], b: dict[str, Tensor], tol: float = 1e-10) -> None:
    """Equal up to ``tol`` times each tensor's largest entry."""
    assert list(a) == list(b)
    for k in b:
        scale = b[k].abs().max().clamp_min(1e-300)
        err = (a[k] - b[k]).abs().max() / scale
        assert err <= tol, f"{k}: relative error {float(err):.3g}"


def rel_l1(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    num = sum(float((a[k] - b[k]).abs().sum()) for k in b)
    return num / sum(float(b[k].abs().sum()) for k in b)


DIAG_ARCHS = ["mlp", "deep_mlp", "cnn", "cnn_strided", "cnn1d", "cnn1d_pool"]
LOSSES = [("ce", "mean"), ("ce", "sum"), ("mse", "mean"), ("mse", "sum")]
LOSS_IDS = [f"{k}-{r}" for k, r in LOSSES]


def arch_loss_pairs(archs: list[str]) -> list:
    """``(arch, loss, reduction)`` params: a pairwise covering set (tests/pairwise.py).

    Every architecture with both losses and both reductions, every loss with both
    reductions; only the three-way product (e.g. cnn1d with sum-MSE) is not spelled out.
    """
    rows = covering({"arch": archs, "loss": ["ce", "mse"], "reduction": ["mean", "sum"]})
    return [
        pytest.param(
            r["arch"], r["loss"], r["reduction"], id=f"{r['arch']}-{r['loss']}-{r['reduction']}"
        )
        for r in rows
    ]


# ------------------------------------------------------------- registration


def test_every_peer_is_registered():
    assert "backpack" in available_peers()
    assert skipped_peers() == {}, skipped_peers()
    names = available_estimators()
    for lib in available_peers():
        for module in PEERS[lib]:
            assert module.startswith(f"{lib}_")
    for name in PEER_NAMES:
        assert name in names
        cls = estimator_class(name)
        assert cls.name == name
        doc = cls.__doc__ or ""
        library = "BackPACK" if name.startswith("backpack.") else "curvlinops"
        assert library in doc, f"{name}: the docstring does not name {library}"
        assert "deviation" in doc.lower(), f"{name}: the docstring lists no known deviations"


def test_a_wrapper_whose_library_lacks_a_name_is_not_registered():
    from hessbench.estimators import peers

    assert peers._missing(("backpack.extensions:DiagHessian",)) is None
    assert peers._missing(("backpack.extensions:NoSuchThing",)) == "backpack.extensions:NoSuchThing"
    assert peers._missing(("no_such_library_xyz:x",)) == "no_such_library_xyz:x"


def test_labels_and_stochastic_flags():
    assert get_estimator("backpack.diag_ggn_mc", num_samples=4).label == (
        "backpack.diag_ggn_mc[num_samples=4]"
    )
    assert get_estimator("backpack.kfac").label == "backpack.kfac[backward=mc,num_samples=1]"
    assert get_estimator("backpack.diag_hessian").label == "backpack.diag_hessian"
    stochastic = {n for n in PEER_NAMES if get_estimator(n).stochastic}
    expected = {"backpack.diag_ggn_mc", "backpack.kfac"}
    if HAS_CURVLINOPS:
        expected |= {"curvlinops.hutchinson", "curvlinops.kfac", "curvlinops.xdiag"}
    assert stochastic == expected
    assert get_estimator("backpack.kfac", backward="exact").stochastic is False


def _docs_suite() -> str:
    text = (Path(__file__).parents[1] / "docs" / "peers.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/peers.md has no yaml block"
    return blocks[0]


def test_docs_suite_snippet_validates_and_plans():
    suite = parse_suite(_docs_suite(), "docs/peers.md")
    labels = {c.estimator.label for c in plan_cells(suite)}
    assert {"hesscale", "ggn_mc[num_samples=1]", "backpack.diag_ggn_mc[num_samples=1]"} <= labels


# ----------------------------------------------------------------- exactness


@pytest.mark.parametrize(("arch", "loss", "reduction"), arch_loss_pairs(DIAG_ARCHS))
def test_backpack_diag_hessian_equals_exact(arch, loss, reduction):
    model, loss_fn, x, y = make_problem(arch, loss, reduction)
    ours = get_estimator("exact")(model, loss_fn, x, y)
    theirs = get_estimator("backpack.diag_hessian")(model, loss_fn, x, y)
    assert_rel_close(theirs, ours)


@pytest.mark.parametrize(("arch", "loss", "reduction"), arch_loss_pairs(DIAG_ARCHS))
def test_backpack_diag_ggn_exact_equals_ggn_exact(arch, loss, reduction):
    model, loss_fn, x, y = make_problem(arch, loss, reduction)
    ours = get_estimator("ggn_exact")(model, loss_fn, x, y)
    theirs = get_estimator("backpack.diag_ggn_exact")(model, loss_fn, x, y)
    assert_rel_close(theirs, ours)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", ["exact", "ggn_exact"])
def test_backpack_sees_the_same_dropout_mask(name, loss):
    """Training-mode dropout: same generator, same mask, same diagonal."""
    model, loss_fn, x, y = make_problem("dropout_mlp", loss, batch=4)
    peer = {"exact": "backpack.diag_hessian", "ggn_exact": "backpack.diag_ggn_exact"}[name]
    for seed in (0, 1):
        ours = get_estimator(name)(model, loss_fn, x, y, generator=gen(seed))
        theirs = get_estimator(peer)(model, loss_fn, x, y, generator=gen(seed))
        assert_rel_close(theirs, ours)
    a = get_estimator(peer)(model, loss_fn, x, y, generator=gen(0))
    b = get_estimator(peer)(model, loss_fn, x, y, generator=gen(1))
    assert any(not torch.equal(a[k], b[k]) for k in a), "the mask ignored the generator"


def test_float32_model_gives_float32_close_to_exact():
    model, loss_fn, x, y = make_problem("cnn", "ce")
    truth = get_estimator("exact")(model, loss_fn, x, y)
    model32, x32 = model.float(), x.float()
    for name in ("backpack.diag_hessian", "backpack.diag_ggn_exact"):
        out = get_estimator(name)(model32, loss_fn, x32, y)
        assert all(v.dtype == torch.float32 for v in out.values())
        if name == "backpack.diag_hessian":
            assert_rel_close({k: v.double() for k, v in out.items()}, truth, tol=1e-4)


# --------------------------------------------------------------- Monte Carlo


def _mc_errors(name: str, model, loss_fn, x, y, truth, ks, seeds) -> tuple[float, list[float]]:
    """Mean one-sample relative L1 error over ``seeds``, and the error at each ``k``."""
    one = [
        rel_l1(get_estimator(name, num_samples=1)(model, loss_fn, x, y, generator=gen(s)), truth)
        for s in seeds
    ]
    at_k = [
        rel_l1(get_estimator(name, num_samples=k)(model, loss_fn, x, y, generator=gen(100)), truth)
        for k in ks
    ]
    return sum(one) / len(one), at_k


@pytest.mark.parametrize(("loss", "reduction"), LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_diag_ggn_mc_converges_like_ggn_mc(arch, loss, reduction):
    """Both are unbiased for ggn_exact: the error falls like 1/sqrt(k), from one scale.

    The relative L1 error of a k-sample mean is about ``s / sqrt(k)`` with ``s`` the
    one-sample error (per entry ``E|mean_k - mu| ~ sigma sqrt(2/pi) / sqrt(k)``);
    ``4 s / sqrt(k)`` leaves room for the non-Gaussian one-sample errors.
    """
    model, loss_fn, x, y = make_problem(arch, loss, reduction)
    truth = get_estimator("ggn_exact")(model, loss_fn, x, y)
    ks = (64, 1024)
    scales = {}
    for name in ("backpack.diag_ggn_mc", "ggn_mc"):
        s, at_k = _mc_errors(name, model, loss_fn, x, y, truth, ks, seeds=range(16))
        scales[name] = s
        for k, err in zip(ks, at_k, strict=True):
            assert err <= 4 * s / math.sqrt(k), f"{name}[num_samples={k}]: {err:.3g} vs s={s:.3g}"
    # the same distribution: one-sample error scales agree (16 draws each)
    ratio = scales["backpack.diag_ggn_mc"] / scales["ggn_mc"]
    assert 0.5 < ratio < 2.0, scales


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_backpack_kfac_mc_converges_to_kflr(arch):
    model, loss_fn, x, y = make_problem(arch, "ce")
    exact = get_estimator("backpack.kfac", backward="exact")(model, loss_fn, x, y)
    one = [
        rel_l1(get_estimator("backpack.kfac")(model, loss_fn, x, y, generator=gen(s)), exact)
        for s in range(8)
    ]
    k = 2048
    est = get_estimator("backpack.kfac", num_samples=k)(model, loss_fn, x, y, generator=gen(9))
    assert rel_l1(est, exact) <= 4 * (sum(one) / len(one)) / math.sqrt(k)


# --------------------------------------------------------------------- K-FAC


def _positions(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Output positions P of every convolution of ``model`` on input ``x``."""
    out: dict[str, int] = {}
    h = x
    for name, m in model.named_children():
        h = m(h)
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            out[name] = h[0, 0].numel()
    return out


@pytest.mark.parametrize(
    ("arch", "loss", "reduction"), arch_loss_pairs(["mlp", "cnn", "cnn_strided", "cnn1d"])
)
def test_backpack_kflr_vs_kfac_exact(arch, loss, reduction):
    """Linear layers: equal. Convolutions: BackPACK's A is P times hessbench's, and its G
    sums over positions before the outer product (its bias entry is the exact GGN)."""
    model, loss_fn, x, y = make_problem(arch, loss, reduction)
    ours = get_estimator("kfac", backward="exact")(model, loss_fn, x, y)
    theirs = get_estimator("backpack.kfac", backward="exact")(model, loss_fn, x, y)
    ggn = get_estimator("ggn_exact")(model, loss_fn, x, y)
    assert list(theirs) == list(ours)
    with torch.no_grad():
        positions = _positions(model, x)
    modules = dict(model.named_children())
    for layer, m in modules.items():
        if not isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            continue
        w, b = f"{layer}.weight", f"{layer}.bias"
        if isinstance(m, nn.Linear):
            assert_rel_close({w: theirs[w], b: theirs[b]}, {w: ours[w], b: ours[b]})
            continue
        p = positions[layer]
        assert p > 1
        # input factor: A_backpack = P * A_hessbench, read off as weight / bias per channel
        shape = (-1,) + (1,) * (m.weight.dim() - 1)
        a_theirs = theirs[w] / theirs[b].reshape(shape)
        a_ours = ours[w] / ours[b].reshape(shape)
        assert_rel_close({w: a_theirs}, {w: p * a_ours})
        # output factor: BackPACK's bias entry is the exact GGN diagonal of the bias
        assert_rel_close({b: theirs[b]}, {b: ggn[b]})
        # hessbench's KFAC-expand G (sum of per-position squares) is another quantity
        assert not torch.allclose(ours[b], ggn[b], rtol=1e-3)


@needs_curvlinops
@pytest.mark.parametrize(
    ("arch", "loss", "reduction"), arch_loss_pairs(["mlp", "deep_mlp", "cnn", "cnn_strided"])
)
def test_curvlinops_kfac_exact_equals_kfac_exact(arch, loss, reduction):
    model, loss_fn, x, y = make_problem(arch, loss, reduction)
    ours = get_estimator("kfac", backward="exact")(model, loss_fn, x, y)
    theirs = get_estimator("curvlinops.kfac", backward="exact")(model, loss_fn, x, y)
    assert_rel_close(theirs, ours)


@needs_curvlinops
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_curvlinops_kfac_mc_converges_to_kfac_exact(loss):
    model, loss_fn, x, y = make_problem("cnn", loss)
    exact = get_estimator("kfac", backward="exact")(model, loss_fn, x, y)
    for name in ("curvlinops.kfac", "kfac"):
        one = [
            rel_l1(get_estimator(name)(model, loss_fn, x, y, generator=gen(s)), exact)
            for s in range(8)
        ]
        k = 2048
        est = get_estimator(name, num_samples=k)(model, loss_fn, x, y, generator=gen(9))
        assert rel_l1(est, exact) <= 4 * (sum(one) / len(one)) / math.sqrt(k), name


@pytest.mark.parametrize("name", ["backpack.kfac", "curvlinops.kfac"])
def test_kfac_peers_refuse_grouped_convolutions(name):
    if name.startswith("curvlinops") and not HAS_CURVLINOPS:
        pytest.skip("curvlinops not installed")
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 3)).double()
    x, y = torch.randn(2, 2, 6, 6, dtype=F64), torch.tensor([0, 1])
    est = get_estimator(name, backward="exact")
    with pytest.raises(UnsupportedError, match=r"layer '0' \(Conv2d\): groups=2"):
        est.check_supported(model, nn.CrossEntropyLoss())
    with pytest.raises(UnsupportedError, match=r"layer '0' \(Conv2d\): groups=2"):
        est(model, nn.CrossEntropyLoss(), x, y)


@needs_curvlinops
def test_curvlinops_kfac_refuses_conv1d():
    model, loss_fn, _, _ = make_problem("cnn1d", "ce")
    est = get_estimator("curvlinops.kfac")
    with pytest.raises(UnsupportedError, match=r"layer '0' \(Conv1d\) is not supported by curv"):
        est.check_supported(model, loss_fn)


# ---------------------------------------------------------------- Hutchinson


def _full_hessian(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    sizes = [p.numel() for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def f(theta: Tensor) -> Tensor:
        parts = dict(zip(names, theta.split(sizes), strict=True))
        shaped = {n: parts[n].view_as(params[n]) for n in names}
        return loss_fn(torch.func.functional_call(model, shaped, (x,)), y)

    return torch.func.jacrev(torch.func.jacrev(f))(flat)


@needs_curvlinops
@pytest.mark.parametrize(("loss", "reduction"), LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_curvlinops_hutchinson_within_its_standard_error(arch, loss, reduction):
    """Per entry ``|h_i - H_ii| <= 6 sqrt(sum_{j != i} H_ij^2 / k)`` (Rademacher variance).

    ``k`` above the number of entries also exercises the chunked calls.
    """
    model, loss_fn, x, y = make_problem(arch, loss, reduction)
    hess = _full_hessian(model, loss_fn, x, y)
    diag = hess.diagonal()
    off = hess.square().sum(1) - diag.square()
    k = 3 * hess.shape[0] + 7
    se = (off / k).sqrt()
    for name in ("curvlinops.hutchinson", "hutchinson"):
        est = get_estimator(name, num_samples=k)(model, loss_fn, x, y, generator=gen(0))
        flat = torch.cat([v.reshape(-1) for v in est.values()])
        excess = (flat - diag).abs() - 6 * se
        assert float(excess.max()) <= 1e-12 * float(diag.abs().max()), name


def _curvlinops_probes(seed: int, dim: int, count: int) -> Tensor:
    """The Rademacher vectors curvlinops draws after ``torch.manual_seed(seed)``, as columns."""
    from curvlinops.sampling import random_vector

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.stack([random_vector(dim, "rademacher", "cpu", F64) for _ in range(count)], 1)


@needs_curvlinops
@pytest.mark.parametrize("m", [2, 8, 20])
def test_curvlinops_xdiag_equals_ours_on_identical_probes_explicit_matrix(m):
    """On an explicit symmetric matrix, same test vectors: the same estimate to rounding."""
    from curvlinops import xdiag as their_xdiag

    from hessbench.estimators.xdiag import xdiag_from_probes

    b = torch.randn(30, 30, dtype=F64, generator=gen(1))
    a = b + b.T
    with torch.random.fork_rng():
        torch.manual_seed(5)
        theirs = their_xdiag(a, m)
    ours = xdiag_from_probes(lambda v: a @ v, _curvlinops_probes(5, 30, m // 2))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@needs_curvlinops
@pytest.mark.parametrize(("loss", "reduction"), LOSSES, ids=LOSS_IDS)
def test_curvlinops_xdiag_is_xdiag_of_the_brute_force_hessian(loss, reduction):
    """The peer, seeded from the generator, equals our XDiag on the full Hessian with its probes.

    The peer seeds the global RNG with one 62-bit draw from the generator
    (``seeded_global_rng``); the test replays that draw to rebuild the test vectors.
    Our estimator ``xdiag`` is the same function (``tests/test_matfree.py``), so
    both are XDiag of the same ``H``: equal means, and equal draws given equal vectors.
    """
    from hessbench.estimators.peers._common import draw_seed
    from hessbench.estimators.xdiag import xdiag_from_probes

    model, loss_fn, x, y = make_problem("mlp", loss, reduction)
    hess = _full_hessian(model, loss_fn, x, y)
    for seed in range(2):
        est = get_estimator("curvlinops.xdiag", num_matvecs=10)(
            model, loss_fn, x, y, generator=gen(seed)
        )
        theirs = torch.cat([v.reshape(-1) for v in est.values()])
        probes = _curvlinops_probes(draw_seed(gen(seed)), hess.shape[0], 5)
        ours = xdiag_from_probes(lambda v: hess @ v, probes)
        torch.testing.assert_close(theirs, ours, rtol=1e-8, atol=1e-10)


@needs_curvlinops
@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_curvlinops_hutchinson_is_hutchinson_of_the_brute_force_hessian(probes):
    """Identical probes (replayed from the generator's seed draw): ``mean_k z_k o H z_k``."""
    from curvlinops.sampling import random_vector

    from hessbench.estimators.peers._common import draw_seed

    model, loss_fn, x, y = make_problem("mlp", "ce")
    hess = _full_hessian(model, loss_fn, x, y)
    k, dim = 7, hess.shape[0]
    est = get_estimator("curvlinops.hutchinson", num_samples=k, probes=probes)
    assert est.label == (
        "curvlinops.hutchinson[num_samples=7]"
        if probes == "rademacher"
        else "curvlinops.hutchinson[num_samples=7,probes=gaussian]"
    )
    out = est(model, loss_fn, x, y, generator=gen(3))
    theirs = torch.cat([v.reshape(-1) for v in out.values()])
    kind = "rademacher" if probes == "rademacher" else "normal"
    with torch.random.fork_rng():
        torch.manual_seed(draw_seed(gen(3)))
        z = torch.stack([random_vector(dim, kind, "cpu", F64) for _ in range(k)], 1)
    torch.testing.assert_close(theirs, (z * (hess @ z)).mean(1), rtol=1e-8, atol=1e-10)


class _Attention(nn.Module):
    """Tokens -> embedding -> causal self-attention -> LayerNorm without a weight -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.head = nn.Linear(8, 6)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, attn_mask=self.mask, is_causal=True, need_weights=False)[0]
        return self.head(self.norm(h)[:, -1])


@needs_curvlinops
@pytest.mark.parametrize("name", ["curvlinops.hutchinson", "curvlinops.xdiag"])
def test_curvlinops_matrix_free_on_attention(name):
    """Self-attention through ``scaled_dot_product_attention``: the peers run.

    torch's fused CPU attention kernel has no forward-mode derivative, which
    curvlinops' Hessian-vector products need; the peers run it in the math backend
    (as hessbench's own HVP paths do) and equal Hutchinson and XDiag of the
    brute-force Hessian on the probes they drew (replayed from the generator's seed draw).
    """
    from curvlinops.sampling import random_vector
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hessbench.estimators.peers._common import draw_seed
    from hessbench.estimators.xdiag import xdiag_from_probes

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Attention().to(F64).eval()
        x, y = torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3,))
    loss_fn = nn.CrossEntropyLoss()
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernel has no double backward either
        hess = _full_hessian(model, loss_fn, x, y)
    dim = hess.shape[0]
    if name == "curvlinops.hutchinson":
        out = get_estimator(name, num_samples=5)(model, loss_fn, x, y, generator=gen(3))
        with torch.random.fork_rng():
            torch.manual_seed(draw_seed(gen(3)))
            z = torch.stack([random_vector(dim, "rademacher", "cpu", F64) for _ in range(5)], 1)
        expected = (z * (hess @ z)).mean(1)
    else:
        out = get_estimator(name, num_matvecs=6)(model, loss_fn, x, y, generator=gen(3))
        probes = _curvlinops_probes(draw_seed(gen(3)), dim, 3)
        expected = xdiag_from_probes(lambda v: hess @ v, probes)
    theirs = torch.cat([v.reshape(-1) for v in out.values()])
    torch.testing.assert_close(theirs, expected, rtol=1e-8, atol=1e-10)


def _hvp_autograd(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """``H v`` by plain double backpropagation (no ``torch.func``)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, params)])


@needs_curvlinops
def test_curvlinops_layer_norm_hvp_error_is_what_the_operator_does():
    """The probe's figure is curvlinops' operator against double backpropagation, on a residual MLP too."""
    from curvlinops import HessianLinearOperator

    from hessbench.estimators.peers.curvlinops_hutchinson import layer_norm_hvp_error
    from hessbench.suite.architectures import ResidualMLP

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ResidualMLP((5,), 3, width=6, hidden=8, blocks=1, act=nn.Tanh, norm=True, bias=True)
        x, y = torch.randn(3, 5, dtype=F64), torch.randint(0, 3, (3,))
    model = model.to(F64)
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=F64, generator=gen(0))
    op = HessianLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False, num_data=3
    )
    ours = _hvp_autograd(model, nn.CrossEntropyLoss(), x, y, v)
    err = float((op @ v - ours).abs().max() / ours.abs().max())
    assert (err > 1e-8) == (layer_norm_hvp_error() > 1e-8), (err, layer_norm_hvp_error())


@needs_curvlinops
@pytest.mark.parametrize("name", ["curvlinops.hutchinson", "curvlinops.xdiag"])
def test_curvlinops_refuses_layer_norm_weights_while_its_products_are_wrong(name):
    from hessbench.estimators.peers.curvlinops_hutchinson import layer_norm_hvp_error
    from hessbench.suite.architectures import ResidualMLP

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ResidualMLP((5,), 3, width=6, hidden=8, blocks=1, act=nn.Tanh, norm=True, bias=True)
        x, y = torch.randn(3, 5, dtype=F64), torch.randint(0, 3, (3,))
    model, loss_fn = model.to(F64), nn.CrossEntropyLoss()
    est = get_estimator(name)
    if layer_norm_hvp_error() <= 1e-8:  # a torch that multiplies correctly: no refusal
        est(model, loss_fn, x, y, generator=gen(0))
        return
    for call in (
        lambda: est.check_supported(model, loss_fn),
        lambda: est(model, loss_fn, x, y, generator=gen(0)),
    ):
        with pytest.raises(UnsupportedError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("layer 'blocks.0.norm' (LayerNorm with a weight)")
        assert "pytorch/functorch#534" in message


@needs_curvlinops
def test_curvlinops_xdiag_refuses_a_budget_at_the_dimension():
    model, loss_fn, x, y = make_problem("mlp", "ce")
    dim = sum(p.numel() for p in model.parameters())
    est = get_estimator("curvlinops.xdiag", num_matvecs=dim + dim % 2)
    with pytest.raises(UnsupportedError, match="below the number of parameter entries"):
        est(model, loss_fn, x, y, generator=gen(0))


@needs_curvlinops
def test_curvlinops_hutchinson_refuses_training_dropout():
    model, loss_fn, x, y = make_problem("dropout_mlp", "ce")
    with pytest.raises(UnsupportedError, match=r"layer '2' \(Dropout\) in training mode"):
        get_estimator("curvlinops.hutchinson")(model, loss_fn, x, y, generator=gen(0))
    model.eval()
    get_estimator("curvlinops.hutchinson")(model, loss_fn, x, y, generator=gen(0))


@needs_curvlinops
def test_curvlinops_hutchinson_works_on_custom_modules():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(x + torch.tanh(self.a(x)))

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Residual().double()
        x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    exact = get_estimator("exact")(model, loss_fn, x, y)
    est = get_estimator("curvlinops.hutchinson", num_samples=5000)(
        model, loss_fn, x, y, generator=gen(0)
    )
    assert rel_l1(est, exact) < 0.2


@pytest.mark.parametrize(("loss", "reduction"), LOSSES, ids=LOSS_IDS)
def test_backpack_sum_grad_squared_is_c_times_efisher(loss, reduction):
    """Not wrapped, documented: BackPACK squares per-sample gradients of the scaled loss."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    model, loss_fn, x, y = make_problem("mlp", loss, reduction, batch=6)
    twin, twin_loss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    n_handles = len(CTX.hook_handles)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            with backpack(SumGradSquared()):
                twin_loss(twin(x), y).backward()
    finally:
        for handle in CTX.hook_handles[n_handles:]:
            handle.remove()
        del CTX.hook_handles[n_handles:]
    efisher = get_estimator("efisher")(model, loss_fn, x, y)
    c = 1.0 if reduction == "sum" else 1.0 / (6 if loss == "ce" else 6 * 3)
    sgs = {n: p.sum_grad_squared for n, p in twin.named_parameters()}
    assert_rel_close(sgs, {n: c * v for n, v in efisher.items()})


# ----------------------------------------------------------------- unsupported


def test_backpack_refuses_layers_its_extension_lacks():
    model = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3)).double()
    x, y = torch.randn(2, 4, dtype=F64), torch.tensor([0, 1])
    for name in ("backpack.diag_hessian", "backpack.diag_ggn_exact", "backpack.kfac"):
        est = get_estimator(name)
        with pytest.raises(UnsupportedError) as info:
            est.check_supported(model, nn.CrossEntropyLoss())
        msg = str(info.value)
        assert "layer '1' (Softplus)" in msg
        assert "BackPACK" in msg
        assert "\n" not in msg
        with pytest.raises(UnsupportedError) as info2:
            est(model, nn.CrossEntropyLoss(), x, y, generator=gen(0))
        assert str(info2.value) == msg


def test_backpack_skips_identity_and_eval_dropout():
    """BackPACK's DiagHessian has no Identity rule: the layer is not called (it is one)."""
    model, loss_fn, x, y = make_problem("deep_mlp", "mse")
    get_estimator("backpack.diag_hessian").check_supported(model, loss_fn)
    dm, loss_fn, x, y = make_problem("dropout_mlp", "mse")
    dm.eval()
    assert_rel_close(
        get_estimator("backpack.diag_hessian")(dm, loss_fn, x, y),
        get_estimator("exact")(dm, loss_fn, x, y),
    )


# -------------------------------------------------------------------- contract


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "hooks": {
            (path, attr): list(getattr(m, attr).keys())
            for path, m in model.named_modules()
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        },
        "attrs": {
            n: sorted(k for k in vars(p) if not k.startswith("_"))
            for n, p in model.named_parameters()
        },
        "module_attrs": {path: sorted(vars(m)) for path, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "ctx_handles": len(CTX.hook_handles),
    }


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(("arch", "loss"), [("mlp", "ce"), ("cnn", "mse"), ("dropout_mlp", "ce")])
@pytest.mark.parametrize("name", PEER_NAMES)
def test_contract_and_no_side_effects(name, arch, loss, dtype):
    model, loss_fn, x, y = make_problem(arch, loss)
    model, x = model.to(dtype), x.to(dtype)
    if loss == "mse":
        y = y.to(dtype)
    est = get_estimator(name)
    before = _snapshot(model)
    if name in ("curvlinops.hutchinson", "curvlinops.xdiag") and arch == "dropout_mlp":
        with pytest.raises(UnsupportedError):
            est(model, loss_fn, x, y, generator=gen(0))
        model.eval()
        before = _snapshot(model)
    out = est(model, loss_fn, x, y, generator=gen(0))
    after = _snapshot(model)
    assert list(out) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert out[n].shape == p.shape, n
        assert out[n].dtype == dtype, n
        assert not out[n].requires_grad, n
        assert bool(torch.isfinite(out[n]).all()), n
        assert torch.equal(after["params"][n], before["params"][n]), n
        assert p.grad is None, f"{n}.grad was set"
    assert after["hooks"] == before["hooks"], "hooks were added"
    assert after["attrs"] == before["attrs"], "attributes were stored on the parameters"
    assert after["module_attrs"] == before["module_attrs"], "the modules were extended"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG changed"
    assert after["ctx_handles"] == before["ctx_handles"], "BackPACK's hook list grew"
    # reproducible from the generator
    again = est(model, loss_fn, x, y, generator=gen(0))
    for n in out:
        assert torch.equal(again[n], out[n]), n


@pytest.mark.parametrize("name", PEER_NAMES)
def test_frozen_parameters_are_left_out(name):
    model, loss_fn, x, y = make_problem("cnn", "ce")
    model[0].weight.requires_grad_(False)
    out = get_estimator(name)(model, loss_fn, x, y, generator=gen(0))
    assert "0.weight" not in out
    assert list(out) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert model[0].weight.grad is None
