"""Capture of an arbitrary ``nn.Module`` as a graph plan for the one-pass engines.

:func:`build_graph_plan` traces the model with ``torch.fx.symbolic_trace`` and maps
every node to a rule:

- ``call_module`` of a layer in :data:`~hessbench.estimators._layers.RULES` or
  :data:`GRAPH_RULES` (BatchNorm1d/2d in eval mode, GELU, SiLU, AdaptiveAvgPool1d/2d);
  LayerNorm and GroupNorm become two nodes, the normalization (a generic
  local-derivative rule) and the per-feature affine map (its parameters);
- ``call_function``/``call_method`` activations (``torch.relu``, ``F.gelu``,
  ``x.tanh()`` ...) to the activation rules; ``flatten``/``view``/``reshape``
  (keeping the batch dimension) to a reshape; ``x + y``/``torch.add``/``x - y``
  of two tensors to an add node; ``torch.cat`` along a non-batch dimension to a
  cat node; scalings by constants (``2 * x``, ``x + 1``, ``-x``) to a constant
  affine rule; ``x.size(...)``/``x.shape`` to values;
- transformers (:mod:`hessbench.estimators._rules_attention`): ``nn.Embedding`` on
  tokens, ``x + p`` for a parameter read by ``get_attr`` (learned positions),
  ``x[:, i]``, ``nn.Linear`` on positions, ``nn.MultiheadAttention`` self-attention
  (in-projection, attention core as a local rule, out-projection), and
  ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` expanded by their
  documented computation (verified configurations only; masks read from buffers).

The plan lists the tensor nodes in topological order with the indices of their
inputs and their parameter keys. Anything else raises a one-line
:class:`UnsupportedError` naming the node.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hessbench.errors import UnsupportedError
from hessbench.estimators._layers import RULES, Rule
from hessbench.estimators._rules_activations import (
    ELURule,
    LeakyReLURule,
    LogSigmoidRule,
    ReLURule,
    SigmoidRule,
    SoftplusRule,
    TanhRule,
)
from hessbench.estimators._rules_attention import (
    AddParamRule,
    AddParamSpec,
    AttentionRule,
    AttentionSpec,
    EmbeddingRule,
    LinearSpec,
    PosLinearRule,
    SelectRule,
)
from hessbench.estimators._rules_norm import (
    AdaptiveAvgPoolRule,
    AffineRule,
    AffineSpec,
    GELURule,
    LayerNormRule,
    LocalRule,
    LocalSpec,
    ReshapeRule,
    ScaleRule,
    SiLURule,
)

__all__ = ["GRAPH_RULES", "GNode", "GraphPlan", "PerModel", "build_graph_plan", "model_key"]

GRAPH_RULES: dict[type[nn.Module], Rule] = {
    nn.GELU: GELURule(),
    nn.SiLU: SiLURule(),
    nn.AdaptiveAvgPool1d: AdaptiveAvgPoolRule(1),
    nn.AdaptiveAvgPool2d: AdaptiveAvgPoolRule(2),
}
"""Layers only the graph engine supports (besides BatchNorm, LayerNorm and GroupNorm)."""

_AFFINE = AffineRule()
_LOCAL = LocalRule()
_LAYERNORM = LayerNormRule()
_ATTENTION = AttentionRule()


class _LNSpec(LocalSpec):
    """LayerNorm's normalization: the closed form when it spans every non-batch feature."""

    def __init__(self, eps: float, shape):
        super().__init__(lambda v: F.layer_norm(v, shape, None, None, eps), "layer_norm")
        self.eps, self.shape = eps, tuple(shape)


_POSLINEAR = PosLinearRule()
_EMBEDDING = EmbeddingRule()
_ADDPARAM = AddParamRule()
_SELECT = SelectRule()
_SEQ_LAYERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


def _param_add(node, index, attrs) -> bool:
    """``x + p`` with ``x`` a tensor node and ``p`` a trainable parameter read by ``get_attr``."""
    if node.target not in (operator.add, torch.add, "add") or node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    pnode = b if a in index else a if b in index else None
    if pnode is None or pnode not in attrs:
        return False
    owner, attr = attrs[pnode]
    p = getattr(owner, attr)
    return isinstance(p, nn.Parameter) and p.requires_grad


