"""Rules of the diagonal pass against independent formulas (float64): Conv by unfold, fused steps.

The rules run on ``torch.ops.aten.convolution_backward``; here the same
quantities are written out with ``F.unfold`` / ``F.fold`` as in BRIEF 2.1:
``h_W[o,c,k] = sum_n sum_pos h_z[n,o,pos] a[n,c,pos+k]^2``, ``h_b = sum h_z`` and
``h_a = (W o W)^T h_z`` (a transposed convolution). Whole HesScale-family
estimates with the rules swapped for these formulas must agree to rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import CASES, problem, relerr, variants
from torch import Tensor, nn

from hessbench.estimators import get_estimator
from hessbench.estimators._layers import RULES, Parametric
from hessbench.estimators._rules_affine import ConvRule, _conv_padding

TOL_ROUNDING = 1e-12
CONV_CASES = [
    c for c in CASES if any(isinstance(m, nn.Conv1d | nn.Conv2d) for m in c.model().modules())
]


def _as_2d(m: nn.Module, x: Tensor) -> tuple[Tensor, dict]:
    """``x`` as an image and the unfold arguments of ``m`` (Conv1d: height 1)."""
    pad = _conv_padding(m, "")
    if x.dim() == 3:
        return x.unsqueeze(2), {
            "kernel_size": (1, m.kernel_size[0]),
            "dilation": (1, m.dilation[0]),
            "padding": (0, pad[0]),
            "stride": (1, m.stride[0]),
        }
    return x, {
        "kernel_size": m.kernel_size,
        "dilation": m.dilation,
        "padding": pad,
        "stride": m.stride,
    }


def unfold_param(m: nn.Module, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
    """``sum_n sum_pos h[n,o,pos] x[n,c,pos+k]`` per group, and ``sum h`` per channel."""
    x2d, kw = _as_2d(m, x)
    cols = F.unfold(x2d, **kw)  # (N, C*K, P)
    n, q, p = cols.shape
    g = m.groups
    cols = cols.view(n, g, q // g, p)
    hz = h.reshape(n, g, -1, p)
    w = torch.einsum("ngop,ngqp->goq", hz, cols).reshape(m.weight.shape)
    b = h.sum((0, *range(2, h.dim()))) if m.bias is not None else None
    return w, b


def unfold_input(m: nn.Module, x: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """``J^T h`` for the convolution with ``weight``: ``fold(W_g^T h_g)``."""
    x2d, kw = _as_2d(m, x)
    n, g, o = h.shape[0], m.groups, m.out_channels
    p = h[0, 0].numel()
    wg = weight.reshape(g, o // g, -1)  # (G, O/G, C/G*K)
    hz = h.reshape(n, g, o // g, p)
    cols = torch.einsum("goq,ngop->ngqp", wg, hz).reshape(n, -1, p)
    out = F.fold(cols, x2d.shape[2:], **kw)
    return out.view_as(x)


def _conv_inputs(case):
    """Every (Conv module, its input) of the case's model at batch 3."""
    model = case.model()
    x = torch.randn(
        3, *case.in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    found = []
    for mod in model:
        if isinstance(mod, nn.Conv1d | nn.Conv2d):
            found.append((mod, x))
        x = mod(x)
    return found


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
def test_conv_rule_matches_unfold(case):
    gen = torch.Generator().manual_seed(7)
    for m, x in _conv_inputs(case):
        rule = RULES[type(m)]
        with torch.no_grad():
            y, cache = rule.forward(m, x, None)
            h = torch.rand(y.shape, dtype=y.dtype, generator=gen)
            g = torch.randn(y.shape, dtype=y.dtype, generator=gen)
            hw, hb = rule.param_diag(m, cache, h)
            want_w, want_b = unfold_param(m, x.square(), h)
            assert relerr(hw, want_w) <= TOL_ROUNDING
            gw, gb = rule.param_grad(m, cache, g)
            want_gw, want_gb = unfold_param(m, x, g)
            assert relerr(gw, want_gw) <= TOL_ROUNDING
            if m.bias is None:
                assert hb is None
                assert gb is None
            else:
                assert relerr(hb, want_b) <= TOL_ROUNDING
                assert relerr(gb, want_gb) <= TOL_ROUNDING
            want_h = unfold_input(m, x, h, m.weight.square())
            want_g = unfold_input(m, x, g, m.weight)
            assert relerr(rule.vjp_sq(m, cache, h), want_h) <= TOL_ROUNDING
            assert relerr(rule.vjp(m, cache, g), want_g) <= TOL_ROUNDING
            # the fused step of the diagonal pass, in each configuration it is called in
            for need_input, with_grad, gin in itertools.product((True, False), repeat=3):
                if with_grad and not gin:
                    continue  # the gradient needs g
                got = rule.diag_backward(
                    m, cache, g if gin else None, h, need_input=need_input, with_grad=with_grad
                )
                want = (
                    want_w,
                    want_b,
                    want_gw if with_grad else None,
                    want_gb if with_grad else None,
                    want_h if need_input else None,
                    want_g if need_input and gin else None,
                )
                for a, b in zip(got, want, strict=True):
                    assert (a is None) == (b is None)
                    if b is not None:
                        assert relerr(a, b) <= TOL_ROUNDING


class UnfoldConvRule(ConvRule):
    """The Conv rule with its diagonal-pass methods written as unfold formulas."""

    diag_backward = Parametric.diag_backward  # composed of the four methods below

    def param_diag(self, m, cache, h):
        return unfold_param(m, cache[0].square(), h)

    def param_grad(self, m, cache, g):
        return unfold_param(m, cache[0], g)

    def vjp_sq(self, m, cache, h):
        return unfold_input(m, cache[0], h, m.weight.square())

    def vjp(self, m, cache, v):
        return unfold_input(m, cache[0], v, m.weight)


@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn", "bl89"])
@pytest.mark.parametrize("v", variants(CONV_CASES, reductions=("mean",), batches=(3,)))
def test_hesscale_family_equals_unfold_formulas(v, name, monkeypatch):
    """The whole estimate, rules swapped for the unfold formulas: equal to rounding."""
    model, loss_fn, x, y = problem(v)
    est = get_estimator(name)
    got, grad, _ = est.estimate_with_grad(model, loss_fn, x, y)
    for cls, nd in ((nn.Conv1d, 1), (nn.Conv2d, 2)):
        monkeypatch.setitem(RULES, cls, UnfoldConvRule(nd))
    want, want_grad, _ = est.estimate_with_grad(model, loss_fn, x, y)
    for k in want:
        assert relerr(got[k], want[k]) <= TOL_ROUNDING, k
        assert relerr(grad[k], want_grad[k]) <= TOL_ROUNDING, k


@pytest.mark.parametrize(
    "cls", [c for c, r in RULES.items() if r.elementwise], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("residual", [True, False])
def test_elementwise_diag_step_equals_generic_formula(cls, residual):
    """Each activation's (fused) diagonal step equals ``(f' g, f'^2 h + f'' g)`` from its derivs."""
    rule = RULES[cls]
    m = cls().train(False) if cls is not nn.Dropout else cls(0.3).train(True)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen) * 3
    x[0, 0, :2] = 0.0  # the kinks
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, cache = rule.forward(m, x, None)
    g = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    h = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    d1, d2 = rule.derivs(m, cache)
    want_h = d1 * d1 * h + (d2 * g if residual and d2 is not None else 0.0)
    got_g, got_h = rule.backward_diag(m, cache, g, h, residual)
    assert relerr(got_h, want_h) <= TOL_ROUNDING
    assert relerr(got_g, d1 * g) <= TOL_ROUNDING
    if not residual:  # HesScaleGN without the gradient: no g in, none out
        none_g, h_only = rule.backward_diag(m, cache, None, h, residual)
        assert none_g is None
        assert relerr(h_only, want_h) <= TOL_ROUNDING


POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
POOL_CASES = [c for c in CASES if any(isinstance(m, POOLS) for m in c.model().modules())]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c.name)
def test_pool_rules_match_the_jacobian(case):
    """Pooling ``vjp`` = ``J^T v`` and ``vjp_sq`` = ``(J o J)^T h``, J from autograd."""
    model = case.model()
    x = torch.randn(
        2, *case.in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )
    gen = torch.Generator().manual_seed(10)
    for mod in model:
        if isinstance(mod, POOLS):
            rule = RULES[type(mod)]
            with torch.no_grad():
                y, cache = rule.forward(mod, x, None)
            jac = torch.autograd.functional.jacobian(lambda t, mod=mod: mod(t), x)
            jac = jac.reshape(y.numel(), x.numel())  # across the batch: block diagonal
            v = torch.randn(y.shape, dtype=y.dtype, generator=gen)
            h = torch.rand(y.shape, dtype=y.dtype, generator=gen)
            want_v = (v.reshape(1, -1) @ jac).view_as(x)
            want_h = (h.reshape(1, -1) @ jac.square()).view_as(x)
            with torch.no_grad():
                assert relerr(rule.vjp(mod, cache, v), want_v) <= TOL_ROUNDING
                assert relerr(rule.vjp_sq(mod, cache, h), want_h) <= TOL_ROUNDING
        x = mod(x).detach()


