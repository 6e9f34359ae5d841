"""The project's own exception types.

Every error that hessbench raises on purpose derives from :class:`HessbenchError`,
so a command-line boundary can catch it and print its one-line message.
"""

from __future__ import annotations


class HessbenchError(Exception):
    """Base class of every error hessbench raises on purpose."""


class StorageError(HessbenchError):
    """A file or folder that could not be written or read.

    A read-only or full disk, a missing permission. The message is ``PATH: cause``.
    """

    @classmethod
    def from_os(cls, exc: OSError, path: object) -> StorageError:
        """The error for ``exc`` met while working on ``path`` (``exc``'s own file wins)."""
        where = exc.filename if exc.filename is not None else path
        return cls(f"{where}: {exc.strerror or exc}")


class ConfigError(HessbenchError, ValueError):
    """An unknown estimator, a bad hyper-parameter or a malformed configuration."""


class UnsupportedError(HessbenchError):
    """A model, layer or loss that an estimator does not support.

    The message names the layer's path and type (or the loss type).
    """


class InputError(HessbenchError, ValueError):
    """Bad data handed to an estimator: non-finite values, wrong shapes or labels."""


class TooLargeError(HessbenchError):
    """A computation refused by a size guard because it would take too long."""


class DivergenceError(HessbenchError):
    """An optimizer step met a non-finite loss, gradient, curvature or update.

    Raised before any parameter or optimizer state is changed. ``step`` is the
    1-based number of the step that failed.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
