"""The suite schema: every validation error, grids, include/exclude, the plan, seeds."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pydantic
import pytest
import yaml
from torch import nn

from hessbench.errors import ConfigError, HessbenchError
from hessbench.estimators import available_estimators, estimator_class
from hessbench.suite import (
    CellSpec,
    Suite,
    SuiteError,
    TrainState,
    derive_seed,
    load_suite,
    parse_suite,
    plan_cells,
    suite_text_hash,
    task_variants,
)

ALL_SUITES = sorted((Path(__file__).parent.parent / "suites").glob("*.yaml"))
# accuracy suites; kind: train and kind: rl suites are tested in test_train.py / test_rl.py
SUITES = [p for p in ALL_SUITES if not re.search(r"^kind: (train|rl)$", p.read_text(), re.M)]
SRC = "suites/x.yaml"

MLP_CE = {
    "name": "ce",
    "model": {"kind": "mlp", "widths": [4]},
    "loss": {"kind": "cross_entropy"},
    "data": {"kind": "synthetic", "input_shape": [3], "num_classes": 2},
    "eval": {"num_batches": 2},
}
MLP_MSE = {
    "name": "mse",
    "model": {"kind": "mlp", "widths": [4], "activation": "relu"},
    "loss": {"kind": "mse"},
    "data": {"kind": "synthetic", "input_shape": [3], "output_dim": 2},
}
BASE = {
    "name": "t",
    "tasks": [MLP_CE, MLP_MSE],
    "estimators": [
        {"name": "hesscale"},
        {"name": "hutchinson", "params": {"num_samples": [1, 10]}},
    ],
}


def suite(**changes: object) -> dict:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(changes))
    return data


def parse(data: dict) -> Suite:
    return parse_suite(yaml.safe_dump(data, sort_keys=False), SRC)


def problems(data: dict) -> list[str]:
    with pytest.raises(SuiteError) as info:
        parse(data)
    return str(info.value).splitlines()


def task(base: dict, **changes: object) -> dict:
    """``base`` with ``changes`` merged into its sub-mappings; a None value removes a key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in {**out[key], **value}.items() if v is not None}
        else:
            out[key] = value
    return out


# --- validation errors --------------------------------------------------------------------


def test_valid_suite_parses():
    s = parse(suite())
    assert s.name == "t"
    assert [t.name for t in s.tasks] == ["ce", "mse"]
    assert s.defaults.seed_list == [0]


def test_bad_activation_is_one_exact_line():
    bad = task(MLP_MSE, model={"activation": "tahn"})
    assert problems(suite(tasks=[MLP_CE, bad])) == [
        "suites/x.yaml: tasks[1].model.activation: 'tahn' is not one of "
        "tanh, relu, sigmoid, leaky_relu, elu, selu, softplus, logsigmoid, gelu, silu"
    ]


def test_suite_error_is_a_config_error():
    assert issubclass(SuiteError, ConfigError)
    assert issubclass(SuiteError, HessbenchError)


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"colour": "red"}, "colour: unknown field"),
        ({"defaults": {"seed": 1}}, "defaults.seed: unknown field"),
        (
            {"tasks": [task(MLP_CE, model={"activations": "relu"})]},
            "tasks[0].model.activations: unknown field",
        ),
        (
            {"tasks": [task(MLP_CE, eval={"states": [{"steps": 3, "momentum": 0.9}]})]},
            "tasks[0].eval.states[0].momentum: unknown field",
        ),
    ],
)
def test_unknown_field(changes, line):
    assert f"{SRC}: {line}" in problems(suite(**changes))


def test_missing_fields():
    no_loss = {k: v for k, v in MLP_CE.items() if k != "loss"}
    no_kind = task(MLP_CE, model={"widths": [3]})
    del no_kind["model"]["kind"]
    lines = problems({"name": "t", "tasks": [no_loss, no_kind]})
    assert lines == [
        f"{SRC}: tasks[0].loss: field required",
        f"{SRC}: tasks[1].model.kind: field required",
        f"{SRC}: estimators: field required",
    ]


