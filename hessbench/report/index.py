"""The index of a folder of reports: ``DIR/index.html`` linking every report in it.

``hessbench report --index DIR`` writes it (:func:`write_index`); each report page
links up to it (``../index.html``). A report is a sub-folder with an
``index.html`` written by :mod:`hessbench.report.document` (its title, kind and
description are read from its meta tags) or, for a report written before that,
a ``report.md`` (its first heading and quoted description). Reports are grouped
by kind (accuracy, train, rl) and named in natural order; the page depends only
on what the reports say, so the same reports give the same bytes.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from hessbench.errors import HessbenchError
from hessbench.report.document import Block, Document, Section, text
from hessbench.report.page import write_files
from hessbench.report.style import natural_key

__all__ = ["ReportEntry", "index_document", "report_entries", "write_index"]

_KINDS = {
    "accuracy": "Accuracy of Hessian-diagonal estimators",
    "train": "Optimizer benchmarks (training)",
    "rl": "Optimizer benchmarks (reinforcement learning)",
    "cost": "Cost of the estimators and their peers",
}


@dataclass(frozen=True)
class ReportEntry:
    """One report of the folder: its sub-folder, page, title, kind and description."""

    name: str
    page: str  # relative to the index: <name>/index.html, or <name>/report.md
    title: str
    kind: str
    description: str


def _meta(page: str, name: str) -> str:
    m = re.search(rf'<meta name="{name}" content="([^"]*)">', page)
    return html.unescape(m.group(1)) if m else ""


def _entry(folder: Path) -> ReportEntry | None:
    page, md = folder / "index.html", folder / "report.md"
    if page.is_file():
        content = page.read_text(encoding="utf-8")
        title = re.search(r"<title>(.*?)</title>", content, re.S)
        return ReportEntry(
            folder.name,
            f"{folder.name}/index.html",
            html.unescape(title.group(1)) if title else folder.name,
            _meta(content, "hessbench-kind") or "accuracy",
            _meta(content, "description"),
        )
    if md.is_file():
        lines = md.read_text(encoding="utf-8").splitlines()
        title = next((x[2:] for x in lines if x.startswith("# ")), folder.name)
        desc = next((x[2:] for x in lines if x.startswith("> ")), "")
        kind = (
            "rl"
            if "RL report" in title
            else "train"
            if "training report" in title
            else "cost"
            if title.startswith("Estimator cost")  # benchmarks/cost_ratios.py
            else ""
        )
        return ReportEntry(folder.name, f"{folder.name}/report.md", title, kind or "accuracy", desc)
    return None


def report_entries(folder: Path) -> list[ReportEntry]:
    """Every report in ``folder`` (its sub-folders with a page), by kind then name."""
    found = [e for d in sorted(Path(folder).iterdir()) if d.is_dir() and (e := _entry(d))]
    order = list(_KINDS)
    return sorted(
        found,
        key=lambda e: (
            order.index(e.kind) if e.kind in order else len(order),
            e.kind,
            natural_key(e.name),
        ),
    )


def _listing(entries: list[ReportEntry]) -> Block:
    e = html.escape
    md = ["| report | title | what it is |", "|---|---|---|"]
    rows = []
    for r in entries:
        md.append(f"| [{r.name}]({r.page}) | {r.title} | {r.description.replace('|', '/')} |")
        rows.append(
            f'<tr><td class="key"><a href="{e(r.page)}">{e(r.name)}</a></td>'
            f"<td>{e(r.title)}</td><td>{e(r.description)}</td></tr>"
        )
    head = "<tr><th>report</th><th>title</th><th>what it is</th></tr>"
    return Block(
        "\n".join(md),
        f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody>'
        "</table></div>",
    )


def index_document(entries: list[ReportEntry], title: str = "hessbench reports") -> Document:
    """The index page of ``entries``: a section per kind, a row per report."""
    kinds = list(dict.fromkeys(r.kind for r in entries))  # entries come sorted by kind
    return Document(
        title=title,
        kind="index",
        intro=[
            text(
                f"{len(entries)} reports, each written by `hessbench report`; this page by "
                "`hessbench report --index DIR`. Each report's page links back here."
            )
        ],
        sections=[
            Section(_KINDS.get(k, k), [_listing([r for r in entries if r.kind == k])])
            for k in kinds
        ],
        up=None,
    )


def write_index(folder: str | Path) -> tuple[Path, int]:
    """Write ``folder/index.html`` listing the reports in ``folder``; return it and their count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HessbenchError(f"{folder}: not a folder")
    entries = report_entries(folder)
    if not entries:
        raise HessbenchError(
            f"{folder}: no report folders in it (none has index.html or report.md)"
        )
    write_files(folder, {"index.html": index_document(entries).html().encode()})
    return folder / "index.html", len(entries)
