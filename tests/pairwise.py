"""Covering arrays: a small set of rows that contains every pair of factor values.

``covering({"case": cases, "loss": losses, ...})`` returns rows (dicts of factor ->
value) such that every *valid* combination of ``strength`` factor values (default:
every pair) appears in at least one row; with ``strength=2`` every single value
appears too. A combination counts as valid when at least one valid full row contains
it, so a ``valid`` predicate (e.g. "this case only fits MSE") removes impossible rows
without leaving anything uncoverable.

The construction is the greedy one of AETG (Cohen et al., 1997) over the enumerated
Cartesian product: repeatedly take the row that covers the most combinations not yet
covered, the first such row in product order on ties. It is deterministic, and the
products here are small (at most a few thousand rows). :func:`uncovered` re-checks a
set of rows independently of the construction; ``tests/test_pairwise.py`` uses it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Row = dict[str, Any]


def _tuples(idx: Sequence[int], strength: int):
    """Every ``strength``-subset of the row's factors, as (factor positions, value indices)."""
    for cols in itertools.combinations(range(len(idx)), strength):
        yield cols, tuple(idx[c] for c in cols)


def _valid_rows(
    factors: Mapping[str, Sequence[Any]], valid: Callable[[Row], bool] | None
) -> list[tuple[int, ...]]:
    names = list(factors)
    rows = []
    for idx in itertools.product(*(range(len(factors[n])) for n in names)):
        row = {n: factors[n][i] for n, i in zip(names, idx, strict=True)}
        if valid is None or valid(row):
            rows.append(idx)
    return rows


def covering(
    factors: Mapping[str, Sequence[Any]],
    *,
    valid: Callable[[Row], bool] | None = None,
    strength: int = 2,
) -> list[Row]:
    """Rows covering every valid ``strength``-way combination of factor values."""
    names = list(factors)
    assert names, "no factor"
    assert all(len(factors[n]) for n in names), "every factor needs a value"
    strength = min(strength, len(names))
    candidates = _valid_rows(factors, valid)
    assert candidates, "no valid row"
    tuples = [list(_tuples(idx, strength)) for idx in candidates]
    holders: dict[tuple, list[int]] = {}  # combination -> the candidate rows containing it
    for r, ts in enumerate(tuples):
        for t in ts:
            holders.setdefault(t, []).append(r)
    score = [len(ts) for ts in tuples]  # combinations each candidate would newly cover
    todo = set(holders)
    chosen: list[tuple[int, ...]] = []
    while todo:
        best = max(range(len(candidates)), key=score.__getitem__)  # first maximum
        chosen.append(candidates[best])
        for t in tuples[best]:
            if t in todo:
                todo.discard(t)
                for r in holders[t]:
                    score[r] -= 1
    return [{n: factors[n][i] for n, i in zip(names, idx, strict=True)} for idx in chosen]


def uncovered(
    rows: Sequence[Row],
    factors: Mapping[str, Sequence[Any]],
    *,
    valid: Callable[[Row], bool] | None = None,
    strength: int = 2,
) -> list[dict[str, Any]]:
    """The valid ``strength``-way combinations that no row contains (empty when covering)."""
    names = list(factors)
    strength = min(strength, len(names))

    def index(row: Row) -> tuple[int, ...]:
        # by identity first (values need not be hashable or comparable), then by equality
        out = []
        for n in names:
            vals = factors[n]
            hit = next((i for i, v in enumerate(vals) if v is row[n]), None)
            if hit is None:
                hit = next(i for i, v in enumerate(vals) if v == row[n])
            out.append(hit)
        return tuple(out)

    have = {t for row in rows for t in _tuples(index(row), strength)}
    need = {t for idx in _valid_rows(factors, valid) for t in _tuples(idx, strength)}
    return [
        {names[c]: factors[names[c]][i] for c, i in zip(cols, vals, strict=True)}
        for cols, vals in sorted(need - have)
    ]
