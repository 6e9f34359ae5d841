"""The :class:`Table` type: CSV data, display rows with footnote marks, and renderers."""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["Table", "fmt", "missing"]

_SUPERSCRIPT = str.maketrans("0123456789,", "⁰¹²³⁴⁵⁶⁷⁸⁹˒")
_LATEX = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\^{}", "–": "--"}
_LATEX |= {
    "\\": r"\textbackslash{}",
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def _latex(text: str) -> str:
    return "".join(_LATEX.get(c, c) for c in text)


@dataclass
class Table:
    """A table: CSV data, display rows with footnote marks, and the footnotes."""

    name: str
    title: str
    caption: str
    data: pd.DataFrame
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    marks: list[list[tuple[int, ...]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys: int = 2  # leading text columns (task, estimator)

    def csv(self) -> str:
        """Full-precision CSV (shortest round-trip floats; ``-`` where there is no value)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.data.columns)
        for row in self.data.itertuples(index=False):
            w.writerow(["-" if missing(v) else repr(float(v)) if _isfloat(v) else v for v in row])
        return buf.getvalue()

    def _cells(self, mark) -> Iterator[list[str]]:
        for row, marks in zip(self.rows, self.marks, strict=True):
            yield [mark(text, m) for text, m in zip(row, marks, strict=True)]

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table, footnotes as a numbered list."""
        align = ["---"] * self.keys + ["---:"] * (len(self.header) - self.keys)
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(align) + "|"]

        def mark(text: str, m: tuple[int, ...]) -> str:
            sup = ",".join(map(str, m)).translate(_SUPERSCRIPT)
            return (text + sup).replace("|", r"\|")

        lines += ["| " + " | ".join(cells) + " |" for cells in self._cells(mark)]
        text = "\n".join(lines) + "\n"
        if self.caption:
            text += f"\n{self.caption}\n"
        if self.notes:
            text += "\n" + "".join(f"{i}. {_md(n)}\n" for i, n in enumerate(self.notes, 1))
        return text

    def latex(self) -> str:
        """A booktabs ``tabular`` (needs the booktabs package), footnotes below it."""
        spec = "l" * self.keys + "r" * (len(self.header) - self.keys)
        out = [
            f"% hessbench report: {self.title}. Needs \\usepackage{{booktabs}}.",
            f"\\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(_latex(h) for h in self.header) + r" \\",
            r"\midrule",
        ]

        def mark(text: str, m: tuple[int, ...]) -> str:
            text = "--" if text == "-" else _latex(text)
            return text + (f"\\textsuperscript{{{','.join(map(str, m))}}}" if m else "")

        previous = None
        for cells in self._cells(mark):
            if previous is not None and cells[0] != previous:
                out.append(r"\midrule")
            shown = cells if cells[0] != previous else ["", *cells[1:]]
            previous = cells[0]
            out.append(" & ".join(shown) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        if self.caption or self.notes:
            out.append(r"\par\smallskip{\footnotesize")
            if self.caption:
                out.append(_latex(self.caption) + r"\par")
            out += [
                f"\\textsuperscript{{{i}}} {_latex(n)}\\par" for i, n in enumerate(self.notes, 1)
            ]
            out.append("}")
        return "\n".join(out) + "\n"

    def html(self) -> str:
        """An HTML ``<table>`` followed by the caption and footnotes."""

        def mark(text: str, m: tuple[int, ...]) -> str:
            sup = f"<sup>{','.join(map(str, m))}</sup>" if m else ""
            return html.escape(text) + sup

        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="{"key" if i < self.keys else "num"}">{c}</td>'
                for i, c in enumerate(cells)
            )
            + "</tr>\n"
            for cells in self._cells(mark)
        )
        out = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"
        if self.caption:
            out += f'<p class="caption">{html.escape(self.caption)}</p>\n'
        if self.notes:
            items = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
            out += f'<ol class="notes">{items}</ol>\n'
        return out


def _md(text: str) -> str:
    for c in "\\`*_<>[]|":
        text = text.replace(c, "\\" + c)
    return text


def _isfloat(v: object) -> bool:
    return isinstance(v, float)


def missing(v: object) -> bool:
    """Whether ``v`` is a missing value (None or NaN)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt(v: float, spec: str = ".3g") -> str:
    """``v`` in format ``spec``, or ``-`` when missing."""
    return "-" if missing(v) else format(v, spec)
