"""The suites that ship with hessbench (``hessbench/suites/*.yaml``; ``suites/`` in a checkout).

Commands that take a suite accept a path or the name of a shipped suite
(``small_mlp``): a path that exists wins.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["find_suite", "shipped_suites"]


def shipped_suites() -> dict[str, Path]:
    """``{name: path}`` of every shipped suite, sorted by name."""
    folder = resources.files("hessbench") / "suites"
    found = {
        p.name[: -len(".yaml")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")
    }
    return dict(sorted(found.items()))


def find_suite(arg: str | Path) -> Path:
    """``arg`` as a path when it exists, else the shipped suite of that name (or ``NAME.yaml``).

    Anything else is returned as given, so the caller's "no such file" error names it.
    """
    path = Path(arg)
    if path.exists() or len(path.parts) != 1:
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    return shipped_suites().get(name, path)
