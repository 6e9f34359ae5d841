"""asv benchmarks: every registered estimator's time, accuracy and peak memory.

For each (problem, estimator) pair of :data:`PROBLEMS` x ``available_estimators()``
(default hyper-parameters; ``exact`` with ``compute_dtype="model"`` so it runs in
float32 like the others):

- ``time_estimate``: CPU time of one call (``time.process_time``, one torch
  thread; asv batches calls into samples of at least ``sample_time``);
- ``track_rel_l1``: relative L1 error ``sum|est - truth| / sum|truth|`` against
  the float64 exact diagonal, at a fixed seed, so that an accuracy change is
  tracked across commits like a slowdown;
- ``track_peak_memory``: peak bytes torch allocates during one call, above the
  baseline (:mod:`benchmarks._memory`).

``Gradient`` gives the same figures for one forward and backward pass of the
loss (``torch.autograd.grad``), the unit estimator costs are quoted in.
``GraphEstimators`` and ``GraphGradient`` give them for the HesScale family on
the graph-engine models of :data:`GRAPH_PROBLEMS` (residual MLP, ResNet, GPT);
``GraphBatch`` times them (and their peak memory) on the GPT at batch 32
(:data:`GRAPH_BATCH_PROBLEMS`), where the pass runs on the last position below
``h[:, -1]``. ``GraphExact`` times the exact diagonal on the graph models, and
``ExactBatch`` at batch 32 (the 8x8 CNN and the GPT).

A pair the estimator does not support raises ``NotImplementedError`` in
``setup``, which asv (and ``.ci/bench_gate.py``) report as skipped.
"""

from __future__ import annotations

import copy
import time

import torch

from hessbench.estimators import available_estimators, get_estimator

from ._memory import peak_memory
from ._problems import (
    EXTRA_PROBLEMS,
    GRAPH_BATCH_PROBLEMS,
    GRAPH_PROBLEMS,
    PROBLEMS,
    build_problem,
)

try:
    from hessbench.errors import TooLargeError, UnsupportedError

    _UNSUPPORTED: tuple[type[Exception], ...] = (UnsupportedError, TooLargeError)
except ImportError:  # an older hessbench
    _UNSUPPORTED = ()

ESTIMATORS = available_estimators()


def make_estimator(name: str):
    """The benchmarked configuration: default hyper-parameters, float32 ``exact``."""
    if name == "exact":
        return get_estimator("exact", compute_dtype="model")
    return get_estimator(name)


def relative_l1(est: dict, truth: dict) -> float:
    """``sum |est - truth| / sum |truth|`` over every parameter, in float64."""
    num = sum(float((est[k].double() - truth[k]).abs().sum()) for k in truth)
    den = sum(float(truth[k].abs().sum()) for k in truth)
    return num / den


class _Timing:
    """asv settings shared by the classes below."""

    timer = time.process_time  # CPU time: steady on a shared machine
    warmup_time = 0.1
    sample_time = 0.02  # each sample times >= 20 ms of calls
    repeat = (5, 20, 1.0)  # 5 to 20 samples, stop after 1 s
    min_run_count = 2
    rounds = 2  # asv interleaves rounds in fresh processes
    timeout = 300


class Estimators(_Timing):
    """One estimator on one problem."""

    params = (list(PROBLEMS), ESTIMATORS)
    param_names = ("problem", "estimator")

    def setup(self, problem: str, estimator: str) -> None:
        torch.set_num_threads(1)
        self.model, self.loss_fn, self.x, self.y = build_problem(problem)
        self.est = make_estimator(estimator)
        self.gen = torch.Generator().manual_seed(0)
        try:  # checks support, and warms up
            self.est(self.model, self.loss_fn, self.x, self.y, generator=self.gen)
        except _UNSUPPORTED as exc:
            raise NotImplementedError(f"{estimator} on {problem}: {exc}") from exc

    def _call(self, generator: torch.Generator) -> dict:
        return self.est(self.model, self.loss_fn, self.x, self.y, generator=generator)

    def time_estimate(self, problem: str, estimator: str) -> None:
        self._call(self.gen)

    def track_rel_l1(self, problem: str, estimator: str) -> float:
        model64 = copy.deepcopy(self.model).double()
        x64, y64 = (t.double() if t.is_floating_point() else t for t in (self.x, self.y))
        truth = get_estimator("exact")(model64, self.loss_fn, x64, y64)  # tokens stay integers
        return relative_l1(self._call(torch.Generator().manual_seed(0)), truth)

    track_rel_l1.unit = "relative L1"

    def track_peak_memory(self, problem: str, estimator: str) -> int:
        return peak_memory(lambda: self._call(torch.Generator().manual_seed(0)))

    track_peak_memory.unit = "bytes"


