"""Transformers in the graph engine: embeddings, positional parameters, attention, slicing.

``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` are expanded into plan
nodes (in-projection, attention core as a local rule, out-projection, norms,
feed-forward, residual adds). The exact and GGN diagonals are checked against the
brute force of ``tests/reference.py`` (float64, batch 1 and 3, with and without
a causal mask, float and bool masks, norm_first or not); the HesScale facts and
the GGN-MC mean on the tiny GPT; the HesScale family's pass on the positions read
(below ``h[:, -1]``) equal to its full pass; one-line refusals of what is not supported.
"""

from __future__ import annotations

import pytest
import reference
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessbench.errors import UnsupportedError
from hessbench.estimators import _graph_pass, _rules_norm, get_estimator
from hessbench.estimators._rules_attention import SelectRule
from hessbench.suite.architectures import ResidualMLP, TinyGPT


class Encoder(nn.Module):
    """Float inputs, ``nn.TransformerEncoder`` (post-norm, dropout in eval mode), flatten, Linear."""

    def __init__(self, act, bool_mask: bool, padding: bool = False):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.1, activation=act, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        mask = nn.Transformer.generate_square_subsequent_mask(4)
        self.register_buffer("mask", mask.isinf() if bool_mask else mask)
        self.padding = padding
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.padding:
            h = self.enc(h, mask=self.mask, src_key_padding_mask=self.mask[0])
        else:
            h = self.enc(h, mask=self.mask)
        return self.out(torch.flatten(h, 1))


