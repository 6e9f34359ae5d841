"""Building problems: deterministic, RNG-neutral, right shapes, digits, training, dtypes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from hessbench.bench.problem import build_problem
from hessbench.errors import ConfigError
from hessbench.suite import (
    SuiteError,
    build_model,
    check_model,
    load_digits,
    parse_suite,
    task_variants,
    training_data,
)

SUITE = """
name: t
tasks:
  - name: mlp_ce
    model: {kind: mlp, widths: [5, 4], activation: tanh}
    loss: {kind: cross_entropy}
    data: {kind: synthetic, input_shape: [3], num_classes: 4, size: 64}
    eval: {batch_size: 2, num_batches: 3, states: [init, {steps: 60, lr: 0.05, batch_size: 16}]}
  - name: mlp_mse_dropout
    model: {kind: mlp, widths: [6], activation: relu, dropout: 0.5}
    loss: {kind: mse, reduction: sum}
    data: {kind: synthetic, input_shape: [2, 3], output_dim: 2, size: 32}
    eval: {batch_size: 1, num_batches: 2, states: [init, {steps: 20, optimizer: sgd, lr: 0.01, batch_size: 8}]}
  - name: cnn_digits
    model: {kind: cnn, channels: [2, 3], hidden: [5], activation: tanh, pooling: avg}
    loss: {kind: cross_entropy}
    data: {kind: digits, layout: image}
    eval: {batch_size: 3, num_batches: 2}
  - name: digits_mse
    model: {kind: mlp, widths: [4]}
    loss: {kind: mse}
    data: {kind: digits, layout: flat}
    eval: {batch_size: 4, num_batches: 100, states: [init, {steps: 40, lr: 0.01}]}
  - name: seq_conv1d
    model:
      kind: sequential
      layers:
        - {type: Conv1d, args: [2, 3, 3]}
        - {type: Softplus}
        - {type: MaxPool1d, args: [2]}
        - {type: Flatten}
        - {type: Linear, args: [6, 2], kwargs: {bias: false}}
    loss: {kind: mse}
    data: {kind: synthetic, input_shape: [2, 6], output_dim: 2}
    eval: {batch_size: 2, num_batches: 2}
