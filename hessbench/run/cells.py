"""Accuracy cells on the worker pool: a group of cells shares one problem and ground truth.

A :class:`Group` is a task variant, a seed and its cells; it is one batch of
:func:`~hessbench.run.pool.run_batches`, whose workers build the problem and the
exact diagonal once per group (:class:`~hessbench.bench.cell.GroupEvaluator`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hessbench.bench.cell import GroupEvaluator, base_record
from hessbench.estimators import Estimator
from hessbench.run.pool import Batch, run_batches
from hessbench.suite import Defaults, TaskVariant

__all__ = ["CellWork", "Group", "run_groups"]


@dataclass
class Group:
    """Cells sharing a task variant and a seed (so they share the ground truth)."""

    variant: TaskVariant
    seed: int
    cells: list[tuple[str, Estimator]]


@dataclass(frozen=True)
class CellWork:
    """What a worker does with a group: evaluate its cells against one ground truth."""

    defaults: Defaults

    def open(self, batch: Batch) -> Callable[[str, Estimator], dict]:
        """An evaluator of the group's cells (problem and ground truth built lazily, once)."""
        variant, seed = batch.key
        evaluator = GroupEvaluator(variant, seed, self.defaults)
        return lambda cell_id, est: evaluator.evaluate(est, cell_id)

    def failed(self, batch: Batch, unit_id: str, unit: Estimator, status: str, message: str):
        """The record of a cell whose worker crashed or timed out."""
        variant, seed = batch.key
        return {
            **base_record(variant.name, unit, seed, unit_id),
            "status": status,
            "message": message,
        }


def _balanced(batches: list[Batch], jobs: int) -> list[Batch]:
    """The batches, with the groups left over after an even deal split across the workers.

    Workers take the next batch when they finish one, so with ``k * jobs + r``
    similar groups, ``r`` workers would run one group more while the others
    wait. Dealing the cells of the last ``r`` groups into ``jobs`` batches each
    lets the workers finish together; a split group's ground truth is computed
    once per part (the same numbers: it is seeded by task, seed and batch).
    """
    extra = len(batches) % jobs if jobs > 1 else 0
    if not extra:
        return batches
    head, tail = batches[:-extra], batches[-extra:]
    parts = [Batch(b.key, b.units[i::jobs]) for b in tail for i in range(jobs)]
    return head + [p for p in parts if p.units]


def run_groups(
    groups: list[Group],
    defaults: Defaults,
    *,
    jobs: int,
    on_start: Callable[[str], None],
    on_record: Callable[[dict], None],
    log_path: Path | None = None,
) -> None:
    """Evaluate every cell of ``groups`` with ``jobs`` worker processes.

    ``on_record`` is called in the parent, in completion order, with every
    cell's record (ok, unsupported, error, timeout or crashed). A cell is bounded
    by ``defaults.timeout_s``. The workers' stdout and stderr go to ``log_path``.
    """
    run_batches(
        _balanced([Batch((g.variant, g.seed), list(g.cells)) for g in groups], jobs),
        CellWork(defaults),
        jobs=jobs,
        threads=defaults.threads,
        timeout_s=defaults.timeout_s,
        on_start=on_start,
        on_record=on_record,
        log_path=log_path,
    )
