"""Optimizer benchmarks: ``kind: train`` suites, their runs and reports.

A train suite trains one task with optimizers x learning rates x seeds and
records learning curves (:mod:`hessbench.train.runner`); the best learning rate
per optimizer is chosen on final held-out loss (:mod:`hessbench.train.report`).
Format and outputs: ``docs/train.md``.
"""

from hessbench.train.cli import (
    is_train_suite,
    train_command,
    train_report_command,
    train_validate_command,
)

__all__ = ["is_train_suite", "train_command", "train_report_command", "train_validate_command"]
