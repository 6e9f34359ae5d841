"""Peak CPU memory that torch allocates during one call, above the baseline.

``tracemalloc`` does not see torch's allocations (they bypass Python's
allocator), and the process's peak RSS cannot be reset between calls. The torch
profiler with ``profile_memory=True`` records every allocation and free of
torch's CPU allocator as a ``[memory]`` event with a signed size; replaying
those events in time order and keeping the running maximum gives the true peak
of bytes held during the call, above what was held when it started (tensors
that outlive the call, such as the returned estimate, count in the peak).

Run it in an untimed pass: profiling slows the call down.

``hessbench.bench.measure.peak_memory`` implements the same method for
``hessbench run``; :func:`peak_memory` uses it where the hessbench under test
has it, and the copy here otherwise (older versions, benchmarked by the CI gate
with these same definitions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

try:
    from hessbench.bench.measure import peak_memory as _hessbench_peak_memory
except ImportError:
    _hessbench_peak_memory = None

__all__ = ["peak_memory"]


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by torch on ``device`` during ``fn()``, above the baseline.

    On CUDA (through hessbench's own function only): ``torch.cuda.max_memory_allocated``
    after ``reset_peak_memory_stats``.

    Example:
        >>> peak_memory(lambda: torch.ones(1000) + torch.ones(1000)) >= 3 * 4000
        True
    """
    device = torch.device(device)
    if _hessbench_peak_memory is not None:
        return int(_hessbench_peak_memory(fn, device))
    if device.type != "cpu":
        raise ValueError(f"peak memory on {device} needs hessbench.bench.measure.peak_memory")
    return _replay_peak(fn)


def _replay_peak(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())  # stable: ties keep the recorded order
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak
