"""The suite schema: YAML suites parsed into frozen pydantic models.

A suite names tasks (model, loss, data, evaluation protocol) and estimators (a
name and hyper-parameters; a list of values expands into a grid); the plan is
task variant x seed x estimator label, minus what ``include``/``exclude`` drop
(:func:`plan_cells`). Every model forbids unknown
fields, and nothing in a suite can execute code. Field reference: ``docs/suites.md``.

>>> suite = parse_suite('''
... name: demo
... tasks:
...   - {name: t, model: {kind: mlp, widths: [4]}, loss: {kind: mse},
...      data: {kind: synthetic, input_shape: [3], output_dim: 2}}
... estimators:
...   - {name: hutchinson, params: {num_samples: [1, 10]}}
... ''')
>>> [cell.id for cell in plan_cells(suite)]
['t/hutchinson[num_samples=1]/seed=0', 't/hutchinson[num_samples=10]/seed=0']
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from hessbench.errors import ConfigError, HessbenchError
from hessbench.estimators import Estimator, estimator_class, get_estimator
from hessbench.suite.parsing import (
    Name,
    ParamValue,
    Problems,
    Seeds,
    StrictModel,
    custom_error,
    fail,
    format_error,
    load_file,
    read_yaml,
    repeats,
    validate,
)
from hessbench.suite.plan import (
    matches,
    plan_cells,
    task_variants,
)
from hessbench.suite.task import (
    TaskSpec,
)

__all__ = [
    "Cluster",
    "Defaults",
    "EstimatorSpec",
    "Memory",
    "Suite",
    "Timing",
    "load_suite",
    "parse_suite",
    "suite_text_hash",
]


class EstimatorSpec(StrictModel):
    """A registered estimator and its hyper-parameters; list values expand into a grid."""

    name: str
    params: dict[str, ParamValue] = Field(default_factory=dict)

    def grid(self) -> list[dict[str, object]]:
        """Every combination of the hyper-parameters, the last key varying fastest."""
        values = [v if isinstance(v, list) else [v] for v in self.params.values()]
        return [dict(zip(self.params, combo, strict=True)) for combo in itertools.product(*values)]

    def expand(self) -> list[Estimator]:
        """One estimator per grid point, built with :func:`get_estimator`."""
        return [get_estimator(self.name, **params) for params in self.grid()]

    @model_validator(mode="after")
    def _builds(self) -> EstimatorSpec:
        try:
            cls = estimator_class(self.name)
        except ConfigError as exc:
            raise custom_error(str(exc)) from None
        allowed = [f.name for f in dataclasses.fields(cls)]
        problems: Problems = {}
        for key, value in self.params.items():
            if key not in allowed:
                known = ", ".join(allowed) or "none"
                problems["params", key] = f"not a hyper-parameter of {self.name}; allowed: {known}"
            elif value == []:
                problems["params", key] = "an empty list of values"
        # the values of the known hyper-parameters are checked too, so one run of
        # `validate` reports every problem of the block: each value on its own first
        # (one line per field: its first bad value), then the combinations of the values
        # that passed, for what only a combination gets wrong (whole-block checks)
        good: dict[str, list[object]] = {}
        for key, value in self.params.items():
            if ("params", key) in problems:
                continue
            good[key] = []
            for v in value if isinstance(value, list) else [value]:
                problem = _field_problem(cls, key, v)
                if problem is None:
                    good[key].append(v)
                else:
                    problems.setdefault(("params", key), problem)
        good = {k: v for k, v in good.items() if v}  # a field with no good value: its default
        whole: list[str] = []
        for combo in itertools.product(*good.values()):
            try:
                cls(**dict(zip(good, combo, strict=True)))
            except pydantic.ValidationError as exc:
                for err in exc.errors():
                    if err["loc"][:1]:
                        problems.setdefault(("params", *err["loc"][:1]), format_error(err, None)[1])
                    else:  # the block as a whole: its input is every value, not shown
                        whole.append(err["msg"].removeprefix("Value error, "))
            except (HessbenchError, ValueError, TypeError) as exc:
                whole.append(str(exc))
        fail([*problems.items(), *((("params",), m) for m in dict.fromkeys(whole))])
        return self


def _field_problem(cls: type[Estimator], key: str, value: object) -> str | None:
    """Why hyper-parameter ``key`` cannot be ``value`` (the others at their defaults), or None.

    Only the field's own problems count; what fails with the defaults of the other
    fields is left to the check of the combinations.
    """
    try:
        cls(**{key: value})
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            if err["loc"][:1] == (key,):
                return format_error(err, None)[1]
    except (HessbenchError, ValueError, TypeError):
        pass
    return None


class Timing(StrictModel):
    """Timing repeats per cell: ``warmup`` calls, then repeats until both minimums are met."""

    warmup: NonNegativeInt = 2
    min_repeats: PositiveInt = 5
    max_repeats: PositiveInt = 50
    min_time_s: PositiveFloat = 0.2

    @model_validator(mode="after")
    def _ordered(self) -> Timing:
        if self.max_repeats < self.min_repeats:
            fail([(("max_repeats",), f"less than min_repeats ({self.min_repeats})")])
        return self


class Memory(StrictModel):
    """Whether peak memory is measured."""

    enabled: bool = True


class Defaults(StrictModel):
    """Settings shared by every task of a suite."""

    seeds: Seeds = Field(default_factory=lambda: [0])
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    threads: PositiveInt = 1
    timeout_s: PositiveFloat = 600
    timing: Timing = Timing()
    memory: Memory = Memory()

    @property
    def seed_list(self) -> list[int]:
        """The seeds: the list as given, or ``range(n)`` for an integer ``n``."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds: list[int] | int) -> list[int] | int:
        if isinstance(seeds, list):
            fail(((i,), f"seed {seeds[i]} appears twice") for i in repeats(seeds))
            if not seeds:
                raise custom_error("an empty list of seeds")
        return seeds


