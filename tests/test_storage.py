"""File-system faults (read-only folder, full disk) are one line, exit 2, and lose nothing.

Tests run as root here, where a read-only mode does not stop writes, so the
faults are simulated by making ``open`` / ``os.fsync`` / ``os.write`` raise the
``OSError`` the kernel would (``EROFS``, ``ENOSPC``).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hessbench import cli as cli_module
from hessbench.cli import app
from hessbench.errors import StorageError
from hessbench.report.page import write_files
from hessbench.store.records import RecordStore, atomic_write, iter_records, run_lock

SUITE = """
name: fs
defaults:
  seeds: [0, 1]
  timeout_s: 120
  timing: {warmup: 0, min_repeats: 1, max_repeats: 1, min_time_s: 0.001}
tasks:
  - name: reg
    model: {kind: mlp, widths: [3], activation: tanh}
    loss: {kind: mse}
    data: {kind: synthetic, input_shape: [2], output_dim: 2}
    eval: {batch_size: 1, num_batches: 1}
estimators:
  - name: hesscale
  - name: zero
"""


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def read_only_below(monkeypatch, root: Path) -> None:
    """Opening a file for writing below ``root``, or creating a folder there, fails with EROFS."""
    real_open, real_os_open, real_mkdir = builtins.open, os.open, Path.mkdir

    def refuse(path) -> None:
        if str(path).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(self, *args, **kwargs):
        if not self.exists():
            refuse(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(Path, "mkdir", fake_mkdir)


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "metadata.json"
    atomic_write(path, '{"old": 1}')
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(StorageError) as info:
        atomic_write(path, '{"new": 2}')
    assert str(info.value) == f"{path}: No space left on device"
    assert path.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]


def test_a_record_that_does_not_fit_is_cut_off_and_the_rest_kept(tmp_path, monkeypatch):
    path = tmp_path / "cells.jsonl"
    store = RecordStore(path)
    store.append({"cell_id": "a"})
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills up in the middle of the line
        real_write(fd, bytes(data[: len(data) // 2]))
        enospc()

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(StorageError, match=f"^{path}: No space left on device$"):
        store.append({"cell_id": "b"})
    monkeypatch.undo()
    store.append({"cell_id": "c"})  # space again: the store goes on
    store.close()
    records, _ = iter_records(path)
    assert [r["cell_id"] for r in records] == ["a", "c"]


def test_a_read_only_run_folder_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    read_only_below(monkeypatch, out)
    with pytest.raises(StorageError, match=f"^{out}/.lock: Read-only file system$"), run_lock(out):
        pass
    with pytest.raises(StorageError, match=f"^{out}/new: Read-only file system$"):
        RecordStore(out / "new" / "x.jsonl")


def test_cli_run_into_a_read_only_folder(tmp_path, monkeypatch):
    suite = tmp_path / "fs.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "ro"
    out.mkdir()
    read_only_below(monkeypatch, out)
    result = CliRunner().invoke(app, ["run", str(suite), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert lines(result) == [f"hessbench: error: {out}/.lock: Read-only file system"]
    # a folder that does not exist yet below a read-only one
    result = CliRunner().invoke(app, ["run", str(suite), "-o", str(out / "sub")])
    assert result.exit_code == 2, result.output
    assert lines(result) == [f"hessbench: error: {out}/sub: Read-only file system"]


def test_cli_run_on_a_disk_that_fills_up_loses_nothing(tmp_path, monkeypatch):
    suite = tmp_path / "fs.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "run"
    cells = out / "cells.jsonl"
    real_fsync = os.fsync
    full = []

    def fsync(fd):  # the disk is full from the second cell record on
        if full or (cells.exists() and cells.read_bytes().count(b"\n") >= 2):
            full.append(fd)
            enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = CliRunner().invoke(app, ["run", str(suite), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert lines(result)[-1] == f"hessbench: error: {cells}: No space left on device"
    assert "Traceback" not in result.output
    # the first cell is on disk, no torn line, no temporary file, metadata still readable
    records, _ = iter_records(cells)
    assert len(records) == 1
    assert cells.read_bytes().endswith(b"\n")
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "metadata.json").read_text())["suite"] == "fs"
    # space again: the same command resumes and finishes
    monkeypatch.setattr(os, "fsync", real_fsync)
    result = CliRunner().invoke(app, ["run", str(suite), "-o", str(out)])
    assert result.exit_code == 0, result.output
    records, _ = iter_records(cells)
    assert sorted(r["cell_id"] for r in records) == sorted(
        f"reg/{e}/seed={s}" for e in ("hesscale", "zero") for s in (0, 1)
    )


def test_report_files_on_a_full_disk(tmp_path, monkeypatch):
    write_files(tmp_path, {"report.md": b"old"})
    monkeypatch.setattr(Path, "replace", enospc)
    with pytest.raises(StorageError, match=f"^{tmp_path}/report.md: No space left on device$"):
        write_files(tmp_path, {"report.md": b"new"})
    assert (tmp_path / "report.md").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_other_file_system_faults_at_the_command_line_are_one_line(capsys):
    @cli_module._one_line_errors
    def command() -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), "/some/file")

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "hessbench: error: /some/file: Permission denied\n"

    @cli_module._one_line_errors
    def bug() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):  # not a file-system fault: a bug keeps its traceback
        bug()
