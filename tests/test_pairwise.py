"""The covering-array helper that the test parametrizations rely on."""

from __future__ import annotations

import itertools
import math

import pytest
from conftest import CASES, LOSSES, covering_variants
from pairwise import covering, uncovered

FACTORS = {
    "a": ["a0", "a1", "a2", "a3", "a4"],
    "b": [{"x": 1}, {"x": 2}, {"x": 3}],  # unhashable values
    "c": [0, 1],
    "d": ["d0", "d1", "d2"],
}


def _no_a0_with_d2(row) -> bool:
    return not (row["a"] == "a0" and row["d"] == "d2")


@pytest.mark.parametrize("strength", [1, 2, 3])
@pytest.mark.parametrize("valid", [None, _no_a0_with_d2])
def test_covering_covers_every_valid_combination(strength, valid):
    rows = covering(FACTORS, valid=valid, strength=strength)
    assert uncovered(rows, FACTORS, valid=valid, strength=strength) == []
    assert all(valid is None or valid(r) for r in rows)
    assert len(rows) < math.prod(len(v) for v in FACTORS.values())  # smaller than the product
    # ... and, without constraints, at least the product of the `strength` largest factors
    if valid is None:
        sizes = sorted((len(v) for v in FACTORS.values()), reverse=True)
        assert len(rows) >= math.prod(sizes[:strength])


def test_uncovered_sees_a_missing_pair():
    rows = covering(FACTORS)
    for i in range(len(rows)):
        missing = uncovered(rows[:i] + rows[i + 1 :], FACTORS)
        # greedy rows each add a new pair when chosen; dropping the last one always loses one
        if i == len(rows) - 1:
            assert missing
        for combo in missing:
            assert all(combo[k] == rows[i][k] for k in combo)


def test_full_product_where_there_are_two_factors():
    two = {"a": FACTORS["a"], "d": FACTORS["d"]}
    rows = covering(two)
    got = sorted((r["a"], r["d"]) for r in rows)
    assert got == sorted(itertools.product(two["a"], two["d"]))


def test_covering_variants_hit_every_case_loss_and_extra_value():
    params = covering_variants(CASES, method={"m1": 1, "m2": 2, "m3": 3})
    seen = [(p.values[0], p.values[1]) for p in params]
    ids = [p.id for p in params]
    assert len(set(ids)) == len(ids)
    pairs = {(v.case.name, v.loss) for v, _ in seen}
    assert pairs == {(c.name, loss) for c in CASES for loss in LOSSES if loss in c.losses}
    assert {(v.case.name, m) for v, m in seen} == {(c.name, m) for c in CASES for m in (1, 2, 3)}
    for a, b in [("reduction", "n"), ("loss", "reduction"), ("loss", "n")]:
        got = {(getattr(v, a), getattr(v, b)) for v, _ in seen}
        assert len(got) == 4, (a, b, got)
