"""The ``hessbench`` command's exit (``hessbench.cli.console``): what Python's shutdown would do, done first."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hessbench import __version__

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, tempfile, threading, time, weakref
    from pathlib import Path
    from hessbench.cli import console

    def late():
        time.sleep(0.2)
        print("thread finished", flush=True)

    threading.Thread(target=late).start()  # non-daemon: waited for
    atexit.register(lambda: print("atexit handler ran"))
    tmp = tempfile.TemporaryDirectory()  # removed by its weakref.finalize at exit
    Path(sys.argv[1]).write_text(tmp.name)
    sys.stdout.write("unflushed")  # buffered: the pipe is no terminal
    sys.argv = ["hessbench", *sys.argv[2:]]
    console()
    """
)


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "tmpdir.txt"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_exit_keeps_threads_atexit_finalizers_and_buffers(tmp_path):
    res = _run(tmp_path, "--version")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # the thread (0.2 s) outlasts the command; the handlers run after it, output kept
    assert lines == ["unflushedhessbench " + __version__, "thread finished", "atexit handler ran"]
    tmp = (tmp_path / "tmpdir.txt").read_text()
    assert tmp
    assert not Path(tmp).exists()


@pytest.mark.parametrize(
    ("args", "code", "stderr"),
    [
        (["validate", "no-such-suite.yaml"], 2, "hessbench: error: no-such-suite.yaml"),
        (["no-such-command"], 2, "No such command"),
    ],
)
def test_exit_status_of_failing_commands(tmp_path, args, code, stderr):
    res = _run(tmp_path, *args)
    assert res.returncode == code
    assert stderr in res.stderr
    assert "atexit handler ran" in res.stdout


def test_exit_code_of_system_exit_values():
    from hessbench.cli import _code

    assert _code(None) == 0
    assert _code(3) == 3
    assert _code("bye") == 1
