"""The graph engine (non-``Sequential`` models): capture, exactness, the HesScale fan-out rule.

Exact and GGN diagonals are checked against the brute force of ``tests/reference.py``
on tiny float64 models built to stress the fan-out rules (``torch.cat``, curved
activations on both branches of a fork, norms); HesScale-family numbers against
the sequential engine on chains and a hand-written recursion on a residual block.
"""

from __future__ import annotations

import pytest
import reference
import torch
import torch.nn.functional as F
from torch import nn

from hessbench.errors import UnsupportedError
from hessbench.estimators import get_estimator


class CatNet(nn.Module):
    """``cat([tanh(A x), sigmoid(B x)])`` then a Linear: a cat fed by two curved branches of one input."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.cat([torch.tanh(self.a(h)), torch.sigmoid(self.b(h))], dim=1))


class ForkNet(nn.Module):
    """A curved activation, then a fork whose two branches are curved again, added back (GELU, SiLU)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.act = nn.SiLU()
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = F.gelu(self.inp(x))
        return self.out(self.act(self.a(h)) + torch.tanh(self.b(h)) - 0.5 * h)


class DirectFork(nn.Module):
    """Curved branches meeting without a linear map in between: ``tanh(u) + sigmoid(u) + u``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        u = self.inp(x)
        return self.out(torch.tanh(u) + torch.sigmoid(u) + u)


class ConvNet(nn.Module):
    """Conv, GroupNorm, SiLU, a residual conv branch, BatchNorm2d, AdaptiveAvgPool2d, flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.act(self.gn(self.conv1(x)))
        h = torch.tanh(self.bn(self.conv2(h)) + h)
        return self.fc(self.pool(h).view(h.size(0), -1))


class BN1dNet(nn.Module):
    """Linear, BatchNorm1d (eval), GELU module, a skip, LayerNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.bn = nn.BatchNorm1d(5)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.bn(self.fc1(x)))
        return self.fc3(self.norm(h + self.fc2(h)))


def _randomize(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.double().eval()


MODELS = {
    "cat": (CatNet, (3,)),
    "fork": (ForkNet, (3,)),
    "direct": (DirectFork, (3,)),
    "conv": (ConvNet, (1, 4, 4)),
    "bn1d": (BN1dNet, (3,)),
}


def _problem(kind: str, batch: int, loss: str, seed: int = 0):
    torch.manual_seed(seed)
    cls, shape = MODELS[kind]
    model = _randomize(cls())
    g = torch.Generator().manual_seed(batch + 10 * seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (batch,), generator=g)
    return model, nn.MSELoss(), x, torch.randn(batch, 3, generator=g, dtype=torch.float64)


def _close(got, want, rtol=1e-10, atol=1e-12):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize(("name", "ref"), [("exact", "hessian"), ("ggn_exact", "ggn")])
def test_graph_engine_matches_brute_force(kind, batch, loss, name, ref):
    model, loss_fn, x, y = _problem(kind, batch, loss)
    want = getattr(reference, f"{ref}_diag")(model, loss_fn, x, y)
    _close(get_estimator(name, method="structured")(model, loss_fn, x, y), want)


def test_graph_engine_returns_the_gradient_of_the_same_pass():
    model, loss_fn, x, y = _problem("fork", 3, "ce")
    est = get_estimator("exact", method="structured")
    _, grad, value = est.estimate_with_grad(model, loss_fn, x, y)
    params = dict(model.named_parameters())
    want = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
    for k, w in zip(params, want, strict=True):
        torch.testing.assert_close(grad[k], w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(value, loss_fn(model(x), y).detach())
    for name in ("hesscale", "ggn_exact", "kfac"):
        _, grad2, _ = get_estimator(name).estimate_with_grad(model, loss_fn, x, y)
        for k, w in zip(params, want, strict=True):
            torch.testing.assert_close(grad2[k], w, rtol=1e-12, atol=1e-14, msg=f"{name} {k}")


# ------------------------------------------------------------------ HesScale family
class Wrapper(nn.Module):
    """A chain run by a plain ``forward`` (so the graph engine takes it)."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        for layer in self.seq:
            x = layer(x)
        return x


