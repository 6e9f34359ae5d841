"""The estimator registry: names, hyper-parameter validation, labels, value semantics."""

from __future__ import annotations

import dataclasses

import pytest

from hessbench.errors import ConfigError, HessbenchError
from hessbench.estimators import (
    Estimator,
    available_estimators,
    estimator_class,
    get_estimator,
)
from hessbench.estimators.peers import PEERS, available_peers

EXPECTED = [
    "adahessian",
    "bl89",
    "diagpp",
    "efisher",
    "exact",
    "ggn_exact",
    "ggn_mc",
    "grad_sq",
    "hesscale",
    "hesscale_gn",
    "hutchinson",
    "kfac",
    "sophia_gnb",
    "xdiag",
    "zero",
]


def _single_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg, "error message is empty"
    assert "\n" not in msg, f"message is not a single line: {msg!r}"
    return msg


# ------------------------------------------------------------------ names


def _core(names: list[str]) -> list[str]:
    """Leave out the optional peers (``library.quantity``), registered when installed."""
    return [n for n in names if n.split(".", 1)[0] not in PEERS]


def test_available_estimators_exact_list():
    assert _core(available_estimators()) == EXPECTED
    peers = [n for n in available_estimators() if n not in EXPECTED]
    assert all(n.split(".", 1)[0] in available_peers() for n in peers), peers


def test_available_estimators_returns_fresh_sorted_list():
    names = available_estimators()
    names.append("bogus")
    assert available_estimators() == sorted(available_estimators())
    assert _core(available_estimators()) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_every_name_builds_with_defaults(name):
    est = get_estimator(name)
    assert isinstance(est, Estimator)
    assert isinstance(est, estimator_class(name))
    assert est.name == name
    assert isinstance(est.cost, str)
    assert est.cost
    assert isinstance(est.stochastic, bool)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_estimator_has_docstring(name):
    doc = estimator_class(name).__doc__ or ""
    assert len(doc.strip()) > 40


def test_stochastic_flags():
    stochastic = {n for n in EXPECTED if get_estimator(n).stochastic}
    assert stochastic == {
        "adahessian",
        "diagpp",
        "ggn_mc",
        "hutchinson",
        "kfac",
        "sophia_gnb",
        "xdiag",
    }
    # K-FAC is random only with Monte-Carlo backward vectors.
    assert get_estimator("kfac", backward="mc").stochastic is True
    assert get_estimator("kfac", backward="exact").stochastic is False


@pytest.mark.parametrize("bad", ["nope", "Hutchinson", "hesscale ", "", "../exact"])
def test_unknown_name(bad):
    with pytest.raises(ConfigError) as info:
        get_estimator(bad)
    msg = _single_line(info.value)
    assert repr(bad) in msg
    for known in EXPECTED:
        assert known in msg


def test_unknown_name_estimator_class():
    with pytest.raises(ConfigError) as info:
        estimator_class("nope")
    msg = _single_line(info.value)
    assert "'nope'" in msg
    assert "hutchinson" in msg


def test_config_error_is_hessbench_error_and_value_error():
    with pytest.raises(HessbenchError):
        get_estimator("nope")
    with pytest.raises(ValueError, match="nope"):
        get_estimator("nope")


