"""Rough memory and time estimates of an accuracy suite, for ``hessbench validate``.

Estimates, not measurements: they come from one forward pass of one zero-filled
sample per task (the layers' sizes, what the backward pass would keep, the
multiply-adds) and a cost model. They are meant to catch a suite that needs tens
of GB or hours before it runs, not to predict its time to the second.

**Memory**, per task, of one worker evaluating one group of cells (a task
variant and a seed), in bytes:

- *parameters*: the model in the task's dtype, its float64 copy for the ground
  truth, a gradient;
- *activations*: what the forward pass of one evaluated batch keeps for the
  backward pass (the autograd graph's saved tensors), in the task's dtype;
- *ground truth*: the float64 exact diagonal, computed once per evaluated batch
  by ``exact``'s structured pass, carries each sample's Hessian with respect to
  a layer's output as ``K`` columns of the layer's width ``F``. ``K`` starts at
  the number of outputs and grows by the width of each curved operation above
  (tanh, sigmoid, GELU, layer norm, attention: their ``f''(u) g`` terms). For an
  ``nn.Sequential`` (MLP, CNN) the walk follows exact's planner: a curved
  layer's terms wait as a diagonal until the next map, an ``F x F`` matrix is
  held where it is smaller than the columns, and below the first ``nn.Linear``
  and its activations only diagonals are needed. Other models (residual
  networks, transformers) run on the graph engine, always in columns: the
  widest saved tensor times all the columns, times :data:`GRAPH_FACTOR`. The peak
  is two such representations (one layer's and the next) plus the float64
  activations. Against measured peaks of ``exact`` (batch 16 to 64): 1.2 to
  1.9 times the estimate for MLPs and CNNs, 0.8 to 2.5 times for the residual
  networks and the tiny GPT;
- *training*: for task states trained before evaluation (``eval.states``), the
  parameters with a gradient and two Adam moments, and the activations of a
  training batch.

A task's *peak* is the sum of parameters, activations and ground truth, or the
training memory when that is larger.

**Time**, per cell, in seconds: a gradient (forward and backward on one batch)
costs :data:`GRAD_OVERHEAD_S` plus :data:`OP_S` per operation of the forward
pass plus its arithmetic at :data:`FLOPS` (one core); an estimator call costs
``1 + k`` gradients for estimators built on ``k`` Hessian-vector products
(``HVP`` in their ``cost``: ``hutchinson``, ``xdiag``, ``diagpp``, ``adahessian``),
:data:`TRUTH_GRADS` for ``exact`` and 2 for the others (one pass; sampled columns
ride along). A cell makes one call per evaluated batch (and scores it,
:data:`METRIC_S`), then the timing protocol of ``defaults.timing`` (``warmup``,
then interleaved estimator and gradient calls until ``min_time_s``, between
``min_repeats`` and ``max_repeats``) and a memory pass; each group computes the
ground truth once per evaluated batch and trains its state first. Worker
start-up (a few seconds per worker) is left out. The constants are fitted to
the committed reports (a 2-core x86 machine): the estimate is within 30 % of
paper_2022's recorded cell time and a third of small_resnet's and
small_transformer's (their estimators' graph-engine passes cost more gradients
than the model assumes).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hessbench.estimators import Estimator
from hessbench.suite.models import TransformerModel, build_model, materialize
from hessbench.suite.plan import CellSpec, plan_cells
from hessbench.suite.schema import Suite
from hessbench.suite.task import TaskSpec

__all__ = [
    "TaskEstimate",
    "estimate_suite",
    "format_bytes",
    "memory_warnings",
    "warn_bytes",
]

GRAD_OVERHEAD_S = 50e-6
"""Fixed cost of one gradient call."""
OP_S = 32e-6
"""One operation (autograd graph node) of a forward and backward pass, besides its
arithmetic: a small net's gradient is dispatch, not arithmetic."""
FLOPS = 5e9
"""Floating-point operations per second of one core on small matrices."""
METRIC_S = 1.5e-3
"""Scoring one evaluated batch against the truth (metrics, per-layer parts), besides its size."""
METRIC_PER_PARAM_S = 1e-7
TRUTH_GRADS = 5.0
"""The float64 exact diagonal, in gradients (``exact``'s median measured ratio is about 5)."""
CELL_OVERHEAD_S = 5e-3
"""Recording a cell (an fsynced append)."""
MEMORY_PASS = 3.0
"""The memory pass replays allocator events: about this many times one call and one gradient."""
GRAPH_FACTOR = 2.0
"""The graph engine's caches beyond two representations (fitted on three measured models)."""

WARN_GB = 4.0
"""Warn when a task's estimated peak is above this many GB (or half the machine's memory)."""