def test_bad_discriminator_and_types():
    bad = task(MLP_CE, model={"kind": "mpl"}, data={"input_shape": [0]})
    lines = problems(suite(tasks=[bad], defaults={"seeds": [0, -1]}))
    assert (
        f"{SRC}: tasks[0].model.kind: 'mpl' is not one of mlp, cnn, sequential, resmlp, resnet, transformer"
        in lines
    )
    assert any(line.startswith(f"{SRC}: tasks[0].data.input_shape[0]: ") for line in lines)
    assert any(line.startswith(f"{SRC}: defaults.seeds[1]: ") for line in lines)


def test_every_problem_is_reported_at_once():
    bad1 = task(MLP_CE, loss={"reduction": "avg"})
    bad2 = task(MLP_MSE, name="x", eval={"batch_size": 0})
    lines = problems(suite(tasks=[bad1, bad2], estimators=[{"name": "nope"}], extra=1))
    assert len(lines) == 4
    assert all(line.startswith(f"{SRC}: ") for line in lines)


def test_yaml_syntax_error_has_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: t\ntasks:\n  - name: [a\n    model: 1\n")
    with pytest.raises(SuiteError, match=rf"^{path}:\d+:\d+: ") as info:
        load_suite(path)
    assert "\n" not in str(info.value)
    line = int(str(info.value).split(":")[1])
    assert line in (3, 4)


def test_tab_and_duplicate_key_are_located():
    with pytest.raises(SuiteError, match=r"^s\.yaml:2:1: found character '\\t'"):
        parse_suite("name: t\n\ttasks: []\n", "s.yaml")
    with pytest.raises(SuiteError, match=r"^s\.yaml:2:1: duplicate key 'name'$"):
        parse_suite("name: t\nname: u\n", "s.yaml")


def test_yaml_cannot_construct_python_objects():
    text = "name: !!python/object/apply:os.system ['echo hacked']\n"
    with pytest.raises(SuiteError, match=r"^s\.yaml:1:7: could not determine a constructor"):
        parse_suite(text, "s.yaml")


@pytest.mark.parametrize(("text", "what"), [("", "nothing"), ("- a\n", "list"), ("3\n", "int")])
def test_not_a_mapping(text, what):
    with pytest.raises(SuiteError, match=f"^s.yaml: expected a mapping of fields, got {what}$"):
        parse_suite(text, "s.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(SuiteError, match="no such file"):
        load_suite(tmp_path / "nope.yaml")


def test_unknown_estimator_lists_the_known_ones():
    (line,) = problems(suite(estimators=[{"name": "hesscale"}, {"name": "hesscal"}]))
    assert line.startswith(f"{SRC}: estimators[1]: unknown estimator 'hesscal'; available: ")
    assert line.endswith(", ".join(available_estimators()))


def test_bad_hyper_parameter_names_its_field():
    ests = [{"name": "zero"}, {"name": "hutchinson", "params": {"num_samples": [1, 0, -1]}}]
    assert problems(suite(estimators=ests)) == [  # one line per field: the first bad value
        f"{SRC}: estimators[1].params.num_samples: Input should be greater than 0 (got 0)"
    ]
    bl89 = [{"name": "bl89", "params": {"output_curvature": "zeros"}}]
    assert problems(suite(estimators=bl89)) == [
        f"{SRC}: estimators[0].params.output_curvature: 'zeros' is not one of elementwise, zero"
    ]


def test_unknown_and_empty_hyper_parameters():
    ests = [
        {"name": "hutchinson", "params": {"samples": 3}},
        {"name": "ggn_mc", "params": {"num_samples": []}},
    ]
    assert problems(suite(estimators=ests)) == [
        f"{SRC}: estimators[0].params.samples: not a hyper-parameter of hutchinson; allowed: num_samples, method, probes, num_matvecs",
        f"{SRC}: estimators[1].params.num_samples: an empty list of values",
    ]


def test_every_problem_of_one_params_block_is_reported_together():
    ests = [{"name": "hutchinson", "params": {"samples": 3, "num_samples": 0, "method": "hvpp"}}]
    lines = problems(suite(estimators=ests))
    assert lines[0] == (
        f"{SRC}: estimators[0].params.samples: not a hyper-parameter of hutchinson; "
        "allowed: num_samples, method, probes, num_matvecs"
    )
    assert (
        f"{SRC}: estimators[0].params.num_samples: Input should be greater than 0 (got 0)" in lines
    )
    assert any(line.startswith(f"{SRC}: estimators[0].params.method: ") for line in lines)
    assert len(lines) == 3


def test_a_problem_of_the_whole_block_is_reported_with_the_fields_problems():
    # num_samples with num_matvecs is refused by the block's own check, which used to be
    # skipped when a field (method) had a problem too
    ests = [{"name": "hutchinson", "params": {"num_samples": 2, "num_matvecs": 4, "method": "x"}}]
    assert problems(suite(estimators=ests)) == [
        f"{SRC}: estimators[0].params.method: 'x' is not one of auto, structured, autograd",
        f"{SRC}: estimators[0].params: give num_samples or num_matvecs, not both",
    ]
    # and a grid's bad value does not hide another field's
    ests = [{"name": "xdiag", "params": {"num_matvecs": [2, 3], "method": ["auto", "y"]}}]
    lines = problems(suite(estimators=ests))
    assert [line.split(": ")[1] for line in lines] == [
        "estimators[0].params.num_matvecs",
        "estimators[0].params.method",
    ]


@pytest.mark.parametrize(("lr", "got"), [(".inf", "inf"), ("1e400", "'1e400'"), (".nan", "nan")])
def test_a_non_finite_learning_rate_of_a_trained_state_names_its_field(lr, got):
    text = f"""
name: t
tasks:
  - name: ce
    model: {{kind: mlp, widths: [4]}}
    loss: {{kind: cross_entropy}}
    data: {{kind: synthetic, input_shape: [3], num_classes: 2}}
    eval: {{states: [init, {{steps: 5, lr: {lr}}}]}}
estimators: [{{name: hesscale}}]
"""
    with pytest.raises(SuiteError) as info:
        parse_suite(text, SRC)
    assert str(info.value) == (
        f"{SRC}: tasks[0].eval.states[1].lr: Input should be a finite number (got {got})"
    )


def test_hyper_parameter_values_must_be_plain_data():
    ests = [{"name": "hutchinson", "params": {"num_samples": {"a": 1}}}]
    (line,) = problems(suite(estimators=ests))
    assert line.startswith(f"{SRC}: estimators[0].params.num_samples: expected ")


def test_duplicate_task_names():
    assert problems(suite(tasks=[MLP_CE, task(MLP_MSE, name="ce")])) == [
        f"{SRC}: tasks[1].name: a second task named 'ce'"
    ]


@pytest.mark.parametrize(
    "name", ["a/b", "a\\b", "..", "a..b", "../x", ".hidden", "-x", "", "x y", "é"]
)
def test_names_refuse_path_separators_and_dot_dot(name):
    (line,) = problems(suite(tasks=[task(MLP_CE, name=name)]))
    assert line.startswith(f"{SRC}: tasks[0].name: {name!r} is not a valid name")
    (line,) = problems(suite(name=name))
    assert line.startswith(f"{SRC}: name: ")


@pytest.mark.parametrize("name", ["a", "Z9", "mlp_6-16.v2"])
def test_valid_names(name):
    assert parse(suite(name=name, tasks=[task(MLP_CE, name=name)])).tasks[0].name == name


def test_loss_and_data_must_fit():
    ce = task(MLP_CE, data={"num_classes": None})
    mse = task(MLP_MSE, data={"output_dim": None, "num_classes": 3})
    assert problems(suite(tasks=[ce, mse])) == [
        f"{SRC}: tasks[0].data.num_classes: field required with loss cross_entropy",
        f"{SRC}: tasks[1].data.output_dim: field required with loss mse",
        f"{SRC}: tasks[1].data.num_classes: not used with loss mse; give output_dim",
    ]
    digits = task(MLP_CE, data={"kind": "digits", "input_shape": None, "num_classes": None})
    assert parse(suite(tasks=[digits, task(digits, name="d", loss={"kind": "mse"})]))


def test_loss_kinds_and_their_options():
    tasks = [
        task(MLP_CE, name="ce", loss={"weight": [0.5, 2], "label_smoothing": 0.1}),
        task(MLP_CE, name="nll", loss={"kind": "nll", "weight": [1, 0], "reduction": "sum"}),
        task(MLP_MSE, name="bce", loss={"kind": "bce_with_logits"}),
        task(MLP_MSE, name="huber", loss={"kind": "huber", "delta": 0.5}),
        task(MLP_MSE, name="sl1", loss={"kind": "smooth_l1", "beta": 0}),
    ]
    built = {t.name: (t.loss.build(), t.output_dim) for t in parse(suite(tasks=tasks)).tasks}
    ce, nll = built["ce"][0], built["nll"][0]
    assert isinstance(ce, nn.CrossEntropyLoss)
    assert ce.label_smoothing == 0.1
    assert ce.weight.tolist() == [0.5, 2.0]
    assert built["ce"][1] == 2
    assert isinstance(nll, nn.NLLLoss)
    assert nll.reduction == "sum"
    assert nll.weight.tolist() == [1, 0]
    assert isinstance(built["bce"][0], nn.BCEWithLogitsLoss)
    assert built["bce"][1] == 2
    assert built["huber"][0].delta == 0.5
    assert built["sl1"][0].beta == 0.0
    # the defaults stay torch's (and the old suites' losses)
    plain = parse(suite()).tasks[0].loss
    assert plain.build().weight is None
    assert plain.build().label_smoothing == 0.0
    assert (plain.weight, plain.label_smoothing, plain.delta, plain.beta) == (None,) * 4


def test_loss_options_fit_their_kind():
    resmlp = {"kind": "resmlp", "widths": None}
    bad = [
        task(MLP_MSE, loss={"delta": 1.0}),
        task(MLP_CE, name="b", loss={"weight": [1.0]}),
        task(MLP_CE, name="c", loss={"label_smoothing": 1.5}),
        task(MLP_CE, name="d", loss={"kind": "nll", "label_smoothing": 0.1}),
        task(MLP_CE, name="e", loss={"weight": [0, 0]}),
        task(MLP_CE, name="f", loss={"weight": [1, -1]}),
        task(MLP_CE, name="g", loss={"kind": "nll"}, model=resmlp),
        task(MLP_CE, name="h", loss={"kind": "bce_with_logits"}),
        task(MLP_MSE, name="i", loss={"kind": "huber", "delta": 0}),
    ]
    lines = problems(suite(tasks=bad))
    assert lines[:7] == [
        f"{SRC}: tasks[0].loss.delta: not used with loss mse",
        f"{SRC}: tasks[1].loss.weight: 1 class weights for 2 classes",
        f"{SRC}: tasks[2].loss.label_smoothing: Input should be less than or equal to 1 (got 1.5)",
        f"{SRC}: tasks[3].loss.label_smoothing: not used with loss nll",
        f"{SRC}: tasks[4].loss.weight: every class weight is zero",
        f"{SRC}: tasks[5].loss.weight[1]: Input should be greater than or equal to 0 (got -1)",
        f"{SRC}: tasks[6].loss.kind: nll needs a model of kind mlp, cnn or sequential "
        "(it gets a final nn.LogSoftmax(dim=1))",
    ]
    assert lines[7:] == [
        f"{SRC}: tasks[7].data.output_dim: field required with loss bce_with_logits",
        f"{SRC}: tasks[7].data.num_classes: not used with loss bce_with_logits; give output_dim",
        f"{SRC}: tasks[8].loss.delta: Input should be greater than 0 (got 0)",
    ]


def test_models_must_fit_the_data():
    cnn = {"kind": "cnn", "channels": [2], "widths": None}
    cnn_flat = task(
        MLP_CE,
        name="a",
        model=cnn,
        data={"kind": "digits", "input_shape": None, "num_classes": None},
    )
    cnn_small = task(cnn_flat, name="b", model={"channels": [2, 2, 2, 2]}, data={"layout": "image"})
    seq = {"kind": "sequential", "layers": [{"type": "Linear", "args": [3, 5]}], "widths": None}
    wrong_out = task(MLP_CE, name="c", model=seq)
    wrong_in = task(
        MLP_MSE,
        name="d",
        model={**seq, "layers": [{"type": "Linear", "args": [4, 2]}], "activation": None},
    )
    lines = problems(suite(tasks=[cnn_flat, cnn_small, wrong_out, wrong_in]))
    assert (
        lines[0]
        == f"{SRC}: tasks[0].data.layout: a cnn needs image inputs (channels, height, width)"
    )
    assert lines[1].startswith(f"{SRC}: tasks[1].model: cnn block 3: ")
    assert (
        lines[2] == f"{SRC}: tasks[2].model: outputs of shape (5,) per sample; the data need (2,)"
    )
    assert lines[3].startswith(f"{SRC}: tasks[3].model: does not fit inputs of shape (3,): ")


def test_layers_come_from_an_allow_list_and_name_their_index():
    layers = [
        {"type": "Linear", "args": [3, 4]},
        {"type": "Lambda", "args": []},
        {"type": "Linear", "args": [4, 2], "kwargs": {"bais": False}},
        {"type": "Linear", "args": [4, 2], "kwargs": {"device": "cuda"}},
        {"type": "Linear", "args": ["__import__('os')", 2]},
    ]
    bad = task(MLP_MSE, model={"kind": "sequential", "layers": layers})
    lines = problems(suite(tasks=[bad]))
    assert lines[0].startswith(
        f"{SRC}: tasks[0].model.layers[1].type: 'Lambda' is not one of Linear, "
    )
    assert lines[1].startswith(f"{SRC}: tasks[0].model.layers[2]: cannot build Linear: ")
    assert "bais" in lines[1]
    assert (
        lines[2]
        == f"{SRC}: tasks[0].model.layers[3].kwargs.device: set by the harness (defaults.device, dtype)"
    )
    assert lines[3].startswith(f"{SRC}: tasks[0].model.layers[4].args[0]: expected a number")


def test_states_and_batch_sizes():
    states = [
        "init",
        "trained",
        {"steps": 0},
        {"steps": 5, "batch_size": 2000},
        {"steps": 5, "lr": 0.1},
    ]
    bad = task(MLP_CE, eval={"states": states})
    lines = problems(suite(tasks=[bad]))
    assert lines[0] == f"{SRC}: tasks[0].eval.states[1]: 'trained' is not one of init"
    assert lines[1].startswith(f"{SRC}: tasks[0].eval.states[2].steps: ")
    assert len(lines) == 2
    dup = task(MLP_CE, eval={"states": ["init", {"steps": 5}, {"steps": 5, "lr": 0.1}]})
    assert problems(suite(tasks=[dup])) == [
        f"{SRC}: tasks[0].eval.states[2]: a second state named 'trained5'",
    ]
    big = task(MLP_CE, eval={"states": [{"steps": 5, "batch_size": 2000}]})
    assert problems(suite(tasks=[big])) == [
        f"{SRC}: tasks[0].eval.states[0].batch_size: more than the 1000 training samples"
    ]


def test_defaults_checks():
    lines = problems(
        suite(defaults={"seeds": [1, 1], "timing": {"min_repeats": 9, "max_repeats": 3}})
    )
    assert lines == [
        f"{SRC}: defaults.seeds[1]: seed 1 appears twice",
        f"{SRC}: defaults.timing.max_repeats: less than min_repeats (9)",
    ]
    assert parse(suite(defaults={"seeds": 3})).defaults.seed_list == [0, 1, 2]
    assert problems(suite(defaults={"seeds": 0}))[0].startswith(f"{SRC}: defaults.seeds: ")


def test_models_are_frozen():
    s = parse(suite())
    with pytest.raises(pydantic.ValidationError):
        s.name = "other"  # type: ignore[misc]


# --- grids, labels, include/exclude ---------------------------------------------------------


def test_grid_expansion_and_labels():
    kfac = {"name": "kfac", "params": {"backward": ["mc", "exact"], "num_samples": [1, 10]}}
    s = parse(suite(estimators=[kfac, {"name": "bl89", "params": {"output_curvature": "zero"}}]))
    assert [e.label for e in s.estimator_list()] == [
        "kfac[backward=mc,num_samples=1]",
        "kfac[backward=mc,num_samples=10]",
        "kfac[backward=exact,num_samples=1]",
        "kfac[backward=exact,num_samples=10]",
        "bl89[output_curvature=zero]",
    ]
    assert [e.num_samples for e in s.estimators[0].expand()] == [1, 10, 1, 10]


def test_labels_must_be_unique():
    ests = [{"name": "exact"}, {"name": "exact", "params": {"method": "hvp"}}]
    (line,) = problems(suite(estimators=ests))
    assert line.startswith(f"{SRC}: estimators[1]: label 'exact' again (also estimators[0])")


def test_include_and_exclude():
    big = task(MLP_MSE, name="big_mse")
    ests = [{"name": "exact"}, *BASE["estimators"]]
    s = parse(suite(tasks=[MLP_CE, big], estimators=ests, exclude=["big_*/exact*"]))
    ids = [c.id for c in plan_cells(s)]
    assert "big_mse/exact/seed=0" not in ids
    assert "ce/exact/seed=0" in ids
    assert len(ids) == 2 * 4 - 1
    s = parse(suite(include=["*/hutchinson"], exclude=["ce/hutchinson[num_samples=10]"]))
    assert [c.id for c in plan_cells(s)] == [
        "ce/hutchinson[num_samples=1]/seed=0",
        "mse/hutchinson[num_samples=1]/seed=0",
        "mse/hutchinson[num_samples=10]/seed=0",
    ]


def test_bad_patterns():
    lines = problems(suite(include=["ce"], exclude=["nothing/*", "*/hesscale"]))
    assert lines == [
        f"{SRC}: include[0]: 'ce' is not a 'task/estimator' pattern",
        f"{SRC}: exclude[0]: 'nothing/*' matches no task/estimator pair",
    ]
    assert problems(suite(exclude=["*/*"])) == [f"{SRC}: exclude: no cell is left"]


# --- task variants and the plan -------------------------------------------------------------


def test_task_variants_and_names():
    trained = task(MLP_CE, eval={"states": ["init", {"steps": 10, "lr": 0.01}]})
    s = parse(suite(tasks=[trained, MLP_MSE]))
    variants = task_variants(s)
    assert [v.name for v in variants] == ["ce@init", "ce@trained10", "mse"]
    assert variants[0].state == "init"
    assert variants[1].state == TrainState(steps=10, lr=0.01)
    assert variants[1].state_label == "trained10"
    assert variants[1].task is s.tasks[0]


def test_plan_order_and_ids():
    s = parse(suite(defaults={"seeds": [3, 1]}))
    cells = plan_cells(s)
    assert [c.id for c in cells[:4]] == [
        "ce/hesscale/seed=3",
        "ce/hutchinson[num_samples=1]/seed=3",
        "ce/hutchinson[num_samples=10]/seed=3",
        "ce/hesscale/seed=1",
    ]
    assert len(cells) == 2 * 2 * 3
    assert all(isinstance(c, CellSpec) for c in cells)
    assert len({c.id for c in cells}) == len(cells)
    assert len(set(cells)) == len(cells)  # hashable
    assert [c.id for c in plan_cells(s)] == [c.id for c in cells]  # pure


def test_plan_filters():
    trained = task(MLP_CE, eval={"states": ["init", {"steps": 10}]})
    s = parse(suite(tasks=[trained, MLP_MSE], defaults={"seeds": 3}))

    def ids(**kw):
        return [c.id for c in plan_cells(s, **kw)]

    assert {i.split("/")[0] for i in ids(tasks=["ce"])} == {"ce@init", "ce@trained10"}
    assert {i.split("/")[0] for i in ids(tasks=["ce@trained10", "m*"])} == {"ce@trained10", "mse"}
    assert {i.split("/")[1] for i in ids(estimators=["hutchinson"])} == {
        "hutchinson[num_samples=1]",
        "hutchinson[num_samples=10]",
    }
    assert {i.split("/")[1] for i in ids(estimators=["hutchinson[num_samples=10]", "hess*"])} == {
        "hutchinson[num_samples=10]",
        "hesscale",
    }
    assert ids(tasks=["mse"], estimators=["hesscale"], seeds=[2, 0]) == [
        "mse/hesscale/seed=0",
        "mse/hesscale/seed=2",
    ]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tasks": ["nope"]}, r"no task matches 'nope'; tasks: ce, mse"),
        ({"estimators": ["hutch"]}, r"no estimator matches 'hutch'; estimators: hesscale, "),
        ({"seeds": [7]}, r"seed 7 is not one of the suite's seeds \(0\)"),
    ],
)
def test_unknown_filters(kw, match):
    s = parse(suite())
    with pytest.raises(ConfigError, match=match):
        plan_cells(s, **kw)