estimators: [{name: zero}]
"""
VARIANTS = {v.name: v for v in task_variants(parse_suite(SUITE))}
F32 = {"dtype": torch.float32, "device": "cpu"}


def build(name: str, seed: int = 0, **kw):
    return build_problem(VARIANTS[name], seed, **{**F32, **kw})


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_problem(a, b) -> bool:
    sa, sb = state(a.model), state(b.model)
    weights = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    data = all(
        torch.equal(xa, xb) and torch.equal(ya, yb)
        for (xa, ya), (xb, yb) in zip(a.batches, b.batches, strict=True)
    )
    return weights and data


@pytest.mark.parametrize("name", ["mlp_ce@init", "mlp_ce@trained60", "cnn_digits", "seq_conv1d"])
def test_deterministic_given_task_and_seed(name):
    assert same_problem(build(name, 0), build(name, 0))
    a, b = build(name, 0), build(name, 1)
    assert not torch.equal(a.model[-1].weight, b.model[-1].weight)
    assert not torch.equal(a.batches[0][0], b.batches[0][0])


def test_variants_of_a_task_share_weights_and_batches():
    init, trained = build("mlp_ce@init"), build("mlp_ce@trained60")
    assert all(
        torch.equal(x, y) for (x, _), (y, _) in zip(init.batches, trained.batches, strict=True)
    )
    assert not torch.equal(init.model[0].weight, trained.model[0].weight)
    fresh = build_model(VARIANTS["mlp_ce@init"].task.model, (3,), 4)
    assert not torch.equal(fresh[0].weight, init.model[0].weight)  # the global RNG, unseeded


@pytest.mark.parametrize("name", ["mlp_ce@trained60", "mlp_mse_dropout@trained20", "cnn_digits"])
def test_global_rng_untouched(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build(name)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    ("name", "x_shape", "y_shape", "y_dtype", "num_params"),
    [
        ("mlp_ce@init", (2, 3), (2,), torch.int64, 3 * 5 + 5 + 5 * 4 + 4 + 4 * 4 + 4),
        ("mlp_mse_dropout@init", (1, 2, 3), (1, 2), torch.float32, 6 * 6 + 6 + 6 * 2 + 2),
        ("cnn_digits", (3, 1, 8, 8), (3,), torch.int64, 2 * 9 + 2 + 3 * 18 + 3 + 12 * 5 + 5 + 60),
        ("digits_mse@init", (4, 64), (4, 10), torch.float32, 64 * 4 + 4 + 4 * 10 + 10),
        ("seq_conv1d", (2, 2, 6), (2, 2), torch.float32, 3 * 2 * 3 + 3 + 6 * 2),
    ],
)
def test_shapes(name, x_shape, y_shape, y_dtype, num_params):
    p = build(name)
    task = VARIANTS[name].task
    assert len(p.batches) == task.eval.num_batches
    for x, y in p.batches:
        assert tuple(x.shape) == x_shape
        assert (tuple(y.shape), y.dtype) == (y_shape, y_dtype)
        assert p.model(x).shape == (x_shape[0], task.output_dim)
    assert p.input_shape == x_shape[1:]
    assert p.num_params == num_params == sum(q.numel() for q in p.model.parameters())
    assert isinstance(p.model, nn.Sequential)
    assert not p.model.training
    assert all(q.grad is None and q.requires_grad for q in p.model.parameters())
    assert isinstance(p.loss_fn, nn.CrossEntropyLoss if y_dtype == torch.int64 else nn.MSELoss)
    assert p.loss_fn.reduction == task.loss.reduction


def test_models():
    mlp = build("mlp_mse_dropout@init").model
    assert [type(m) for m in mlp] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    cnn = build("cnn_digits").model
    assert [type(m).__name__ for m in cnn] == [
        "Conv2d",
        "Tanh",
        "AvgPool2d",
        "Conv2d",
        "Tanh",
        "AvgPool2d",
        "Flatten",
        "Linear",
        "Tanh",
        "Linear",
    ]
    seq = build("seq_conv1d").model
    assert seq[-1].bias is None


def test_digits():
    x, labels = load_digits()
    assert x.shape == (1797, 64)
    assert x.dtype == torch.float32
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))
    flat = build("digits_mse@init")
    (_, y0), image = flat.batches[0], build("cnn_digits").batches[0][0]
    assert torch.equal(y0.sum(1), torch.ones(4))  # one-hot rows for MSE
    assert image.shape[1:] == (1, 8, 8)
    # 400 evaluated samples cycle through the 297 of the evaluation part, disjoint from training
    xs = torch.cat([b[0] for b in flat.batches])
    assert len(torch.unique(xs, dim=0)) <= 297
    train, _ = training_data(VARIANTS["digits_mse@init"].task, 0)
    assert len(train) == 1500
    both = torch.cat([torch.unique(xs, dim=0), torch.unique(train, dim=0)])
    assert len(torch.unique(both, dim=0)) == len(torch.unique(xs, dim=0)) + len(
        torch.unique(train, dim=0)
    )


def test_digits_are_scikit_learns():
    from sklearn import datasets

    ref = datasets.load_digits()
    x, labels = load_digits()
    assert torch.equal(x, torch.tensor(ref.data / 16, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(ref.target))


def test_digits_without_the_file_use_scikit_learns_loader(monkeypatch):
    """The file is read without importing scikit-learn; without it, ``load_digits`` is used."""
    import hessbench.suite.data as data_module

    direct = load_digits()
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    load_digits.cache_clear()
    try:
        x, labels = load_digits()
    finally:
        load_digits.cache_clear()
    assert torch.equal(x, direct[0])
    assert torch.equal(labels, direct[1])


def test_reading_the_digits_does_not_import_scikit_learn():
    code = (
        "import sys\nfrom hessbench.suite import load_digits\nload_digits()\n"
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["mlp_ce", "mlp_mse_dropout", "digits_mse"])
def test_training_reduces_the_loss(name):
    steps = VARIANTS[f"{name}@init"].task.eval.states[1].steps
    init, trained = build(f"{name}@init"), build(f"{name}@trained{steps}")
    x, y = training_data(VARIANTS[f"{name}@init"].task, 0)
    with torch.no_grad():
        before = init.loss_fn(init.model(x), y)
        after = trained.loss_fn(trained.model(x), y)
    assert after < 0.9 * before


def test_dtype_and_device():
    p32, p64 = build("mlp_ce@trained60"), build("mlp_ce@trained60", dtype=torch.float64)
    assert all(q.dtype == torch.float64 for q in p64.model.parameters())
    assert all(x.dtype == torch.float64 and y.dtype == torch.int64 for x, y in p64.batches)
    assert all(x.device.type == "cpu" for x, _ in p64.batches)
    # the same draws, cast: a float64 task is the float32 task in higher precision
    assert torch.equal(p32.batches[0][0].double(), p64.batches[0][0])
    i32, i64 = build("mlp_ce@init"), build("mlp_ce@init", dtype=torch.float64)
    assert torch.equal(i32.model[0].weight.double(), i64.model[0].weight)
    mse = build("seq_conv1d", dtype=torch.float64)
    assert mse.batches[0][1].dtype == torch.float64


def test_model_checks():
    spec = VARIANTS["cnn_digits"].task.model
    with pytest.raises(ConfigError, match="cnn needs"):
        build_model(spec, (64,), 10)
    with pytest.raises(ConfigError, match="shrink"):
        build_model(spec, (1, 3, 3), 10)
    check_model(spec, (1, 8, 8), 10)
    seq = VARIANTS["seq_conv1d"].task.model
    check_model(seq, (2, 6), 2)
    with pytest.raises(ConfigError, match="does not fit inputs of shape"):
        check_model(seq, (2, 9), 2)
    with pytest.raises(
        ConfigError, match=r"outputs of shape \(2,\) per sample; the data need \(3,\)"
    ):
        check_model(seq, (2, 6), 3)


def test_output_mismatch_is_a_suite_error():
    variant = VARIANTS["seq_conv1d"]
    bad_task = variant.task.model_copy(
        update={"data": variant.task.data.model_copy(update={"output_dim": 3})}
    )
    bad = type(variant)(bad_task, "init", "bad")
    with pytest.raises(SuiteError, match="task 'seq_conv1d': model outputs have shape"):
        build_problem(bad, 0, **F32)


LOSS_SUITE = """
name: losses
tasks:
  - name: nll
    model: {kind: mlp, widths: [4]}
    loss: {kind: nll, weight: [1.0, 2.0, 0.5]}
    data: {kind: synthetic, input_shape: [3], num_classes: 3, size: 32}
    eval: {batch_size: 2, num_batches: 2, states: [init, {steps: 5, batch_size: 8}]}
  - name: bce
    model: {kind: cnn, channels: [2], hidden: [3]}
    loss: {kind: bce_with_logits, reduction: sum}
    data: {kind: synthetic, input_shape: [1, 4, 4], output_dim: 3}
    eval: {batch_size: 4, num_batches: 2}
  - name: huber_digits
    model: {kind: mlp, widths: [4]}
    loss: {kind: huber, delta: 0.5}
    data: {kind: digits}
    eval: {batch_size: 2, num_batches: 1}
  - name: ce_smooth
    model: {kind: sequential, layers: [{type: Linear, args: [3, 2]}]}
    loss: {kind: cross_entropy, label_smoothing: 0.2, weight: [1, 3]}
    data: {kind: synthetic, input_shape: [3], num_classes: 2}
    eval: {batch_size: 2, num_batches: 1}
