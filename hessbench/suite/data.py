"""The data of a task: scikit-learn's digits (fixed split) or synthetic draws, deterministically.

Every draw comes from a local ``torch.Generator`` seeded with
:func:`~hessbench.suite.plan.derive_seed` of the task's name and the seed (see
:mod:`hessbench.bench.problem` for the full seeding scheme).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hessbench.suite.plan import derive_seed
from hessbench.suite.task import DIGITS_EVAL, DigitsData, SequenceData, TaskSpec

__all__ = ["evaluation_data", "load_digits", "seeded_generator", "training_data"]


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: ``(1797, 64)`` float32 pixels in [0, 1] and int64 labels.

    The data set ships inside scikit-learn, so nothing is downloaded. Its file
    (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the label per row)
    is read directly, as ``sklearn.datasets.load_digits`` reads it, without
    importing scikit-learn (1.1-1.8 s, in every worker process); where the file
    is not found, ``load_digits`` itself. ``tests/test_tasks.py`` checks that both
    give the same arrays. The tensors are shared between calls: do not modify them.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        pixels, labels = data[:, :-1], data[:, -1]
    else:
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        pixels, labels = bunch.data, bunch.target
    x = torch.from_numpy((pixels / 16).astype(np.float32))
    return x, torch.from_numpy(labels.astype(np.int64))


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def _digits_part(task: TaskSpec, evaluation: bool) -> tuple[Tensor, Tensor]:
    x, labels = load_digits()
    perm = torch.randperm(len(x), generator=seeded_generator("digits", "split"))
    idx = perm[:DIGITS_EVAL] if evaluation else perm[DIGITS_EVAL:]
    return x[idx].reshape(len(idx), *task.input_shape), labels[idx]


def _targets(task: TaskSpec, labels: Tensor) -> Tensor:
    if task.loss.classes:
        return labels
    # digits with an element-wise loss: one-hot rows (0/1 labels for bce_with_logits)
    return nn.functional.one_hot(labels, task.output_dim).float()


def _sequences(data: SequenceData, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randint(data.vocab, (n, data.length), generator=gen)
    if data.task == "sum_mod":
        return x, x.sum(1) % data.vocab
    if data.task == "copy_first":
        return x, x[:, 0].clone()
    return x, x.amin(1)


def _synthetic(task: TaskSpec, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    if isinstance(task.data, SequenceData):
        return _sequences(task.data, n, gen)
    x = torch.randn(n, *task.input_shape, generator=gen)
    if task.loss.classes:
        return x, torch.randint(task.output_dim, (n,), generator=gen)
    if task.loss.kind == "bce_with_logits":  # independent fair 0/1 labels (multi-label)
        return x, torch.randint(2, (n, task.output_dim), generator=gen).float()
    return x, torch.randn(n, task.output_dim, generator=gen)


def training_data(task: TaskSpec, seed: int) -> tuple[Tensor, Tensor]:
    """The training part (inputs, targets): digits' 1500, or ``size`` synthetic samples.

    Inputs are float32, or int64 tokens for sequence data.
    """
    if isinstance(task.data, DigitsData):
        x, labels = _digits_part(task, evaluation=False)
        return x, _targets(task, labels)
    return _synthetic(task, task.data.size, seeded_generator(task.name, seed, "data"))


def evaluation_data(task: TaskSpec, seed: int) -> tuple[Tensor, Tensor]:
    """The ``num_batches * batch_size`` evaluated samples (inputs, targets), in order."""
    n, gen = task.eval.num_batches * task.eval.batch_size, seeded_generator(task.name, seed, "eval")
    if not isinstance(task.data, DigitsData):
        return _synthetic(task, n, gen)
    x, labels = _digits_part(task, evaluation=True)
    # Without replacement, cycling through fresh permutations when more are needed.
    idx = torch.cat([torch.randperm(len(x), generator=gen) for _ in range(-(-n // len(x)))])[:n]
    return x[idx], _targets(task, labels[idx])
