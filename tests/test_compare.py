"""``hessbench compare`` on synthetic cell records: noise is not a regression.

No timing is measured here: the records carry made-up timings with the spread
that real runs on a loaded machine show, so the decisions are deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hessbench.cli import app
from hessbench.report.compare import compare, relative_spread
from hessbench.store.records import CellStore, frame

# label -> (true CPU-time ratio to a gradient, memory ratio)
LABELS = {
    "hesscale": (1.9, 2.0),
    "bl89": (1.7, 1.8),
    "ggn_mc[num_samples=1]": (2.2, 2.1),
    "hutchinson[num_samples=1]": (2.6, 2.4),
    "zero": (0.05, 0.1),
    "exact": (40.0, 9.0),
}
TASKS = ["mlp", "cnn", "wide"]
SEEDS = [0, 1, 2]


def records(run: int, slower: dict[str, float] | None = None, repeats: int = 20) -> list[dict]:
    """One run's cell records: per cell, timings that wander by ~15 % from run to run,
    with within-run IQRs of 10-30 % (what same-commit runs on a shared machine show)."""
    rng = np.random.default_rng(1000 + run)
    slower = slower or {}
    out = []
    for task in TASKS:
        for seed in SEEDS:
            for i, (label, (ratio, mem)) in enumerate(LABELS.items()):
                name = label.split("[")[0]
                grad = 1e-3
                r = ratio * slower.get(label, 1.0) * math.exp(rng.normal(0, 0.15))
                iqr = rng.uniform(0.1, 0.3)
                out.append(
                    {
                        "cell_id": f"{task}/{label}/seed={seed}",
                        "task": task,
                        "estimator": name,
                        "label": label,
                        "params": {},
                        "seed": seed,
                        "status": "ok",
                        "message": "",
                        # deterministic: the same in every run
                        "l1": 0.1 * (i + 1) + seed,
                        "abs_truth": 10.0 + seed,
                        "rel_l1": (0.1 * (i + 1) + seed) / (10.0 + seed),
                        "cosine": 0.9 - 0.01 * i,
                        "spearman": 0.8 - 0.01 * i,
                        "sign_agreement": 0.95,
                        "time_s": r * grad,
                        "time_iqr_s": iqr * r * grad,
                        "cpu_time_s": r * grad,
                        "grad_time_s": grad,
                        "grad_time_iqr_s": iqr * grad,
                        "grad_cpu_time_s": grad,
                        "cpu_time_ratio": r,
                        "time_ratio": r,
                        "repeats": repeats,
                        "memory_ratio": mem,
                    }
                )
    return out


def write_run(path: Path, recs: list[dict]) -> Path:
    store = CellStore(path)
    for rec in recs:
        store.append(rec)
    store.close()
    return path


def cli(*args: object):
    return CliRunner().invoke(app, ["compare", *map(str, args)])


def test_two_runs_of_the_same_code_compare_clean(tmp_path):
    a, b = frame(records(1)), frame(records(2))
    # cell by cell the timings differ by more than the factor (the old verdict)
    ratio = b["cpu_time_ratio"] / a["cpu_time_ratio"]
    assert ((ratio > 1.2) | (ratio < 1 / 1.2)).sum() >= 10
    res = compare(a, b)
    assert res.changes == []
    assert {c.time_verdict for c in res.cost} == {"same"}
    assert {c.memory_verdict for c in res.cost} == {"same"}
    assert res.worse == 0
    assert res.count("better") == 0
    result = cli(write_run(tmp_path / "a", records(1)), write_run(tmp_path / "b", records(2)))
    assert result.exit_code == 0, result.output
    assert "54 cells in both runs: 0 worse, 0 better" in " ".join(result.output.split())


def test_a_twice_slower_estimator_is_caught(tmp_path):
    a, b = frame(records(1)), frame(records(2, slower={"bl89": 2.0}))
    res = compare(a, b)
    verdicts = {c.label: c.time_verdict for c in res.cost}
    assert verdicts.pop("bl89") == "worse"
    assert set(verdicts.values()) == {"same"}
    assert res.worse == 1
    (bl89,) = [c for c in res.cost if c.label == "bl89"]
    assert bl89.cells == bl89.timed == 9
    assert 1.6 < bl89.time_ratio < 2.5
    # and the other way round it got faster
    back = compare(b, a)
    assert {c.label: c.time_verdict for c in back.cost}["bl89"] == "better"
    assert back.worse == 0
    ra = write_run(tmp_path / "a", records(1))
    rb = write_run(tmp_path / "b", records(2, slower={"bl89": 2.0}))
    result = cli(ra, rb)
    assert result.exit_code == 1, result.output
    assert "1 worse, 0 better" in " ".join(result.output.split())
    assert cli(rb, ra).exit_code == 0


def test_a_slowdown_within_the_noise_is_not_a_regression():
    def widened(recs: list[dict], by: float) -> list[dict]:
        return [dict(r, time_iqr_s=by * r["time_iqr_s"]) for r in recs]

    # 1.5x is beyond the factor, but these runs are noisier than that
    a, b = widened(records(1), 4), widened(records(1, slower={"bl89": 1.5}), 4)
    (bl89,) = [c for c in compare(frame(a), frame(b)).cost if c.label == "bl89"]
    assert bl89.time_ratio == pytest.approx(1.5)
    assert bl89.time_verdict == "same"
    # the same slowdown in quiet runs is caught
    a, b = widened(records(1), 0.1), widened(records(1, slower={"bl89": 1.5}), 0.1)
    (bl89,) = [c for c in compare(frame(a), frame(b)).cost if c.label == "bl89"]
    assert bl89.time_verdict == "worse"


def test_cells_without_a_spread_are_not_judged_on_time(tmp_path):
    # --quick runs time once: no IQR, so no verdict, however large the change
    a = frame(records(1, repeats=1))
    b = frame(records(2, slower={"bl89": 3.0}, repeats=1))
    res = compare(a, b)
    assert {c.time_verdict for c in res.cost} == {"not judged"}
    assert res.worse == 0
    assert math.isnan(relative_spread(a.iloc[0]))
    ra = write_run(tmp_path / "a", records(1, repeats=1))
    rb = write_run(tmp_path / "b", records(2, slower={"bl89": 3.0}, repeats=1))
    result = cli(ra, rb)
    assert result.exit_code == 0, result.output
    assert "6 estimator labels not judged on time" in result.output


def test_accuracy_changes_are_exact(tmp_path):
    base = records(1)
    target = "cnn/hesscale/seed=1"

    def doctored(scale: float) -> list[dict]:
        return [
            dict(r, rel_l1=r["rel_l1"] * scale) if r["cell_id"] == target else r for r in records(2)
        ]

    # rounding-level differences are not changes
    assert compare(frame(base), frame(doctored(1 + 1e-12))).accuracy == []
    # anything beyond is, far below the timing factor
    res = compare(frame(base), frame(doctored(1 + 1e-6)))
    assert [(c.cell_id, c.what, c.verdict) for c in res.accuracy] == [(target, "rel_l1", "worse")]
    assert res.worse == 1
    res = compare(frame(base), frame(doctored(1 - 1e-6)))
    assert [c.verdict for c in res.accuracy] == ["better"]
    # a lower cosine is worse
    recs = [dict(r, cosine=0.5) if r["cell_id"] == target else r for r in records(2)]
    assert [(c.what, c.verdict) for c in compare(frame(base), frame(recs)).accuracy] == [
        ("cosine", "worse")
    ]
    ra, rb = write_run(tmp_path / "a", base), write_run(tmp_path / "b", doctored(1 + 1e-6))
    result = cli(ra, rb)
    assert result.exit_code == 1, result.output
    assert target in result.output
    assert "rel_l1" in result.output
    # --tol widens what counts as rounding
    assert cli(ra, rb, "--tol", "1e-5").exit_code == 0
    assert cli(ra, rb, "--tol", "-1").exit_code == 2


def test_rounding_level_errors_of_exact_estimators_are_not_compared():
    recs = [dict(r, rel_l1=3e-8) if r["label"] == "exact" else r for r in records(1)]
    recs_b = [dict(r, rel_l1=5e-8) if r["label"] == "exact" else r for r in records(2)]
    assert compare(frame(recs), frame(recs_b)).accuracy == []


@pytest.mark.parametrize("factor", ["1", "0.5"])
def test_factor_must_be_above_one(tmp_path, factor):
    run = write_run(tmp_path / "a", records(1))
    result = cli(run, run, "--factor", factor)
    assert result.exit_code == 2
    assert "--factor must be above 1" in result.output
