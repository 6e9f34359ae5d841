"""The tidy per-cell table a report carries, and reading it back in place of a run folder.

A report folder holds ``results.csv`` (one row per cell, every column of the
record table the report was made from: task, estimator, label, params, seed,
status, message, l1, rel_l1, l1_over_hesscale, times, memory, ...),
``results_parts.csv`` (one row per cell and parameter or layer; left out when
it has more than :data:`MAX_PART_ROWS` rows) and ``results_meta.json`` (the
run's metadata and the column types). ``hessbench report`` accepts such a folder,
or the CSV's path, instead of a run folder and writes the same tables and figures.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd

from hessbench.errors import HessbenchError

__all__ = ["MAX_PART_ROWS", "RESULT_FILES", "is_results", "read_results", "results_files"]

MAX_PART_ROWS = 200_000
RESULT_FILES = ("results.csv", "results_parts.csv", "results_meta.json")


def _csv(df: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.17g", lineterminator="\n")
    return buf.getvalue().encode()


def results_files(df: pd.DataFrame, parts: pd.DataFrame, meta: dict) -> dict[str, bytes]:
    """``results.csv``, ``results_parts.csv`` (if small) and ``results_meta.json``."""
    files = {"results.csv": _csv(df)}
    small = len(parts) <= MAX_PART_ROWS
    if small:
        files["results_parts.csv"] = _csv(parts)
    info = {
        "metadata": meta,
        "columns": [[c, str(t)] for c, t in df.dtypes.items()],
        "part_columns": [[c, str(t)] for c, t in parts.dtypes.items()],
        "parts": "results_parts.csv" if small else f"left out: {len(parts)} rows",
    }
    files["results_meta.json"] = (
        json.dumps(info, indent=1, sort_keys=True, default=str) + "\n"
    ).encode()
    return files


def is_results(path: Path) -> bool:
    """Whether ``path`` is a ``results.csv`` or a folder holding one (and no run records)."""
    if path.is_file():
        return path.suffix == ".csv"
    return (path / "results.csv").is_file() and not (path / "metadata.json").is_file()


def _cell(v: object) -> object:
    """A value of an object column as the record table holds it (None, bool or text)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return {"True": True, "False": False}.get(v, v) if isinstance(v, str) else v


def _typed(df: pd.DataFrame, columns: list[list[str]]) -> pd.DataFrame:
    for col, dtype in columns:
        if col not in df:
            df[col] = pd.Series(dtype=object)
        if dtype == "object":
            df[col] = df[col].astype(object).map(_cell)
        elif dtype == "bool":
            df[col] = df[col].map({"True": True, "False": False}).astype(bool)
        else:
            df[col] = df[col].astype(dtype)
    return df[[c for c, _ in columns]]


def read_results(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The cell table, the per-part table (empty when left out) and the run's metadata.

    Raises:
        HessbenchError: no ``results.csv`` there, or no ``results_meta.json`` beside it.
    """
    csv = path if path.is_file() else path / "results.csv"
    info_path = csv.with_name("results_meta.json")
    if not csv.is_file() or not info_path.is_file():
        raise HessbenchError(f"{path}: no results.csv with results_meta.json beside it")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    read = dict(keep_default_na=False, na_values=[""], dtype=str)
    df = _typed(pd.read_csv(csv, **read), info["columns"])
    parts_path = csv.with_name("results_parts.csv")
    cols = info["part_columns"]
    parts = (
        _typed(pd.read_csv(parts_path, **read), cols)
        if parts_path.is_file()
        else pd.DataFrame({c: pd.Series(dtype=t) for c, t in cols})
    )
    return df, parts, info["metadata"]