# element-wise layers without curvature (linear or piecewise linear), and layers that only
# move entries; every other layer without a weight matrix (tanh, sigmoid, GELU, LayerNorm,
# ...) is curved
_FLAT = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Flatten,
    nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding,
)  # fmt: skip
_ELEMENTWISE_FLAT = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout)
# autograd nodes of curved operations (the graph engine adds their width in columns)
_CURVED_NODE = re.compile(
    r"Tanh|Sigmoid|Gelu|Silu|Softplus|Elu|Mish|LayerNorm|Softmax|ScaledDotProduct|Bmm"
)


@dataclass(frozen=True)
class _Layer:
    """One leaf module's call in a forward pass of one sample."""

    kind: str  # "map" (a weight matrix: Linear, Conv), "curved" or "flat"
    fin: int  # input entries per sample
    fout: int  # output entries per sample
    elementwise: bool  # an element-wise layer (activation, dropout)
    first_linear: bool = False  # an nn.Linear, the first map of the forward pass


@dataclass(frozen=True)
class _Forward:
    """What one forward pass of one sample shows."""

    num_params: int
    layers: tuple[_Layer, ...]  # leaf modules in call order
    sequential: bool  # an nn.Sequential: exact's planner may collapse and densify
    macs: int  # multiply-adds
    ops: int  # operations (autograd graph nodes)
    saved: int  # entries the autograd graph keeps for the backward pass
    widest: int  # entries of its largest saved tensor
    curved: int  # entries of the curved operations' saved tensors (their widths)


@dataclass(frozen=True)
class TaskEstimate:
    """The estimates of one task (all its variants and seeds)."""

    task: str
    num_params: int
    batch_size: int
    param_bytes: int
    activation_bytes: int
    truth_bytes: int
    train_bytes: int
    cells: int
    seconds: float

    @property
    def peak_bytes(self) -> int:
        """The larger of evaluating (parameters + activations + truth) and training."""
        return max(self.param_bytes + self.activation_bytes + self.truth_bytes, self.train_bytes)


def _kind(module: nn.Module) -> str:
    weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
    if weights and not isinstance(module, nn.Embedding):
        return "map"
    return "flat" if isinstance(module, _FLAT) else "curved"


def _forward(task: TaskSpec) -> _Forward:
    with torch.device("meta"):
        model = build_model(task.model, task.input_shape, task.output_dim)
    materialize(model).eval()
    calls: list[tuple[nn.Module, int, int]] = []

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else t
            calls.append((module, x[0].numel() if x.dim() else 1, t[0].numel() if t.dim() else 1))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    tokens = isinstance(task.model, TransformerModel)
    out = model(torch.zeros(1, *task.input_shape, dtype=torch.long if tokens else torch.float32))
    for h in handles:
        h.remove()
    layers, macs = [], 0
    for i, (m, fin, fout) in enumerate(calls):
        kind = _kind(m)
        if kind == "map":  # each output entry takes fan-in multiply-adds
            macs += fout * next(p[0].numel() for p in m.parameters(recurse=False) if p.dim() >= 2)
        first = isinstance(m, nn.Linear) and not any(_kind(c[0]) == "map" for c in calls[:i])
        elementwise = (kind == "curved" and fin == fout) or isinstance(m, _ELEMENTWISE_FLAT)
        layers.append(_Layer(kind, fin, fout, elementwise, first))
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ops, saved, widest, curved = _graph(out, model)
    sequential = type(model) is nn.Sequential
    return _Forward(num_params, tuple(layers), sequential, macs, ops, saved, widest, curved)


def _graph(out: torch.Tensor, model: nn.Module) -> tuple[int, int, int, int]:
    """Nodes of the autograd graph, its saved entries, the largest, the curved nodes' widths.

    A node's saved tensors (``grad_fn._saved_*``) are what the backward pass reads;
    parameters among them are left out.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, todo = set(), [out.grad_fn]
    saved = widest = curved = 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(f for f, _ in node.next_functions)
        sizes = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    v = getattr(node, name)
                except RuntimeError:  # freed, or not a tensor
                    continue
                if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in params:
                    sizes.append(v.numel())
        saved += sum(sizes)
        widest = max(widest, *sizes, 0)
        if sizes and _CURVED_NODE.search(type(node).__name__):
            curved += max(sizes)
    return len(seen), saved, widest, curved


def _collapse(f: _Forward) -> int:
    """The layer below which exact's pass needs only diagonals (-1: none), as its planner finds.

    Above a first ``nn.Linear`` and element-wise layers only, the next map's input
    Hessian is needed on its diagonal alone.
    """
    layers = f.layers
    first = next((i for i, la in enumerate(layers) if la.kind == "map"), None)
    if not f.sequential or first is None or not layers[first].first_linear:
        return -1
    j = first + 1
    while j < len(layers) and layers[j].kind != "map":
        if not layers[j].elementwise:
            return -1
        j += 1
    return j if j < len(layers) else -1


def _representation(f: _Forward, outputs: int) -> float:
    """Entries of the largest per-sample Hessian representation of exact's pass."""
    if not f.sequential:  # the graph engine: columns everywhere
        return GRAPH_FACTOR * f.widest * (outputs + f.curved)
    k, pending, largest = outputs, 0, 0
    collapse = _collapse(f)
    for i in range(len(f.layers) - 1, -1, -1):
        layer = f.layers[i]
        if i == collapse:  # the map's input Hessian on its diagonal only: J^T V and a diagonal
            return max(largest, layer.fin * k + layer.fin)
        if layer.kind == "map":
            k, pending = min(k + pending, layer.fin), 0  # or dense F x F, where smaller
        elif layer.kind == "curved":
            pending = layer.fin  # f'' g waits as a diagonal
        largest = max(largest, layer.fin * k + pending)
    return largest


