"""The report of a run as files: tables, figures, ``report.md`` and ``index.html``.

:func:`render_report` returns every file's bytes keyed by its path in the
report folder; it reads nothing and writes nothing. The page text depends
only on the results, the run's metadata and the command given, never on the
time or the machine making the report.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hessbench.errors import StorageError
from hessbench.report.budget import budget_table
from hessbench.report.document import (
    Block,
    Document,
    Section,
    figures_section,
    pairs,
    tables_section,
    text,
)
from hessbench.report.figures import FigureResult, figure_bytes, make_figures
from hessbench.report.results import RESULT_FILES, results_files
from hessbench.report.tables import Table, accuracy_table, cost_table, layer_table

__all__ = [
    "OUTPUTS",
    "Report",
    "default_output",
    "hessbench_provenance",
    "render_report",
    "report_document",
    "write_files",
]

TABLE_FORMATS = ("md", "csv", "tex")
FIGURE_FORMATS = ("png", "pdf")
_TABLES = ("accuracy", "cost", "layers", "matvec_budget")
_FIGURES = (
    "l1_over_hesscale",
    "layer_error",
    "accuracy_vs_cost",
    "error_vs_samples",
    "error_vs_matvecs",
    "error_vs_matvec_time",
    "cost_vs_params",
    "memory",
    "before_after_training",
)
OUTPUTS = (
    "report.md",
    "index.html",
    *RESULT_FILES,
    *(f"tables/{t}.{f}" for t in _TABLES for f in TABLE_FORMATS),
    *(f"figures/{n}.{f}" for n in _FIGURES for f in FIGURE_FORMATS),
)
"""Every file a report can contain (a figure that does not apply is left out)."""

_TABLE_TITLES = {
    "accuracy": "Accuracy",
    "cost": "Cost",
    "layers": "Accuracy per layer",
    "matvec_budget": "Matrix-free estimators at equal budgets",
}


@dataclass
class Report:
    """A rendered report: files by relative path, and what they were made from."""

    files: dict[str, bytes]
    tables: list[Table]
    figures: list[FigureResult]


def default_output(run_dir: Path) -> Path:
    """``<run_dir>/report``: a report never overwrites the committed ``reports/`` unless asked.

    ``reports/<suite>`` is written only with an explicit ``-o reports/<suite>``.
    """
    return Path(run_dir) / "report"


def _run_commands(meta: dict) -> list[str]:
    out = []
    for s in meta.get("sessions", []):
        argv = list(s.get("command") or [])
        if argv:
            argv[0] = Path(argv[0]).name
            if argv[0] == "__main__.py":
                argv[0] = "hessbench"
            cmd = shlex.join(argv)
            if cmd not in out:
                out.append(cmd)
    return out


def hessbench_provenance(meta: dict) -> str:
    """Which hessbench made a run: a checkout's version and commit, or the installed version.

    Metadata written before ``hessbench_source`` existed shows its commit.
    """
    version = meta.get("hessbench_version") or "?"
    if meta.get("hessbench_source") == "installed":
        dist = meta.get("hessbench_distribution")
        return f"{version}, installed package" + (f" (distribution {dist})" if dist else "")
    commit = str(meta.get("git_commit") or "?")[:12]
    dirty = " with uncommitted changes" if meta.get("git_dirty") else ""
    return f"{version}, git commit {commit}{dirty}"


def _environment(meta: dict) -> list[tuple[str, str]]:
    g = meta.get

    def v(key: str) -> str:
        return "?" if g(key) in (None, "") else str(g(key))

    sessions = meta.get("sessions") or [{}]
    return [
        ("suite file", f"{v('suite_file')} (SHA-256 {str(g('suite_hash') or '?')[:12]})"),
        ("hessbench", hessbench_provenance(meta)),
        ("Python, torch, numpy", f"{v('python')}, {v('torch')}, {v('numpy')}"),
        ("platform", v("platform")),
        ("CPU", f"{v('cpu')}, {v('cpu_count')} cores"),
        ("device, threads", f"{v('device')}, {v('threads')} torch thread(s) per worker"),
        ("worker processes", str(sessions[-1].get("jobs", "?"))),
        ("quick run", "yes (first seed, at most 2 batches, no timing repeats)" if g("quick") else "no"),
    ]  # fmt: skip


def _status_line(df: pd.DataFrame) -> str:
    counts = df["status"].value_counts()
    order = ["ok", "unsupported", "error", "timeout", "crashed"]
    order += sorted(set(counts.index) - set(order))
    return f"{len(df)} cells: " + ", ".join(f"{counts[s]} {s}" for s in order if s in counts)


def _description(meta: dict) -> str:
    import yaml

    try:
        suite = yaml.safe_load(meta.get("suite_text") or "") or {}
    except yaml.YAMLError:
        suite = {}
    return " ".join(str(suite.get("description", "")).split()) if isinstance(suite, dict) else ""


def report_document(df, meta, command, tables, figures) -> Document:
    """The page of an accuracy report (``report.md`` and ``index.html`` are written from it)."""
    intro: list[Block] = [text(f"Made by `{command}`. {_status_line(df)}.")]
    if runs := _run_commands(meta):
        intro.append(text("The run: " + "; ".join(f"`{c}`" for c in runs) + "."))
    return Document(
        title=f"hessbench report: {meta.get('suite', '?')}",
        kind="accuracy",
        description=_description(meta),
        intro=intro,
        sections=[
            Section("Environment", [pairs(_environment(meta))]),
            figures_section(figures),
            tables_section([(_TABLE_TITLES[t.name], t) for t in tables]),
        ],
    )


def write_files(out: Path, files: dict[str, bytes], known: tuple[str, ...] = ()) -> None:
    """Write ``files`` (relative path -> bytes) under ``out``, each through a rename.

    Paths in ``known`` that ``files`` no longer holds are deleted (a figure that
    no longer applies must not linger); other files in ``out`` are left alone.
    """
    for name in known:
        if name not in files and (out / name).exists():
            _fs(lambda name=name: (out / name).unlink(), out / name)
    for name, data in files.items():
        path = out / name
        tmp = path.with_name(f".{path.name}.tmp")

        def write(path: Path = path, tmp: Path = tmp, data: bytes = data) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_bytes(data)
                tmp.replace(path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                raise

        _fs(write, path)


def _fs(action: Callable[[], object], path: Path) -> None:
    """Run ``action``; an OSError (read-only or full disk) becomes ``PATH: cause``."""
    try:
        action()
    except OSError as exc:
        raise StorageError.from_os(exc, path) from None


def render_report(
    df: pd.DataFrame,
    parts: pd.DataFrame,
    meta: dict,
    command: str,
    formats: tuple[str, ...] = FIGURE_FORMATS,
) -> Report:
    """Every file of the report of a run, by path relative to the report folder.

    ``df`` and ``parts`` are :func:`hessbench.store.records.load` and ``load_parts`` of the
    run, ``meta`` its ``metadata.json``, ``command`` the command shown as the maker;
    figures are rendered in ``formats`` (the page links PNG and PDF regardless).
    """
    tables = [accuracy_table(df), cost_table(df), layer_table(df, parts)]
    tables += [t for t in (budget_table(df),) if t is not None]
    figures = make_figures(df, parts)
    files: dict[str, bytes] = {}
    for t in tables:
        files[f"tables/{t.name}.md"] = t.markdown().encode()
        files[f"tables/{t.name}.csv"] = t.csv().encode()
        files[f"tables/{t.name}.tex"] = t.latex().encode()
    for f in figures:
        if f.figure is not None:
            for fmt in formats:
                files[f"figures/{f.name}.{fmt}"] = figure_bytes(f.figure, fmt)
    files.update(results_files(df, parts, meta))
    page = report_document(df, meta, command, tables, figures)
    files["report.md"] = page.markdown().encode()
    files["index.html"] = page.html().encode()
    assert set(files) <= set(OUTPUTS), sorted(set(files) - set(OUTPUTS))
    return Report(files, tables, figures)
