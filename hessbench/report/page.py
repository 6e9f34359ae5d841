"""The report of a run as files: tables, figures, ``report.md`` and ``index.html``.

:func:`render_report` returns every file's bytes keyed by its path in the
report folder; it reads nothing and writes nothing. The page text depends
only on the results, the run's metadata and the command given, never on the
time or the machine making the report.
"""

from __future__ import annotations

import contextlib
import html
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hessbench.errors import StorageError
from hessbench.report.budget import budget_table
from hessbench.report.figures import FigureResult, figure_bytes, make_figures
from hessbench.report.results import RESULT_FILES, results_files
from hessbench.report.tables import Table, accuracy_table, cost_table, layer_table

__all__ = [
    "OUTPUTS",
    "Report",
    "default_output",
    "figure_sections",
    "hessbench_provenance",
    "render_report",
    "table_links",
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


def _markdown(df, meta, command, tables, figures) -> str:
    suite = meta.get("suite", "?")
    out = [f"# hessbench report: {suite}", ""]
    if desc := _description(meta):
        out += [f"> {desc}", ""]
    out += [f"Made by `{command}`. {_status_line(df)}.", ""]
    runs = _run_commands(meta)
    if runs:
        out += ["The run: " + "; ".join(f"`{c}`" for c in runs) + ".", ""]
    out += ["## Environment", "", "| | |", "|---|---|"]
    out += [f"| {k} | {val.replace('|', '/')} |" for k, val in _environment(meta)] + [""]
    out += ["## Figures", "", *figure_sections(figures), "## Tables", ""]
    for t in tables:
        out += [f"### {_TABLE_TITLES[t.name]}", "", t.markdown(), table_links(t.name), ""]
    return "\n".join(out)


def figure_sections(figures: list[FigureResult]) -> list[str]:
    """Markdown lines: per figure a numbered heading, the caption, the PNG and links.

    A figure that was not drawn gets its reason instead.
    """
    out: list[str] = []
    for i, f in enumerate(figures, 1):
        out += [f"### {i}. {f.title}", ""]
        if f.figure is None:
            out += [f"*Not drawn: {f.skipped}.*", ""]
            continue
        out += [f.caption, "", f"![{f.title}](figures/{f.name}.png)", ""]
        out += [f"[PDF](figures/{f.name}.pdf) · [PNG](figures/{f.name}.png)", ""]
    return out


def table_links(name: str) -> str:
    """Markdown links to a table's CSV, LaTeX and Markdown files."""
    return " · ".join(f"[{x.upper()}](tables/{name}.{x})" for x in ("csv", "tex", "md"))


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


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:13px;margin:0.5em 0}
th,td{padding:2px 8px;border-bottom:1px solid #ddd}th{text-align:left;background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;height:auto}
.caption,.notes,.skipped{font-size:13px;color:#555}code{background:#f4f4f4;padding:0 3px}"""


def _html(df, meta, command, tables, figures) -> str:
    e = html.escape
    suite = e(str(meta.get("suite", "?")))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>hessbench report: {suite}</title><style>{_CSS}</style></head><body>",
        f"<h1>hessbench report: {suite}</h1>",
    ]
    if desc := _description(meta):
        out.append(f"<blockquote>{e(desc)}</blockquote>")
    out.append(f"<p>Made by <code>{e(command)}</code>. {e(_status_line(df))}.</p>")
    if runs := _run_commands(meta):
        out.append("<p>The run: " + "; ".join(f"<code>{e(c)}</code>" for c in runs) + ".</p>")
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _environment(meta))
    out += ["<h2>Environment</h2>", f"<table>{rows}</table>", "<h2>Figures</h2>"]
    for i, f in enumerate(figures, 1):
        out.append(f'<h3 id="{f.name}">{i}. {e(f.title)}</h3>')
        if f.figure is None:
            out.append(f'<p class="skipped"><em>Not drawn: {e(f.skipped)}.</em></p>')
            continue
        src = f"figures/{f.name}"
        out += [
            f'<p class="caption">{e(f.caption)}</p>',
            f'<p><a href="{src}.pdf"><img src="{src}.png" alt="{e(f.title)}"></a></p>',
        ]
    out.append("<h2>Tables</h2>")
    for t in tables:
        links = " · ".join(f'<a href="tables/{t.name}.{f}">{f.upper()}</a>' for f in TABLE_FORMATS)
        out += [f'<h3 id="{t.name}">{_TABLE_TITLES[t.name]}</h3>', t.html(), f"<p>{links}</p>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


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
    files["report.md"] = _markdown(df, meta, command, tables, figures).encode()
    files["index.html"] = _html(df, meta, command, tables, figures).encode()
    assert set(files) <= set(OUTPUTS), sorted(set(files) - set(OUTPUTS))
    return Report(files, tables, figures)
