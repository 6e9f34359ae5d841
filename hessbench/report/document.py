"""One report page, written as ``report.md`` and as ``index.html``, for every kind of report.

A :class:`Document` is a title, a few introductory blocks and sections of
blocks (text, key-value pairs, figures, tables); the accuracy, train and rl
reports each build one, and this module writes it both ways, so the two pages
say the same and every kind of report gets the same HTML:

- a viewport meta tag (phones lay the page out at their width), and the report's
  kind and description as meta tags, which :mod:`hessbench.report.index` reads;
- a link up to ``../index.html`` (the index of the report folders beside this
  one, ``hessbench report --index DIR``) and a table of contents linking every
  section, figure and table;
- tables in a box that scrolls sideways on its own, numbers never broken across
  lines;
- one figure a row at most its natural width (150 dpi, see
  :mod:`hessbench.report.plotting` for why its text stays readable), with what
  to read from it, its caption and notes below.

Headings get GitHub's anchors (:func:`slug`), so the contents links work in
``report.md`` on GitHub and in ``index.html`` alike. No JavaScript.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from hessbench.report.plotting import FigureResult
from hessbench.report.table import Table

__all__ = [
    "CSS",
    "Block",
    "Document",
    "Section",
    "figure_block",
    "figures_section",
    "pairs",
    "quote",
    "slug",
    "table_block",
    "tables_section",
    "text",
]

CSS = """html{-webkit-text-size-adjust:100%}
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;
color:#222;line-height:1.45;font-size:15px;overflow-wrap:break-word}
h1{font-size:1.6em;margin:0.3em 0}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0}
th,td{padding:2px 8px;border-bottom:1px solid #ddd;vertical-align:top}
th{text-align:left;background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:100%;height:auto}figure{margin:0.5em 0 1.5em 0}
figcaption,.caption,.notes,.skipped{font-size:14px;color:#444}
.read{color:#222;font-weight:600}
code{background:#f4f4f4;padding:0 3px;overflow-wrap:anywhere}
nav{font-size:14px}nav ul{margin:0.3em 0;padding-left:1.3em}
nav li{margin:0.1em 0}.up{margin:0.5em 0}"""


def slug(title: str, taken: set[str] | None = None) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.

    With ``taken``, a repeated anchor gets ``-1``, ``-2``, ... as on GitHub, and is added.
    """
    base = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    anchor, n = base, 0
    while taken is not None and anchor in taken:
        n += 1
        anchor = f"{base}-{n}"
    if taken is not None:
        taken.add(anchor)
    return anchor


def _inline(text: str) -> str:
    """HTML of a text whose backtick spans are code."""
    parts = text.split("`")
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts)
    )


@dataclass(frozen=True)
class Block:
    """A piece of a page as Markdown and as HTML (made by the functions below)."""

    markdown: str
    html: str


def text(words: str) -> Block:
    """A paragraph; backtick spans are code."""
    return Block(words, f"<p>{_inline(words)}</p>")


def quote(text: str) -> Block:
    """A quoted paragraph (the suite's description)."""
    return Block(f"> {text}", f"<blockquote>{html.escape(text)}</blockquote>")


def pairs(rows: list[tuple[str, str]]) -> Block:
    """A two-column table of names and values (the environment)."""
    e = html.escape
    md = ["| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    cells = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    return Block("\n".join(md), f'<div class="scroll"><table>{cells}</table></div>')


def figure_block(f: FigureResult) -> Block:
    """A figure's PNG (linking its PDF), what to read from it, its caption and notes.

    A figure that was not drawn shows the reason instead.
    """
    e = html.escape
    if f.figure is None:
        return Block(
            f"*Not drawn: {f.skipped}.*",
            f'<p class="skipped"><em>Not drawn: {e(f.skipped)}.</em></p>',
        )
    src = f"figures/{f.name}"
    words = " ".join(x for x in (f.caption, *f.notes) if x)
    md = [f"![{f.title}]({src}.png)"]
    md += [f"**What to read:** {f.read}"] if f.read else []
    md += [words, f"[PDF]({src}.pdf) · [PNG]({src}.png)"]
    read = f'<p class="read">What to read: {e(f.read)}</p>' if f.read else ""
    return Block(
        "\n\n".join(x for x in md if x),
        f'<figure><a href="{src}.pdf"><img src="{src}.png" alt="{e(f.title)}"></a>'
        f'<figcaption>{read}<p class="caption">{e(words)}</p>'
        f'<p><a href="{src}.pdf">PDF</a> · <a href="{src}.png">PNG</a></p>'
        "</figcaption></figure>",
    )


def table_block(table: Table, formats: tuple[str, ...] = ("csv", "tex", "md")) -> Block:
    """A table (in its scroll box, with caption and footnotes) and links to its files."""
    md = " · ".join(f"[{x.upper()}](tables/{table.name}.{x})" for x in formats)
    links = " · ".join(f'<a href="tables/{table.name}.{x}">{x.upper()}</a>' for x in formats)
    return Block(table.markdown() + "\n" + md, table.html() + f"<p>{links}</p>")


@dataclass
class Section:
    """A heading (level 2, or 3 for a child) with its blocks and child sections."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)


def figures_section(figures: list[FigureResult], title: str = "Figures") -> Section:
    """A section with a numbered child section per figure."""
    return Section(
        title,
        children=[Section(f"{i}. {f.title}", [figure_block(f)]) for i, f in enumerate(figures, 1)],
    )


def tables_section(tables: list[tuple[str, Table]], title: str = "Tables") -> Section:
    """A section with a child section per ``(heading, table)``."""
    return Section(title, children=[Section(h, [table_block(t)]) for h, t in tables])


@dataclass
class Document:
    """A report page: title, kind, description, introduction and sections."""

    title: str
    kind: str  # accuracy, train or rl
    description: str = ""
    intro: list[Block] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    up: str | None = "../index.html"  # the index of the reports beside this one

    def _anchors(self) -> list[tuple[Section, str, int]]:
        """Every section with its anchor and level, in page order."""
        taken = {slug(self.title)}
        out = []
        for s in self.sections:
            out.append((s, slug(s.title, taken), 2))
            out += [(c, slug(c.title, taken), 3) for c in s.children]
        return out

    def _contents(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        anchors = {id(s): a for s, a, _ in self._anchors()}
        return [
            (s.title, anchors[id(s)], [(c.title, anchors[id(c)]) for c in s.children])
            for s in self.sections
        ]

    def markdown(self) -> str:
        """The page as GitHub Markdown (``report.md``)."""
        out = [f"# {self.title}", ""]
        if self.description:
            out += [quote(self.description).markdown, ""]
        for b in self.intro:
            out += [b.markdown, ""]
        out += ["Contents:", ""]
        for title, anchor, children in self._contents():
            sub = " · ".join(f"[{t}](#{a})" for t, a in children)
            out.append(f"- [{title}](#{anchor})" + (f": {sub}" if sub else ""))
        out.append("")
        for s in self.sections:
            out += [f"## {s.title}", ""]
            for b in s.blocks:
                out += [b.markdown, ""]
            for c in s.children:
                out += [f"### {c.title}", ""]
                for b in c.blocks:
                    out += [b.markdown, ""]
        return "\n".join(out)

    def html(self) -> str:
        """The page as a static HTML page (``index.html``)."""
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="hessbench-kind" content="{e(self.kind)}">',
            f'<meta name="description" content="{e(self.description)}">',
            f"<title>{e(self.title)}</title><style>{CSS}</style></head><body>",
        ]
        if self.up:
            out.append(f'<nav class="up"><a href="{e(self.up)}">↑ All reports</a></nav>')
        out += [f"<h1>{e(self.title)}</h1>"]
        if self.description:
            out.append(quote(self.description).html)
        out += [b.html for b in self.intro]
        out.append('<nav class="toc" aria-label="Contents"><strong>Contents</strong><ul>')
        for title, anchor, children in self._contents():
            sub = "".join(f'<li><a href="#{a}">{e(t)}</a></li>' for t, a in children)
            sub = f"<ul>{sub}</ul>" if sub else ""
            out.append(f'<li><a href="#{anchor}">{e(title)}</a>{sub}</li>')
        out.append("</ul></nav>")
        for s, anchor, level in self._anchors():
            out.append(f'<h{level} id="{anchor}">{e(s.title)}</h{level}>')
            out += [b.html for b in s.blocks]
        out.append("</body></html>")
        return "\n".join(out) + "\n"
