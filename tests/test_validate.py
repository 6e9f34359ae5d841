"""``hessbench validate``'s estimates and warnings, and errors printed without a blank line first."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hessbench.bench.measure import peak_memory
from hessbench.cli import app
from hessbench.estimators import get_estimator
from hessbench.suite import build_model, parse_suite
from hessbench.suite.estimate import estimate_suite, memory_warnings

SUITE = """
name: est
defaults: {{seeds: 2}}
tasks:
  - name: mlp
    model: {{kind: mlp, widths: {widths}, activation: tanh}}
    loss: {{kind: cross_entropy}}
    data: {{kind: synthetic, input_shape: [32], num_classes: 10}}
    eval: {{batch_size: {batch}, num_batches: 2}}
  - name: small
    model: {{kind: mlp, widths: [4]}}
    loss: {{kind: mse}}
    data: {{kind: synthetic, input_shape: [3], output_dim: 2}}
estimators:
  - name: hesscale
  - name: hutchinson
    params: {{num_samples: [1, 10]}}
"""


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hessbench", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_validate_prints_each_tasks_memory_and_time(tmp_path):
    path = tmp_path / "est.yaml"
    path.write_text(SUITE.format(widths=[64, 64], batch=8))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        f"{path}: ok: suite 'est': 2 task variants, 3 estimator labels, 2 seeds, 12 cells"
    )
    assert lines[1].startswith("estimates (a cost model, not measurements)")
    assert lines[2].split() == [
        "task", "params", "batch", "activations", "ground", "truth", "peak", "cells", "time",
    ]  # fmt: skip
    mlp = lines[3].split()
    assert mlp[:3] == ["mlp", "6.9k", "8"]  # 32*64+64 + 64*64+64 + 64*10+10 parameters
    assert mlp[-3] == "6"
    assert lines[4].split()[:3] == ["small", "26", "1"]
    assert lines[5].startswith("about ")
    assert "for 12 cells on one worker" in lines[5]
    assert "warning" not in result.output


def test_estimates_grow_with_the_batch_and_the_samples():
    def one(widths, batch, samples=(1, 10)):
        text = SUITE.format(widths=widths, batch=batch).replace("[1, 10]", str(list(samples)))
        return estimate_suite(parse_suite(text))[0]

    a, b = one([64, 64], 8), one([64, 64], 80)
    assert b.activation_bytes == 10 * a.activation_bytes
    assert b.truth_bytes > 5 * a.truth_bytes  # per-sample columns (the model's copy is fixed)
    assert one([64, 64], 8, (100,)).seconds > 3 * one([64, 64], 8, (1,)).seconds
    assert (a.cells, a.num_params) == (6, 6922)


@pytest.mark.parametrize("widths", [[64, 64], [128, 128, 128]])
def test_the_ground_truth_estimate_is_near_exacts_measured_peak(widths):
    """Within a factor of 2 of what the float64 exact diagonal allocates (CPU profiler)."""
    n = 32
    text = SUITE.format(widths=widths, batch=n)
    suite = parse_suite(text)
    (estimate, _) = estimate_suite(suite)
    task = suite.tasks[0]
    torch.manual_seed(0)
    model = build_model(task.model, task.input_shape, task.output_dim).double()
    x, y = torch.randn(n, 32, dtype=torch.float64), torch.randint(0, 10, (n,))
    exact = get_estimator("exact")
    measured = peak_memory(lambda: exact(model, nn.CrossEntropyLoss(), x, y), torch.device("cpu"))
    assert estimate.truth_bytes / 2 < measured < 2 * estimate.truth_bytes


def test_a_task_that_needs_a_lot_of_memory_warns_in_one_line(tmp_path):
    path = tmp_path / "big.yaml"
    # three hidden layers of 2048: a dense 2048 x 2048 Hessian per sample, for 512 samples
    path.write_text(SUITE.format(widths=[2048, 2048, 2048], batch=512))
    res = cli("validate", path)
    assert res.returncode == 0, res.stderr
    assert ": ok: suite 'est'" in res.stdout
    (line,) = res.stderr.splitlines()
    assert line.startswith("hessbench: warning: task mlp: a batch of 512 needs about ")
    assert " GB per worker (estimate; above " in line
    assert line.endswith("mostly the exact ground truth 34 GB (float64, per-sample columns)")
    # the threshold is a parameter: nothing above it, no warning
    estimates = estimate_suite(parse_suite(path.read_text()))
    assert memory_warnings(estimates, limit=1e12) == []
    assert len(memory_warnings(estimates, limit=1e6)) == 1


BAD_ACCURACY = """
name: bad
tasks:
  - name: t
    model: {kind: mlp, widths: [4], activation: tahn}
    loss: {kind: mse}
    data: {kind: synthetic, input_shape: [3], output_dim: 2}
estimators: [{name: hesscale}]
"""
BAD_TRAIN = """
kind: train
name: badtrain
task:
  name: t
  model: {kind: mlp, widths: [4]}
  loss: {kind: mse}
  data: {kind: synthetic, input_shape: [3], output_dim: 2}
steps: 4
eval_every: 2
batch_size: 2
optimizers:
  - {name: adam, lr: [0.01, 1e400]}
"""


@pytest.mark.parametrize(
    ("text", "command", "field"),
    [
        (BAD_ACCURACY, "run", "tasks[0].model.activation"),
        (BAD_ACCURACY, "validate", "tasks[0].model.activation"),
        (BAD_TRAIN, "run", "optimizers[0].lr[1]: Input should be a finite number"),
        (BAD_TRAIN, "validate", "optimizers[0].lr[1]: Input should be a finite number"),
        (None, "run", "no such file"),
    ],
)
def test_an_error_is_the_first_line_of_stderr(tmp_path, text, command, field):
    """No empty line (an unstarted progress bar's) before ``hessbench: error:``."""
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(textwrap.dedent(text))
    res = cli(command, path, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith(f"hessbench: error: {path}: "), repr(res.stderr[:80])
    assert field in res.stderr.splitlines()[0]
    assert res.stdout == ""
