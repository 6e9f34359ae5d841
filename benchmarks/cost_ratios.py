"""Each estimator's median cost (time and peak memory) as a ratio to one autograd gradient.

Usage::

    python benchmarks/cost_ratios.py --output reports/peers/report.md   # regenerate the table
    python benchmarks/cost_ratios.py --quick                        # fewer repeats
    python benchmarks/cost_ratios.py --only cnn --estimators hesscale exact
    python benchmarks/cost_ratios.py --device cuda --quick --keep-going \
        --output reports/peers_gpu/report.md                        # on a GPU

Output: Markdown (printed as it is measured; ``--output`` also writes it to a
file), one table per problem. Each row is one quantity: hessbench's estimator,
and beside it the peer implementation of the same quantity where the peer
library is installed (BackPACK's ``DiagHessian``, ``DiagGGNExact``,
``DiagGGNMC`` and ``KFAC``; curvlinops' Hutchinson). HesScale, HesScaleGN and
BL89 have no peer column: hessbench computes them without BackPACK, in its own
one-pass engine. Without BackPACK (or curvlinops) the peer cells say "not
installed".

Protocol: for every problem and estimator, the estimator and the reference
(forward + backward of the same loss with ``torch.autograd.grad``) are timed
interleaved A B A B in one process and one CPU thread, after warm-up; a ratio is
median(estimator) / median(gradient), for CPU time (``time.process_time``, the
steadier one on a shared machine) and wall-clock time (``time.perf_counter``).
Peak memory is the peak of bytes torch allocates during one call above what it
held before (``benchmarks/_memory.py``; untimed), divided by the gradient's.
The "with grad" column is what ``estimate_with_grad`` (estimate, gradient and
loss, for an optimizer step) costs above the plain call, in gradients: both
timed interleaved, ``(median(with grad) - median(plain)) / median(gradient)``.
The peers run behind hessbench's interface, which deep-copies the model for
BackPACK on every call (included in their times).

With ``--device cuda`` every problem lives on the GPU; each timed call is
bracketed by ``torch.cuda.synchronize``, the ratios and the "with grad" column
use that synchronised wall-clock time (the CPU column is then the host's CPU
time, waiting in ``synchronize`` included), and peak memory is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, above what
was allocated before the call. ``--keep-going`` writes a failing cell as
``error: ...`` (traceback on stderr) instead of stopping the run.

Problems (float32; ``exact`` with ``compute_dtype="model"``):

- ``cnn``: ``Conv2d(3,16,3)-ReLU-MaxPool2d(2)-Conv2d(16,32,3)-Tanh-Flatten-Linear(800,10)``,
  cross-entropy, 3x16x16 inputs, batch 1, 8 and 32;
- ``mlp``: a 784-128-64-10 tanh MLP with cross-entropy at batch 1, 32 and 128;
- ``resnet``: ``hessbench.suite.architectures.ResNet`` (channels [8, 16], one basic
  block per stage, eval-mode BatchNorm, ReLU), 3x16x16 inputs, cross-entropy, batch 1 and 32;
- ``resmlp``: ``ResidualMLP`` (64 inputs, width 128, hidden 256, 2 pre-LayerNorm blocks,
  GELU), cross-entropy, batch 1 and 32;
- ``gpt``: ``TinyGPT`` (vocab 16, d_model 32, 4 heads, 2 pre-norm
  ``nn.TransformerEncoderLayer`` blocks with GELU and a causal mask, length 8,
  about 18k parameters), cross-entropy on the last position, batch 1 and 32. These are plain ``nn.Module`` s (the graph
  engine); for them the table also gives the cost of ``exact[method=hvp]``
  estimated as ``P`` times one timed Hessian-vector product;
- ``costnet``: the HesScale paper's cost net ``Linear(64,512)`` + L x
  [``Linear(512,512)``, ``Tanh``] + ``Linear(512,100)``, no biases, MSE, at
  batch 1 and 32 for L = 1, 4, 16;
- ``hutchinson``: ``hutchinson[num_samples=1]`` against plain double backprop
  (an int8 ``randint`` Rademacher probe) on tanh MLPs of ``10^4`` to ``4 x 10^6``
  parameters at batch 1; the target is at most 1.2x.
- ``matfree``: the overhead of the matrix-free estimators. ``xdiag`` and ``diagpp``
  at ``m`` = 10, 50, 200 Hessian-vector products, each over the same ``m`` products of
  plain ``hutchinson[num_matvecs=m]`` plus the orthogonalisation they need (a reduced
  QR of a ``P x s`` Gaussian matrix, ``s = m/2`` for XDiag, ``m/3`` for Diag++), timed
  interleaved as above; on the 64-32-32-10 tanh MLP (``P = 3466``), the 784-128-64-10
  MLP and the CNN at batch 8. The target is at most 1.2x.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks._memory

from benchmarks._memory import peak_memory
from benchmarks._problems import cnn3x16_model
from hessbench.errors import TooLargeError, UnsupportedError
from hessbench.estimators import available_estimators, get_estimator

Spec = tuple[str, dict]

ROWS: list[tuple[str, Spec, Spec | None]] = [
    ("Hessian diagonal (exact)", ("exact", {"compute_dtype": "model"}), ("backpack.diag_hessian", {})),
    ("GGN diagonal (exact)", ("ggn_exact", {}), ("backpack.diag_ggn_exact", {})),
    ("GGN diagonal (MC, 1 sample)", ("ggn_mc", {"num_samples": 1}), ("backpack.diag_ggn_mc", {"num_samples": 1})),
    ("K-FAC diagonal (MC, 1 sample)", ("kfac", {"num_samples": 1}), ("backpack.kfac", {"num_samples": 1})),
    ("HesScale", ("hesscale", {}), None),
    ("HesScaleGN", ("hesscale_gn", {}), None),
    ("BL89", ("bl89", {}), None),
    ("Hutchinson (1 probe)", ("hutchinson", {"num_samples": 1}), ("curvlinops.hutchinson", {"num_samples": 1})),
    ("Sophia-GNB", ("sophia_gnb", {}), None),
    ("squared gradient", ("grad_sq", {}), None),
    ("empirical Fisher", ("efisher", {}), None),
    ("AdaHessian (1 probe)", ("adahessian", {"num_samples": 1}), None),
]  # fmt: skip

Problem = tuple[str, nn.Module, nn.Module, torch.Tensor, torch.Tensor]
CPU = torch.device("cpu")


def on_device(problem: Problem, device: torch.device) -> Problem:
    """The problem with its model, inputs and targets moved to ``device``."""
    title, model, loss_fn, x, y = problem
    return title, model.to(device), loss_fn, x.to(device), y.to(device)


def cnn_problem(batch: int) -> Problem:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = cnn3x16_model()
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return f"cnn 3x16x16 relu/tanh CE batch={batch}", model, nn.CrossEntropyLoss(), x, y


def mlp_problem(batch: int, widths: tuple[int, ...] = (784, 128, 64, 10)) -> Problem:
    """A tanh MLP of ``widths`` (inputs first) with cross-entropy on random data."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers)
    x = torch.randn(batch, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (batch,), generator=gen)
    name = "-".join(map(str, widths))
    return f"mlp {name} tanh CE batch={batch}", model, nn.CrossEntropyLoss(), x, y


