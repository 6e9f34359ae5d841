"""Where and when a run happened: the hessbench checkout's git state, the CPU, the time.

Shared by the run folders' ``metadata.json`` of every suite kind.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import hessbench

__all__ = ["cpu_name", "environment", "git", "git_commit", "git_dirty", "now", "session_commands"]


def git(*args: str) -> str | None:
    """The stripped output of ``git ARGS`` in the hessbench package's folder (None on failure)."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(hessbench.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The hessbench checkout's commit (None outside git)."""
    return git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether the hessbench checkout has uncommitted changes (None outside git)."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


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
        "hessbench_version": hessbench.__version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
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
