"""The measurement protocol: exact memory peaks, bounded timing repeats (no wall-clock asserts)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn

from hessbench.bench.measure import memory_ratio, peak_memory, time_interleaved

CPU = torch.device("cpu")


def test_peak_memory_replays_allocations_in_time_order():
    def work():
        a = torch.ones(1_000_000)  # +4 MB
        b = torch.ones(2_000_000)  # +8 MB: peak 12 MB
        del a  # -4 MB
        c = torch.ones(500_000)  # +2 MB: 10 MB, below the peak
        return b, c

    assert peak_memory(work, CPU) == 12_000_000


def test_peak_memory_counts_only_allocations_during_the_call():
    held = torch.ones(4_000_000)  # allocated before: not part of the peak

    def work():
        return held * held  # one new 16 MB tensor

    assert peak_memory(work, CPU) == 16_000_000


def test_memory_ratio_of_a_function_with_itself_is_one():
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 5))
    x, y = torch.randn(8, 30), torch.randint(0, 5, (8,))
    params = list(model.parameters())

    def grad():
        return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)

    res = memory_ratio(grad, grad, device=CPU)
    assert res["peak_bytes"] == res["grad_peak_bytes"] > 0
    assert res["memory_ratio"] == 1.0

    # a reference measured before is reused, and the reference function not called
    def never():
        raise AssertionError("the reference was measured twice")

    again = memory_ratio(grad, never, device=CPU, grad_peak=res["grad_peak_bytes"])
    assert again == res


def test_time_interleaved_alternates_and_bounds_repeats():
    calls = []
    out = time_interleaved(
        lambda: calls.append("a"),
        lambda: calls.append("b"),
        device=CPU,
        warmup=2,
        min_repeats=3,
        max_repeats=7,
        min_time_s=10.0,  # unreachable: capped at max_repeats
    )
    assert out["repeats"] == 7
    assert calls == ["a", "b"] * (2 + 7)
    for key in ("time_s", "cpu_time_s", "grad_time_s", "time_ratio", "cpu_time_ratio"):
        assert out[key] >= 0
    assert isinstance(out["contended"], bool)
    calls.clear()
    out = time_interleaved(
        lambda: None,
        lambda: None,
        device=CPU,
        warmup=0,
        min_repeats=3,
        max_repeats=7,
        min_time_s=1e-9,
    )
    assert out["repeats"] == 3


def test_peak_memory_keeps_the_profilers_log_lines_out_of_stderr():
    # one fresh process: Kineto reads its log level when its first session starts
    code = (
        "import torch\n"
        "from hessbench.bench.measure import peak_memory\n"
        "for _ in range(2):\n"
        "    assert peak_memory(lambda: torch.ones(1000) + 1, torch.device('cpu')) > 0\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "profiler_start" not in done.stderr, done.stderr
