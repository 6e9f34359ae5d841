"""The estimator contract, checked for every registered estimator.

Every estimator, called as ``est(model, loss_fn, inputs, targets, generator=...)``:

- returns one detached, finite tensor per trainable parameter, keyed by the
  ``named_parameters()`` names in order, with the parameter's shape, dtype and device;
- leaves the model (parameters, buffers, ``.grad``, hooks, training flags) and the
  global RNG as it found them;
- is a deterministic function of the generator's seed;
- refuses what it cannot handle with one-line hessbench errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from pairwise import covering, uncovered
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

from hessbench.errors import (
    ConfigError,
    HessbenchError,
    InputError,
    TooLargeError,
    UnsupportedError,
)
from hessbench.estimators import available_estimators, estimator_class, get_estimator
from hessbench.estimators._layerwise import LayerwiseEstimator

# Every registered estimator: the optional peers (hessbench.estimators.peers) too, when
# their libraries are installed.
ALL = available_estimators()

# Estimators that need an nn.Sequential of supported layers (the layer-by-layer pass,
# and the peer wrappers built on its plan).
LAYERWISE_ONLY = {n for n in ALL if issubclass(estimator_class(n), LayerwiseEstimator)}

# Estimators that refuse training-mode dropout although they take no per-sample path.
REFUSES_TRAIN_DROPOUT = {"curvlinops.hutchinson", "curvlinops.xdiag"}


def _refuses_train_dropout(est) -> bool:
    return est.name in REFUSES_TRAIN_DROPOUT or getattr(est, "method", None) in ("jacobian", "vmap")


def _valid(name: str, params: dict) -> bool:
    try:
        get_estimator(name, **params)
    except ConfigError:
        return False
    return True


# Implementation variants that take a different code path than the defaults; those an
# estimator does not offer (an unknown field or value) are left out.
_VARIANT_CANDIDATES = [
    ("exact", {"method": "hvp"}),
    ("exact", {"method": "structured"}),
    ("exact", {"representation": "factored"}),
    ("exact", {"representation": "full"}),
    ("exact", {"compute_dtype": "model"}),
    ("ggn_exact", {"method": "structured"}),
    ("ggn_exact", {"method": "jacobian"}),
    ("ggn_mc", {"method": "structured", "num_samples": 3}),
    ("ggn_mc", {"method": "jacobian", "num_samples": 3}),
    ("efisher", {"method": "structured"}),
    ("efisher", {"method": "vmap"}),
    ("sophia_gnb", {"method": "structured"}),
    ("sophia_gnb", {"method": "autograd"}),
    ("kfac", {"backward": "exact"}),
    ("kfac", {"backward": "mc", "num_samples": 4}),
    ("bl89", {"output_curvature": "zero"}),
    ("hutchinson", {"num_samples": 3}),
    ("adahessian", {"num_samples": 2, "spatial_averaging": False}),
    # optional peers (left out when their library is not installed)
    ("backpack.kfac", {"backward": "exact"}),
    ("backpack.diag_ggn_mc", {"num_samples": 3}),
    ("curvlinops.kfac", {"backward": "exact"}),
    ("curvlinops.hutchinson", {"num_samples": 3}),
]
VARIANTS = [(n, p) for n, p in _VARIANT_CANDIDATES if _valid(n, p)]
CONFIGS = [(n, {}) for n in ALL] + VARIANTS


def _cfg_id(cfg) -> str:
    name, params = cfg
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def _params(cfgs) -> list:
    return [pytest.param(c, id=_cfg_id(c)) for c in cfgs]


CFG_PARAMS = _params(CONFIGS)
NAME_PARAMS = _params([(n, {}) for n in ALL])

# Configurations that need the layer-by-layer pass: the layer-wise estimators and
# every estimator forced onto its structured path.
LAYERWISE = (
    [(n, {}) for n in sorted(LAYERWISE_ONLY)]
    + [("bl89", {"output_curvature": "zero"})]
    + [(n, p) for n, p in VARIANTS if n in LAYERWISE_ONLY and p.get("backward") == "exact"]
    + [(n, p) for n, p in VARIANTS if p.get("method") == "structured"]
)
LAYERWISE_PARAMS = _params(LAYERWISE)
# Configurations that must work on any differentiable nn.Module: the defaults of the
# autograd-capable estimators and their non-structured methods.
GENERIC = [
    (n, {"num_samples": 2} if n in ("hutchinson", "adahessian") else {})
    for n in ALL
    if n not in LAYERWISE_ONLY
] + [(n, p) for n, p in VARIANTS if p.get("method") not in (None, "structured")]
GENERIC_PARAMS = _params(GENERIC)


def test_configs_cover_every_registered_estimator():
    assert {n for n, _ in CONFIGS} == set(ALL)
    assert {n for n, _ in LAYERWISE} | {n for n, _ in GENERIC} == set(ALL)


# ---------------------------------------------------------------- problems


class ResidualMLP(nn.Module):
    """A non-Sequential model: ``out(h + tanh(mid(h)))`` with ``h = tanh(inp(x))``."""

    def __init__(self, d_in: int = 4, width: int = 5, d_out: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.tanh(self.mid(h)))


class PlainMLP(nn.Module):
    """A non-Sequential module computing the same function as ``mlp()``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fc2(torch.tanh(self.fc1(x)))