def cost_net_problem(layers: int, batch: int) -> Problem:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(64, 512, bias=False)]
    for _ in range(layers):
        mods += [nn.Linear(512, 512, bias=False), nn.Tanh()]
    mods.append(nn.Linear(512, 100, bias=False))
    x = torch.randn(batch, 64, generator=gen)
    y = torch.randn(batch, 100, generator=gen)
    return f"costnet L={layers} MSE batch={batch}", nn.Sequential(*mods), nn.MSELoss(), x, y


def resnet_problem(batch: int) -> Problem:
    from hessbench.suite.architectures import ResNet

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNet((3, 16, 16), 10, channels=[8, 16], blocks=1, act=nn.ReLU, bn=True).eval()
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return (
        f"resnet [8,16] 3x16x16 relu eval-BN CE batch={batch}",
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
    )


def resmlp_problem(batch: int) -> Problem:
    from hessbench.suite.architectures import ResidualMLP

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResidualMLP(
        (64,), 10, width=128, hidden=256, blocks=2, act=nn.GELU, norm=True, bias=True
    )
    x = torch.randn(batch, 64, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return (
        f"resmlp 64-128(256)x2 LayerNorm GELU CE batch={batch}",
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
    )


def gpt_problem(batch: int) -> Problem:
    from hessbench.suite.architectures import TinyGPT

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyGPT(8, 16, d_model=32, heads=4, layers=2, mlp_ratio=2, causal=True).eval()
    x = torch.randint(0, 16, (batch, 8), generator=gen)
    y = torch.randint(0, 16, (batch,), generator=gen)
    return (
        f"gpt vocab 16 d_model 32 4 heads 2 layers length 8 causal CE batch={batch}",
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
    )


MATFREE: list[tuple[str, Callable[[int], int]]] = [
    ("xdiag", lambda m: m // 2),  # s test vectors
    ("diagpp", lambda m: m // 3),  # k sketch columns
]
"""Matrix-free estimators and the width of the matrix each orthogonalises for budget ``m``."""


def matfree_overhead(problem: Problem, args, emit: Callable[[str], None]) -> None:
    """A table: each matrix-free estimator over ``hutchinson`` at equal budget plus a QR."""
    title, model, loss_fn, x, y = problem
    dev = args.device
    nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit(f"### {title} ({nparams} parameters)")
    emit()
    emit(
        f"| estimator | m | its {args.clock} ms | hutchinson + QR, {args.clock} ms "
        "| CPU ratio | wall ratio |\n|---|---:|---:|---:|---:|---:|"
    )
    gen = torch.Generator(device=dev)
    for name, width in MATFREE:
        for m in (10, 50, 200):
            est = get_estimator(name, num_matvecs=m)
            hutch = get_estimator("hutchinson", num_matvecs=m)
            sketch = torch.randn(
                nparams,
                width(m),
                generator=torch.Generator(device=dev).manual_seed(0),
                device=dev,
            )

            def run(est=est):
                return est(model, loss_fn, x, y, generator=gen.manual_seed(0))

            def baseline(hutch=hutch, sketch=sketch):
                hutch(model, loss_fn, x, y, generator=gen.manual_seed(0))
                return torch.linalg.qr(sketch)

            r = measure(
                run, baseline, min_time=args.min_time, max_repeats=200, min_repeats=5, device=dev
            )
            emit(
                f"| `{est.label}` | {m} | {r['est_ms']:.1f} | {r['grad_ms']:.1f} "
                f"| {r['cpu_ratio']:.2f}x | {r['wall_ratio']:.2f}x |"
            )
    emit()


HUTCHINSON_WIDTHS: list[tuple[int, ...]] = [
    (64, 128, 10),  # P = 9,610
    (784, 128, 64, 10),  # P = 109,386
    (784, 1024, 128, 10),  # P = 936,330
    (784, 2048, 1152, 10),  # P = 3,978,378
]
"""Tanh MLPs from ``10^4`` to ``4 x 10^6`` parameters for ``--only hutchinson``."""


def hutchinson_overhead(problem: Problem, args, emit: Callable[[str], None]) -> None:
    """One row: ``hutchinson[num_samples=1]`` over plain double backprop with an int8 probe."""
    title, model, loss_fn, x, y = problem
    params = [p for p in model.parameters() if p.requires_grad]
    nparams = sum(p.numel() for p in params)
    est = get_estimator("hutchinson", num_samples=1)
    gen, plain_gen = torch.Generator(device=args.device), torch.Generator(device=args.device)

    def ours():
        return est(model, loss_fn, x, y, generator=gen.manual_seed(0))

    def plain():  # what a user writes: double backprop, a Rademacher probe from randint
        plain_gen.manual_seed(0)
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        z = [
            torch.randint(0, 2, p.shape, dtype=torch.int8, generator=plain_gen, device=p.device)
            .mul_(2)
            .sub_(1)
            for p in params
        ]
        z = [v.to(p.dtype) for v, p in zip(z, params, strict=True)]
        hv = torch.autograd.grad(grads, params, grad_outputs=z)
        return [v * h for v, h in zip(z, hv, strict=True)]

    r = measure(
        ours, plain, min_time=args.min_time, max_repeats=500, min_repeats=5, device=args.device
    )
    emit(
        f"| {title} | {nparams:,} | {r['est_ms']:.2f} | {r['grad_ms']:.2f} "
        f"| {r['cpu_ratio']:.2f}x | {r['wall_ratio']:.2f}x |"
    )


def hvp_ratio(problem: Problem, grad, min_time: float, device: torch.device = CPU) -> float:
    """``P`` times one double-backprop Hessian-vector product, over one gradient."""
    _, model, loss_fn, x, y = problem
    params = [p for p in model.parameters() if p.requires_grad]
    vec = [torch.randn_like(p) for p in params]

    def hvp():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # attention kernels twice differentiable
            gs = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
            vs = sum((g * v).sum() for g, v in zip(gs, vec, strict=True))
            return torch.autograd.grad(vs, params)

    r = measure(hvp, grad, min_time=min_time, max_repeats=2000, device=device)
    return r["ratio"] * sum(p.numel() for p in params)


def _timed(fn: Callable[[], object], device: torch.device = CPU) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn()``; on CUDA, synchronised before and after."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def measure(
    fn_a,
    fn_b,
    *,
    min_time: float,
    max_repeats: int,
    min_repeats: int = 7,
    device: torch.device = CPU,
) -> dict:
    """Interleaved medians of ``fn_a`` (estimator) and ``fn_b`` (gradient).

    Repeats: enough for ``min_time`` seconds of ``fn_a``, within
    ``[min_repeats, max_repeats]``; calls slower than a second get 3.
    ``grad_ms``, ``est_ms`` and ``ratio`` are in the device's clock: CPU time on
    the CPU, synchronised wall-clock time on CUDA.
    """
    for _ in range(3):
        fn_a()
        fn_b()
    one = max(_timed(fn_a, device)[0], _timed(fn_b, device)[0], 1e-6)
    floor = 3 if one > 1.0 else min_repeats
    repeats = int(min(max_repeats, max(floor, min_time / one)))
    a_w, a_c, b_w, b_c = [], [], [], []
    for _ in range(repeats):
        w, c = _timed(fn_a, device)
        a_w.append(w)
        a_c.append(c)
        w, c = _timed(fn_b, device)
        b_w.append(w)
        b_c.append(c)
    med = statistics.median
    a, b = (a_w, b_w) if device.type == "cuda" else (a_c, b_c)
    return {
        "repeats": repeats,
        "grad_ms": med(b) * 1e3,
        "est_ms": med(a) * 1e3,
        "ratio": med(a) / med(b),
        "cpu_ratio": med(a_c) / med(b_c),
        "wall_ratio": med(a_w) / med(b_w),
    }


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for dist in ("backpack-for-pytorch", "curvlinops-for-pytorch"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_log(script: str, argv: list[str] | None) -> tuple[list[str], Callable[..., None], str]:
    """The lines emitted so far, ``emit`` (prints a line and keeps it) and the command run."""
    lines: list[str] = []

    def emit(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    args = argv if argv is not None else sys.argv[1:]
    return lines, emit, f"python benchmarks/{script} {' '.join(args)}".strip()


def _cell(
    spec: Spec | None, problem: Problem, grad, grad_mem: int, args, *, with_grad: bool = False
) -> list[str]:
    """``[name, cpu, wall, memory]`` cells of one estimator on one problem.

    With ``with_grad``, a fifth cell: what :meth:`estimate_with_grad` costs above
    the plain call (both timed interleaved), in gradients.
    """
    blank = [""] * (4 if with_grad else 3)
    if spec is None:
        return ["— (no peer; hessbench's pass needs no BackPACK)", *blank]
    name, kw = spec
    if name not in available_estimators():
        return [f"`{name}`: not installed", *blank]
    est = get_estimator(name, **kw)
    try:
        return _measured_cell(est, problem, grad, grad_mem, args, with_grad=with_grad)
    except (UnsupportedError, TooLargeError) as exc:
        reason = f"n/a: {str(exc).splitlines()[0][:60]}"
        return [f"`{est.label}`", "n/a", "n/a", reason] + (["n/a"] if with_grad else [])
    except Exception as exc:
        if not args.keep_going:
            raise
        traceback.print_exc()
        reason = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        return [f"`{est.label}`", "error", "error", reason] + (["error"] if with_grad else [])


def _measured_cell(est, problem: Problem, grad, grad_mem: int, args, *, with_grad: bool):
    _, model, loss_fn, x, y = problem
    gen = torch.Generator(device=args.device).manual_seed(0)

    def run():
        return est(model, loss_fn, x, y, generator=gen)

    run()  # refusals (UnsupportedError, TooLargeError) surface here, before any timing
    r = measure(run, grad, min_time=args.min_time, max_repeats=2000, device=args.device)
    mem = peak_memory(run, args.device) / grad_mem if grad_mem else float("nan")
    cells = [
        f"`{est.label}`",
        f"{r['cpu_ratio']:.2f}x",
        f"{r['wall_ratio']:.2f}x",
        f"{mem:.2f}x",
    ]
    if with_grad:

        def run_with_grad():
            return est.estimate_with_grad(model, loss_fn, x, y, generator=gen)

        w = measure(
            run_with_grad, run, min_time=args.min_time, max_repeats=2000, device=args.device
        )
        cells.append(f"{(w['est_ms'] - w['grad_ms']) / r['grad_ms']:+.2f}")
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (0.3 s per cell)")
    parser.add_argument(
        "--only",
        choices=["cnn", "mlp", "costnet", "resnet", "resmlp", "gpt", "matfree", "hutchinson"],
        help="one problem family",
    )
    parser.add_argument("--estimators", nargs="*", help="rows whose hessbench estimator is named")
    parser.add_argument("--batch", type=int, help="only the per-problem tables of this batch size")
    parser.add_argument("--output", type=Path, help="also write the Markdown to this file")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the problems live (cuda: synchronised wall-clock time, CUDA peak memory)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="write a failing cell as 'error: ...' (traceback on stderr) and go on",
    )
    args = parser.parse_args(argv)
    args.min_time = 0.3 if args.quick else 1.5
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is false on this machine")
    args.device = torch.device(args.device)
    args.clock = "wall" if args.device.type == "cuda" else "CPU"
    torch.set_num_threads(1)
    problems: list[Callable[[], Problem]] = []

    def sizes(*batches: int) -> tuple[int, ...]:
        return tuple(b for b in batches if args.batch in (None, b))

    if args.only in (None, "cnn"):
        problems += [lambda b=b: cnn_problem(b) for b in sizes(1, 8, 32)]
    if args.only in (None, "mlp"):
        problems += [lambda b=b: mlp_problem(b) for b in sizes(1, 32, 128)]
    if args.only in (None, "resnet"):
        problems += [lambda b=b: resnet_problem(b) for b in sizes(1, 32)]
    if args.only in (None, "resmlp"):
        problems += [lambda b=b: resmlp_problem(b) for b in sizes(1, 32)]
    if args.only in (None, "gpt"):
        problems += [lambda b=b: gpt_problem(b) for b in sizes(1, 32)]
    if args.only in (None, "costnet"):
        problems += [
            lambda la=la, b=b: cost_net_problem(la, b) for la in (1, 4, 16) for b in sizes(1, 32)
        ]
    overhead: list[Callable[[], Problem]] = []
    if args.only in (None, "matfree") and args.batch is None:
        overhead = [
            lambda: mlp_problem(1, (64, 32, 32, 10)),
            lambda: mlp_problem(1),
            lambda: cnn_problem(8),
        ]
    hutch: list[Callable[[], Problem]] = []
    if args.only in (None, "hutchinson") and args.batch is None:
        hutch = [lambda w=w: mlp_problem(1, w) for w in HUTCHINSON_WIDTHS]
    rows = [r for r in ROWS if not args.estimators or r[1][0] in args.estimators]
    lines, emit, command = markdown_log("cost_ratios.py", argv)
    emit("# Estimator cost relative to one gradient")
    emit()
    emit(
        "> Time and peak memory of every estimator, and of BackPACK's and curvlinops' "
        "implementations of the same quantities, as ratios to one gradient."
    )
    emit()
    emit(f"Generated by `{command}` (hessbench {_commit()}).")
    emit(
        f"{_versions()}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread; ratio = estimator / one autograd gradient "
        "(medians, interleaved; memory: peak bytes torch allocates during one call; "
        "with grad: what `estimate_with_grad` costs above the plain call, in gradients)."
    )
    if args.device.type == "cuda":
        emit(
            f"Device: {torch.cuda.get_device_name(args.device)} (CUDA {torch.version.cuda}). "
            "Every call synchronised before and after; ratios and 'with grad' use the "
            "synchronised wall-clock time (the CPU column is the host's CPU time); "
            "memory: `torch.cuda.max_memory_allocated` above the allocation before the call."
        )
    for make in problems:
        problem = on_device(make(), args.device)
        title, model, loss_fn, x, y = problem
        params = [p for p in model.parameters() if p.requires_grad]

        def grad(model=model, loss_fn=loss_fn, x=x, y=y, params=params):
            return torch.autograd.grad(loss_fn(model(x), y), params)

        g = measure(grad, grad, min_time=args.min_time, max_repeats=2000, device=args.device)
        # after the warm-up: a process's first CUDA gradient also allocates the
        # libraries' workspaces (about 68 MB on an H200), which are not the gradient's
        grad_mem = peak_memory(grad, args.device)
        nparams = sum(p.numel() for p in params)
        emit()
        emit(f"## {title}")
        emit()
        emit(
            f"{nparams} parameters; one gradient: {g['grad_ms']:.3f} ms {args.clock}, "
            f"{grad_mem / 1e6:.2f} MB peak."
        )
        if not isinstance(model, nn.Sequential):
            hvps = hvp_ratio(problem, grad, args.min_time, args.device)
            emit(
                f"Graph model: `exact[method=hvp]` would cost about "
                f"{hvps:.0f}x a gradient ({nparams} HVPs)."
            )
        emit()
        emit(
            "| quantity | hessbench | CPU | wall | memory | with grad | peer | CPU | wall "
            "| memory |\n"
            "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"
        )
        for label, ours, peer in rows:
            cells = [label, *_cell(ours, problem, grad, grad_mem, args, with_grad=True)]
            cells += _cell(peer, problem, grad, grad_mem, args)
            emit("| " + " | ".join(cells) + " |")
    if overhead:
        emit()
        emit("## Matrix-free overhead: `xdiag` and `diagpp` over `hutchinson` at equal budget")
        emit()
        emit(
            "Ratio = the estimator / (`hutchinson[num_matvecs=m]` + a reduced QR of the "
            "`P x s` matrix it orthogonalises), medians, interleaved; target at most 1.2x."
        )
        emit()
        for make in overhead:
            matfree_overhead(on_device(make(), args.device), args, emit)
    if hutch:
        emit()
        emit("## Hutchinson against plain double backprop")
        emit()
        emit(
            "Ratio = `hutchinson[num_samples=1]` / (one `torch.autograd.grad` with "
            "`create_graph=True`, an int8 `torch.randint` Rademacher probe, a second "
            "`torch.autograd.grad` and `z * Hz`), medians, interleaved, batch 1; "
            "target at most 1.2x."
        )
        emit()
        emit(
            f"| problem | parameters | hutchinson, {args.clock} ms | plain torch, {args.clock} ms "
            "| CPU ratio | wall ratio |\n|---|---:|---:|---:|---:|---:|"
        )
        for make in hutch:
            hutchinson_overhead(on_device(make(), args.device), args, emit)
    if args.output is not None:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