_RESHAPE = ReshapeRule()
_SCALE = ScaleRule()

# call_function / call_method activations: name -> (rule, module factory from args)
_ACTS: dict[Any, tuple[Rule, Any]] = {
    torch.relu: (ReLURule(), lambda a, k: nn.ReLU()),
    F.relu: (ReLURule(), lambda a, k: nn.ReLU()),
    "relu": (ReLURule(), lambda a, k: nn.ReLU()),
    torch.tanh: (TanhRule(), lambda a, k: nn.Tanh()),
    F.tanh: (TanhRule(), lambda a, k: nn.Tanh()),
    "tanh": (TanhRule(), lambda a, k: nn.Tanh()),
    torch.sigmoid: (SigmoidRule(), lambda a, k: nn.Sigmoid()),
    F.sigmoid: (SigmoidRule(), lambda a, k: nn.Sigmoid()),
    "sigmoid": (SigmoidRule(), lambda a, k: nn.Sigmoid()),
    F.gelu: (GELURule(), lambda a, k: nn.GELU(approximate=k.get("approximate", "none"))),
    F.silu: (SiLURule(), lambda a, k: nn.SiLU()),
    F.elu: (ELURule(), lambda a, k: nn.ELU(a[0] if a else k.get("alpha", 1.0))),
    F.leaky_relu: (
        LeakyReLURule(),
        lambda a, k: nn.LeakyReLU(a[0] if a else k.get("negative_slope", 0.01)),
    ),
    F.softplus: (
        SoftplusRule(),
        lambda a, k: nn.Softplus(k.get("beta", a[0] if a else 1.0), k.get("threshold", 20.0)),
    ),
    F.logsigmoid: (LogSigmoidRule(), lambda a, k: nn.LogSigmoid()),
}
_RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
_ADDS = {
    operator.add: 1.0,
    torch.add: 1.0,
    "add": 1.0,
    operator.sub: -1.0,
    torch.sub: -1.0,
    "sub": -1.0,
}
_VALUE_METHODS = {"size", "dim"}


@dataclass(frozen=True, slots=True)
class GNode:
    """One tensor node: ``kind`` is ``input``, ``rule``, ``reshape``, ``add`` or ``cat``.

    ``inputs`` are indices of earlier tensor nodes; ``fx`` is the traced node
    (reshapes resolve their arguments from it); ``coef`` the second operand's
    sign of an add; ``dim`` a cat's dimension.
    """

    name: str
    kind: str
    inputs: tuple[int, ...]
    rule: Rule | None = None
    module: Any = None
    weight_key: str | None = None
    bias_key: str | None = None
    fx: Any = None
    coef: float = 1.0
    dim: int = 0

    @property
    def has_params(self) -> bool:
        return self.weight_key is not None or self.bias_key is not None


@dataclass(frozen=True, slots=True)
class GraphPlan:
    """Tensor nodes in topological order, the output node, and which nodes lead to a parameter."""

    nodes: tuple[GNode, ...]
    output: int
    keys: tuple[str, ...]
    need: tuple[bool, ...]
    """``need[i]``: node ``i`` has parameters or an input that leads to one."""
    values: tuple[Any, ...]
    """fx nodes that compute non-tensor values (``x.size(0)``), evaluated in the forward pass."""
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    """What the passes derive from the plan alone, computed at their first use."""

    @property
    def by_fx(self) -> dict[Any, int]:
        """The index of each tensor node by its fx node."""
        if "by_fx" not in self.memo:
            self.memo["by_fx"] = {gn.fx: i for i, gn in enumerate(self.nodes) if gn.fx is not None}
        return self.memo["by_fx"]


