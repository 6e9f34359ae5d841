"""Reproducible kernels for a cell or a training run on CUDA.

On CUDA, cuDNN's default convolution algorithms may accumulate with atomics and
``cudnn.benchmark`` may pick a different algorithm per process, so two calls with
the same seed can differ in the last bits (measured on an H200: every estimator
on a small ResNet, even the squared gradient). :func:`deterministic_kernels`
selects cuDNN's deterministic algorithms without autotuning for the duration of
a block and restores the user's settings afterwards. CPU kernels are already
deterministic for a fixed thread count; there it does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["deterministic_kernels"]


@contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """``cudnn.deterministic = True`` and ``cudnn.benchmark = False`` inside, on CUDA.

    Example:
        >>> cudnn = torch.backends.cudnn
        >>> with deterministic_kernels(torch.device("cuda")):
        ...     print(cudnn.deterministic, cudnn.benchmark)
        True False
        >>> cudnn.deterministic
        False
    """
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before
