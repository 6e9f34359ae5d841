"""Where and when a run happened: which hessbench, the CPU, the time.

Shared by the run folders' ``metadata.json`` of every suite kind.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import hessbench

__all__ = [
    "checkout",
    "cpu_name",
    "environment",
    "git",
    "git_commit",
    "git_dirty",
    "installed_version",
    "now",
    "session_commands",
    "source",
]


def _run_git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _is_hessbench_project(pyproject: Path) -> bool:
    """Whether ``pyproject`` declares ``[project] name = "hessbench"``."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r'^name\s*=\s*["\']hessbench["\']\s*$', text, re.MULTILINE) is not None


def checkout(package_dir: Path | None = None) -> Path | None:
    """The hessbench checkout this package runs from, or None (an installed copy).

    A checkout is a git work tree whose top level holds a ``pyproject.toml`` of the
    ``hessbench`` project and whose ``hessbench/`` folder is ``package_dir`` (default:
    this package's folder). A copy installed into a virtual environment inside some
    other repository is not one: that repository's commit says nothing about hessbench.
    """
    package_dir = (package_dir or Path(hessbench.__file__).parent).resolve()
    top = _run_git(package_dir, "rev-parse", "--show-toplevel")
    if not top:
        return None
    top_dir = Path(top).resolve()
    if top_dir / "hessbench" != package_dir or not _is_hessbench_project(
        top_dir / "pyproject.toml"
    ):
        return None
    return top_dir


def git(*args: str, package_dir: Path | None = None) -> str | None:
    """The stripped output of ``git ARGS`` in the hessbench checkout (None outside one)."""
    root = checkout(package_dir)
    return None if root is None else _run_git(root, *args)


def git_commit(package_dir: Path | None = None) -> str | None:
    """The hessbench checkout's commit (None for an installed copy or outside git)."""
    return git("rev-parse", "HEAD", package_dir=package_dir) or None


def git_dirty(package_dir: Path | None = None) -> bool | None:
    """Whether the hessbench checkout has uncommitted changes (None for an installed copy)."""
    status = git("status", "--porcelain", "--untracked-files=no", package_dir=package_dir)
    return None if status is None else bool(status)


def installed_version() -> str | None:
    """The version of the installed ``hessbench`` distribution (None when not installed)."""
    try:
        return importlib.metadata.version("hessbench")
    except importlib.metadata.PackageNotFoundError:
        return None


def source(package_dir: Path | None = None) -> dict:
    """Which hessbench ran, for ``metadata.json``.

    ``hessbench_source`` is ``"checkout"`` (with its git commit and dirty flag) or
    ``"installed"`` (``hessbench_distribution``: the installed version; no commit).
    """
    in_checkout = checkout(package_dir) is not None
    return {
        "hessbench_version": hessbench.__version__,
        "hessbench_source": "checkout" if in_checkout else "installed",
        "hessbench_distribution": installed_version(),
        "git_commit": git_commit(package_dir) if in_checkout else None,
        "git_dirty": git_dirty(package_dir) if in_checkout else None,
    }


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    """The UTC time to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    """What ran the suite, in ``metadata.json``'s order: versions, git state, machine."""
    return {
        **source(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def session_commands(meta: dict) -> list[str]:
    """The distinct commands of a run folder's sessions, as a user would type them.

    ``python -m hessbench...`` and installed-script paths become ``hessbench``.
    """
    out: list[str] = []
    for s in meta.get("sessions", []):
        argv = [str(a) for a in s.get("command") or []]
        if argv:
            argv[0] = Path(argv[0]).name
            if argv[0] in ("__main__.py", "-m"):
                argv[0] = "hessbench"
            cmd = shlex.join(argv)
            if cmd not in out:
                out.append(cmd)
    return out