estimators: [{name: zero}]
"""
LOSS_VARIANTS = {v.name: v for v in task_variants(parse_suite(LOSS_SUITE))}


@pytest.mark.parametrize(
    ("name", "loss_type", "y_dtype", "last"),
    [
        ("nll@init", nn.NLLLoss, torch.int64, nn.LogSoftmax),
        ("nll@trained5", nn.NLLLoss, torch.int64, nn.LogSoftmax),
        ("bce", nn.BCEWithLogitsLoss, torch.float64, nn.Linear),
        ("huber_digits", nn.HuberLoss, torch.float64, nn.Linear),
        ("ce_smooth", nn.CrossEntropyLoss, torch.int64, nn.Linear),
    ],
)
def test_loss_kinds_build_their_problems(name, loss_type, y_dtype, last):
    """Targets, losses and models per loss kind; every estimator's loss closed form accepts them."""
    from hessbench.estimators import get_estimator

    p = build_problem(LOSS_VARIANTS[name], 0, dtype=torch.float64, device="cpu")
    assert type(p.loss_fn) is loss_type
    assert isinstance(p.model[-1], last)
    x, y = p.batches[0]
    assert y.dtype == y_dtype
    if loss_type is nn.BCEWithLogitsLoss:
        assert y.shape == (4, 3)
        assert set(y.unique().tolist()) <= {0.0, 1.0}
    if name == "huber_digits":
        assert torch.equal(y.sum(1), torch.ones(2, dtype=torch.float64))  # one-hot rows
    if getattr(p.loss_fn, "weight", None) is not None:
        assert p.loss_fn.weight.dtype == torch.float64
    diag = get_estimator("hesscale")(p.model, p.loss_fn, x, y)
    assert set(diag) == {n for n, _ in p.model.named_parameters()}
