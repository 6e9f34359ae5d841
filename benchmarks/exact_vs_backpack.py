"""``exact`` against BackPACK's DiagHessian: CPU-time ratio to a gradient and peak memory.

Usage::

    python benchmarks/exact_vs_backpack.py [--quick] [--representation auto]

Same protocol as ``benchmarks/cost_ratios.py`` (one thread, CPU time, the
estimator and one ``torch.autograd.grad`` interleaved, medians). BackPACK runs
on a model extended once, outside the timed region (its cheapest use: no
per-call deep copy). Both in the model's dtype (float32, ``exact`` with
``compute_dtype="model"``). Peak memory: torch CPU allocations above the
baseline during one call (``benchmarks/_memory.py``), in MiB.
Problems: the CNN ``Conv2d(3,16,3)-ReLU-MaxPool2d(2)-Conv2d(16,32,3)-Tanh-
Flatten-Linear(800,10)`` on 3x16x16 inputs with cross-entropy at batch 1/8/32,
and the cost net ``Linear(64,512)`` + 4 x [``Linear(512,512)``, Tanh] +
``Linear(512,100)`` (MSE) at batch 1/32; or, with ``--suite FILE``, every task
of a suite (its first evaluation batch, float32).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._memory import peak_memory
from benchmarks.cost_ratios import cnn_problem, cost_net_problem, measure
from hessbench.estimators import get_estimator


def suite_problems(path: str) -> list:
    from hessbench.bench.problem import build_problem
    from hessbench.suite import find_suite, load_suite, task_variants

    out = []
    for variant in task_variants(load_suite(find_suite(path))):
        prob = build_problem(variant, 0, dtype=torch.float32, device="cpu")
        x, y = prob.batches[0]
        out.append((f"{variant.name} batch={x.shape[0]}", prob.model, prob.loss_fn, x, y))
    return out


def backpack_fn(model, loss_fn, x, y):
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    bmodel = extend(copy.deepcopy(model))
    bloss = extend(copy.deepcopy(loss_fn))

    def run():
        loss = bloss(bmodel(x), y)
        with backpack(DiagHessian()):
            loss.backward()
        out = [p.diag_h for p in bmodel.parameters()]
        for p in bmodel.parameters():
            p.grad = None
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--representation", default="auto")
    parser.add_argument("--only", choices=["cnn", "mlp"])
    parser.add_argument("--suite", help="instead: every task of this suite file (first batch)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems = []
    if args.suite:
        problems += suite_problems(args.suite)
    if not args.suite and args.only in (None, "cnn"):
        problems += [cnn_problem(b) for b in (1, 8, 32)]
    if not args.suite and args.only in (None, "mlp"):
        problems += [cost_net_problem(4, b) for b in (1, 32)]
    min_time = 0.3 if args.quick else 1.5
    for title, model, loss_fn, x, y in problems:
        params = list(model.parameters())

        def grad(model=model, loss_fn=loss_fn, x=x, y=y, params=params):
            return torch.autograd.grad(loss_fn(model(x), y), params)

        est = get_estimator("exact", compute_dtype="model", representation=args.representation)

        def ours(est=est, model=model, loss_fn=loss_fn, x=x, y=y):
            return est(model, loss_fn, x, y)

        bp = backpack_fn(model, loss_fn, x, y)
        rows = [("exact", ours), ("backpack DiagHessian", bp)]
        g_mem = peak_memory(grad) / 2**20
        print(f"\n{title}  (grad peak {g_mem:.2f} MiB)", flush=True)
        for name, fn in rows:
            r = measure(fn, grad, min_time=min_time, max_repeats=500)
            mem = peak_memory(fn) / 2**20
            print(
                f"  {name:22s} cpu {r['cpu_ratio']:8.2f}x  wall {r['wall_ratio']:8.2f}x  "
                f"est {r['est_ms']:9.3f} ms  peak {mem:9.3f} MiB  (grad {r['grad_ms']:.3f} ms)",
                flush=True,
            )


if __name__ == "__main__":
    main()