class MyLinear(nn.Linear):
    """A subclass the layer table does not know (exact type match)."""


def _seeded(seed: int, build):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    )


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3))


ARCHS = {"mlp": mlp, "cnn": cnn, "dropout_mlp": dropout_mlp, "residual": ResidualMLP}
INPUT_SHAPES = {"mlp": (4,), "cnn": (2, 6, 6), "dropout_mlp": (4,), "residual": (4,)}


def make_problem(arch: str, loss: str, dtype=torch.float64, batch: int = 3, seed: int = 0):
    """A seeded model, loss, inputs and targets; the global RNG is left alone."""

    def build():
        model = ARCHS[arch]().to(dtype)
        x = torch.randn(batch, *INPUT_SHAPES[arch], dtype=dtype)
        if loss == "ce":
            y = torch.randint(0, 3, (batch,))
            loss_fn: nn.Module = nn.CrossEntropyLoss()
        else:
            y = torch.randn(batch, 3, dtype=dtype)
            loss_fn = nn.MSELoss()
        return model, loss_fn, x, y

    return _seeded(seed, build)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(cfg):
    name, params = cfg
    return get_estimator(name, **params)


# --------------------------------------------------------------- snapshot

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


def _hooks(model: nn.Module) -> dict:
    out = {}
    for path, m in model.named_modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d is not None:
                out[(path, attr)] = list(d.keys())
    for name, p in model.named_parameters():
        out[("param", name)] = list((p._backward_hooks or {}).keys())
        post = getattr(p, "_post_accumulate_grad_hooks", None)
        out[("post", name)] = list((post or {}).keys())
    for attr in _GLOBAL_HOOKS:
        d = getattr(nn_module, attr, None)
        if d is not None:
            out[("global", attr)] = list(d.keys())
    return out


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": [id(p) for p in model.parameters()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: (None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters()
        },
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": _hooks(model),
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["param_ids"] == before["param_ids"], "parameters were replaced"
    for n, p in before["params"].items():
        assert after["params"][n].dtype == p.dtype, f"{n} changed dtype"
        assert torch.equal(after["params"][n], p), f"parameter {n} was modified"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    for n, g in before["grads"].items():
        ga = after["grads"][n]
        if g is None:
            assert ga is None, f"{n}.grad was set"
        else:
            assert ga is not None, f"{n}.grad was cleared"
            assert torch.equal(ga, g), f"{n}.grad was modified"
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), f"buffer {n} was modified"
    assert after["training"] == before["training"], "training flags changed"
    assert after["hooks"] == before["hooks"], "hooks were added or removed"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG state changed"


def assert_single_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg, "empty error message"
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def check_output(model: nn.Module, out: dict[str, Tensor]) -> None:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert isinstance(out, dict)
    assert list(out) == [n for n, _ in trainable]
    for n, p in trainable:
        v = out[n]
        assert isinstance(v, Tensor), n
        assert v.shape == p.shape, n
        assert v.dtype == p.dtype, n
        assert v.device == p.device, n
        assert not v.requires_grad, n
        assert v.grad_fn is None, n
        assert bool(torch.isfinite(v).all()), f"{n} is not finite"


# ------------------------------------------------------- output contract


def _covering_params(**factors: dict) -> list:
    """A pairwise covering set of the factors (``name={id: value}``), as pytest params.

    Every value of every factor, and every pair of values of any two factors, appears
    in at least one param (tests/pairwise.py); the full product is not needed for that.
    """
    rows = covering({name: list(values) for name, values in factors.items()})
    return [
        pytest.param(
            *(factors[name][r[name]] for name in factors), id="-".join(r[name] for name in factors)
        )
        for r in rows
    ]


