"""Evaluating cells: what a worker process does for one (task variant, seed) group.

The problem (model, loss, evaluated batches) is built once per group, the
float64 ground truth once per evaluated batch and the gradient's peak memory
once, then reused by every estimator of the group. Each cell yields one record
(see :mod:`hessbench.store.records`).
"""

from __future__ import annotations

import copy
import time
import traceback

import torch

from hessbench.bench.kernels import reproducible_kernels
from hessbench.bench.measure import memory_ratio, time_interleaved
from hessbench.bench.metrics import Truth, aggregate, batches_metrics, prepare_truth
from hessbench.bench.problem import Problem, build_problem
from hessbench.errors import TooLargeError, UnsupportedError
from hessbench.estimators import Estimator, get_estimator
from hessbench.suite import Defaults, TaskVariant, derive_seed

__all__ = ["GroupEvaluator", "base_record"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_METRICS_ENTRIES = 2**22
"""Estimates held for one :func:`batches_metrics` call, in entries (32 MiB in float64)."""


def base_record(variant_name: str, est: Estimator, seed: int, cell_id: str) -> dict:
    """The identifying fields every record of a cell carries.

    Besides the estimator's name, label and hyper-parameters, what a report needs
    to know about it (whether it is random, which field counts its samples, whether
    its parameters are the defaults), so that reports never consult the registry.
    """
    return {
        "cell_id": cell_id,
        "task": variant_name,
        "estimator": est.name,
        "label": est.label,
        # as the label shows them: options added later stay out at their defaults,
        # so records of existing configurations do not change
        "params": est.label_params,
        "stochastic": est.stochastic,
        "sample_param": est.sample_param,
        "default_params": est.default_params,
        "seed": seed,
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class GroupEvaluator:
    """Lazily builds a group's problem and ground truth; evaluates its cells."""

    def __init__(self, variant: TaskVariant, seed: int, defaults: Defaults):
        self.variant = variant
        self.seed = seed
        self.defaults = defaults
        dtype = variant.task.dtype or defaults.dtype
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(defaults.device)
        self._problem: Problem | None = None
        self._truth: dict[int, Truth] = {}
        self._truth_model: torch.nn.Module | None = None
        self._grad_peak: int | None = None

    @property
    def problem(self) -> Problem:
        """The group's model, loss and evaluated batches (built on first use)."""
        if self._problem is None:
            self._problem = build_problem(
                self.variant, self.seed, dtype=self.dtype, device=self.device
            )
        return self._problem

    def truth(self, b: int) -> Truth:
        """The float64 exact diagonal for evaluated batch ``b``, prepared (computed once)."""
        if b not in self._truth:
            p = self.problem
            if self._truth_model is None:
                self._truth_model = copy.deepcopy(p.model).to(torch.float64)
            x, y = p.batches[b]
            x = x.to(torch.float64) if x.is_floating_point() else x  # tokens stay integers
            y = y.to(torch.float64) if y.is_floating_point() else y
            gen = torch.Generator(device=self.device).manual_seed(
                derive_seed(self.variant.name, self.seed, b, "truth")
            )
            exact = get_estimator("exact")(self._truth_model, p.loss_fn, x, y, generator=gen)
            self._truth[b] = prepare_truth(exact)
        return self._truth[b]

    def evaluate(self, est: Estimator, cell_id: str) -> dict:
        """Run one cell; never raises (failures become a status)."""
        rec = base_record(self.variant.name, est, self.seed, cell_id)
        start = time.perf_counter()
        try:
            with reproducible_kernels(self.device):  # same seed, same numbers on CUDA too
                rec.update(self._evaluate(est))
        except (UnsupportedError, TooLargeError) as exc:
            rec.update(status="unsupported", message=str(exc))
        except Exception as exc:  # a failing cell must not stop the others
            rec.update(status="error", message=_one_line(exc), traceback=traceback.format_exc())
        rec["elapsed_s"] = time.perf_counter() - start
        return rec

    def _evaluate(self, est: Estimator) -> dict:
        p = self.problem
        est.check_supported(p.model, p.loss_fn)
        per_batch: list[dict] = []
        held: list[tuple[dict, Truth]] = []  # estimates whose metrics are computed together
        for b, (x, y) in enumerate(p.batches):
            gen = torch.Generator(device=self.device).manual_seed(
                derive_seed(self.variant.name, est.label, self.seed, b)
            )
            held.append((est(p.model, p.loss_fn, x, y, generator=gen), self.truth(b)))
            if b == len(p.batches) - 1 or len(held) * p.num_params >= _METRICS_ENTRIES:
                # raises FloatingPointError naming a parameter whose estimate is not finite
                per_batch += batches_metrics(*zip(*held, strict=True))
                held = []
        return {
            "status": "ok",
            "message": "",
            **aggregate(per_batch),
            **self._timing(est),
            **self._memory(est),
            "num_batches": len(p.batches),
            "batch_size": int(p.batches[0][0].shape[0]),
            "num_params": p.num_params,
            "dtype": str(self.dtype).removeprefix("torch."),  # what the estimator computed in
        }

    def _memory(self, est: Estimator) -> dict:
        """Peak memory of one call and of one gradient (first batch, untimed passes).

        The gradient's peak is the same for every estimator of the group: it is
        measured once, after the group's first estimator.
        """
        if not self.defaults.memory.enabled:
            return {}
        p = self.problem
        x, y = p.batches[0]
        params = [q for q in p.model.parameters() if q.requires_grad]
        gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.variant.name, est.label, self.seed, "memory")
        )
        res = memory_ratio(
            lambda: est(p.model, p.loss_fn, x, y, generator=gen),
            lambda: torch.autograd.grad(p.loss_fn(p.model(x), y), params),
            device=self.device,
            grad_peak=self._grad_peak,
        )
        self._grad_peak = int(res["grad_peak_bytes"])
        return res

    def _timing(self, est: Estimator) -> dict:
        """The measurement protocol of :mod:`hessbench.bench.measure` on the first batch.

        It uses its own generator, so accuracy numbers never depend on timing.
        """
        p = self.problem
        x, y = p.batches[0]
        params = [q for q in p.model.parameters() if q.requires_grad]
        gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.variant.name, est.label, self.seed, "timing")
        )
        t = self.defaults.timing
        return time_interleaved(
            lambda: est(p.model, p.loss_fn, x, y, generator=gen),
            lambda: torch.autograd.grad(p.loss_fn(p.model(x), y), params),
            device=self.device,
            warmup=t.warmup,
            min_repeats=t.min_repeats,
            max_repeats=t.max_repeats,
            min_time_s=t.min_time_s,
        )
