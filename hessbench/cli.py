"""The ``hessbench`` command line.

Commands catch the project's own errors at the boundary and print them as one
line (exit code 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table

from hessbench import __version__
from hessbench.errors import HessbenchError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Benchmark and evaluate Hessian-diagonal estimators in PyTorch.",
)
list_app = typer.Typer(no_args_is_help=True, help="List what hessbench knows about.")
app.add_typer(list_app, name="list")

F = TypeVar("F", bound=Callable[..., object])


def _one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HessbenchError as exc:
            print(f"hessbench: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        print(f"hessbench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Benchmark and evaluate Hessian-diagonal estimators in PyTorch."""


@list_app.command("estimators")
@_one_line_errors
def list_estimators() -> None:
    """Every registered estimator: name, hyper-parameters, cost and whether it is random."""
    import dataclasses

    from hessbench.estimators import available_estimators, estimator_class

    table = Table(title="hessbench estimators")
    for col in ("name", "hyper-parameters (defaults)", "cost", "stochastic"):
        table.add_column(col)
    for name in available_estimators():
        cls = estimator_class(name)
        est = cls()
        fields = ", ".join(f"{f.name}={getattr(est, f.name)}" for f in dataclasses.fields(cls))
        table.add_row(name, fields or "-", cls.cost, "yes" if est.stochastic else "no")
    Console(width=140).print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
