"""Residual MLP and ResNet models in suites: builders, validation, and exact diagonals.

The exact and GGN diagonals of these graph models, computed by the graph engine
(``method="structured"``, which never falls back), are checked against the
independent brute force of ``tests/reference.py`` (float64, batch 1 and 3, both
losses).
"""

from __future__ import annotations

import pytest
import reference
import torch
from torch import nn

from hessbench.errors import ConfigError
from hessbench.estimators import get_estimator
from hessbench.suite import SuiteError, build_model, check_model, parse_suite
from hessbench.suite.architectures import BasicBlock, ResidualMLP, ResNet

TASKS = """
name: t
tasks:
  - name: rn
    model: {kind: resnet, channels: [2, 3], batchnorm: true}
    loss: {kind: cross_entropy}
    data: {kind: digits, layout: image}
  - name: rm
    model: {kind: resmlp, width: 6, hidden: 5, blocks: 2, activation: tanh}
    loss: {kind: mse}
    data: {kind: synthetic, input_shape: [4], output_dim: 3}
estimators: [{name: exact}]
"""


def test_resnet_and_resmlp_build_from_a_suite():
    suite = parse_suite(TASKS)
    rn = build_model(suite.tasks[0].model, (1, 8, 8), 10)
    rm = build_model(suite.tasks[1].model, (4,), 3)
    assert isinstance(rn, ResNet)
    assert isinstance(rm, ResidualMLP)
    assert sum(isinstance(m, BasicBlock) for m in rn.modules()) == 2
    assert rn(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert rm(torch.randn(2, 4)).shape == (2, 3)
    # the second stage halves the resolution through a strided 1x1 shortcut
    assert isinstance(rn.layers[1].shortcut, nn.Sequential)
    assert rn.layers[1].conv1.stride == (2, 2)


def test_resnet_refuses_flat_inputs_naming_the_field():
    text = TASKS.replace("layout: image", "layout: flat")
    with pytest.raises(SuiteError, match=r"data\.layout: a resnet needs image inputs"):
        parse_suite(text)
    with pytest.raises(ConfigError, match="a resnet needs"):
        check_model(parse_suite(TASKS).tasks[0].model, (64,), 10)


@pytest.mark.parametrize(
    "layer",
    [
        "{type: BatchNorm1d, args: [5]}",
        "{type: LayerNorm, args: [5]}",
        "{type: GroupNorm, args: [1, 5]}",
        "{type: GELU}",
        "{type: SiLU}",
    ],
)
def test_sequential_takes_the_new_layers(layer):
    text = f"""
name: s
tasks:
  - name: q
    model: {{kind: sequential, layers: [{{type: Linear, args: [4, 5]}}, {layer}, {{type: Linear, args: [5, 2]}}]}}
    loss: {{kind: mse}}
    data: {{kind: synthetic, input_shape: [4], output_dim: 2}}
estimators: [{{name: exact}}]
"""
    suite = parse_suite(text)
    model = build_model(suite.tasks[0].model, (4,), 2)
    assert model(torch.randn(3, 4)).shape == (3, 2)


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":
        model = ResNet((1, 4, 4), 3, channels=[2, 2], blocks=1, act=nn.Tanh, bn=True)
        for m in model.modules():  # non-trivial running statistics: eval-mode BN is affine
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
    else:
        model = ResidualMLP((3,), 3, width=4, hidden=3, blocks=2, act=nn.Tanh, norm=True, bias=True)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.double().eval()


@pytest.mark.parametrize("kind", ["resnet", "resmlp"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize(("name", "ref"), [("exact", "hessian"), ("ggn_exact", "ggn")])
def test_exact_diagonals_of_graph_models_match_brute_force(kind, batch, loss, name, ref):
    model = _tiny(kind)
    g = torch.Generator().manual_seed(batch)
    shape = (1, 4, 4) if kind == "resnet" else (3,)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (batch,), generator=g)
    else:
        loss_fn, y = nn.MSELoss(), torch.randn(batch, 3, generator=g, dtype=torch.float64)
    want = getattr(reference, f"{ref}_diag")(model, loss_fn, x, y)
    # method="structured": the graph engine itself, never the autograd fallback
    got = get_estimator(name, method="structured")(model, loss_fn, x, y)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


SEQUENCE_TASK = """
name: s
tasks:
  - name: gpt
    model: {kind: transformer, d_model: 8, heads: 2, layers: 1, mlp_ratio: 2}
    loss: {kind: cross_entropy}
    data: {kind: sequence, task: TASK, vocab: 6, length: 4}
estimators: [{name: exact}]
"""


@pytest.mark.parametrize(
    ("task", "label"),
    [
        ("sum_mod", lambda x: x.sum(1) % 6),
        ("copy_first", lambda x: x[:, 0]),
        ("min", lambda x: x.amin(1)),
    ],
)
def test_sequence_tasks_label_their_tokens(task, label):
    from hessbench.bench.problem import build_problem
    from hessbench.suite import task_variants

    suite = parse_suite(SEQUENCE_TASK.replace("TASK", task))
    problem = build_problem(task_variants(suite)[0], 0, dtype=torch.float64, device="cpu")
    x, y = problem.batches[0]
    assert x.dtype == torch.int64
    assert x.shape == (1, 4)
    assert int(x.max()) < 6
    assert torch.equal(y, label(x))


def test_transformer_and_sequence_data_go_together():
    bad = SEQUENCE_TASK.replace("TASK", "min").replace(
        "{kind: sequence, task: min, vocab: 6, length: 4}",
        "{kind: synthetic, input_shape: [4], num_classes: 6}",
    )
    with pytest.raises(SuiteError, match=r"data\.kind: a transformer reads token sequences"):
        parse_suite(bad)
    with pytest.raises(SuiteError, match=r"heads: must divide d_model=8"):
        parse_suite(SEQUENCE_TASK.replace("TASK", "min").replace("heads: 2", "heads: 3"))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("name", "ref"), [("exact", "hessian"), ("ggn_exact", "ggn")])
def test_exact_diagonals_of_a_tiny_gpt_match_brute_force(batch, name, ref):
    """Standard nn.TransformerEncoderLayer blocks, causal mask, embeddings, last position."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hessbench.suite.architectures import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(4, 6, d_model=8, heads=2, layers=1, mlp_ratio=2, causal=True).double().eval()
    g = torch.Generator().manual_seed(batch)
    x, y = torch.randint(6, (batch, 4), generator=g), torch.randint(6, (batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    with sdpa_kernel(SDPBackend.MATH):  # the brute force differentiates twice too
        want = getattr(reference, f"{ref}_diag")(model, loss_fn, x, y)
    # method="structured": the graph engine itself (attention as plan nodes), never the fallback
    got = get_estimator(name, method="structured")(model, loss_fn, x, y)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