def _gpt(causal: bool, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = TinyGPT(4, 6, d_model=8, heads=2, layers=layers, mlp_ratio=2, causal=causal)
    for m in model.modules():  # non-trivial norms: the affine parts matter
        if isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.double().eval()


def _problem(kind: str, batch: int):
    g = torch.Generator().manual_seed(batch)
    if kind.startswith("gpt"):
        model = _gpt(kind == "gpt-causal")
        x, y = torch.randint(6, (batch, 4), generator=g), torch.randint(6, (batch,), generator=g)
        return model, nn.CrossEntropyLoss(), x, y
    torch.manual_seed(1)
    act = "relu" if kind == "encoder-relu-bool" else nn.GELU()
    model = Encoder(act, kind == "encoder-relu-bool").double().eval()
    x = torch.randn(batch, 4, 3, generator=g, dtype=torch.float64)
    return model, nn.MSELoss(), x, torch.randn(batch, 3, generator=g, dtype=torch.float64)


def _close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("kind", ["gpt-causal", "gpt", "encoder-relu-bool", "encoder-gelu"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("name", "ref"), [("exact", "hessian"), ("ggn_exact", "ggn")])
def test_exact_diagonals_of_transformers_match_brute_force(kind, batch, name, ref):
    model, loss_fn, x, y = _problem(kind, batch)
    with sdpa_kernel(SDPBackend.MATH):  # the brute force differentiates twice
        want = getattr(reference, f"{ref}_diag")(model, loss_fn, x, y)
    _close(get_estimator(name, method="structured")(model, loss_fn, x, y), want)


@pytest.mark.parametrize("kind", ["gpt-causal", "gpt", "encoder-gelu", "resmlp"])
@pytest.mark.parametrize("batch", [1, 3])
def test_layernorm_residual_split_keeps_the_exact_diagonal(monkeypatch, kind, batch):
    """LayerNorm's residual as a diagonal plus three columns per row (from every size,
    ``SPLIT_MIN`` 0): still the brute-force diagonal, and the split did run."""
    if kind == "resmlp":
        torch.manual_seed(2)
        model = ResidualMLP((5,), 3, width=6, hidden=8, blocks=2, act=nn.GELU, norm=True, bias=True)
        model = model.double()
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 5, generator=g, dtype=torch.float64)
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(3, (batch,), generator=g)
    else:
        model, loss_fn, x, y = _problem(kind, batch)
    with sdpa_kernel(SDPBackend.MATH):
        want = reference.hessian_diag(model, loss_fn, x, y)
    monkeypatch.setattr(_rules_norm, "SPLIT_MIN", 0)
    split, kinds = _rules_norm.LayerNormRule.residual_parts, []

    def spy(self, m, c, g):
        parts = split(self, m, c, g)
        kinds.append(tuple(k for k, _, _ in parts))
        return parts

    monkeypatch.setattr(_rules_norm.LayerNormRule, "residual_parts", spy)
    _close(get_estimator("exact", method="structured")(model, loss_fn, x, y), want)
    assert ("diag", "cols") in kinds, kinds


@pytest.mark.parametrize("kind", ["gpt-causal", "encoder-gelu"])
@pytest.mark.parametrize("batch", [1, 3])
def test_compressed_column_blocks_keep_the_exact_diagonal(monkeypatch, kind, batch):
    """Merged blocks of more than twice a node's features as that node's eigen-columns
    (from every width, ``COMPRESS_MIN`` 1): still the brute-force diagonal."""
    model, loss_fn, x, y = _problem(kind, batch)
    with sdpa_kernel(SDPBackend.MATH):
        want = reference.hessian_diag(model, loss_fn, x, y)
    monkeypatch.setattr(_graph_pass, "COMPRESS_MIN", 1)
    compress, seen = _graph_pass._compress, []

    def spy(b):
        out = compress(b)
        seen.append((b.v.shape[1], out.v.shape[1]))
        return out

    monkeypatch.setattr(_graph_pass, "_compress", spy)
    _close(get_estimator("exact", method="structured")(model, loss_fn, x, y), want)
    assert seen
    assert all(k_out < k_in for k_in, k_out in seen), seen


@pytest.mark.parametrize("kind", ["gpt-causal", "encoder-gelu"])
def test_residual_columns_rebuild_the_residual(monkeypatch, kind):
    """The blocks the exact pass takes at attention (signed columns head by head,
    eigenvalues above rounding only) and LayerNorm (a diagonal and three columns per
    position) sum to the node's residual, to rounding."""
    from hessbench.estimators._rules_attention import AttentionRule
    from hessbench.estimators._rules_norm import LayerNormRule

    seen = []

    def spy(original):
        def wrapped(self, m, c, g):
            parts = original(self, m, c, g)
            res = self.residual(m, c, g)
            n = res.shape[0]
            rebuilt, k = torch.zeros_like(res), 0
            for kind, v, signs in parts:
                if kind == "diag":
                    rebuilt += torch.diag_embed(v.reshape(n, -1).square() * signs.reshape(n, -1))
                    continue
                v = v.reshape(*v.shape[:2], -1)
                rebuilt += (v.transpose(1, 2) * signs.unsqueeze(1)) @ v
                k += v.shape[1]
            torch.testing.assert_close(rebuilt, res, rtol=0, atol=1e-12 * res.abs().max())
            split = any(kind == "diag" for kind, _, _ in parts)
            seen.append((type(self).__name__, k, res.shape[1], split))
            return parts

        return wrapped

    monkeypatch.setattr(AttentionRule, "residual_parts", spy(AttentionRule.residual_parts))
    monkeypatch.setattr(LayerNormRule, "residual_parts", spy(LayerNormRule.residual_parts))
    monkeypatch.setattr(_rules_norm, "SPLIT_MIN", 0)  # LayerNorm's split wherever it applies
    model, loss_fn, x, y = _problem(kind, 3)
    get_estimator("exact")(model, loss_fn, x, y)
    assert {n for n, _, _, _ in seen} == {"AttentionRule", "LayerNormRule"}
    if kind == "gpt-causal":  # read at the last position: the top layers' residuals are low rank
        assert any(k < f for n, k, f, _ in seen if n == "AttentionRule"), seen
        # the eigen-columns' rank cut (a split residual has 3 columns per position anyway)
        assert any(k < f for n, k, f, split in seen if n == "LayerNormRule" and not split), seen


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(
            weight=torch.tensor([0.5, 1.0, 2.0, 1.5, 0.2, 1.0], dtype=torch.float64)
        ),
        nn.CrossEntropyLoss(label_smoothing=0.1),
    ],
    ids=["mean", "sum", "weighted", "smoothed"],
)
def test_the_exact_pass_in_chunks_of_samples_equals_one_pass(monkeypatch, loss_fn):
    """The exact pass on chunks of 2 samples (of 5), each chunk's share weighed by the
    loss's reduction factor, gives the one-call diagonal, gradient and loss."""
    model = _gpt(True)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(6, (5, 4), generator=g), torch.randint(6, (5,), generator=g)
    est = get_estimator("exact")
    monkeypatch.setattr(_graph_pass, "BATCH_ENTRIES", 10**12)  # one call
    whole = est.estimate_with_grad(model, loss_fn, x, y)
    sizes = []
    chunk_size = _graph_pass.chunk_size

    def spy(plan, problem, mode):
        sizes.append(chunk_size(plan, problem, mode))
        return sizes[-1]

    monkeypatch.setattr(_graph_pass, "chunk_size", spy)
    monkeypatch.setattr(_graph_pass, "BATCH_ENTRIES", 0)
    per = next(v for k, v in _plan_memo(model).items() if k[0] == "chunk_entries")
    monkeypatch.setattr(_graph_pass, "CHUNK_ENTRIES", 2 * per)
    chunked = est.estimate_with_grad(model, loss_fn, x, y)
    assert sizes == [2]
    for got, ref in zip(chunked[:2], whole[:2], strict=True):
        _close(got, ref)
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-13, atol=0.0)


