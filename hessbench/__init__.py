"""hessbench: benchmark and evaluate Hessian-diagonal estimators in PyTorch."""

from hessbench.errors import (
    ConfigError,
    HessbenchError,
    InputError,
    TooLargeError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "HessbenchError",
    "InputError",
    "TooLargeError",
    "UnsupportedError",
    "__version__",
]
