"""Every estimator on CUDA equals the same estimator on the CPU (float64).

Skipped without a CUDA GPU (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``. The device contract of ``test_contract.py``
covers two Sequential MLPs; this covers the architectures with their own code
paths: a CNN with max-pooling, a residual MLP with LayerNorm, a ResNet with
BatchNorm and a causal transformer (the graph engine and its attention rules).
Deterministic estimators agree to 1e-9 relative (float64, different kernels and
summation orders); stochastic ones draw their probes from a CUDA generator, so
only their shape, dtype, device and finiteness are checked. Two calls with the
same seed agree bit for bit under :func:`reproducible_kernels`, as in
``hessbench run`` (without it, cuDNN's default algorithms made every estimator
on the ResNet differ in the last bits between calls, on an H200).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hessbench.bench.kernels import reproducible_kernels
from hessbench.errors import TooLargeError, UnsupportedError
from hessbench.estimators import available_estimators, get_estimator
from hessbench.suite.architectures import ResidualMLP, ResNet, TinyGPT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F64 = torch.float64


def _cnn() -> tuple[nn.Module, Tensor, Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    return model, torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,))


def _resmlp() -> tuple[nn.Module, Tensor, Tensor]:
    model = ResidualMLP((5,), 3, width=6, hidden=8, blocks=2, act=nn.GELU, norm=True, bias=True)
    return model, torch.randn(3, 5), torch.randint(0, 3, (3,))


def _resnet() -> tuple[nn.Module, Tensor, Tensor]:
    model = ResNet((2, 6, 6), 3, channels=[2, 3], blocks=1, act=nn.ReLU, bn=True)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval(), torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,))


def _gpt() -> tuple[nn.Module, Tensor, Tensor]:
    model = TinyGPT(4, 6, d_model=8, heads=2, layers=2, mlp_ratio=2, causal=True).eval()
    return model, torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3,))


ARCHS = {"cnn": _cnn, "resmlp": _resmlp, "resnet": _resnet, "gpt": _gpt}


def _problem(arch: str):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, x, y = ARCHS[arch]()
    model = model.to(F64)
    if x.is_floating_point():
        x = x.to(F64)
    return model, nn.CrossEntropyLoss(), x, y


def _estimate(name: str, arch: str, device: torch.device) -> dict[str, Tensor] | None:
    model, loss_fn, x, y = _problem(arch)
    model, x, y = model.to(device), x.to(device), y.to(device)
    est = get_estimator(name)
    try:
        est.check_supported(model, loss_fn)
    except UnsupportedError:
        return None
    gen = torch.Generator(device=device)
    with reproducible_kernels(device):
        try:
            out = est(model, loss_fn, x, y, generator=gen.manual_seed(0))
        except (UnsupportedError, TooLargeError):  # found at call time (a peer's refusal)
            return None
        again = est(model, loss_fn, x, y, generator=gen.manual_seed(0))
    for n, p in model.named_parameters():
        v = out[n]
        assert v.shape == p.shape, (name, arch, n)
        assert v.dtype == p.dtype, (name, arch, n)
        assert v.device == p.device, (name, arch, n)
        assert bool(torch.isfinite(v).all()), (name, arch, n)
        assert torch.equal(v, again[n]), (name, arch, n, "same seed, different estimate")
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", available_estimators())
def test_cuda_estimate_equals_the_cpu_estimate(name, arch):
    cuda = _estimate(name, arch, torch.device("cuda"))
    cpu = _estimate(name, arch, torch.device("cpu"))
    if "." not in name:  # a peer library may refuse the kernel torch picks on one device only
        assert (cuda is None) == (cpu is None), f"{name} on {arch}: supported on one device only"
    if cuda is None or cpu is None or get_estimator(name).stochastic:
        return
    for n, v in cpu.items():
        scale = v.abs().max().item() or 1.0
        torch.testing.assert_close(
            cuda[n].cpu(), v, rtol=1e-9, atol=1e-9 * scale, msg=f"{name} on {arch}: {n}"
        )


@pytest.mark.parametrize("name", ["hesscale", "hesscale_gn", "bl89"])
def test_cuda_positions_read_pass_equals_the_cpu_full_pass(monkeypatch, name):
    """The pass below ``h[:, -1]`` on the last position only (ROWS_MIN 0), on CUDA, equals
    the CPU's full pass (ROWS_MIN never), diagonal, gradient and loss."""
    from hessbench.estimators import _graph_pass

    model, loss_fn, x, y = _problem("gpt")
    est = get_estimator(name)
    monkeypatch.setattr(_graph_pass, "ROWS_MIN", 10**9)
    full = est.estimate_with_grad(model, loss_fn, x, y)
    monkeypatch.setattr(_graph_pass, "ROWS_MIN", 0)
    cuda = torch.device("cuda")
    with reproducible_kernels(cuda):
        narrow = est.estimate_with_grad(model.to(cuda), loss_fn, x.to(cuda), y.to(cuda))
    for got, ref in zip(narrow[:2], full[:2], strict=True):
        for n, v in ref.items():
            scale = v.abs().max().item() or 1.0
            torch.testing.assert_close(got[n].cpu(), v, rtol=1e-9, atol=1e-9 * scale, msg=n)
    torch.testing.assert_close(narrow[2].cpu(), full[2], rtol=1e-12, atol=0.0)


def _f32_cnn_error(name: str, tf32: bool | None) -> float:
    """Largest error of a float32 CUDA estimate against the float64 CPU one, over its scale.

    ``tf32=None``: inside :func:`reproducible_kernels`, as a cell runs; ``True``: with
    cuDNN's and cuBLAS's TF32 forced on (the control)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(8, 32, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 5),
        )
        x, y = torch.randn(4, 8, 8, 8), torch.randint(0, 5, (4,))
    est, loss_fn = get_estimator(name), nn.CrossEntropyLoss()
    ref = est(model.to(F64), loss_fn, x.to(F64), y)
    cuda = torch.device("cuda")
    model, x, y = model.to(torch.float32).to(cuda), x.to(cuda), y.to(cuda)
    if tf32:
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        before = cudnn.allow_tf32, matmul.allow_tf32
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        try:
            got = est(model, loss_fn, x, y)
        finally:
            cudnn.allow_tf32, matmul.allow_tf32 = before
    else:
        with reproducible_kernels(cuda):
            got = est(model, loss_fn, x, y)
    return max(
        ((got[n].double().cpu() - v).abs().max() / v.abs().max()).item() for n, v in ref.items()
    )


@pytest.mark.parametrize("name", ["hesscale", "ggn_exact", "grad_sq"])
def test_cuda_float32_cells_carry_no_tf32_rounding(name):
    """Inside a cell a float32 estimate on CUDA is float32-accurate (no TF32 convolutions or
    products, whose 10-bit mantissa would put ~1e-3 into accuracy numbers); on a GPU that
    has TF32 (compute capability 8 or more) forcing it on shows the test can see it."""
    strict = _f32_cnn_error(name, None)
    assert strict < 1e-4, strict
    if torch.cuda.get_device_capability()[0] >= 8:
        loose = _f32_cnn_error(name, True)
        assert loose > 10 * strict, (loose, strict)