def _plan_memo(model) -> dict:
    """The memo of the graph plan the estimators built for ``model``."""
    from hessbench.estimators._graph import GraphPlan
    from hessbench.estimators._sequential import build_plan

    plan = build_plan(model, graph=True)
    assert isinstance(plan, GraphPlan)
    return plan.memo


def test_no_chunks_with_dropout_in_training_mode(monkeypatch):
    """Dropout masks are drawn for the whole batch: one call however large the bound."""
    from hessbench.estimators._factor_pass import Mode, Problem
    from hessbench.estimators._losses import LossSpec
    from hessbench.estimators._sequential import build_plan

    model, loss_fn, x, y = _problem("encoder-gelu", 3)
    monkeypatch.setattr(_graph_pass, "BATCH_ENTRIES", 0)
    monkeypatch.setattr(_graph_pass, "CHUNK_ENTRIES", 0)
    problem = Problem(model, LossSpec.of(loss_fn), x, y, torch.Generator().manual_seed(0))
    plan, mode = build_plan(model, graph=True), Mode(columns="exact", residual=True)
    assert _graph_pass.chunk_size(plan, problem, mode) == 1  # eval mode: one sample a call
    model.train()
    assert _graph_pass.chunk_size(plan, problem, mode) == 3
    assert _graph_pass.chunk_size(plan, problem, Mode(columns="exact", residual=False)) == 3


def test_the_causal_mask_matters_to_the_tiny_gpt():
    """Two layers: the earlier positions' masked attention reaches the last position."""
    x, y = torch.tensor([[1, 4, 2, 5]]), torch.tensor([3])
    a = get_estimator("exact", method="structured")(_gpt(True), nn.CrossEntropyLoss(), x, y)
    b = get_estimator("exact", method="structured")(_gpt(False), nn.CrossEntropyLoss(), x, y)
    k = "blocks.0.self_attn.in_proj_weight"
    assert (a[k] - b[k]).abs().max() > 1e-3 * a[k].abs().max()


