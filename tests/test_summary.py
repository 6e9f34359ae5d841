"""The run summary's L1 / HesScale: per task first, a geometric mean across tasks, rounding left out.

Recorded cells only (no estimator runs): the numbers are those of the shipped
smoke suite, where HesScale is exact to rounding on ``mlp_mse`` (MSE through one
sigmoid layer), so a median over all cells used to show ``ggn_mc`` at ``7.6e6`` x
HesScale and ``exact`` at ``0.17``.
"""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from hessbench.kinds.accuracy import summary_table
from hessbench.report import accuracy_table
from hessbench.report.summary import (
    EPS,
    ROUNDING_EPS,
    ratio_summaries,
    rounding_tasks,
    task_ratios,
)
from hessbench.store.records import frame

# (task, label) -> l1 on seed 0, from `hessbench run smoke` (abs_truth: mlp_ce 11.3, mlp_mse 5.96)
SMOKE = {
    ("mlp_ce", "exact"): 2.39e-07,
    ("mlp_ce", "hesscale"): 0.2338,
    ("mlp_ce", "ggn_mc[num_samples=1]"): 11.04,
    ("mlp_ce", "zero"): 11.33,
    ("mlp_mse", "exact"): 1.56e-07,
    ("mlp_mse", "hesscale"): 4.547e-07,  # exact to rounding: rel. L1 7.6e-8 < eps(float32)
    ("mlp_mse", "ggn_mc[num_samples=1]"): 6.951,
    ("mlp_mse", "zero"): 5.961,
}
ABS_TRUTH = {"mlp_ce": 11.33, "mlp_mse": 5.961}


def cell(task: str, label: str, seed: int, l1: float, abs_truth: float, **extra) -> dict:
    return {
        "cell_id": f"{task}/{label}/seed={seed}",
        "task": task,
        "estimator": label.split("[")[0],
        "label": label,
        "params": {},
        "seed": seed,
        "status": "ok",
        "message": "",
        "l1": l1,
        "abs_truth": abs_truth,
        "rel_l1": l1 / abs_truth,
        "cpu_time_ratio": 1.0,
        "memory_ratio": 1.0,
        **extra,
    }


def smoke(**extra) -> list[dict]:
    return [cell(t, lab, 0, l1, ABS_TRUTH[t], **extra) for (t, lab), l1 in SMOKE.items()]


def rendered(table) -> tuple[dict[str, list[str]], str]:
    """label -> the table's cells of that row, as printed; and the caption's words."""
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows, " ".join(text.split())


def test_a_task_where_hesscale_is_exact_to_rounding_does_not_drive_the_summary():
    df = frame(smoke(dtype="float32"))
    rows, text = rendered(summary_table(df, "smoke"))
    # columns after the label: ok, other, rel. L1, L1 / HesScale, range, tasks, time, memory
    assert rows["ggn_mc[num_samples=1]"][3] == f"{11.04 / 0.2338:.3g}"  # 47.2, not 7.6e6
    assert rows["exact"][3] == f"{2.39e-07 / 0.2338:.3g}"  # 1.02e-06, not 0.17
    assert rows["zero"][3:5] == [f"{11.33 / 0.2338:.3g}", "-"]
    assert rows["hesscale"][3] == "1"
    assert all(r[5] == "1/2" for r in rows.values())
    assert "e+06" not in text
    assert "mlp_mse (HesScale's rel. L1 7.6e-08 <= 1.2e-05 = 100 eps of float32)" in text


def test_records_without_a_dtype_count_as_float32():
    df = frame(smoke())  # written before cells recorded their dtype
    assert set(rounding_tasks(df)) == {"mlp_mse"}
    assert ratio_summaries(df)["zero"].left_out == ("mlp_mse",)


def test_the_bound_is_a_hundred_epsilons_of_the_dtype_computed_in():
    def recs(rel: float, dtype: str) -> list[dict]:
        return [
            cell("t", "hesscale", 0, rel * 10.0, 10.0, dtype=dtype),
            cell("t", "zero", 0, 10.0, 10.0, dtype=dtype),
        ]

    bound32 = ROUNDING_EPS * EPS["float32"]
    assert set(rounding_tasks(frame(recs(0.99 * bound32, "float32")))) == {"t"}
    assert rounding_tasks(frame(recs(1.01 * bound32, "float32"))) == {}
    # a float64 task's HesScale at 1e-10 is an approximation error, not rounding
    assert rounding_tasks(frame(recs(1e-10, "float64"))) == {}
    (t,) = rounding_tasks(frame(recs(1e-15, "float64"))).values()
    assert (t.dtype, t.bound) == ("float64", 100 * 2.0**-52)
    # HesScale exactly right: its error is 0, every ratio to it undefined or infinite
    df = frame(recs(0.0, "float64"))
    assert set(rounding_tasks(df)) == {"t"}
    assert ratio_summaries(df)["zero"].tasks == 0
    assert math.isnan(ratio_summaries(df)["zero"].geomean)


def test_per_task_ratio_of_medians_then_geometric_mean_over_tasks():
    recs = []
    # per task: hesscale's L1 over seeds 0..2 and the label's; medians 1 and r
    for task, r in (("a", 2.0), ("b", 8.0), ("c", 4.0)):
        for seed, (h, e) in enumerate(((1.0, r), (0.5, 100 * r), (3.0, 0.1 * r))):
            recs.append(cell(task, "hesscale", seed, h, 10.0, dtype="float32"))
            recs.append(cell(task, "x", seed, e, 10.0, dtype="float32"))
    # a seed only the label has: not paired, not counted
    recs.append(cell("a", "x", 7, 1e9, 10.0, dtype="float32"))
    df = frame(recs)
    assert task_ratios(df)[("a", "x")] == pytest.approx(2.0)
    s = ratio_summaries(df)["x"]
    assert s.geomean == pytest.approx(4.0)  # (2 * 8 * 4) ** (1/3)
    assert (s.low, s.high, s.tasks, s.left_out) == (2.0, 8.0, 3, ())
    rows, _ = rendered(summary_table(df, "t"))
    assert rows["x"][3:6] == ["4", "2–8", "3/3"]


def test_the_report_table_marks_ratios_on_a_rounding_level_task():
    table = accuracy_table(frame(smoke(dtype="float32")))
    at = table.header.index("L1 / HesScale (paper)")
    (note,) = [i + 1 for i, n in enumerate(table.notes) if "rounding level" in n]
    for row, mark, task in zip(table.rows, table.marks, table.data["task"], strict=True):
        marked = [note in mark[i] for i in (at, at + 1, at + 2)]
        assert marked == [task == "mlp_mse"] * 3, row
    assert table.data.groupby("task")["hesscale_at_rounding"].all().to_dict() == {
        "mlp_ce": False,
        "mlp_mse": True,
    }
    assert "7.6e-08 <= 1.2e-05" in table.notes[note - 1]