class PerModel:
    """Values for the last few models, kept while the model's :func:`model_key` is unchanged.

    Bounded (a plan or a trace holds the model's modules); the model itself is
    held weakly, so a new model at a recycled ``id`` never hits.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.items: dict[int, tuple[Any, tuple, Any]] = {}

    def get(self, model: nn.Module, key: tuple) -> Any:
        hit = self.items.get(id(model))
        return hit[2] if hit is not None and hit[0]() is model and hit[1] == key else None

    def put(self, model: nn.Module, key: tuple, value: Any) -> Any:
        self.items.pop(id(model), None)
        while len(self.items) >= self.size:
            del self.items[next(iter(self.items))]
        self.items[id(model)] = (weakref.ref(model), key, value)
        return value


_PLANS = PerModel()
_TRACES = PerModel()
_DROPOUT = nn.modules.dropout._DropoutNd


def model_key(model: nn.Module) -> tuple:
    """What a plan depends on besides the code: the modules, their training flags, the parameters.

    Dropout probabilities too: a plan leaves out a dropout layer that is the identity.
    """
    # one walk over the module tree, as flat (id, flag) pairs without generator expressions
    # (it runs on every call: ``modules()``/``parameters()`` cost ~0.1 ms on a small
    # ResNet, a tenth of a gradient at batch 1); a module or parameter reached twice
    # appears twice, which only makes the key longer
    mods: list[int | bool] = []
    params: list[int | bool] = []
    stack = [model]
    while stack:
        m = stack.pop()
        mods += (id(m), m.training)
        if isinstance(m, _DROPOUT):
            mods.append(m.p)
        for p in m._parameters.values():
            if p is not None:
                params += (id(p), p.requires_grad)
        children = m._modules
        if children:
            stack.extend(reversed([c for c in children.values() if c is not None]))
    return tuple(mods), tuple(params)


def _trace(model: nn.Module):
    """``symbolic_trace(model)`` as a one-line :class:`UnsupportedError` when it fails."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # any tracing failure means "not capturable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(
            f"model {type(model).__name__} cannot be traced by torch.fx ({first[:200]})"
        ) from None
    return gm


def _fail(node, what: str) -> UnsupportedError:
    return UnsupportedError(f"node '{node.name}' ({what}) is not supported by the graph engine")


def _keys(path: str, m: nn.Module) -> tuple[str | None, str | None]:
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    wk = f"{path}.weight" if isinstance(w, nn.Parameter) and w.requires_grad else None
    bk = f"{path}.bias" if isinstance(b, nn.Parameter) and b.requires_grad else None
    return wk, bk


def _cached_trace(model: nn.Module, key: tuple):
    """``_trace(model)``, kept for the last few models while their :func:`model_key` holds."""
    gm = _TRACES.get(model, key)
    if gm is None:
        gm = _TRACES.put(model, key, _trace(model))
    return gm


def build_graph_plan(model: nn.Module, *, like: nn.Module | None = None) -> GraphPlan:
    """Trace ``model`` and map its nodes to rules (see the module docstring).

    ``like``: a model ``model`` is a copy of, module for module under the same
    names (a :func:`~hessbench.estimators._base.cast_copy`): its trace, which
    is cached, serves for ``model`` (tracing costs several times more than
    mapping the nodes), and the plan of the short-lived copy is not cached.

    Raises:
        UnsupportedError: one line naming the reason (untraceable model, the first
            unsupported node, train-mode batch norm, tied parameters, parameters
            used outside a supported layer, no trainable parameter).

    Plans of the last few models are cached while the model's modules, their
    training flags and its parameters (objects and ``requires_grad``) are
    unchanged; batch-norm statistics are read at every forward pass.
    """
    if like is not None:
        return _build(model, _cached_trace(like, model_key(like)))
    key = model_key(model)
    plan = _PLANS.get(model, key)
    if plan is None:
        plan = _PLANS.put(model, key, _build(model, _cached_trace(model, key)))
    return plan