# ------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize(
    ("name", "param", "allowed"),
    [
        ("hutchinson", "foo", ["num_samples"]),
        ("hutchinson", "samples", ["num_samples"]),
        ("hesscale", "num_samples", []),
        ("bl89", "output", ["output_curvature"]),
        ("kfac", "method", ["backward", "num_samples"]),
        ("exact", "max_param", ["method", "representation", "compute_dtype", "max_params"]),
    ],
)
def test_unknown_hyper_parameter(name, param, allowed):
    with pytest.raises(ConfigError) as info:
        get_estimator(name, **{param: 1})
    msg = _single_line(info.value)
    assert repr(param) in msg
    assert name in msg
    for a in allowed:
        assert a in msg


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("hutchinson", {"num_samples": 0}, "num_samples"),
        ("hutchinson", {"num_samples": -3}, "num_samples"),
        ("hutchinson", {"num_samples": "abc"}, "num_samples"),
        ("hutchinson", {"num_samples": 1.5}, "num_samples"),
        ("ggn_mc", {"num_samples": 0}, "num_samples"),
        ("ggn_mc", {"method": "bogus"}, "method"),
        ("kfac", {"num_samples": 0}, "num_samples"),
        ("kfac", {"backward": "bogus"}, "backward"),
        ("adahessian", {"num_samples": 0}, "num_samples"),
        ("bl89", {"output_curvature": "bogus"}, "output_curvature"),
        ("exact", {"method": "bogus"}, "method"),
        ("exact", {"max_params": 0}, "max_params"),
        ("exact", {"representation": "bogus"}, "representation"),
        ("exact", {"compute_dtype": "float16"}, "compute_dtype"),
        ("ggn_exact", {"method": "hvp"}, "method"),
    ],
)
def test_bad_value(name, params, field):
    with pytest.raises(ConfigError) as info:
        get_estimator(name, **params)
    msg = _single_line(info.value)
    assert field in msg
    assert name in msg


def test_string_numbers_are_accepted_where_unambiguous():
    # Suites come from YAML/CLI strings; "10" parses as an integer.
    assert get_estimator("hutchinson", num_samples="10").num_samples == 10


# ------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    ("name", "params", "label"),
    [
        ("hutchinson", {"num_samples": 10}, "hutchinson[num_samples=10]"),
        ("hutchinson", {}, "hutchinson[num_samples=1]"),
        ("ggn_mc", {"num_samples": 1}, "ggn_mc[num_samples=1]"),
        ("ggn_mc", {"num_samples": 1, "method": "jacobian"}, "ggn_mc[num_samples=1]"),
        ("kfac", {"backward": "mc", "num_samples": 1}, "kfac[backward=mc,num_samples=1]"),
        ("kfac", {}, "kfac[backward=mc,num_samples=1]"),
        ("bl89", {"output_curvature": "zero"}, "bl89[output_curvature=zero]"),
        ("exact", {}, "exact"),
        ("exact", {"method": "hvp", "max_params": 7, "representation": "full"}, "exact"),
        ("exact", {"compute_dtype": "model"}, "exact"),
        ("ggn_exact", {"method": "jacobian"}, "ggn_exact"),
        ("hesscale", {}, "hesscale"),
        ("hesscale_gn", {}, "hesscale_gn"),
        ("grad_sq", {}, "grad_sq"),
        ("efisher", {}, "efisher"),
        ("sophia_gnb", {}, "sophia_gnb"),
        ("zero", {}, "zero"),
    ],
)
def test_labels(name, params, label):
    assert get_estimator(name, **params).label == label


@pytest.mark.parametrize("name", EXPECTED)
def test_label_starts_with_name_and_is_file_safe(name):
    label = get_estimator(name).label
    assert label.startswith(name)
    assert "/" not in label
    assert "\\" not in label
    assert " " not in label


@pytest.mark.parametrize("name", EXPECTED)
def test_params_roundtrip(name):
    est = get_estimator(name)
    assert get_estimator(name, **est.params) == est


# --------------------------------------------------------- value semantics


@pytest.mark.parametrize("name", EXPECTED)
def test_frozen(name):
    est = get_estimator(name)
    fields = [f.name for f in dataclasses.fields(est)]
    target = fields[0] if fields else "some_new_attribute"
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        setattr(est, target, getattr(est, target, 1))


def test_frozen_hyper_parameter_assignment():
    est = get_estimator("hutchinson", num_samples=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.num_samples = 5  # type: ignore[misc]
    assert est.num_samples == 3


@pytest.mark.parametrize("name", EXPECTED)
def test_hashable_and_equal_by_value(name):
    a, b = get_estimator(name), get_estimator(name)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


def test_equality_depends_on_values_and_class():
    a = get_estimator("hutchinson", num_samples=10)
    assert a == get_estimator("hutchinson", num_samples=10)
    assert a != get_estimator("hutchinson", num_samples=11)
    assert a != get_estimator("adahessian", num_samples=10)
    assert get_estimator("hesscale") != get_estimator("hesscale_gn")
    cache = {a: "x"}
    assert cache[get_estimator("hutchinson", num_samples=10)] == "x"