def _chains():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3))
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ELU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 1),
        nn.Softplus(),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    return [(mlp.double(), (5,)), (cnn.double(), (2, 6, 6))]


@pytest.mark.parametrize("chain", [0, 1])
@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn", "bl89", "exact", "ggn_exact"])
def test_a_chain_as_a_graph_gives_the_sequential_numbers(chain, name):
    seq, shape = _chains()[chain]
    g = torch.Generator().manual_seed(chain)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    want = get_estimator(name)(seq, nn.CrossEntropyLoss(), x, y)
    got = get_estimator(name)(Wrapper(seq), nn.CrossEntropyLoss(), x, y)
    got = {k.removeprefix("seq."): v for k, v in got.items()}
    _close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["ggn_mc", "kfac"])
def test_a_chain_as_a_graph_draws_the_same_samples(name):
    seq, shape = _chains()[0]
    x = torch.randn(4, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    est = get_estimator(name, num_samples=3)
    want = est(seq, nn.CrossEntropyLoss(), x, y, generator=torch.Generator().manual_seed(5))
    got = est(Wrapper(seq), nn.CrossEntropyLoss(), x, y, generator=torch.Generator().manual_seed(5))
    _close({k.removeprefix("seq."): v for k, v in got.items()}, want, rtol=1e-13, atol=1e-15)


class BNBlock(nn.Module):
    """``tanh(x + bn(conv(x)))``: a residual block of the user's inside an ``nn.Sequential``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return torch.tanh(x + self.bn(self.conv(x)))


def _sequential_of_graph_layers() -> nn.Sequential:
    torch.manual_seed(3)
    seq = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.GELU(),
        BNBlock(),
        nn.Flatten(),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    )
    for m in seq.modules():  # non-trivial statistics and affine parts
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return seq.double().eval()


@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn", "bl89", "exact", "ggn_exact", "kfac"])
def test_a_sequential_with_graph_layers_runs_on_the_graph_engine(name):
    """BatchNorm, GELU, LayerNorm and a residual block in an ``nn.Sequential``: the graph
    engine takes it, with the numbers of the same layers in a plain module."""
    from hessbench.estimators._graph import GraphPlan
    from hessbench.estimators._sequential import build_plan

    seq = _sequential_of_graph_layers()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    assert isinstance(build_plan(seq, graph=True), GraphPlan)
    with pytest.raises(UnsupportedError, match=r"layer '1' \(BatchNorm2d\) is not supported"):
        build_plan(seq)  # the sequential engines' callers still get the table's one line
    est, loss = get_estimator(name), nn.CrossEntropyLoss()
    got = est(seq, loss, x, y, generator=torch.Generator().manual_seed(5))
    want = est(Wrapper(seq), loss, x, y, generator=torch.Generator().manual_seed(5))
    _close(got, {k.removeprefix("seq."): v for k, v in want.items()}, rtol=1e-13, atol=1e-15)
    if name == "exact":
        _close(got, reference.hessian_diag(seq, nn.CrossEntropyLoss(), x, y))


class ResBlock(nn.Module):
    """``out(y)``, ``y = x + tanh(W1 x)``, ``x = W0 input``."""

    def __init__(self):
        super().__init__()
        self.w0 = nn.Linear(3, 4)
        self.w1 = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, inp):
        x = self.w0(inp)
        return self.out(x + torch.tanh(self.w1(x)))


def test_hesscale_sums_the_diagonals_of_a_fan_out():
    """The HesScale recursion written out by hand for one residual block."""
    torch.manual_seed(2)
    model = ResBlock().double()
    inp = torch.randn(3, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    got = get_estimator("hesscale")(model, nn.CrossEntropyLoss(), inp, y)
    w0, w1, wo = model.w0, model.w1, model.out
    x = w0(inp).detach()
    u = w1(x).detach()
    t = torch.tanh(u)
    z = model.out(x + t).detach()
    p = torch.softmax(z, 1)
    c = 1.0 / 3
    h_z = c * (p - p * p)
    g_z = c * (p - F.one_hot(y, 3).double())
    W1, Wo = w1.weight.detach(), wo.weight.detach()
    h_y, g_y = h_z @ Wo.square(), g_z @ Wo
    d1, d2 = 1 - t * t, -2 * t * (1 - t * t)
    h_u = d1 * d1 * h_y + d2 * g_y
    h_x = h_y + h_u @ W1.square()  # the fan-out: the two diagonals summed
    want = {
        "w0.weight": h_x.t() @ inp.square(),
        "w0.bias": h_x.sum(0),
        "w1.weight": h_u.t() @ x.square(),
        "w1.bias": h_u.sum(0),
        "out.weight": h_z.t() @ (x + t).square(),
        "out.bias": h_z.sum(0),
    }
    _close(got, want, rtol=1e-12, atol=1e-15)
    # the last layer is exact
    exact = reference.hessian_diag(model, nn.CrossEntropyLoss(), inp, y)
    for k in ("out.weight", "out.bias"):
        torch.testing.assert_close(got[k], exact[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_hesscale_facts_on_graphs(kind, loss):
    model, loss_fn, x, y = _problem(kind, 3, loss)
    hs = get_estimator("hesscale")(model, loss_fn, x, y)
    gn = get_estimator("hesscale_gn")(model, loss_fn, x, y)
    bz = get_estimator("bl89", output_curvature="zero")(model, loss_fn, x, y)
    _close(hs, {k: gn[k] + bz[k] for k in gn}, rtol=1e-12, atol=1e-15)
    exact = reference.hessian_diag(model, loss_fn, x, y)
    last = [k for k in exact if k.startswith(("out.", "fc.", "fc3."))]
    assert last
    for k in last:
        torch.testing.assert_close(hs[k], exact[k], rtol=1e-10, atol=1e-14, msg=k)
    if loss == "mse":
        bl = get_estimator("bl89")(model, loss_fn, x, y)
        _close(bl, hs, rtol=0, atol=0)


class ReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(10, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.c(torch.cat([h, torch.relu(self.b(h)) + h], 1))


def test_hesscale_equals_hesscale_gn_on_relu_graphs():
    torch.manual_seed(3)
    model = ReLUNet().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    hs = get_estimator("hesscale")(model, nn.CrossEntropyLoss(), x, y)
    gn = get_estimator("hesscale_gn")(model, nn.CrossEntropyLoss(), x, y)
    _close(hs, gn, rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for v in hs.values())


# ------------------------------------------------------------------ MC and K-FAC
def test_ggn_mc_on_a_graph_converges_to_ggn_exact():
    model, loss_fn, x, y = _problem("fork", 2, "ce")
    want = get_estimator("ggn_exact")(model, loss_fn, x, y)
    got = get_estimator("ggn_mc", num_samples=20_000, method="structured")(
        model, loss_fn, x, y, generator=torch.Generator().manual_seed(0)
    )
    num = sum((got[k] - want[k]).abs().sum() for k in want)
    den = sum(want[k].abs().sum() for k in want)
    assert num / den < 0.03, float(num / den)


class LinearGraph(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.cat([self.b(h) + h, h], 1))


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_kfac_exact_at_batch_one_equals_ggn_exact_on_a_linear_graph(loss):
    torch.manual_seed(4)
    model = LinearGraph().double()
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1]) if loss == "ce" else torch.randn(1, 3, dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    want = reference.ggn_diag(model, loss_fn, x, y)
    _close(get_estimator("kfac", backward="exact")(model, loss_fn, x, y), want)


def test_kfac_gives_norm_parameters_their_ggn_diagonal():
    """Per-channel affine parameters have no Kronecker factors: the GGN diagonal of the same columns."""
    model, loss_fn, x, y = _problem("conv", 3, "ce")
    got = get_estimator("kfac", backward="exact")(model, loss_fn, x, y)
    want = reference.ggn_diag(model, loss_fn, x, y)
    assert got.keys() == want.keys()
    for k in ("gn.weight", "gn.bias", "bn.weight", "bn.bias"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


# ------------------------------------------------------------------ refusals
class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))


class RawParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return x @ self.w


class TrainBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + x


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (Untraceable, r"cannot be traced by torch\.fx"),
        (Tied, r"node 'a_1': layer 'a' \(Linear\) is called twice"),
        (RawParam, r"node 'w' reads attribute 'w' directly"),
        (TrainBN, r"layer 'bn' \(BatchNorm1d\) uses batch statistics"),
    ],
)
def test_graph_engine_refuses_in_one_line(cls, match):
    model = cls().double()
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(UnsupportedError, match=match) as err:
        get_estimator("exact", method="structured")(model, nn.CrossEntropyLoss(), x, y)
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedError, match=match):
        get_estimator("hesscale")(model, nn.CrossEntropyLoss(), x, y)
    if cls is TrainBN:  # the brute force cannot differentiate batch statistics with torch.func
        return
    # auto falls back to the generic path
    want = reference.hessian_diag(model, nn.CrossEntropyLoss(), x, y)
    _close(get_estimator("exact")(model, nn.CrossEntropyLoss(), x, y), want)


@pytest.mark.parametrize(
    ("shape", "positions"), [((5,), ()), ((2, 3), ()), ((5,), (4,)), ((3,), (2, 4))]
)
def test_layernorm_closed_form_equals_the_generic_local_rule(shape, positions):
    """Also per position (``(N, *P, D)``, a transformer's tokens): a block-diagonal residual."""
    from hessbench.estimators._graph import _LNSpec
    from hessbench.estimators._rules_norm import LayerNormRule, LocalRule, _LNCache

    torch.manual_seed(5)
    spec = _LNSpec(1e-5, shape)
    x = torch.randn(3, *positions, *shape, dtype=torch.float64)
    g = torch.randn(3, *positions, *shape, dtype=torch.float64)
    v = torch.randn(3, 4, *positions, *shape, dtype=torch.float64)
    closed, generic = LayerNormRule(), LocalRule()
    yc, cc = closed.forward(spec, x, None)
    yg, cg = generic.forward(spec, x, None)
    assert isinstance(cc, _LNCache)  # the closed form, not the generic cache
    torch.testing.assert_close(yc, yg, rtol=1e-12, atol=1e-12)
    for meth, arg in [
        ("vjp", g),
        ("vjp_cols", v),
        ("vjp_sq", g.abs()),
        ("residual", g),
        ("residual_diag", g),
        # a second call reuses the bases built at the first, not its argument
        ("vjp_sq", v[:, 0].abs()),
        ("residual_diag", v[:, 1]),
    ]:
        got = getattr(closed, meth)(spec, cc, arg)
        want = getattr(generic, meth)(spec, cg, arg)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=meth)


@pytest.mark.parametrize("mask", [None, "causal_bool", "float"])
def test_attention_closed_form_equals_the_generic_local_rule(mask):
    """The attention core's diagonal-pass products in closed form, against ``jacrev`` of it."""
    from hessbench.estimators._rules_attention import AttentionRule, AttentionSpec
    from hessbench.estimators._rules_norm import LocalRule

    torch.manual_seed(7)
    length, d, heads = 5, 6, 2
    owner = nn.Module()
    if mask == "causal_bool":
        owner.register_buffer("m", torch.ones(length, length, dtype=torch.bool).triu(1))
    elif mask == "float":
        owner.register_buffer("m", torch.randn(length, length, dtype=torch.float64))
    spec = AttentionSpec(heads, owner, None if mask is None else "m", "attn")
    x = torch.randn(3, length, 3 * d, dtype=torch.float64)
    g = torch.randn(3, length, d, dtype=torch.float64)
    h = torch.rand(3, length, d, dtype=torch.float64)
    v = torch.randn(3, 4, length, d, dtype=torch.float64)
    closed, generic = AttentionRule(), LocalRule()
    yc, cc = closed.forward(spec, x, None)
    yg, cg = generic.forward(spec, x, None)
    torch.testing.assert_close(yc, yg, rtol=1e-12, atol=1e-12)
    assert "generic" not in cc.lazy  # the diagonal pass builds no Jacobian
    for meth, arg in [
        ("vjp", g),
        ("vjp_sq", h),
        ("residual_diag", g),
        ("vjp_sq", h.flip(1)),  # a second call on the same cache, another argument
        ("vjp_cols", v),
        ("residual", g),
    ]:
        got = getattr(closed, meth)(spec, cc, arg)
        want = getattr(generic, meth)(spec, cg, arg)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=meth)