@pytest.mark.parametrize("kind", ["gpt-causal", "encoder-relu-bool"])
def test_hesscale_facts_on_transformers(kind):
    model, loss_fn, x, y = _problem(kind, 3)
    hs = get_estimator("hesscale")(model, loss_fn, x, y)
    gn = get_estimator("hesscale_gn")(model, loss_fn, x, y)
    bl = get_estimator("bl89", output_curvature="zero")(model, loss_fn, x, y)
    with sdpa_kernel(SDPBackend.MATH):
        want = reference.hessian_diag(model, loss_fn, x, y)
    assert hs.keys() == want.keys()
    for k in hs:
        torch.testing.assert_close(hs[k], gn[k] + bl[k], rtol=1e-10, atol=1e-14, msg=k)
    head = "head" if kind.startswith("gpt") else "out"
    for k in (f"{head}.weight", f"{head}.bias"):  # the last layer is exact
        torch.testing.assert_close(hs[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
    # attention mixes positions: the recursion is an approximation there, not the exact value
    k = (
        "blocks.0.self_attn.in_proj_weight"
        if kind.startswith("gpt")
        else "enc.layers.0.linear1.weight"
    )
    assert not torch.allclose(hs[k], want[k], rtol=1e-3, atol=1e-8)


class SliceReader(nn.Module):
    """A pre-norm block read at positions 1:3 (a slice keeping dim 1), then per-position layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(6, 8)
        self.pos = nn.Parameter(0.5 * torch.randn(4, 8))
        self.block = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(4))
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 5)
        self.out = nn.Linear(10, 6)

    def forward(self, tokens):
        h = self.block(self.embed(tokens) + self.pos, src_mask=self.mask)
        h = torch.tanh(self.proj(self.norm(h[:, 1:3])))
        return self.out(torch.flatten(h, 1))


@pytest.mark.parametrize("make", ["gpt-causal", "gpt-1-layer", "slice"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn", "bl89"])
def test_the_diagonal_pass_on_the_positions_read_equals_the_full_pass(
    monkeypatch, make, batch, name
):
    """Below ``h[:, -1]`` (or ``h[:, 1:3]``) the pass runs on those positions: same numbers."""
    model = {
        "gpt-causal": lambda: _gpt(True),
        "gpt-1-layer": lambda: _gpt(False, layers=1),
        "slice": lambda: SliceReader().double().eval(),
    }[make]()
    g = torch.Generator().manual_seed(batch)
    x, y = torch.randint(6, (batch, 4), generator=g), torch.randint(6, (batch,), generator=g)
    est = get_estimator(name)
    monkeypatch.setattr(_graph_pass, "ROWS_MIN", 10**9)  # never: the full tensors
    full = est.estimate_with_grad(model, nn.CrossEntropyLoss(), x, y)
    seen = []
    rows = SelectRule.rows

    def spy(m, shape):
        seen.append(rows(m, shape))
        return seen[-1]

    monkeypatch.setattr(_graph_pass, "ROWS_MIN", 0)  # always
    monkeypatch.setattr(SelectRule, "rows", staticmethod(spy))
    narrow = est.estimate_with_grad(model, nn.CrossEntropyLoss(), x, y)
    want = (slice(1, 3), False) if make == "slice" else (slice(3, 4), True)
    assert seen == [want]
    for got, ref in zip(narrow[:2], full[:2], strict=True):
        _close(got, ref)
    torch.testing.assert_close(narrow[2], full[2], rtol=1e-12, atol=0.0)


def test_ggn_mc_mean_converges_to_ggn_exact_on_the_tiny_gpt():
    model, loss_fn, x, y = _problem("gpt-causal", 1)
    want = get_estimator("ggn_exact", method="structured")(model, loss_fn, x, y)
    errs = []
    for n in (25, 400):  # seeded: 0.17 and 0.02 measured
        est = get_estimator("ggn_mc", num_samples=n, method="structured")
        got = est(model, loss_fn, x, y, generator=torch.Generator().manual_seed(0))
        num = sum((got[k] - want[k]).abs().sum() for k in want)
        errs.append(float(num / sum(want[k].abs().sum() for k in want)))
    assert errs[1] < 0.05
    assert errs[1] < errs[0] / 2


def test_kfac_on_the_tiny_gpt_is_the_ggn_on_the_head_at_batch_1():
    model, loss_fn, x, y = _problem("gpt-causal", 1)
    got = get_estimator("kfac", backward="exact")(model, loss_fn, x, y)
    want = get_estimator("ggn_exact", method="structured")(model, loss_fn, x, y)
    assert got.keys() == want.keys()
    for k in ("head.weight", "head.bias", "embed.weight", "pos", "norm.weight"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.out(self.att(h, torch.tanh(h), h)[0][:, 0])


class Direct(nn.Module):
    """``nn.MultiheadAttention`` called directly, weights dropped: supported."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.out(self.att(h, h, h, need_weights=False)[0][:, -1])


def test_direct_multihead_attention_matches_brute_force():
    torch.manual_seed(2)
    model = Direct().double()
    x, y = torch.randn(2, 3, 3, dtype=torch.float64), torch.tensor([0, 1])
    with sdpa_kernel(SDPBackend.MATH):
        want = reference.hessian_diag(model, nn.CrossEntropyLoss(), x, y)
    _close(get_estimator("exact", method="structured")(model, nn.CrossEntropyLoss(), x, y), want)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Encoder("relu", True).train(), r"layer 'enc\.layers\.0' .*dropout in training"),
        (lambda: Encoder("relu", True, padding=True), r"with a src_key_padding_mask"),
        (CrossAttention, r"other than self-attention"),
    ],
)
def test_transformer_refusals_are_one_line(make, match):
    model = make().double()
    x, y = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    if isinstance(model, CrossAttention):
        x, y = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match=match) as err:
        get_estimator("hesscale")(model, nn.MSELoss(), x, y)
    assert "\n" not in str(err.value)