def _truth_bytes(f: _Forward, outputs: int, n: int) -> int:
    """The float64 ground truth: two representations, the activations, the model's copy."""
    return int(8 * n * (2 * _representation(f, outputs) + f.saved) + 8 * f.num_params)


def _grad_s(f: _Forward, n: int) -> float:
    return GRAD_OVERHEAD_S + OP_S * f.ops + 6 * f.macs * n / FLOPS


def _call_grads(est: Estimator) -> float:
    """An estimator call, in gradients."""
    if est.name == "exact":
        return TRUTH_GRADS
    samples = getattr(est, est.sample_param, None) if est.sample_param else None
    if isinstance(samples, int) and "HVP" in type(est).cost:
        return 1.0 + samples  # one Hessian-vector product per probe
    return 2.0  # one pass (sampled columns ride along in one backward pass)


def _cell_s(cell: CellSpec, grad_s: float, num_params: int, suite: Suite) -> float:
    task, timing = cell.task.task, suite.defaults.timing
    call = _call_grads(cell.estimator) * grad_s
    pair = call + grad_s
    repeats = min(timing.max_repeats, max(timing.min_repeats, math.ceil(timing.min_time_s / pair)))
    seconds = CELL_OVERHEAD_S + (timing.warmup + repeats) * pair
    seconds += task.eval.num_batches * (call + METRIC_S + METRIC_PER_PARAM_S * num_params)
    if suite.defaults.memory.enabled:
        seconds += MEMORY_PASS * pair
    return seconds


def estimate_suite(suite: Suite, cells: Iterable[CellSpec] | None = None) -> list[TaskEstimate]:
    """One estimate per task of ``suite`` that has cells (``cells``: the plan, by default)."""
    cells = plan_cells(suite) if cells is None else list(cells)
    out = []
    for task in suite.tasks:
        mine = [c for c in cells if c.task.task is task]
        if not mine:
            continue
        f = _forward(task)
        n = task.eval.batch_size
        size = 8 if (task.dtype or suite.defaults.dtype) == "float64" else 4
        param_bytes = f.num_params * (2 * size + 8)
        activation_bytes = n * f.saved * size
        truth_bytes = _truth_bytes(f, task.output_dim, n)
        grad_s = _grad_s(f, n)
        seconds = sum(_cell_s(c, grad_s, f.num_params, suite) for c in mine)
        groups = {(c.task.name, c.seed): c.task for c in mine}
        truth_s = TRUTH_GRADS * grad_s * task.eval.num_batches
        seconds += len(groups) * truth_s
        train_bytes = 0
        for variant in groups.values():
            if variant.state != "init":
                b = variant.state.batch_size
                seconds += variant.state.steps * 2 * _grad_s(f, b)
                train_bytes = max(train_bytes, f.num_params * 4 * size + b * f.saved * size)
        memory = (param_bytes, activation_bytes, truth_bytes, train_bytes)
        out.append(TaskEstimate(task.name, f.num_params, n, *memory, len(mine), seconds))
    return out


def format_bytes(n: float) -> str:
    """``512 B``, ``3.1 kB``, ``12 MB``, ``16 GB`` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.2g} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def _machine_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def warn_bytes() -> float:
    """The warning threshold: :data:`WARN_GB`, or half the machine's memory if less."""
    machine = _machine_bytes()
    return min(WARN_GB * 1e9, machine / 2) if machine else WARN_GB * 1e9


def memory_warnings(estimates: Iterable[TaskEstimate], limit: float | None = None) -> list[str]:
    """One line per task whose estimated peak is above ``limit`` (default :func:`warn_bytes`)."""
    limit = warn_bytes() if limit is None else limit
    lines = []
    for e in estimates:
        if e.peak_bytes <= limit:
            continue
        parts = {
            f"the exact ground truth {format_bytes(e.truth_bytes)} (float64, per-sample columns)": (
                e.truth_bytes
            ),
            f"activations {format_bytes(e.activation_bytes)}": e.activation_bytes,
            f"parameters {format_bytes(e.param_bytes)}": e.param_bytes,
            f"training the evaluated states {format_bytes(e.train_bytes)}": e.train_bytes,
        }
        biggest = max(parts, key=parts.__getitem__)
        lines.append(
            f"task {e.task}: a batch of {e.batch_size} needs about {format_bytes(e.peak_bytes)} "
            f"per worker (estimate; above {format_bytes(limit)}), mostly {biggest}"
        )
    return lines
