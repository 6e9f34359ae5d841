"""The plan of a suite: task variants, cells with stable ids, and derived seeds.

Pure and cheap: nothing here builds a model or touches data. The names are
exported by :mod:`hessbench.suite`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from hessbench.errors import ConfigError
from hessbench.estimators import Estimator
from hessbench.suite.parsing import glob

if TYPE_CHECKING:
    from hessbench.suite.task import TaskSpec, TrainState

__all__ = ["CellSpec", "TaskVariant", "derive_seed", "matches", "plan_cells", "task_variants"]

T = TypeVar("T")


class _Seeds(Protocol):
    @property
    def seed_list(self) -> list[int]: ...


class PlannedSuite(Protocol):
    """What planning reads of a suite; :class:`hessbench.suite.schema.Suite` is one.

    (A protocol, so this module, which the schema's validation calls, does not
    import the schema.)
    """

    @property
    def tasks(self) -> Sequence[TaskSpec]: ...
    @property
    def include(self) -> Sequence[str]: ...
    @property
    def exclude(self) -> Sequence[str]: ...
    @property
    def defaults(self) -> _Seeds: ...
    def estimator_list(self) -> list[Estimator]: ...


def derive_seed(*parts: object) -> int:
    """A seed in ``[0, 2**62)`` from the SHA-256 of ``repr(parts)``: stable across processes.

    Use strings and integers as parts (their ``repr`` never changes).

    >>> derive_seed("paper_2022", 0, "data")
    3588593932078474997
    """
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 2


@dataclass(frozen=True)
class TaskVariant:
    """A task in one model state.

    ``name`` is the task's name when the task evaluates one state, otherwise
    ``task@init`` or ``task@trained<steps>``.
    """

    task: TaskSpec
    state: Literal["init"] | TrainState
    name: str

    @property
    def state_label(self) -> str:
        """``init`` or ``trained<steps>``."""
        return "init" if self.state == "init" else self.state.label

    def __hash__(self) -> int:
        return hash(self.name)


def task_variants(suite: PlannedSuite) -> list[TaskVariant]:
    """Every task variant of ``suite``: one per task and evaluated state, in suite order."""
    out = []
    for task in suite.tasks:
        for state in task.eval.states:
            variant = TaskVariant(task, state, task.name)
            if len(task.eval.states) > 1:
                variant = dataclasses.replace(variant, name=f"{task.name}@{variant.state_label}")
            out.append(variant)
    return out


@dataclass(frozen=True)
class CellSpec:
    """One cell: a task variant, an estimator and a seed."""

    task: TaskVariant
    estimator: Estimator
    seed: int

    @property
    def id(self) -> str:
        """``task/estimator-label/seed=N``, stable across runs."""
        return f"{self.task.name}/{self.estimator.label}/seed={self.seed}"

    def __hash__(self) -> int:
        return hash(self.id)


def matches(patterns: Sequence[str], variant: TaskVariant, estimator: Estimator) -> bool:
    """Whether one ``task/estimator`` pattern matches the pair.

    The task part is matched against the variant's and the task's name, the
    estimator part against the label and the estimator's name.
    """
    tasks, ests = (variant.name, variant.task.name), (estimator.label, estimator.name)
    return any(glob(p).fullmatch(f"{t}/{e}") for p in patterns for t in tasks for e in ests)


def _select(
    items: list[T], patterns: list[str] | None, keys: Callable[[T], tuple[str, ...]], what: str
) -> list[T]:
    if patterns is None:
        return items
    for p in patterns:
        if not any(glob(p).fullmatch(k) for item in items for k in keys(item)):
            known = ", ".join(dict.fromkeys(keys(item)[0] for item in items))
            raise ConfigError(f"no {what} matches {p!r}; {what}s: {known}")
    return [x for x in items if any(glob(p).fullmatch(k) for p in patterns for k in keys(x))]


def plan_cells(
    suite: PlannedSuite,
    *,
    tasks: list[str] | None = None,
    estimators: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[CellSpec]:
    """The cells of ``suite``, ordered by task variant, then seed, then estimator.

    ``include``/``exclude`` of the suite apply first; the filters narrow further
    and keep the suite's order.

    Args:
        suite: a validated suite.
        tasks: keep task variants whose name or task name matches one of these
            (names, or patterns with ``*`` and ``?``); None keeps all.
        estimators: keep estimators whose label or name matches one of these.
        seeds: keep these seeds; each must be one of the suite's.

    Raises:
        ConfigError: a filter that matches nothing, naming what there is.
    """
    variants = _select(task_variants(suite), tasks, lambda v: (v.name, v.task.name), "task")
    ests = _select(suite.estimator_list(), estimators, lambda e: (e.label, e.name), "estimator")
    seed_list = suite.defaults.seed_list
    if seeds is not None:
        unknown = [s for s in seeds if s not in seed_list]
        if unknown:
            known = ", ".join(map(str, seed_list))
            raise ConfigError(f"seed {unknown[0]} is not one of the suite's seeds ({known})")
        seed_list = [s for s in seed_list if s in seeds]
    return [
        CellSpec(v, e, seed)
        for v in variants
        for seed in seed_list
        for e in ests
        if (not suite.include or matches(suite.include, v, e)) and not matches(suite.exclude, v, e)
    ]