# Every configuration on both architectures, both losses and both dtypes; every pair
# of those values (e.g. every configuration in float32 and float64, the CNN in float32
# with both losses) in at least one case.
OUTPUT_CONTRACT_PARAMS = _covering_params(
    cfg={_cfg_id(c): c for c in CONFIGS},
    arch={a: a for a in ("mlp", "cnn")},
    loss={loss: loss for loss in ("ce", "mse")},
    dtype={"f32": torch.float32, "f64": torch.float64},
)


def test_output_contract_params_cover_every_pair():
    factors = {
        "cfg": CONFIGS,
        "arch": ["mlp", "cnn"],
        "loss": ["ce", "mse"],
        "dtype": [torch.float32, torch.float64],
    }
    rows = [dict(zip(factors, p.values, strict=True)) for p in OUTPUT_CONTRACT_PARAMS]
    assert uncovered(rows, factors) == []
    assert len(rows) < 2 * 2 * 2 * len(CONFIGS)


@pytest.mark.parametrize(("cfg", "arch", "loss", "dtype"), OUTPUT_CONTRACT_PARAMS)
def test_output_contract_and_no_side_effects(cfg, arch, loss, dtype):
    est = build(cfg)
    model, loss_fn, x, y = make_problem(arch, loss, dtype)
    x_before, y_before = x.clone(), y.clone()
    before = snapshot(model)
    out = est(model, loss_fn, x, y, generator=gen(0))
    check_output(model, out)
    assert_unchanged(model, before)
    assert torch.equal(x, x_before)
    assert torch.equal(y, y_before)
    # the result does not alias the parameters
    for n, p in model.named_parameters():
        assert out[n].data_ptr() != p.data_ptr(), f"{n}: result aliases the parameter"


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_result_is_independent_storage(cfg):
    """Writing into the result must not affect the model or a later result."""
    est = build(cfg)
    model, loss_fn, x, y = make_problem("mlp", "ce")
    before = snapshot(model)
    out = est(model, loss_fn, x, y, generator=gen(0))
    ref = {k: v.clone() for k, v in out.items()}
    for v in out.values():
        v.fill_(123.0)
    assert_unchanged(model, before)
    again = est(model, loss_fn, x, y, generator=gen(0))
    assert_same(again, ref)


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_existing_grad_is_preserved(cfg):
    est = build(cfg)
    model, loss_fn, x, y = make_problem("mlp", "mse")
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
    before = snapshot(model)
    out = est(model, loss_fn, x, y, generator=gen(0))
    check_output(model, out)
    assert_unchanged(model, before)


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_preexisting_hooks_are_kept_and_not_fired_twice(cfg):
    """A user's own hooks stay registered; estimators add none of their own."""
    est = build(cfg)
    model, loss_fn, x, y = make_problem("mlp", "ce")
    handles = [
        model[0].register_forward_hook(lambda *a: None),
        model.register_forward_pre_hook(lambda *a: None),
        model[2].weight.register_hook(lambda g: None),
    ]
    try:
        before = snapshot(model)
        est(model, loss_fn, x, y, generator=gen(0))
        assert_unchanged(model, before)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(("train", "loss"), [(True, "ce"), (True, "mse"), (False, "ce")])
