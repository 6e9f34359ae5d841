"""``cast_copy`` and ``CastView``: how the exact diagonal of a float32 model computes in float64.

Graph models run on ``cast_copy``; sequential plans read each layer through a
``CastView`` instead, so no float64 copy of the whole model exists.

It must hold what ``copy.deepcopy(model).to(dtype)`` holds for the passes
(parameters, buffers, structure, ties), leave the original alone, and give
the exact diagonal of a float32 model bit for bit what the same model in
float64 gives (graph models reuse the original's ``torch.fx`` trace). Also:
the graph plan cache follows frozen parameters, replaced modules and the
training flags.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_architectures import _tiny
from test_transformer import Encoder, _gpt
from torch import nn

from hessbench.estimators import get_estimator
from hessbench.estimators._base import cast_copy


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    return {
        "resnet": _tiny("resnet").float(),
        "resmlp": _tiny("resmlp").float(),
        "gpt": _gpt(True).float(),
        "encoder": Encoder("gelu", bool_mask=False).eval(),
        "tied": tied,
    }


@pytest.mark.parametrize("name", list(_models()))
def test_cast_copy_holds_what_a_deep_copy_cast_holds(name):
    model = _models()[name]
    want = copy.deepcopy(model).to(torch.float64)
    got = cast_copy(model, torch.float64)
    assert type(got) is type(model)
    assert got is not model
    for a, b in ((want.named_parameters(), got.named_parameters()),
                 (want.named_buffers(), got.named_buffers())):  # fmt: skip
        a, b = dict(a), dict(b)
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
            assert a[k].dtype == b[k].dtype, k
            assert a[k].requires_grad == b[k].requires_grad, k
    assert [n for n, _ in want.named_modules()] == [n for n, _ in got.named_modules()]
    for p in got.parameters():
        assert isinstance(p, nn.Parameter)
        assert p.is_leaf


def test_cast_copy_keeps_ties_and_leaves_the_original_alone():
    models = _models()
    tied = cast_copy(models["tied"], torch.float64)
    assert tied[0].weight is tied[2].weight  # one parameter, as in the original
    resnet = models["resnet"]
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    twin = cast_copy(resnet, torch.float64)
    for t in list(twin.parameters()) + list(twin.buffers()):
        with torch.no_grad():
            t.add_(1)  # buffers (int counters too) and parameters are the copy's own
    after = resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert all(after[k].dtype == before[k].dtype for k in after)
    assert all(p.dtype == torch.float32 for p in resnet.parameters())


@pytest.mark.parametrize("name", ["resnet", "resmlp", "gpt"])
def test_exact_on_a_float32_model_equals_exact_on_it_in_float64(name):
    model = _models()[name]
    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        x, y = torch.randint(6, (3, 4), generator=g), torch.randint(6, (3,), generator=g)
    else:
        shape = {"resnet": (3, 1, 4, 4), "resmlp": (3, 3)}[name]
        x, y = torch.randn(shape, generator=g), torch.randint(3, (3,), generator=g)
    loss = nn.CrossEntropyLoss()
    exact = get_estimator("exact", method="structured")
    x64 = x.double() if x.is_floating_point() else x
    want = exact(copy.deepcopy(model).double(), loss, x64, y)
    for _ in range(2):  # the same on a second call, with the original's trace cached
        got = exact(model, loss, x, y)
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == torch.float32
            assert torch.equal(got[k], want[k].float()), k


def test_the_graph_plan_cache_follows_the_model():
    from hessbench.estimators._graph import build_graph_plan

    model = _models()["resmlp"]
    plan = build_graph_plan(model)
    assert build_graph_plan(model) is plan  # unchanged: the cached plan
    model.out.bias.requires_grad_(False)  # a frozen parameter: a new plan without its key
    frozen = build_graph_plan(model)
    assert frozen is not plan
    assert "out.bias" in plan.keys
    assert "out.bias" not in frozen.keys
    model.out = nn.Linear(model.out.in_features, 5)  # a replaced module: a new plan
    replaced = build_graph_plan(model)
    assert replaced is not frozen
    assert "out.bias" in replaced.keys
    model.train()  # the training flags are part of the key
    assert build_graph_plan(model) is not replaced


def _sequential_cases():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 3))
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ELU(), nn.MaxPool2d(2), nn.Conv2d(2, 4, 2, groups=2),
        nn.Tanh(), nn.AvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    dropout = nn.Sequential(  # a dropout mask drawn in training mode, a frozen weight
        nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 3)
    )
    dropout[3].weight.requires_grad_(False)
    return {"mlp": (mlp, (3, 4)), "cnn": (cnn, (3, 1, 4, 4)), "dropout": (dropout, (3, 4))}


@pytest.mark.parametrize("name", ["mlp", "cnn", "dropout"])
@pytest.mark.parametrize("representation", ["auto", "factored", "full"])
def test_exact_of_a_float32_sequential_equals_exact_on_its_float64_copy(name, representation):
    """Read layer by layer in float64 (``CastView``), with the gradient too: bit for bit."""
    model, shape = _sequential_cases()[name]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(shape, generator=g), torch.randint(3, (shape[0],), generator=g)
    loss = nn.CrossEntropyLoss()
    exact = get_estimator("exact", method="structured", representation=representation)
    twin = copy.deepcopy(model).double()

    def gen():  # the same dropout masks for both
        return torch.Generator().manual_seed(5)

    want, want_grad, want_loss = exact.estimate_with_grad(
        twin, loss, x.double(), y, generator=gen()
    )
    got, grad, value = exact.estimate_with_grad(model, loss, x, y, generator=gen())
    assert list(got) == list(want) == list(grad)
    for k in want:
        assert got[k].dtype == grad[k].dtype == torch.float32
        assert torch.equal(got[k], want[k].float()), k
        assert torch.equal(grad[k], want_grad[k].float()), k
    assert value.dtype == torch.float32
    assert float(value) == float(want_loss.float())


def test_a_cast_view_reads_floating_tensors_in_its_dtype_and_the_rest_as_is():
    from hessbench.estimators._sequential import CastView

    bn = nn.BatchNorm1d(3).eval()
    view = CastView(bn, torch.float64)
    assert view.weight.dtype == view.running_var.dtype == torch.float64
    assert torch.equal(view.running_var, bn.running_var.double())
    assert not view.weight.requires_grad  # a value, not a parameter to differentiate
    assert view.num_batches_tracked.dtype == torch.int64  # integers as they are
    assert view.eps == bn.eps
    assert view.training is False
    assert bn.weight.dtype == torch.float32  # the module itself is untouched


def test_exact_in_float64_never_holds_a_float64_copy_of_the_whole_model():
    """Peak memory below float64 parameters plus the float32 result (a cast copy needed more)."""
    from hessbench.bench.measure import peak_memory

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    x, y = torch.randn(1, 256), torch.tensor([3])
    exact = get_estimator("exact")
    exact(model, nn.CrossEntropyLoss(), x, y)  # warm: plans and caches built
    peak = peak_memory(lambda: exact(model, nn.CrossEntropyLoss(), x, y), torch.device("cpu"))
    size = sum(p.numel() for p in model.parameters())
    assert peak < 8 * size + 4 * size


def test_the_sequential_plan_cache_follows_the_model():
    from hessbench.estimators._sequential import build_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Tanh(), nn.Linear(4, 2))
    plan = build_plan(model)
    assert build_plan(model) is plan  # unchanged: the cached plan
    assert len(plan.steps) == 3  # a dropout with p = 0 is no step
    model[1].p = 0.5  # now a step (training mode): a new plan
    dropping = build_plan(model)
    assert len(dropping.steps) == 4
    model.eval()  # eval-mode dropout is the identity again
    assert len(build_plan(model).steps) == 3
    model[3].bias.requires_grad_(False)  # a frozen parameter: no key for it
    assert "3.bias" not in build_plan(model).keys
    model[3] = nn.Linear(4, 5)  # a replaced module
    assert build_plan(model).steps[-1].module is model[3]
    twin = copy.deepcopy(model)  # another model with the same structure: its own plan
    assert build_plan(twin).steps[-1].module is twin[3]


def test_a_layer_read_in_float64_is_named_by_its_own_type_in_errors():
    from hessbench.errors import UnsupportedError

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(2, 5, 4), torch.randint(2, (2,))  # 3-D: Linear needs (N, features)
    with pytest.raises(UnsupportedError, match=r"^layer '0' \(Linear\): Linear expects inputs"):
        get_estimator("exact", method="structured")(model, nn.CrossEntropyLoss(), x, y)
