"""The :class:`Table` type: CSV data, display rows with footnote marks, and renderers.

Every rendering (Markdown, LaTeX, HTML) writes the numbers of a column in one
notation (:func:`uniform_columns`): scientific for all of them where the column
spans many decades, positional for all otherwise, each number keeping the
significant digits it was formatted with. The CSV keeps full precision.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["Table", "fmt", "missing", "uniform_columns"]

_NUMBER = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)")
_SEPARATORS = {"", "–", " to ", " (", ")"}  # what may stand between a cell's numbers

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
        rows = uniform_columns(self.rows, self.keys)
        for row, marks in zip(rows, self.marks, strict=True):
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
        out = (
            f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}</tbody>\n</table></div>\n"
        )
        if self.caption:
            out += f'<p class="caption">{html.escape(self.caption)}</p>\n'
        if self.notes:
            items = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
            out += f'<ol class="notes">{items}</ol>\n'
        return out


def _numbers(text: str) -> list[str] | None:
    """The number tokens of a numeric cell (``0.12``, ``1e-05–3e-05``, ``2 (1 to 3)``), else None."""
    parts = _NUMBER.split(text)
    if len(parts) < 3 or any(p not in _SEPARATORS for p in parts[0::2]):
        return None
    return parts[1::2]


def _digits(token: str) -> int:
    """How many significant digits a formatted number shows (at least 1)."""
    mantissa = token.lstrip("+-").split("e")[0].replace(".", "").lstrip("0")
    return max(1, len(mantissa))


def _scientific(values: list[float]) -> bool:
    """Whether a column's numbers span enough decades to be written in scientific notation."""
    v = [abs(x) for x in values if x != 0 and math.isfinite(x)]
    return bool(v) and (min(v) < 1e-3 or max(v) >= 1e5 or max(v) >= 1e4 * min(v))


def _write(token: str, scientific: int) -> str:
    """``token`` in scientific notation with ``scientific`` digits, or positional if 0."""
    v = float(token)
    if v == 0 or not math.isfinite(v) or ("e" not in token and not scientific):
        return token
    if scientific:
        return f"{v:.{scientific - 1}e}"
    decimals = max(0, _digits(token) - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def uniform_columns(rows: list[list[str]], keys: int = 0) -> list[list[str]]:
    """``rows`` with the numbers of each column after the first ``keys`` in one notation.

    A cell is numeric when it is numbers joined by ``–``, `` to `` or parentheses
    (``0.12``, ``0.1–0.5``, ``1.2 (0.3 to 4)``); other cells (``3/3``, ``-``,
    ``lr 0.01 *``) are left as they are. A column is scientific (``2.54e-07``)
    where its nonzero numbers reach below 1e-3 or 1e5 or span four decades, else
    positional (``1760``, ``0.0399``). Scientific numbers get the most significant
    digits any number of the column shows (``%.3g`` drops trailing zeros: ``0.99``
    is ``9.90e-01``); positional ones keep their own.
    """
    out = [list(r) for r in rows]
    width = max((len(r) for r in rows), default=0)
    for c in range(keys, width):
        cells = {i: _numbers(r[c]) for i, r in enumerate(rows) if c < len(r)}
        cells = {i: found for i, found in cells.items() if found}
        tokens = [t for found in cells.values() for t in found]
        # "%.3g" drops trailing zeros ("0.99", "1"): the column's most digits are everyone's
        scientific = max(map(_digits, tokens)) if _scientific(list(map(float, tokens))) else 0
        for i in cells:
            parts = _NUMBER.split(rows[i][c])  # separators at even, numbers at odd places
            out[i][c] = "".join(_write(p, scientific) if j % 2 else p for j, p in enumerate(parts))
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