class GraphExact(_Timing):
    """The exact diagonal (float32) on :data:`GRAPH_PROBLEMS`: time and memory.

    Its graph pass carries column blocks (the residuals' eigen-columns above
    rounding, head by head at attention); the accuracy is its own reference.
    """

    params = (list(GRAPH_PROBLEMS),)
    param_names = ("problem",)

    def setup(self, problem: str) -> None:
        torch.set_num_threads(1)
        self.model, self.loss_fn, self.x, self.y = build_problem(problem)
        self.est = make_estimator("exact")
        self.est(self.model, self.loss_fn, self.x, self.y)

    def time_exact(self, problem: str) -> None:
        self.est(self.model, self.loss_fn, self.x, self.y)

    def track_peak_memory(self, problem: str) -> int:
        return peak_memory(lambda: self.est(self.model, self.loss_fn, self.x, self.y))

    track_peak_memory.unit = "bytes"


class ExactBatch(GraphExact):
    """The exact diagonal (float32) at batch 32, where its per-sample cost dominates.

    Only ``exact``: the other estimators' batch scaling is covered by
    ``mlp784_b32``. The GPT at batch 32 (``gpt_b32``) runs its exact pass in
    chunks of samples (seconds per call). (The 3x16x16 CNN at batch 32 takes ~3 s
    per exact call; ``benchmarks/cost_ratios.py`` measures it.) Also the gradient.
    """

    params = (list(EXTRA_PROBLEMS) + list(GRAPH_BATCH_PROBLEMS),)

    def setup(self, problem: str) -> None:
        super().setup(problem)
        self.params_ = [p for p in self.model.parameters() if p.requires_grad]

    def time_gradient(self, problem: str) -> None:
        torch.autograd.grad(self.loss_fn(self.model(self.x), self.y), self.params_)


class Gradient(_Timing):
    """The reference: one forward and backward pass of the loss."""

    params = (list(PROBLEMS),)
    param_names = ("problem",)

    def setup(self, problem: str) -> None:
        torch.set_num_threads(1)
        self.model, self.loss_fn, self.x, self.y = build_problem(problem)
        self.params_ = [p for p in self.model.parameters() if p.requires_grad]
        self._grad()

    def _grad(self):
        return torch.autograd.grad(self.loss_fn(self.model(self.x), self.y), self.params_)

    def time_gradient(self, problem: str) -> None:
        self._grad()

    def track_peak_memory(self, problem: str) -> int:
        return peak_memory(self._grad)

    track_peak_memory.unit = "bytes"


class GraphEstimators(Estimators):
    """The HesScale family on residual and transformer models (:data:`GRAPH_PROBLEMS`).

    The same figures as :class:`Estimators`; the models are captured by the graph
    engine (``torch.fx``), whose diagonal pass these time.
    """

    params = (list(GRAPH_PROBLEMS), ["hesscale", "hesscale_gn", "bl89"])


class GraphGradient(Gradient):
    """:class:`Gradient` on :data:`GRAPH_PROBLEMS` and :data:`GRAPH_BATCH_PROBLEMS`."""

    params = (list(GRAPH_PROBLEMS) + list(GRAPH_BATCH_PROBLEMS),)


class GraphBatch(_Timing):
    """The HesScale family on :data:`GRAPH_BATCH_PROBLEMS` (the GPT at batch 32): time, memory.

    Their gradient is :class:`GraphGradient`'s.

    No ``track_rel_l1``: the float64 ``exact`` diagonal takes seconds at this
    batch (the accuracy is :class:`GraphEstimators`' at batch 1, and the pass on
    the positions read is tested equal to the full one).
    """

    params = (list(GRAPH_BATCH_PROBLEMS), ["hesscale", "hesscale_gn", "bl89"])
    param_names = ("problem", "estimator")

    def setup(self, problem: str, estimator: str) -> None:
        torch.set_num_threads(1)
        self.model, self.loss_fn, self.x, self.y = build_problem(problem)
        self.est = make_estimator(estimator)
        self.est(self.model, self.loss_fn, self.x, self.y)

    def time_estimate(self, problem: str, estimator: str) -> None:
        self.est(self.model, self.loss_fn, self.x, self.y)

    def track_peak_memory(self, problem: str, estimator: str) -> int:
        return peak_memory(lambda: self.est(self.model, self.loss_fn, self.x, self.y))

    track_peak_memory.unit = "bytes"