class Cluster(StrictModel):
    """Slurm resources of ``hessbench run --executor slurm`` (command-line options override).

    Each array task evaluates one chunk of whole (task variant, seed) groups.
    """

    partition: str | None = None
    time_min: PositiveFloat = 60
    cpus_per_task: PositiveInt | None = None
    mem_gb: PositiveFloat | None = None
    gpus: NonNegativeInt | None = None
    chunks: PositiveInt | None = None
    array_parallelism: PositiveInt = 256
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = Field(default_factory=list)


class Suite(StrictModel):
    """A benchmark suite: tasks x estimators x seeds."""

    name: Name
    description: str = ""
    defaults: Defaults = Defaults()
    cluster: Cluster = Cluster()
    tasks: list[TaskSpec] = Field(min_length=1)
    estimators: list[EstimatorSpec] = Field(min_length=1)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    def estimator_list(self) -> list[Estimator]:
        """Every estimator of the suite, grids expanded, in suite order."""
        return [est for spec in self.estimators for est in spec.expand()]

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        fail(((i, "name"), f"a second task named {names[i]!r}") for i in repeats(names))
        return tasks

    @model_validator(mode="after")
    def _check(self) -> Suite:
        problems: Problems = {}
        labels = [(i, est.label) for i, spec in enumerate(self.estimators) for est in spec.expand()]
        for k in repeats([label for _, label in labels]):
            (i, label), first = labels[k], next(j for j, other in labels if other == labels[k][1])
            problems["estimators", i] = (
                f"label {label!r} again (also estimators[{first}]); labels must differ "
                "(they leave out implementation choices such as method)"
            )
        cells = [(v, e) for v in task_variants(self) for e in self.estimator_list()]
        for field in ("include", "exclude"):
            for i, pattern in enumerate(getattr(self, field)):
                if pattern.count("/") != 1:
                    problems[field, i] = f"{pattern!r} is not a 'task/estimator' pattern"
                elif not any(matches([pattern], v, e) for v, e in cells):
                    problems[field, i] = f"{pattern!r} matches no task/estimator pair"
        if not problems and not plan_cells(self):
            problems["exclude" if self.exclude else "include",] = "no cell is left"
        fail(problems.items())
        return self


def parse_suite(text: str, source: str = "<suite>") -> Suite:
    """Parse and validate a suite from YAML text; ``source`` names it in messages.

    Raises:
        SuiteError: every problem, one per line, ``SOURCE: field.path: message``
            (``SOURCE:LINE:COL: message`` for YAML syntax errors).
    """
    return validate(Suite, read_yaml(text, source), source)


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (see :func:`parse_suite`)."""
    return load_file(path, parse_suite)


def suite_text_hash(text: str | bytes) -> str:
    """The SHA-256 hex digest of a suite's text (UTF-8)."""
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()
