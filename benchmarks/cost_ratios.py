"""Print each estimator's median cost as a ratio to one autograd gradient.

Usage::

    python benchmarks/cost_ratios.py            # both problem families
    python benchmarks/cost_ratios.py --quick    # fewer repeats
    python benchmarks/cost_ratios.py --only mlp --estimators hesscale exact

For every problem, the estimator and the reference (forward + backward of the
same loss with ``torch.autograd.grad``) are timed interleaved A B A B in one
process and one CPU thread, after warm-up; the ratio is median(estimator) /
median(gradient), for both CPU time (``time.process_time``, the steadier one
on a shared machine) and wall-clock time (``time.perf_counter``).

Problems: (a) a 784-128-64-10 tanh MLP with cross-entropy at batch 1, 32 and
128; (b) the HesScale paper's cost net ``Linear(64,512)`` + L x
[``Linear(512,512)``, ``Tanh``] + ``Linear(512,100)``, no biases, MSE, at batch
1 and 64 for L = 1, 4, 16. Everything in float32 (the gradient's dtype);
``exact`` runs with ``compute_dtype="model"``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from hessbench.estimators import get_estimator

ESTIMATORS: list[tuple[str, dict]] = [
    ("hesscale", {}),
    ("hesscale_gn", {}),
    ("bl89", {}),
    ("ggn_mc", {"num_samples": 1}),
    ("sophia_gnb", {}),
    ("kfac", {}),
    ("ggn_exact", {}),
    ("hutchinson", {"num_samples": 1}),
    ("exact", {"compute_dtype": "model"}),
    ("grad_sq", {}),
    ("efisher", {}),
    ("adahessian", {"num_samples": 1}),
]


def mlp_problem(batch: int) -> tuple[str, nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    x = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return f"mlp784 tanh CE batch={batch}", model, nn.CrossEntropyLoss(), x, y


def cost_net_problem(layers: int, batch: int):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(64, 512, bias=False)]
    for _ in range(layers):
        mods += [nn.Linear(512, 512, bias=False), nn.Tanh()]
    mods.append(nn.Linear(512, 100, bias=False))
    x = torch.randn(batch, 64, generator=gen)
    y = torch.randn(batch, 100, generator=gen)
    return f"costnet L={layers} MSE batch={batch}", nn.Sequential(*mods), nn.MSELoss(), x, y


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def measure(fn_a, fn_b, *, min_time: float, max_repeats: int) -> dict[str, float]:
    """Interleaved medians of ``fn_a`` (estimator) and ``fn_b`` (gradient)."""
    for _ in range(3):
        fn_a()
        fn_b()
    one = max(_timed(fn_a)[0], _timed(fn_b)[0], 1e-6)
    repeats = int(min(max_repeats, max(7, min_time / one)))
    a_w, a_c, b_w, b_c = [], [], [], []
    for _ in range(repeats):
        w, c = _timed(fn_a)
        a_w.append(w)
        a_c.append(c)
        w, c = _timed(fn_b)
        b_w.append(w)
        b_c.append(c)
    med = statistics.median
    return {
        "repeats": repeats,
        "grad_ms": med(b_c) * 1e3,
        "est_ms": med(a_c) * 1e3,
        "cpu_ratio": med(a_c) / med(b_c),
        "wall_ratio": med(a_w) / med(b_w),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", choices=["mlp", "costnet"], help="one problem family")
    parser.add_argument("--estimators", nargs="*", help="subset of estimator names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems = []
    if args.only in (None, "mlp"):
        problems += [mlp_problem(b) for b in (1, 32, 128)]
    if args.only in (None, "costnet"):
        problems += [cost_net_problem(layer, b) for layer in (1, 4, 16) for b in (1, 64)]
    chosen = [e for e in ESTIMATORS if not args.estimators or e[0] in args.estimators]
    min_time = 0.3 if args.quick else 1.5
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}; ratio = estimator / gradient"
    )
    for title, model, loss_fn, x, y in problems:
        params = [p for p in model.parameters() if p.requires_grad]

        def grad(model=model, loss_fn=loss_fn, x=x, y=y, params=params):
            return torch.autograd.grad(loss_fn(model(x), y), params)

        print(f"\n{title}")
        for name, kw in chosen:
            est = get_estimator(name, **kw)
            gen = torch.Generator().manual_seed(0)

            def run(est=est, model=model, loss_fn=loss_fn, x=x, y=y, gen=gen):
                return est(model, loss_fn, x, y, generator=gen)

            r = measure(run, grad, min_time=min_time, max_repeats=2000)
            print(
                f"  {est.label:34s} cpu {r['cpu_ratio']:6.2f}x  wall {r['wall_ratio']:6.2f}x  "
                f"(grad {r['grad_ms']:.3f} ms, n={r['repeats']})",
                flush=True,
            )


if __name__ == "__main__":
    main()
