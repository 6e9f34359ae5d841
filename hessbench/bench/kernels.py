"""Reproducible, full-precision kernels for a cell or a training run on CUDA.

On CUDA, cuDNN's default convolution algorithms may accumulate with atomics and
``cudnn.benchmark`` may pick a different algorithm per process, so two calls with
the same seed can differ in the last bits (measured on an H200: every estimator
on a small ResNet, even the squared gradient). And on Ampere and later GPUs
cuDNN rounds float32 convolution inputs to TF32 by default (10-bit mantissa), so a
float32 estimate would carry that rounding (about 1e-3 relative) into its accuracy
numbers, which the same suite on the CPU does not. :func:`reproducible_kernels`
selects cuDNN's deterministic algorithms without autotuning and turns TF32 off
for convolutions and matrix products for the duration of a block, and restores
the user's settings afterwards. CPU kernels are already deterministic for a fixed
thread count and never use TF32; there it does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["reproducible_kernels"]


@contextmanager
def reproducible_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA: deterministic cuDNN algorithms, no autotuning, no TF32, inside the block.

    Example:
        >>> cudnn = torch.backends.cudnn
        >>> with reproducible_kernels(torch.device("cuda")):
        ...     print(cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32)
        True False False
        >>> cudnn.deterministic, cudnn.allow_tf32
        (False, True)
    """
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = (
        True,
        False,
        False,
        False,
    )
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before