@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_dropout_model(cfg, loss, train):
    """Dropout draws from the generator (or a saved/restored global RNG), never leaking."""
    est = build(cfg)
    model, loss_fn, x, y = make_problem("dropout_mlp", loss)
    model.train(train)
    before = snapshot(model)
    if train and _refuses_train_dropout(est):
        # per-sample evaluation cannot reproduce a batch's dropout masks: refused
        with pytest.raises(UnsupportedError, match=r"layer '2' \(Dropout\)"):
            est(model, loss_fn, x, y, generator=gen(3))
        assert_unchanged(model, before)
        return
    a = est(model, loss_fn, x, y, generator=gen(3))
    check_output(model, a)
    assert_unchanged(model, before)
    b = est(model, loss_fn, x, y, generator=gen(3))
    assert_same(a, b)
    assert_unchanged(model, before)


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_eval_mode_dropout_is_identity(cfg):
    """In eval mode a Dropout layer changes nothing: same result as without it.

    Stochastic estimators included: the same generator gives the same draws, as the
    trainable parameters (and so the probes and labels) are the same.
    """
    est = build(cfg)
    model, loss_fn, x, y = make_problem("dropout_mlp", "ce")
    model.eval()
    plain = nn.Sequential(model[0], model[1], model[3])
    a = est(model, loss_fn, x, y, generator=gen(0))
    b = est(plain, loss_fn, x, y, generator=gen(0))
    assert [k.replace("3.", "2.") for k in a] == list(b)
    for k, v in a.items():
        torch.testing.assert_close(v, b[k.replace("3.", "2.")], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize(("arch", "loss"), [("mlp", "ce"), ("cnn", "mse")])
@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_seeding(cfg, arch, loss):
    """Same seed: bitwise identical; different seeds differ iff the estimator is stochastic."""
    est = build(cfg)
    model, loss_fn, x, y = make_problem(arch, loss, torch.float32)
    a = est(model, loss_fn, x, y, generator=torch.Generator().manual_seed(0))
    b = est(model, loss_fn, x, y, generator=torch.Generator().manual_seed(0))
    assert_same(a, b)
    # an equal, freshly built estimator gives the same
    assert_same(a, build(cfg)(model, loss_fn, x, y, generator=torch.Generator().manual_seed(0)))
    outs = [a] + [est(model, loss_fn, x, y, generator=gen(s)) for s in (1, 2, 3)]
    flat = [torch.cat([v.flatten() for v in o.values()]) for o in outs]
    n_distinct = len({tuple(f.tolist()) for f in flat})
    if est.stochastic:
        # categorical draws may coincide for two seeds by chance, hardly for four
        assert n_distinct > 1, "a stochastic estimator ignored its generator"
    else:
        assert n_distinct == 1, "a deterministic estimator depends on the seed"


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_no_generator(cfg):
    """Without a generator a fresh one is used: the global RNG is still untouched."""
    est = build(cfg)
    model, loss_fn, x, y = make_problem("mlp", "mse")
    before = snapshot(model)
    a = est(model, loss_fn, x, y)
    b = est(model, loss_fn, x, y)
    check_output(model, a)
    assert_unchanged(model, before)
    if not est.stochastic:
        assert_same(a, b)
    else:
        assert any(not torch.equal(a[k], b[k]) for k in a), "two unseeded runs agree bitwise"


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_no_generator_with_training_dropout(cfg):
    """Deterministic estimators called without a generator still handle a dropout mask."""
    est = build(cfg)
    model, loss_fn, x, y = make_problem("dropout_mlp", "ce")
    model.train()
    before = snapshot(model)
    if _refuses_train_dropout(est):
        with pytest.raises(UnsupportedError, match=r"layer '2' \(Dropout\)"):
            est(model, loss_fn, x, y)
        assert_unchanged(model, before)
        return
    out = est(model, loss_fn, x, y)
    check_output(model, out)
    assert_unchanged(model, before)


def test_generator_is_advanced_only_by_stochastic_estimators():
    model, loss_fn, x, y = make_problem("mlp", "ce")
    for name in ALL:
        est = get_estimator(name)
        g = gen(0)
        state = g.get_state()
        est(model, loss_fn, x, y, generator=g)
        if not est.stochastic:
            assert torch.equal(g.get_state(), state), f"{name} drew from the generator"


# ----------------------------------------------------------- frozen params


FREEZES = {
    "first_layer": ["0.weight", "0.bias"],
    "first_weight": ["0.weight"],
    "last_bias": ["2.bias"],
}


@pytest.mark.parametrize("frozen", list(FREEZES))
@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_frozen_parameters_are_left_out(cfg, frozen):
    est = build(cfg)
    loss = "mse" if frozen == "first_weight" else "ce"
    model, loss_fn, x, y = make_problem("mlp", loss)
    full = est(model, loss_fn, x, y, generator=gen(0))
    params = dict(model.named_parameters())
    for n in FREEZES[frozen]:
        params[n].requires_grad_(False)
    before = snapshot(model)
    out = est(model, loss_fn, x, y, generator=gen(0))
    check_output(model, out)
    assert set(out) == set(full) - set(FREEZES[frozen])
    assert_unchanged(model, before)
    if not est.stochastic:
        # the diagonal entries of the remaining parameters do not depend on the freeze
        for k, v in out.items():
            torch.testing.assert_close(v, full[k], rtol=1e-10, atol=1e-14, msg=k)


# -------------------------------------------------------- unsupported models


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def _nested_bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 5), nn.Tanh()),
        nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5)),
        nn.Linear(5, 3),
    )