# --- seeds and hashes -----------------------------------------------------------------------


def test_derive_seed_is_stable():
    # A pinned value: the same in every process and run (no use of hash()).
    assert derive_seed("paper_2022", 0, "data") == 3588593932078474997
    assert derive_seed("a", 0) != derive_seed("a", 1) != derive_seed("b", 0)
    assert all(0 <= derive_seed("t", s, "init") < 2**62 for s in range(100))


def test_suite_text_hash():
    assert suite_text_hash("abc") == suite_text_hash(b"abc")
    assert (
        suite_text_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# --- the shipped suites ---------------------------------------------------------------------


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_shipped_suites_load_and_plan(path):
    s = load_suite(path)
    assert s.name == path.stem
    assert path.read_text().startswith("# "), "a comment at the top says what it is for"
    cells = plan_cells(s)
    assert cells
    assert len({c.id for c in cells}) == len(cells)


def test_shipped_suite_names():
    assert {p.stem for p in SUITES} >= {
        "smoke",
        "small_mlp",
        "small_cnn",
        "paper_2022",
        "paper_digits",
        "scaling",
    }


@pytest.mark.parametrize("name", ["small_mlp", "small_cnn"])
def test_flagship_suites_cover_every_estimator(name):
    s = load_suite(Path(__file__).parent.parent / "suites" / f"{name}.yaml")
    builtin = {
        name
        for name in available_estimators()  # tests may register extra estimators
        if estimator_class(name).__module__.startswith("hessbench.estimators.")
        # the optional peers (installed or not) are not part of the flagship suites
        and not estimator_class(name).__module__.startswith("hessbench.estimators.peers.")
    }
    # xdiag and diagpp came after published reports of these suites; their cells
    # live in matrix_free.yaml (checked below) so the flagship suites' cells stay as published
    assert {e.name for e in s.estimator_list()} == builtin - MATRIX_FREE_ONLY


MATRIX_FREE_ONLY = {"xdiag", "diagpp"}


def test_matrix_free_suite_covers_the_flagship_tasks_at_equal_budgets():
    root = Path(__file__).parent.parent / "suites"
    mf = load_suite(root / "matrix_free.yaml")
    assert {"hutchinson", *MATRIX_FREE_ONLY} <= {e.name for e in mf.estimator_list()}
    labels = {c.estimator.label for c in plan_cells(mf)}
    for m in (10, 50, 200):
        assert {f"hutchinson[num_matvecs={m}]", f"xdiag[num_matvecs={m}]"} <= labels
        assert f"diagpp[num_matvecs={m}]" in labels
    tasks = {t.name: t for t in mf.tasks}
    for name, prefix in (("paper_2022", "paper_"), ("small_mlp", "mlp_"), ("small_cnn", "cnn_")):
        theirs = load_suite(root / f"{name}.yaml")
        for t in theirs.tasks:
            ours = t.name if t.name.startswith(prefix) else prefix + t.name
            assert ours in tasks, (name, t.name)
            assert (tasks[ours].model, tasks[ours].loss) == (t.model, t.loss), (name, t.name)


def test_paper_protocols():
    root = Path(__file__).parent.parent / "suites"
    paper = load_suite(root / "paper_2022.yaml")
    (t,) = paper.tasks
    assert paper.defaults.seed_list == list(range(40))
    assert (t.eval.batch_size, t.eval.num_batches, t.input_shape, t.output_dim) == (
        1,
        1000,
        (6,),
        10,
    )
    digits = load_suite(root / "paper_digits.yaml")
    assert [v.name for v in task_variants(digits)] == [
        "digits_tanh@init",
        "digits_tanh@trained10000",
        "digits_relu@init",
        "digits_relu@trained10000",
    ]
    scaling = load_suite(root / "scaling.yaml")
    assert [len(t.model.layers) for t in scaling.tasks] == [2 + 2 * n for n in (1, 2, 4, 8, 16)]


def test_the_documented_example_is_valid():
    text = (Path(__file__).parent.parent / "docs" / "suites.md").read_text()
    example = text.split("## A complete example")[1].split("```yaml\n")[1].split("```")[0]
    s = parse_suite(example, "docs/suites.md")
    assert [v.name for v in task_variants(s)] == [
        "digits_tanh@init",
        "digits_tanh@trained2000",
        "cnn_images",
        "custom",
    ]
    ids = {c.id for c in plan_cells(s)}
    assert len(ids) == 4 * 3 * 7 - 3 - 3
    assert "cnn_images/hutchinson[num_samples=10]/seed=0" not in ids


@pytest.mark.parametrize("path", ALL_SUITES, ids=[p.stem for p in ALL_SUITES])
def test_cli_validates_every_shipped_suite(path):
    """``hessbench validate`` accepts every shipped suite, whatever its kind."""
    from typer.testing import CliRunner

    from hessbench.cli import app

    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: ok:" in result.output
