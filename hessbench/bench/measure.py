"""Time an estimator against one gradient computation, in the same process.

Protocol (per cell, on its first evaluated batch):

1. ``warmup`` calls of the estimator and of the reference (one forward and
   backward of the same loss on the same batch, ``torch.autograd.grad``);
2. one timed pair gives the call durations, from which the number of repeats
   is chosen so the repeats last about ``min_time_s``, clamped to
   ``[min_repeats, max_repeats]``;
3. the estimator (A) and the reference (B) are timed interleaved, A B A B ...,
   so that machine drift affects both alike; each call is timed with
   ``time.perf_counter`` (wall) and ``time.process_time`` (CPU), with a CUDA
   synchronisation around it on GPUs.

Reported: medians and inter-quartile ranges, and the ratios of medians
estimator / gradient for wall and CPU time. A run is flagged ``contended``
when the median wall time exceeds the median CPU time by more than 50% (with
one thread, the process was waiting for a core).

Memory (:func:`peak_memory`, a separate untimed pass): the peak of bytes
allocated above the level at the start of the call. On CUDA from
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On the
CPU ``tracemalloc`` does not see torch's allocator, so the call runs under
``torch.profiler.profile(profile_memory=True)`` and its allocation and free
events are replayed in time order; the running sum's maximum is the peak.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["memory_ratio", "peak_memory", "time_interleaved"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def _iqr(values: list[float]) -> float:
    q75, q25 = np.percentile(values, [75, 25])
    return float(q75 - q25)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def time_interleaved(
    est_fn: Callable[[], object],
    grad_fn: Callable[[], object],
    *,
    device: torch.device,
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    min_time_s: float,
) -> dict[str, float | int | bool]:
    """Median wall and CPU times of ``est_fn`` and ``grad_fn``, measured interleaved."""
    for _ in range(warmup):
        est_fn()
        grad_fn()
    a = _timed(est_fn, device)
    b = _timed(grad_fn, device)
    pair = max(a[0] + b[0], 1e-9)
    repeats = int(min(max_repeats, max(min_repeats, math.ceil(min_time_s / pair))))
    est_wall, est_cpu, grad_wall, grad_cpu = [a[0]], [a[1]], [b[0]], [b[1]]
    for _ in range(repeats - 1):
        w, c = _timed(est_fn, device)
        est_wall.append(w)
        est_cpu.append(c)
        w, c = _timed(grad_fn, device)
        grad_wall.append(w)
        grad_cpu.append(c)
    med = statistics.median
    contended = med(est_wall) > 1.5 * med(est_cpu) or med(grad_wall) > 1.5 * med(grad_cpu)
    return {
        "time_s": med(est_wall),
        "time_iqr_s": _iqr(est_wall),
        "cpu_time_s": med(est_cpu),
        "grad_time_s": med(grad_wall),
        "grad_time_iqr_s": _iqr(grad_wall),
        "grad_cpu_time_s": med(grad_cpu),
        "time_ratio": _ratio(med(est_wall), med(grad_wall)),
        "cpu_time_ratio": _ratio(med(est_cpu), med(grad_cpu)),
        "repeats": repeats,
        "contended": bool(contended),
    }


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn()``, above the level at its start."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    # Kineto prints two "USDT: ... profiler_start/stop" lines to stderr per session (one
    # pair per cell in workers.log) unless its log level is above USDT's (5); read when
    # the profiler first starts in the process, so a user's own setting wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    # The autograd profiler that torch.profiler.profile wraps: the same Kineto memory
    # events, without torch.profiler's first-use import of torch._dynamo/_inductor
    # (seconds per worker process).
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=True) as prof:
        fn()
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU:
            level += e.nbytes()
            peak = max(peak, level)
    return int(peak)


def memory_ratio(
    est_fn: Callable[[], object],
    grad_fn: Callable[[], object],
    *,
    device: torch.device,
    grad_peak: int | None = None,
) -> dict[str, float | int]:
    """Peak memory of the estimator and of one gradient, and their ratio.

    ``grad_peak``: the gradient's peak when already measured (``grad_fn`` is
    then not called).
    """
    est = peak_memory(est_fn, device)
    grad = peak_memory(grad_fn, device) if grad_peak is None else grad_peak
    return {"peak_bytes": est, "grad_peak_bytes": grad, "memory_ratio": _ratio(est, grad)}