def _subclass_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), MyLinear(5, 3))


def _reflect_conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 3),
    )


def _maxpool_indices_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.MaxPool2d(2, return_indices=True),
        nn.Flatten(),
        nn.Linear(27, 3),
    )


# (builder, input shape, expected path, expected type name); in an nn.Sequential, a
# layer outside the sequential table sends the model to the graph engine, which also
# refuses these (train-mode BatchNorm among them); LayerNorm only the peers refuse
UNSUPPORTED_LAYERS = {
    "batchnorm": (_bn_model, (4,), "1", "BatchNorm1d"),
    "nested_layernorm": (_nested_bn_model, (4,), "1.1", "LayerNorm"),
    "subclass": (_subclass_model, (4,), "2", "MyLinear"),
    "reflect_conv": (_reflect_conv_model, (2, 6, 6), "0", "Conv2d"),
    "maxpool_indices": (_maxpool_indices_model, (2, 6, 6), "1", "MaxPool2d"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED_LAYERS))
@pytest.mark.parametrize("cfg", LAYERWISE_PARAMS)
def test_unsupported_layer_is_refused_naming_path_and_type(cfg, case):
    est = build(cfg)
    builder, shape, path, type_name = UNSUPPORTED_LAYERS[case]
    model = _seeded(0, builder).double()
    x = _seeded(1, lambda: torch.randn(3, *shape, dtype=torch.float64))
    y = torch.tensor([0, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    kind = type(est)
    if case == "nested_layernorm" and getattr(
        kind, "graph_capable", getattr(kind, "graph_plans", False)
    ):  # the graph engine's LayerNorm rule
        est.check_supported(model, loss_fn)
        check_output(model, est(model, loss_fn, x, y, generator=gen(0)))
        return
    with pytest.raises(UnsupportedError) as info:
        est.check_supported(model, loss_fn)
    msg = assert_single_line(info.value)
    assert f"'{path}'" in msg
    assert type_name in msg
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info2:
        est(model, loss_fn, x, y, generator=gen(0))
    assert str(info2.value) == msg, "check_supported and the call disagree"
    assert_unchanged(model, before)


@pytest.mark.parametrize("cfg", LAYERWISE_PARAMS)
def test_non_sequential_module_runs_on_the_graph_engine_or_is_refused(cfg):
    """hessbench's own layer-by-layer estimators capture any module with torch.fx;
    the peer wrappers (their libraries need an nn.Sequential) refuse it in one line,
    without running the model."""
    est = build(cfg)
    model = _seeded(0, PlainMLP).double()
    x = torch.ones(2, 4, dtype=torch.float64)
    y = torch.tensor([0, 1])
    kind = type(est)  # layer-wise estimators: graph_capable; structured dual-path: graph_plans
    if getattr(kind, "graph_capable", getattr(kind, "graph_plans", False)):
        est.check_supported(model, nn.CrossEntropyLoss())
        out = est(model, nn.CrossEntropyLoss(), x, y, generator=gen(0))
        check_output(model, out)
        return
    with pytest.raises(UnsupportedError) as info:
        est.check_supported(model, nn.CrossEntropyLoss())
    msg = assert_single_line(info.value)
    assert "PlainMLP" in msg
    assert model.calls == 0, "check_supported ran the model"
    with pytest.raises(UnsupportedError) as info2:
        est(model, nn.CrossEntropyLoss(), x, y, generator=gen(0))
    assert "PlainMLP" in assert_single_line(info2.value)


@pytest.mark.parametrize("cfg", LAYERWISE_PARAMS)
def test_bad_input_shape_for_layerwise_names_the_layer(cfg):
    """A Linear layer fed a (N, T, F) input: refused with the layer's path and type."""
    est = build(cfg)
    model = _seeded(0, mlp).double()
    x = torch.ones(3, 2, 4, dtype=torch.float64)
    y = torch.zeros(3, 2, 3, dtype=torch.float64)
    with pytest.raises(HessbenchError) as info:
        est(model, nn.MSELoss(), x, y, generator=gen(0))
    msg = assert_single_line(info.value)
    assert "'0'" in msg
    assert "Linear" in msg


@pytest.mark.parametrize("cfg", GENERIC_PARAMS)
def test_generic_estimators_accept_inputs_the_structured_pass_refuses(cfg):
    """A Sequential fed (N, T, F) inputs (nn.Linear acts on the last dimension).

    The layer-by-layer pass refuses it; estimators that work on any module must then
    use their autograd path (``method='auto'`` means structured *where supported*).
    """
    est = build(cfg)
    model = _seeded(0, mlp).double()
    x = _seeded(1, lambda: torch.randn(3, 2, 4, dtype=torch.float64))
    y = _seeded(2, lambda: torch.randn(3, 2, 3, dtype=torch.float64))
    before = snapshot(model)
    out = est(model, nn.MSELoss(), x, y, generator=gen(0))
    check_output(model, out)
    assert_unchanged(model, before)
    fallback = {"exact": "hvp", "ggn_exact": "jacobian", "ggn_mc": "jacobian"}.get(cfg[0])
    if fallback is not None:
        params = {**cfg[1], "method": fallback}
        ref = get_estimator(cfg[0], **params)(model, nn.MSELoss(), x, y, generator=gen(0))
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_check_supported_accepts_supported_pairs(cfg):
    est = build(cfg)
    for arch in ("mlp", "cnn", "dropout_mlp"):
        for loss in ("ce", "mse"):
            model, loss_fn, _, _ = make_problem(arch, loss)
            before = snapshot(model)
            assert est.check_supported(model, loss_fn) is None
            assert_unchanged(model, before)


# ------------------------------------------------- generic (autograd) paths


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("cfg", GENERIC_PARAMS)
def test_generic_estimators_work_on_custom_modules(cfg, loss):
    est = build(cfg)
    model, loss_fn, x, y = make_problem("residual", loss)
    est.check_supported(model, loss_fn)
    before = snapshot(model)
    a = est(model, loss_fn, x, y, generator=gen(0))
    check_output(model, a)
    assert_unchanged(model, before)
    assert_same(a, est(model, loss_fn, x, y, generator=gen(0)))


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("cfg", GENERIC_PARAMS)
def test_custom_module_equals_equivalent_sequential(cfg, loss):
    """The autograd path on a custom module agrees with the Sequential of the same function."""
    est = build(cfg)
    seq, loss_fn, x, y = make_problem("mlp", loss)
    custom = PlainMLP().double()
    with torch.no_grad():
        custom.fc1.weight.copy_(seq[0].weight)
        custom.fc1.bias.copy_(seq[0].bias)
        custom.fc2.weight.copy_(seq[2].weight)
        custom.fc2.bias.copy_(seq[2].bias)
    rename = {"fc1.weight": "0.weight", "fc1.bias": "0.bias", "fc2.weight": "2.weight"}
    rename["fc2.bias"] = "2.bias"
    a = est(custom, loss_fn, x, y, generator=gen(0))
    b = est(seq, loss_fn, x, y, generator=gen(0))
    assert [rename[k] for k in a] == list(b)
    for k, v in a.items():
        torch.testing.assert_close(v, b[rename[k]], rtol=1e-9, atol=1e-13, msg=k)


def test_batchnorm_eval_mode_generic_estimators():
    """Eval-mode BatchNorm is an affine map: the generic paths handle it, buffers untouched."""
    model = _seeded(0, _bn_model).double().eval()
    x = _seeded(1, lambda: torch.randn(3, 4, dtype=torch.float64))
    y = torch.tensor([0, 1, 2])
    exact = get_estimator("exact")(model, nn.CrossEntropyLoss(), x, y)
    for cfg in GENERIC:
        est = build(cfg)
        before = snapshot(model)
        out = est(model, nn.CrossEntropyLoss(), x, y, generator=gen(0))
        check_output(model, out)
        assert_unchanged(model, before)
    # the default takes the graph engine (eval-mode BatchNorm is one of its rules);
    # the Hessian-vector-product path agrees to rounding
    hvp = get_estimator("exact", method="hvp")(model, nn.CrossEntropyLoss(), x, y)
    for k in exact:
        torch.testing.assert_close(exact[k], hvp[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cfg", GENERIC_PARAMS)
def test_batchnorm_train_mode_is_refused_or_leaves_buffers(cfg):
    """Training-mode BatchNorm updates running statistics in forward.

    An estimator must either refuse it with a hessbench error (per-sample methods
    cannot handle batch statistics) or leave the buffers as they were.
    """
    est = build(cfg)
    model = _seeded(0, _bn_model).double().train()
    x = _seeded(1, lambda: torch.randn(3, 4, dtype=torch.float64))
    y = torch.tensor([0, 1, 2])
    before = snapshot(model)
    try:
        out = est(model, nn.CrossEntropyLoss(), x, y, generator=gen(0))
    except HessbenchError as exc:
        assert_single_line(exc)
    else:
        check_output(model, out)
    assert_unchanged(model, before)


# --------------------------------------------------------------- bad losses


BAD_LOSSES = {  # the supported losses and their options: tests/test_losses.py
    "l1": (lambda: nn.L1Loss(), "L1Loss"),
    "bce_no_logits": (lambda: nn.BCELoss(), "BCELoss"),
    "nll": (lambda: nn.NLLLoss(), "NLLLoss"),  # the model does not end with LogSoftmax
    "ce_negative_weight": (
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 1.0])),
        "CrossEntropyLoss(weight=...)",
    ),
    "ce_none": (lambda: nn.CrossEntropyLoss(reduction="none"), "reduction"),
    "mse_none": (lambda: nn.MSELoss(reduction="none"), "reduction"),
    "huber_none": (lambda: nn.HuberLoss(reduction="none"), "reduction"),
    "function": (lambda: torch.nn.functional.mse_loss, "not supported"),
}


@pytest.mark.parametrize("case", list(BAD_LOSSES))
@pytest.mark.parametrize("cfg", NAME_PARAMS)
def test_unsupported_loss(cfg, case):
    est = build(cfg)
    make_loss, needle = BAD_LOSSES[case]
    loss_fn = make_loss()
    model, _, x, _ = make_problem("mlp", "ce")
    y = torch.tensor([0, 1, 2]) if "ce" in case or case == "nll" else torch.zeros(3, 3)
    with pytest.raises(UnsupportedError) as info:
        est.check_supported(model, loss_fn)
    assert needle in assert_single_line(info.value)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info2:
        est(model, loss_fn, x, y, generator=gen(0))
    assert needle in assert_single_line(info2.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("cfg", NAME_PARAMS)
def test_supported_reductions(cfg, reduction):
    est = build(cfg)
    model, _, x, y = make_problem("mlp", "ce")
    out = est(model, nn.CrossEntropyLoss(reduction=reduction), x, y, generator=gen(0))
    check_output(model, out)


# ------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("cfg", NAME_PARAMS)
def test_non_finite_inputs(cfg, bad):
    est = build(cfg)
    model, loss_fn, x, y = make_problem("mlp", "ce")
    x[1, 2] = bad
    before = snapshot(model)
    with pytest.raises(InputError) as info:
        est(model, loss_fn, x, y, generator=gen(0))
    assert_single_line(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("which", ["2.weight", "0.bias"])
@pytest.mark.parametrize("cfg", NAME_PARAMS)
def test_nan_parameter_is_named(cfg, which):
    est = build(cfg)
    model, loss_fn, x, y = make_problem("mlp", "ce")
    with torch.no_grad():
        dict(model.named_parameters())[which].view(-1)[0] = float("nan")
    with pytest.raises(InputError) as info:
        est(model, loss_fn, x, y, generator=gen(0))
    msg = assert_single_line(info.value)
    assert which in msg


def _bad_targets():
    return {
        "ce_column": ("ce", lambda y: y[:, None]),
        "ce_too_few": ("ce", lambda y: y[:2]),
        "ce_out_of_range": ("ce", lambda y: torch.tensor([0, 1, 3])),
        "ce_negative": ("ce", lambda y: torch.tensor([0, -1, 2])),
        "ce_float": ("ce", lambda y: y.double()),
        "mse_shape": ("mse", lambda y: y[:, :2]),
        "mse_batch": ("mse", lambda y: y[:2]),
        "mse_nan": ("mse", lambda y: y.index_fill(0, torch.tensor([1]), float("nan"))),
    }


@pytest.mark.parametrize("case", list(_bad_targets()))
@pytest.mark.parametrize("cfg", NAME_PARAMS)
def test_bad_targets(cfg, case):
    est = build(cfg)
    loss, transform = _bad_targets()[case]
    model, loss_fn, x, y = make_problem("mlp", loss)
    before = snapshot(model)
    with pytest.raises(InputError) as info:
        est(model, loss_fn, x, transform(y), generator=gen(0))
    assert_single_line(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("cfg", NAME_PARAMS)
def test_no_trainable_parameters(cfg):
    est = build(cfg)
    model, loss_fn, x, y = make_problem("mlp", "ce")
    model.requires_grad_(False)
    with pytest.raises(UnsupportedError) as info:
        est.check_supported(model, loss_fn)
    assert_single_line(info.value)
    with pytest.raises(UnsupportedError) as info2:
        est(model, loss_fn, x, y, generator=gen(0))
    assert_single_line(info2.value)


@pytest.mark.parametrize("cfg", NAME_PARAMS)
def test_parameter_free_model(cfg):
    est = build(cfg)
    model = nn.Sequential(nn.Flatten(), nn.Tanh())
    with pytest.raises(UnsupportedError) as info:
        est(model, nn.MSELoss(), torch.ones(2, 3), torch.zeros(2, 3), generator=gen(0))
    assert_single_line(info.value)


def test_exact_hvp_size_guard():
    model, loss_fn, x, y = make_problem("mlp", "ce")  # 4*5 + 5 + 5*3 + 3 = 43 entries
    est = get_estimator("exact", method="hvp", max_params=10)
    before = snapshot(model)
    with pytest.raises(TooLargeError) as info:
        est(model, loss_fn, x, y, generator=gen(0))
    msg = assert_single_line(info.value)
    assert "43" in msg
    assert "max_params" in msg
    assert "10" in msg
    assert_unchanged(model, before)
    # at the limit it runs
    ok = get_estimator("exact", method="hvp", max_params=43)(model, loss_fn, x, y)
    check_output(model, ok)


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot capture it (only autograd can run it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return torch.tanh(h) if bool(h.sum() > 0) else torch.sigmoid(h)


def test_exact_auto_size_guard_on_an_untraceable_module():
    """What neither engine captures falls back to HVPs, behind the size guard."""
    model = _seeded(0, _Untraceable).double()
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TooLargeError) as info:
        get_estimator("exact", max_params=5)(model, nn.MSELoss(), x, y)
    assert "max_params" in assert_single_line(info.value)
    # the structured paths (Sequential, or a graph the engine captures) are not limited
    for name in ("mlp", "residual"):
        seq, loss_fn, x, y = make_problem(name, "mse")
        check_output(seq, get_estimator("exact", max_params=5)(seq, loss_fn, x, y))


@pytest.mark.parametrize("name", ALL)
def test_a_torchscript_model_is_refused_in_one_line(name):
    model, loss_fn, x, y = make_problem("mlp", "ce")
    with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    est = get_estimator(name)
    with pytest.raises(UnsupportedError) as info:
        est.check_supported(scripted, loss_fn)
    assert "TorchScript" in assert_single_line(info.value)
    with pytest.raises(UnsupportedError, match="TorchScript"):
        est(scripted, loss_fn, x, y, generator=gen(0))


def test_errors_are_hessbench_errors():
    for cls in (ConfigError, UnsupportedError, InputError, TooLargeError):
        assert issubclass(cls, HessbenchError)
    assert issubclass(InputError, ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_contract():
    """On CUDA: results on the parameters' device, CPU and CUDA global RNG untouched."""
    dev = torch.device("cuda")
    for name in ALL:
        for arch, loss in (("mlp", "ce"), ("dropout_mlp", "mse")):
            model, loss_fn, x, y = make_problem(arch, loss)
            model, x, y = model.to(dev).train(), x.to(dev), y.to(dev)
            est = get_estimator(name)
            cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state(dev)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            if arch == "dropout_mlp" and _refuses_train_dropout(est):
                with pytest.raises(UnsupportedError, match=r"layer '2' \(Dropout\)"):
                    est(model, loss_fn, x, y, generator=torch.Generator(device=dev).manual_seed(0))
                continue
            a = est(model, loss_fn, x, y, generator=torch.Generator(device=dev).manual_seed(0))
            b = est(model, loss_fn, x, y, generator=torch.Generator(device=dev).manual_seed(0))
            check_output(model, a)
            assert_same(a, b)
            for n, p in model.named_parameters():
                assert torch.equal(p, before[n]), n
                assert p.grad is None, n
            assert torch.equal(torch.get_rng_state(), cpu_rng), name
            assert torch.equal(torch.cuda.get_rng_state(dev), cuda_rng), name