def _build(model: nn.Module, gm) -> GraphPlan:
    modules = dict(model.named_modules())
    nodes: list[GNode] = []
    index: dict[Any, int] = {}  # fx node -> tensor node index
    values: list[Any] = []
    value_set: set[Any] = set()
    keys: list[str] = []
    seen_params: dict[int, str] = {}
    called: set[str] = set()
    output = -1
    attrs: dict[Any, tuple[nn.Module, str]] = {}  # get_attr node -> (owner, attribute)
    tuples: dict[Any, int] = {}  # MultiheadAttention call -> its output node

    def tensor_input(node, arg) -> int:
        if isinstance(arg, torch.fx.Node) and arg in index:
            return index[arg]
        raise _fail(node, f"{node.op} {node.target!r} with a non-tensor input")

    def add(gn: GNode, fxn) -> None:
        index[fxn] = len(nodes)
        nodes.append(replace(gn, fx=fxn))

    def emit(gn: GNode, fxn=None) -> int:
        """Append a tensor node (mapped from ``fxn`` when given); its index."""
        if fxn is not None:
            index[fxn] = len(nodes)
            gn = replace(gn, fx=fxn)
        nodes.append(gn)
        return len(nodes) - 1

    def register(name: str, path: str, k: str | None, p) -> None:
        if k is None:
            return
        if id(p) in seen_params:
            raise UnsupportedError(
                f"node '{name}': layer '{path}' shares a parameter with "
                f"'{seen_params[id(p)]}'; tied parameters are not supported by the graph engine"
            )
        seen_params[id(p)] = k
        keys.append(k)

    def module_node(name: str, path: str, m: nn.Module, x: int, fxn=None) -> int:
        """The node(s) of a single-input layer ``m`` at ``path`` reading node ``x``."""
        wk, bk = _keys(path, m)
        t = type(m)
        if (wk or bk) and path in called:
            raise UnsupportedError(
                f"node '{name}': layer '{path}' ({t.__name__}) is called twice; "
                "tied parameters are not supported by the graph engine"
            )
        called.add(path)
        pre: list[GNode] = []
        if t in (nn.BatchNorm1d, nn.BatchNorm2d):
            if m.training or not m.track_running_stats or m.running_var is None:
                raise UnsupportedError(
                    f"layer '{path}' ({t.__name__}) uses batch statistics (training mode or "
                    "track_running_stats=False); only eval-mode batch norm is supported"
                )
            gn = GNode(name, "rule", (x,), _AFFINE, AffineSpec(m.weight, m.bias, None, m), wk, bk)
        elif t in (nn.LayerNorm, nn.GroupNorm):
            if t is nn.LayerNorm:
                shape, eps = tuple(m.normalized_shape), m.eps
                fn = lambda v, shape=shape, eps=eps: F.layer_norm(v, shape, None, None, eps)  # noqa: E731
                view: tuple[int, ...] | None = shape
                affine = m.elementwise_affine
            else:
                groups, eps = m.num_groups, m.eps
                fn = lambda v, groups=groups, eps=eps: F.group_norm(v, groups, None, None, eps)  # noqa: E731
                view = None  # per channel, set below from the input rank
                affine = m.affine
            norm = GNode(name + ".normalize", "rule", (x,), _LOCAL, LocalSpec(fn, path))
            if t is nn.LayerNorm:  # closed form where it normalizes every non-batch feature
                norm = replace(norm, rule=_LAYERNORM, module=_LNSpec(m.eps, shape))
            if not affine:
                gn = replace(norm, name=name)
            else:
                pre.append(norm)
                spec = AffineSpec(m.weight, m.bias, view)
                gn = GNode(name, "rule", (len(nodes),), _AFFINE, spec, wk, bk)
        elif t is nn.Linear:  # positions allowed (transformers); (N, in) as LinearRule
            gn = GNode(name, "rule", (x,), _POSLINEAR, m, wk, bk)
        elif t is nn.Embedding:
            _EMBEDDING.check(m, path)
            gn = GNode(name, "rule", (x,), _EMBEDDING, m, wk, None)
            bk = None
        else:
            rule = RULES.get(t) or GRAPH_RULES.get(t)
            if rule is None:
                supported = sorted(
                    [c.__name__ for c in (*RULES, *GRAPH_RULES)]
                    + [
                        "BatchNorm1d",
                        "BatchNorm2d",
                        "Embedding",
                        "GroupNorm",
                        "LayerNorm",
                        "MultiheadAttention",
                        "TransformerEncoder",
                        "TransformerEncoderLayer",
                    ]
                )
                raise UnsupportedError(
                    f"layer '{path}' ({t.__name__}) is not supported; supported layers: "
                    + ", ".join(supported)
                )
            rule.check(m, path)
            if not rule.parametric:
                stray = [n for n, p in m.named_parameters() if p.requires_grad]
                if stray:
                    raise UnsupportedError(
                        f"layer '{path}' ({t.__name__}) has trainable parameters {stray} "
                        "that this estimator cannot handle"
                    )
                wk = bk = None
            gn = GNode(name, "rule", (x,), rule, m, wk, bk)
        register(name, path, wk, getattr(m, "weight", None))
        register(name, path, bk, getattr(m, "bias", None))
        for p in pre:
            emit(p)
        return emit(gn, fxn)

    def alias(fxn, i: int) -> None:
        """Map the fx node ``fxn`` to tensor node ``i`` (the last node of an expanded layer)."""
        index[fxn] = i
        nodes[i] = replace(nodes[i], fx=fxn)

    def bind(fn, node) -> dict:
        try:
            return inspect.signature(fn).bind(None, *node.args, **node.kwargs).arguments
        except TypeError as exc:
            raise _fail(node, f"a call that does not match its signature: {exc}") from None

    def mask_of(node, arg) -> tuple[Any, str | None]:
        """``(owner module, attribute)`` of an attention mask read from a buffer (or none)."""
        if arg is None:
            return None, None
        if isinstance(arg, torch.fx.Node) and arg in attrs:
            owner, attr = attrs[arg]
            val = getattr(owner, attr)
            if isinstance(val, torch.Tensor) and not isinstance(val, nn.Parameter):
                return owner, attr
        raise _fail(node, "an attention mask that is not a buffer of the model")

    def mha_nodes(name: str, path: str, m: nn.MultiheadAttention, x: int, owner, attr) -> int:
        """Self-attention as in-projection (packed Linear), attention core (local rule), out_proj."""
        why = None
        if not m._qkv_same_embed_dim:
            why = "kdim/vdim different from embed_dim"
        elif m.bias_k is not None or m.add_zero_attn:
            why = "add_bias_kv/add_zero_attn"
        elif not m.batch_first:
            why = "batch_first=False (the batch must be dimension 0)"
        elif m.training and m.dropout > 0:
            why = "attention dropout in training mode"
        if why:
            raise UnsupportedError(
                f"layer '{path}' (MultiheadAttention): {why} is not supported by the graph engine"
            )
        if path in called:
            raise UnsupportedError(
                f"node '{name}': layer '{path}' (MultiheadAttention) is called twice; "
                "tied parameters are not supported by the graph engine"
            )
        called.add(path)
        w, b = m.in_proj_weight, m.in_proj_bias
        wk = f"{path}.in_proj_weight" if w.requires_grad else None
        bk = f"{path}.in_proj_bias" if b is not None and b.requires_grad else None
        register(name, path, wk, w)
        register(name, path, bk, b)
        spec = LinearSpec(w, b)
        qkv = emit(GNode(name + ".in_proj", "rule", (x,), _POSLINEAR, spec, wk, bk))
        core = AttentionSpec(m.num_heads, owner, attr, path)
        att = emit(GNode(name + ".attention", "rule", (qkv,), _ATTENTION, core))
        o = m.out_proj
        owk, obk = _keys(path + ".out_proj", o)
        register(name, path, owk, o.weight)
        register(name, path, obk, o.bias)
        return emit(GNode(name + ".out_proj", "rule", (att,), _POSLINEAR, o, owk, obk))

    def attention(node, path: str, m: nn.MultiheadAttention) -> int:
        a = bind(nn.MultiheadAttention.forward, node)
        q, k, v = a["query"], a["key"], a["value"]
        if not (q is k is v) or q not in index:
            raise _fail(node, f"attention '{path}' other than self-attention (query = key = value)")
        if a.get("key_padding_mask") is not None:
            raise _fail(node, f"attention '{path}' with a key_padding_mask")
        owner, attr = mask_of(node, a.get("attn_mask"))
        if a.get("is_causal") and owner is None:
            raise _fail(node, f"attention '{path}' with is_causal=True and no attn_mask")
        return mha_nodes(node.name, path, m, index[q], owner, attr)

    def layer_nodes(name: str, path: str, m: nn.TransformerEncoderLayer, x: int, owner, attr):
        """``nn.TransformerEncoderLayer`` by its documented computation (norm_first or not)."""
        drop = [m.dropout.p, m.dropout1.p, m.dropout2.p]
        if m.training and any(p > 0 for p in drop):
            raise UnsupportedError(
                f"layer '{path}' (TransformerEncoderLayer): dropout in training mode is not "
                "supported by the graph engine (use dropout=0 or eval mode)"
            )
        act = m.activation
        if not isinstance(act, nn.Module) and act not in (F.relu, F.gelu):
            raise UnsupportedError(
                f"layer '{path}' (TransformerEncoderLayer): activation {act!r} is not supported "
                "(relu or gelu, a function or a module)"
            )

        def ff(h: int) -> int:
            h = module_node(name + ".linear1", path + ".linear1", m.linear1, h)
            if isinstance(act, nn.Module):
                h = module_node(name + ".activation", path + ".activation", act, h)
            else:
                rule, make = _ACTS[act]
                h = emit(GNode(name + ".activation", "rule", (h,), rule, make([], {})))
            return module_node(name + ".linear2", path + ".linear2", m.linear2, h)

        def sa(h: int) -> int:
            return mha_nodes(name + ".self_attn", path + ".self_attn", m.self_attn, h, owner, attr)

        def norm(i: int, h: int) -> int:
            return module_node(f"{name}.norm{i}", f"{path}.norm{i}", getattr(m, f"norm{i}"), h)

        def plus(tag: str, a: int, b: int) -> int:
            return emit(GNode(f"{name}.{tag}", "add", (a, b)))

        if m.norm_first:
            x = plus("add1", x, sa(norm(1, x)))
            return plus("add2", x, ff(norm(2, x)))
        x = norm(1, plus("add1", x, sa(x)))
        return norm(2, plus("add2", x, ff(x)))

    def encoder(node, path: str, m: nn.Module) -> None:
        if type(m) is nn.TransformerEncoder:
            a = bind(nn.TransformerEncoder.forward, node)
            src, mask = a["src"], a.get("mask")
        else:
            a = bind(nn.TransformerEncoderLayer.forward, node)
            src, mask = a["src"], a.get("src_mask")
        if a.get("src_key_padding_mask") is not None:
            raise _fail(node, f"layer '{path}' with a src_key_padding_mask")
        if src not in index:
            raise _fail(node, f"layer '{path}' on a non-tensor input")
        owner, attr = mask_of(node, mask)
        if a.get("is_causal") and owner is None:
            raise _fail(node, f"layer '{path}' with is_causal=True and no mask")
        x = index[src]
        if type(m) is nn.TransformerEncoder:
            for i, layer in enumerate(m.layers):
                if type(layer) is not nn.TransformerEncoderLayer:
                    raise UnsupportedError(
                        f"layer '{path}.layers.{i}' ({type(layer).__name__}) is not supported"
                    )
                x = layer_nodes(
                    f"{node.name}.layers.{i}", f"{path}.layers.{i}", layer, x, owner, attr
                )
            if m.norm is not None:
                x = module_node(node.name + ".norm", path + ".norm", m.norm, x)
        else:
            x = layer_nodes(node.name, path, m, x, owner, attr)
        alias(node, x)

    for node in gm.graph.nodes:
        op, target = node.op, node.target
        if op == "placeholder":
            if index:
                raise _fail(node, "a second input")
            add(GNode(node.name, "input", ()), node)
            continue
        if op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node) or out not in index:
                raise _fail(node, "an output that is not one tensor")
            output = index[out]
            continue
        if op == "get_attr":  # a mask or a parameter added to a tensor: checked where used
            prefix, _, attr = str(target).rpartition(".")
            attrs[node] = (modules[prefix], attr)
            continue
        raw = [a for a in node.all_input_nodes if a in attrs]
        if raw and not (
            (op == "call_module" and type(modules[str(target)]) in _SEQ_LAYERS)
            or _param_add(node, index, attrs)
        ):
            raise UnsupportedError(
                f"node '{raw[0].name}' reads attribute '{raw[0].target}' directly; parameters and "
                "tensors used outside a supported layer are not supported by the graph engine"
            )
        if op == "call_function" and target is operator.getitem and node.args[0] in tuples:
            if node.args[1] != 0:
                raise _fail(node, "attention weights (only the output [0] is supported)")
            alias(node, tuples[node.args[0]])
            continue
        tensor_args = [a for a in node.all_input_nodes if a in index]
        if not tensor_args:
            # a value computed from shapes (x.size(0), x.shape[1]) or constants
            if all(a in value_set for a in node.all_input_nodes) and node.all_input_nodes:
                values.append(node)
                value_set.add(node)
                continue
            raise _fail(node, f"{op} {getattr(target, '__name__', target)!r}")
        if (op == "call_method" and target in _VALUE_METHODS) or (
            op == "call_function" and target is getattr and node.args[1] == "shape"
        ):
            values.append(node)
            value_set.add(node)
            continue
        if op == "call_module":
            path = str(target)
            m = modules[path]
            t = type(m)
            if t is nn.MultiheadAttention:
                tuples[node] = attention(node, path, m)
                continue
            if t in (nn.TransformerEncoderLayer, nn.TransformerEncoder):
                encoder(node, path, m)
                continue
            x = (
                tensor_input(node, node.args[0])
                if len(node.args) == 1 and not node.kwargs
                else None
            )
            if x is None:
                raise _fail(node, f"{type(m).__name__} called with extra arguments")
            module_node(node.name, path, m, x, node)
            continue
        # call_function / call_method on tensors
        key = target
        fname = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if _param_add(node, index, attrs):
            a, b = node.args
            x, pnode = (a, b) if a in index else (b, a)
            owner, attr = attrs[pnode]
            p = getattr(owner, attr)
            register(node.name, str(pnode.target), str(pnode.target), p)
            add(
                GNode(
                    node.name,
                    "rule",
                    (index[x],),
                    _ADDPARAM,
                    AddParamSpec(p),
                    None,
                    str(pnode.target),
                ),
                node,
            )
        elif key is operator.getitem and node.args[0] in index:
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if not SelectRule.valid(idx):
                raise _fail(
                    node,
                    f"indexing {node.args[1]!r} (only x[:, i] basic indexing keeping the batch)",
                )
            add(GNode(node.name, "rule", (index[node.args[0]],), _SELECT, idx), node)
        elif key in _ACTS and len(tensor_args) == 1 and node.args and node.args[0] in index:
            rule, make = _ACTS[key]
            rest = [a for a in node.args[1:]]
            kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            if any(isinstance(a, torch.fx.Node) for a in [*rest, *kwargs.values()]):
                raise _fail(node, f"{fname} with computed arguments")
            m = make(rest, kwargs)
            rule.check(m, node.name)
            add(GNode(node.name, "rule", (index[node.args[0]],), rule, m), node)
        elif key in _RESHAPES and node.args and node.args[0] in index and len(tensor_args) == 1:
            add(GNode(node.name, "reshape", (index[node.args[0]],), _RESHAPE, None, fx=node), node)
        elif key in _ADDS and not node.kwargs and len(node.args) == 2:
            a, b = node.args
            if a in index and b in index:
                add(GNode(node.name, "add", (index[a], index[b]), coef=_ADDS[key]), node)
            elif isinstance(a, (int, float)) or isinstance(b, (int, float)):
                const = a if isinstance(a, (int, float)) else b
                x = b if isinstance(a, (int, float)) else a
                if x not in index:
                    raise _fail(node, fname)
                sign = -1.0 if (_ADDS[key] < 0 and x is b) else 1.0
                shift = float(const) * (_ADDS[key] if x is a else 1.0)
                add(GNode(node.name, "rule", (index[x],), _SCALE, (sign, shift)), node)
            else:
                raise _fail(node, f"{fname} of these operands")
        elif key in (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div") and (
            len(node.args) == 2 and not node.kwargs
        ):
            a, b = node.args
            div = key in (operator.truediv, torch.div, "div")
            if a in index and isinstance(b, (int, float)):
                add(
                    GNode(
                        node.name, "rule", (index[a],), _SCALE, (1.0 / b if div else float(b), 0.0)
                    ),
                    node,
                )
            elif b in index and isinstance(a, (int, float)) and not div:
                add(GNode(node.name, "rule", (index[b],), _SCALE, (float(a), 0.0)), node)
            else:
                raise _fail(node, f"{fname} of these operands (only scalings by constants)")
        elif (
            key in (operator.neg, torch.neg, "neg")
            and len(node.args) == 1
            and node.args[0] in index
        ):
            add(GNode(node.name, "rule", (index[node.args[0]],), _SCALE, (-1.0, 0.0)), node)
        elif key is torch.cat:
            seq = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(seq, (list, tuple)) or not all(a in index for a in seq):
                raise _fail(node, "cat of non-tensor operands")
            if not isinstance(dim, int) or dim == 0:
                raise _fail(node, "cat along the batch dimension")
            add(GNode(node.name, "cat", tuple(index[a] for a in seq), dim=dim), node)
        elif key is F.adaptive_avg_pool2d or key is F.adaptive_avg_pool1d:
            nd = 2 if key is F.adaptive_avg_pool2d else 1
            size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
            pool = (nn.AdaptiveAvgPool2d if nd == 2 else nn.AdaptiveAvgPool1d)(size)
            add(
                GNode(node.name, "rule", (index[node.args[0]],), GRAPH_RULES[type(pool)], pool),
                node,
            )
        elif key in (operator.getitem,) and all(a in value_set for a in node.all_input_nodes):
            values.append(node)
            value_set.add(node)
        else:
            raise _fail(node, f"{op} {fname!r}")
    if output < 0:
        raise UnsupportedError(f"model {type(model).__name__}: no output node")
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen_params:
            raise UnsupportedError(
                f"parameter '{n}' is not used by a supported layer of the graph engine"
            )
    if not keys:
        raise UnsupportedError("the model has no trainable parameters")
    need: list[bool] = []
    for gn in nodes:
        need.append(gn.has_params or any(need[j] for j in gn.inputs))
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    return GraphPlan(tuple(nodes), output, tuple(order), tuple(need), tuple(values))