def _count_conv_backward(monkeypatch) -> dict:
    calls = {"n": 0}
    original = ConvRule._backward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConvRule, "_backward", counting)
    return calls


@pytest.mark.parametrize(("first_act", "backward_calls"), [(nn.ReLU, 2), (nn.Tanh, 3)])
def test_hesscale_skips_the_gradient_below_the_lowest_curved_activation(
    monkeypatch, first_act, backward_calls
):
    """ReLU has no ``f'' g`` term: below the last curved activation no ``J^T g`` is needed.

    Conv-act-Conv-ReLU-Linear: each conv's diagonal is one convolution backward; the
    second conv also backpropagates ``g`` only when a curved activation (Tanh) lies
    below it. The diagonal is the same either way (the brute-force tests check it).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), first_act(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()  # fmt: skip
    x, y = torch.randn(2, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    calls = _count_conv_backward(monkeypatch)
    get_estimator("hesscale")(model, nn.CrossEntropyLoss(), x, y)
    assert calls["n"] == backward_calls
    calls["n"] = 0
    _, grad, _ = get_estimator("hesscale").estimate_with_grad(model, nn.CrossEntropyLoss(), x, y)
    assert calls["n"] == 4  # with the gradient: (h) and (g) for both convs
    want = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), list(model.parameters()))
    for (name, _), w in zip(model.named_parameters(), want, strict=True):
        torch.testing.assert_close(grad[name], w, rtol=1e-12, atol=1e-14)


def test_graph_hesscale_on_a_relu_resnet_backpropagates_no_gradient(monkeypatch):
    """The graph engine: a ReLU ResNet with eval-mode BatchNorm has no curved node."""
    from hessbench.suite.architectures import ResNet

    torch.manual_seed(0)
    model = ResNet((3, 8, 8), 4, channels=[4, 8], blocks=1, act=nn.ReLU, bn=True).double()
    model.eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 3])
    calls = _count_conv_backward(monkeypatch)
    get_estimator("hesscale")(model, nn.CrossEntropyLoss(), x, y)
    assert calls["n"] == convs  # one convolution backward per conv: h only
