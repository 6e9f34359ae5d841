"""Suites: the YAML schema, its parsing, model and data builders, and the cell plan.

The public face of the suite part; the harness imports from here:

- :func:`load_suite` / :func:`parse_suite` give a frozen :class:`Suite` (pydantic),
  or raise :class:`SuiteError` with one ``file: field.path: message`` line;
- :func:`plan_cells` expands a suite into its cells (task variant x seed x estimator
  label), :func:`task_variants` into its task variants;
- :func:`derive_seed` is the one seed derivation every random draw goes through.

Modules: ``parsing`` (YAML and pydantic helpers shared by every suite kind),
``models`` (model specs and builders), ``task`` (loss, data, evaluation specs),
``data`` (the task's data), ``schema`` (the accuracy suite), ``plan`` (cells).
"""

from hessbench.suite.data import evaluation_data, load_digits, training_data
from hessbench.suite.models import (
    ACTIVATIONS,
    Activation,
    CNNModel,
    LayerSpec,
    MLPModel,
    ModelSpec,
    SequentialModel,
    build_model,
    check_model,
)
from hessbench.suite.parsing import SuiteError
from hessbench.suite.plan import CellSpec, TaskVariant, derive_seed, plan_cells, task_variants
from hessbench.suite.schema import (
    Cluster,
    Defaults,
    EstimatorSpec,
    Memory,
    Suite,
    Timing,
    load_suite,
    parse_suite,
    suite_text_hash,
)
from hessbench.suite.shipped import find_suite, shipped_suites
from hessbench.suite.task import (
    DataSpec,
    DigitsData,
    Evaluation,
    LossConfig,
    SequenceData,
    SyntheticData,
    TaskSpec,
    TrainState,
)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "CNNModel",
    "CellSpec",
    "Cluster",
    "DataSpec",
    "Defaults",
    "DigitsData",
    "EstimatorSpec",
    "Evaluation",
    "LayerSpec",
    "LossConfig",
    "MLPModel",
    "Memory",
    "ModelSpec",
    "SequenceData",
    "SequentialModel",
    "Suite",
    "SuiteError",
    "SyntheticData",
    "TaskSpec",
    "TaskVariant",
    "Timing",
    "TrainState",
    "build_model",
    "check_model",
    "derive_seed",
    "evaluation_data",
    "find_suite",
    "load_digits",
    "load_suite",
    "parse_suite",
    "plan_cells",
    "shipped_suites",
    "suite_text_hash",
    "task_variants",
    "training_data",
]