def graph_forward(plan: GraphPlan, x, generator):
    """The forward pass: every tensor node's output and cache."""
    outs: list[Any] = [None] * len(plan.nodes)
    caches: list[Any] = [None] * len(plan.nodes)
    by_fx = plan.by_fx
    env: dict[Any, Any] = {}

    def value(arg):
        if isinstance(arg, torch.fx.Node):
            if arg in by_fx:
                return outs[by_fx[arg]]
            if arg not in env:
                args = value(arg.args)
                kwargs = {k: value(v) for k, v in arg.kwargs.items()}
                if arg.op == "call_method":
                    env[arg] = getattr(args[0], arg.target)(*args[1:], **kwargs)
                else:
                    env[arg] = arg.target(*args, **kwargs)
            return env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    n = x.shape[0]
    for i, gn in enumerate(plan.nodes):
        if gn.kind == "input":
            outs[i] = x
        elif gn.kind == "rule":
            try:
                outs[i], caches[i] = gn.rule.forward(gn.module, outs[gn.inputs[0]], generator)
            except UnsupportedError as exc:
                raise UnsupportedError(f"node '{gn.name}': {exc}") from None
        elif gn.kind == "reshape":
            fxn = gn.fx
            args, kwargs = value(fxn.args), {k: value(v) for k, v in fxn.kwargs.items()}
            if fxn.op == "call_method":
                y = getattr(args[0], fxn.target)(*args[1:], **kwargs)
            else:
                y = fxn.target(*args, **kwargs)
            if y.dim() == 0 or y.shape[0] != n:
                raise UnsupportedError(
                    f"node '{gn.name}' ({fxn.target}) mixes samples (output shape "
                    f"{tuple(y.shape)}); only reshapes keeping the batch dimension are supported"
                )
            outs[i], caches[i] = y, outs[gn.inputs[0]].shape[1:]
        elif gn.kind == "add":
            a, b = outs[gn.inputs[0]], outs[gn.inputs[1]]
            if a.shape != b.shape:
                raise UnsupportedError(
                    f"node '{gn.name}' adds tensors of shapes {tuple(a.shape)} and "
                    f"{tuple(b.shape)}; broadcasting is not supported"
                )
            outs[i] = a + b if gn.coef > 0 else a - b
        elif gn.kind == "cat":
            parts = [outs[j] for j in gn.inputs]
            dim = gn.dim if gn.dim > 0 else gn.dim + parts[0].dim()
            if dim <= 0:
                raise UnsupportedError(f"node '{gn.name}': cat along the batch dimension")
            outs[i] = torch.cat(parts, dim)
            caches[i] = (dim, [p.shape[dim] for p in parts])
    return outs, caches
