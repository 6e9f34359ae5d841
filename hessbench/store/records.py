"""Results on disk: a crash-safe run folder, and tidy tables from it.

A run folder holds

- ``cells.jsonl``: one JSON record per finished cell, appended, flushed and
  fsynced as soon as the cell ends (a re-run of a cell appends a newer record;
  the last record of a cell wins);
- ``metadata.json``: the suite text and hash, versions, machine, start and end
  times, written to a temporary file and renamed;
- ``results.csv``: the tidy cell table, written the same way at the end of a run;
- ``.lock``: held (``fcntl.flock``) while a run writes the folder;
- ``shards/``: result shards of Slurm array tasks and ``--shard i/n`` runs, in the
  same record format, merged into ``cells.jsonl`` by :mod:`hessbench.store.shards`.

Every record carries ``schema_version``; :func:`load` refuses a newer one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from hessbench.errors import HessbenchError, StorageError

__all__ = [
    "SCHEMA_VERSION",
    "CellStore",
    "RecordStore",
    "atomic_write",
    "ensure_dir",
    "frame",
    "iter_records",
    "load",
    "load_parts",
    "read_last_records",
    "read_records",
    "run_kind",
    "run_lock",
    "storage",
]

SCHEMA_VERSION = 1
CELLS = "cells.jsonl"
FAILED = ("error", "timeout", "crashed", "cancelled")
"""Statuses of cells that did not finish; a resumed run skips them unless ``--retry-failed``."""
DONE = ("ok", "unsupported")


class ResultsError(HessbenchError):
    """A run folder that cannot be read or written."""


@contextlib.contextmanager
def storage(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` into a one-line StorageError naming the path.

    A read-only or full disk, a missing permission: ``PATH: cause``.
    """
    try:
        yield
    except OSError as exc:
        raise StorageError.from_os(exc, path) from None


def ensure_dir(path: Path) -> None:
    """Create the folder ``path`` (and its parents) if missing; a failure is a StorageError."""
    with storage(path):
        path.mkdir(parents=True, exist_ok=True)


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename.

    On failure (e.g. a full disk) ``path`` is unchanged, the temporary file is
    removed, and a :class:`~hessbench.errors.StorageError` names ``path``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    data = text.encode("utf-8") if isinstance(text, str) else text
    with storage(path):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def run_lock(run_dir: Path, *, wait_s: float = 0, lock_file: Path | None = None) -> Iterator[None]:
    """Hold the run folder's lock (or ``lock_file``), or fail naming the holder.

    ``wait_s``: how long to retry a held lock before failing (default: fail at once).
    """
    path = lock_file or run_dir / ".lock"
    ensure_dir(path.parent)
    deadline = time.monotonic() + wait_s
    with storage(path):
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed below
    with fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                what = run_dir if lock_file is None else path
                raise ResultsError(f"{what} is being written by {holder}; wait or use -o") from None
        with storage(path):
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
        yield


def _clean(value: object) -> object:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class RecordStore:
    """Appends records to a JSONL file, each flushed and fsynced.

    Every record gets ``schema_version``; non-finite floats become ``null``. A
    half-written last line left by a killed run is dropped on opening. A record
    that cannot be written in full (a full disk) is cut off again, so the file
    keeps every earlier record and no torn line; the error is a
    :class:`~hessbench.errors.StorageError` naming the file.
    """

    def __init__(self, path: Path, *, schema_version: int = SCHEMA_VERSION):
        self.path = path
        self.schema_version = schema_version
        ensure_dir(self.path.parent)
        with storage(self.path):
            self._repair_tail()
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_tail(self) -> None:
        """Drop a half-written last line left by a killed run."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        """Append one record, written and fsynced before returning."""
        line = json.dumps(_clean({"schema_version": self.schema_version, **record}), sort_keys=True)
        data = (line + "\n").encode("utf-8")
        if self._fd is None:
            raise ValueError(f"{self.path}: the record store is closed")
        with storage(self.path):
            size = os.fstat(self._fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                raise

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class CellStore(RecordStore):
    """Appends cell records to ``cells.jsonl`` in a run folder (or to the file ``path``)."""

    def __init__(self, run_dir: Path | None = None, *, path: Path | None = None):
        if path is None:
            if run_dir is None:
                raise TypeError("CellStore needs run_dir or path")
            path = run_dir / CELLS
        super().__init__(path)


def read_last_records(path: Path, *, newest: int | None = None) -> dict[str, dict]:
    """The last record of every ``cell_id`` in the JSONL file ``path`` ({} if it is missing).

    A malformed last line (torn by a killed run) is ignored, any other one raises.
    ``newest``: refuse records with a higher ``schema_version``.
    """
    if not path.exists():
        return {}
    records: dict[str, dict] = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise HessbenchError(f"{path}:{i + 1}: not a JSON record") from None
        if newest is not None and rec.get("schema_version", 0) > newest:
            raise HessbenchError(f"{path}: written by a newer hessbench; upgrade to read it")
        records[rec["cell_id"]] = rec
    return records


def run_kind(run_dir: str | Path) -> str | None:
    """The ``kind`` in a run folder's ``metadata.json`` (None if it has none or cannot be read)."""
    path = Path(run_dir) / "metadata.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def iter_records(path: Path, start: int = 0, stop: int = -1) -> tuple[list[dict], int]:
    """The records of a JSONL file from byte ``start`` (to ``stop``), and the offset after the last.

    Only complete lines count: a line still being written (no newline yet) is left
    for a later call, so the returned offset never points into a record.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read(stop - start if stop >= 0 else -1)
    except FileNotFoundError:
        return [], start
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for i, line in enumerate(complete.decode("utf-8").split("\n")):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            where = f"{path}:{i + 1}" if start == 0 else f"{path}: line {i + 1} after byte {start}"
            raise ResultsError(f"{where}: not a JSON record") from None
        version = rec.get("schema_version", 0)
        if version > SCHEMA_VERSION:
            raise ResultsError(
                f"{path}: written with results schema {version}, newer than this hessbench's "
                f"{SCHEMA_VERSION}; upgrade hessbench to read it"
            )
        records.append(rec)
    return records, start + len(complete)


def read_records(run_dir: Path) -> dict[str, dict]:
    """The last record of every cell, keyed by cell id (a torn last line is ignored)."""
    records, _ = iter_records(Path(run_dir) / CELLS)
    return {rec["cell_id"]: rec for rec in records}


CELL_COLUMNS = [
    "cell_id",
    "task",
    "estimator",
    "label",
    "params",
    "seed",
    "status",
    "message",
    "l1",
    "abs_truth",
    "rel_l1",
    "l1_over_hesscale",
    "cosine",
    "spearman",
    "sign_agreement",
    "time_ratio",
    "cpu_time_ratio",
    "time_s",
    "time_iqr_s",
    "cpu_time_s",
    "grad_time_s",
    "grad_time_iqr_s",
    "grad_cpu_time_s",
    "repeats",
    "contended",
    "memory_ratio",
    "peak_bytes",
    "grad_peak_bytes",
    "num_batches",
    "batch_size",
    "num_params",
    "dtype",
    "elapsed_s",
    "stochastic",
    "sample_param",
    "default_params",
]


def load(run_dir: str | Path) -> pd.DataFrame:
    """One row per cell (its last record), with the paper's ``l1_over_hesscale``.

    ``l1_over_hesscale`` divides a cell's ``l1`` by the ``l1`` of the ``hesscale``
    cell of the same task and seed (NaN where that cell is missing or failed).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ResultsError(f"{run_dir}: no such run folder")
    return frame(read_records(run_dir).values())


def frame(records: Iterable[dict]) -> pd.DataFrame:
    """The table of :func:`load` for the given records (the last one of a cell wins)."""
    records = {rec["cell_id"]: rec for rec in records}.values()
    rows = []
    for rec in records:
        row = {k: rec.get(k) for k in CELL_COLUMNS if k not in ("params", "l1_over_hesscale")}
        row["params"] = json.dumps(rec.get("params", {}), sort_keys=True)
        rows.append(row)
    df = pd.DataFrame(rows, columns=[c for c in CELL_COLUMNS if c != "l1_over_hesscale"])
    numeric = [
        c
        for c in CELL_COLUMNS
        if c
        not in (
            "contended",
            "cell_id",
            "task",
            "estimator",
            "label",
            "params",
            "status",
            "message",
            "l1_over_hesscale",
            "dtype",
            "stochastic",
            "sample_param",
            "default_params",
        )
    ]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    ref = df[(df["estimator"] == "hesscale") & (df["status"] == "ok")]
    ref = ref.drop_duplicates(["task", "seed"]).set_index(["task", "seed"])["l1"]
    keys = pd.MultiIndex.from_frame(df[["task", "seed"]])
    with np.errstate(divide="ignore", invalid="ignore"):  # HesScale's L1 can be 0 in float64
        ratio = df["l1"].to_numpy() / ref.reindex(keys).to_numpy()
    df.insert(11, "l1_over_hesscale", ratio)
    return df.sort_values(["task", "seed", "label"], kind="stable").reset_index(drop=True)


def load_parts(run_dir: str | Path) -> pd.DataFrame:
    """One row per cell and parameter or layer: ``level``, ``name``, ``l1``, ``rel_l1``, ..."""
    rows = []
    for rec in read_records(Path(run_dir)).values():
        for part in rec.get("parts") or []:
            rows.append(
                {
                    "cell_id": rec["cell_id"],
                    "task": rec.get("task"),
                    "label": rec.get("label"),
                    "seed": rec.get("seed"),
                    **part,
                }
            )
    cols = ["cell_id", "task", "label", "seed", "level", "name", "l1", "abs_truth", "rel_l1"]
    return pd.DataFrame(rows, columns=cols)
