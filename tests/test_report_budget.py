"""The matrix-free budget table and figures, on recorded cells (no estimator runs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from hessbench.report.budget import budget_figure, budget_table, budget_time_figure

SEEDS = (0, 1, 2)


def _cell(task, estimator, seed, rel_l1, params=None, sample=None, time=1.0):
    params = params or {}
    label = (
        estimator
        if not params
        else f"{estimator}[{','.join(f'{k}={v}' for k, v in params.items())}]"
    )
    return {
        "cell_id": f"{task}/{label}/seed={seed}",
        "task": task,
        "estimator": estimator,
        "label": label,
        "params": json.dumps(params),
        "seed": seed,
        "status": "ok",
        "rel_l1": rel_l1,
        "cpu_time_ratio": time,
        "sample_param": sample if sample else math.nan,
        "stochastic": sample is not None,
        "default_params": not params,
    }


def recorded(hutch: dict[int, list[float]], xdiag: dict[int, list[float]]) -> pd.DataFrame:
    """Task 't': HesScale at 0.10, 0.11, 0.12 over seeds, GGN at 0.5, and two budget sweeps."""
    rows = []
    for s in SEEDS:
        rows.append(_cell("t", "hesscale", s, 0.10 + 0.01 * s, time=1.3))
        rows.append(_cell("t", "ggn_exact", s, 0.5, time=1.6))
        rows.append(_cell("t", "exact", s, 1e-9, time=5.0))
        for name, sweep in (("hutchinson", hutch), ("xdiag", xdiag)):
            for budget, errs in sweep.items():
                p = {"num_matvecs": budget}
                rows.append(_cell("t", name, s, errs[s], p, "num_matvecs", time=float(budget)))
    return pd.DataFrame(rows)


@pytest.fixture
def df() -> pd.DataFrame:
    return recorded(
        hutch={1: [9.0, 8.0, 10.0], 10: [1.0, 1.2, 0.9], 50: [0.2, 0.25, 0.15]},
        xdiag={2: [8.0, 9.0, 7.0], 10: [0.3, 0.35, 0.4], 50: [0.05, 0.06, 0.04]},
    )


def test_the_table_finds_where_each_estimator_reaches_hesscale(df):
    table = budget_table(df)
    assert table is not None
    assert table.header == [
        "task",
        "estimator",
        "HesScale",
        "1 matvecs",
        "2 matvecs",
        "10 matvecs",
        "50 matvecs",
        "reaches HesScale at",
    ]
    rows = {r[1]: r for r in table.rows}
    # hutchinson's median at 50 is 0.2 > HesScale's 0.11: not reached within the budgets
    assert rows["hutchinson"][-1] == "> 50"
    assert rows["xdiag"][-1] == "50"  # 0.05 <= 0.11
    assert rows["hutchinson"][2] == "0.11 (0.1–0.12)"
    assert rows["hutchinson"][4] == "-"  # hutchinson did not run with 2
    assert rows["xdiag"][3] == "-"  # nor xdiag with 1
    data = table.data.set_index("estimator")
    assert data.at["xdiag", "median_50"] == pytest.approx(0.05)
    assert data.at["xdiag", "reaches_hesscale_at"] == 50
    assert math.isnan(data.at["hutchinson", "reaches_hesscale_at"])


def test_overlapping_seed_ranges_are_marked_no_difference():
    df = recorded(
        hutch={1: [5.0, 5.0, 5.0], 10: [0.115, 0.2, 0.09]},  # range 0.09-0.2 overlaps 0.10-0.12
        xdiag={2: [5.0, 5.0, 5.0], 10: [0.5, 0.6, 0.7]},
    )
    table = budget_table(df)
    marks = {r[1]: m for r, m in zip(table.rows, table.marks, strict=True)}
    col = table.header.index("10 matvecs")
    assert marks["hutchinson"][col] == (1,)
    assert marks["xdiag"][col] == ()
    assert "no difference found" in table.notes[0]
    assert "no difference found" in table.markdown()


def test_no_budget_sweep_means_no_table_and_skipped_figures(df):
    plain = df[df["estimator"].isin(["hesscale", "ggn_exact"])]
    assert budget_table(plain) is None
    for make in (budget_figure, budget_time_figure):
        result = make(plain)
        assert result.figure is None
        assert "num_matvecs" in result.skipped


def test_the_figure_plots_the_medians_and_the_references(df):
    fig = budget_figure(df).figure
    (ax,) = fig.axes
    curves = {}
    for line in [c.lines[0] for c in ax.containers]:  # each errorbar's line, not its caps
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        curves[tuple(x)] = y
    assert np.allclose(curves[(1.0, 10.0, 50.0)], [9.0, 1.0, 0.2])  # hutchinson
    assert np.allclose(curves[(2.0, 10.0, 50.0)], [8.0, 0.35, 0.05])  # xdiag
    # references: horizontal lines at HesScale's and the GGN's medians; exact (1e-9) left out
    flat = {round(float(ln.get_ydata()[0]), 6) for ln in ax.lines if len(ln.get_xdata()) == 2}
    assert flat == {0.11, 0.5}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["hutchinson", "xdiag", "hesscale", "ggn_exact"]


def test_the_time_figure_puts_the_budget_points_at_their_time(df):
    fig = budget_time_figure(df).figure
    (ax,) = fig.axes
    xs = sorted(float(v) for line in ax.lines for v in np.atleast_1d(line.get_xdata()))
    assert {1.3, 1.6, 1.0, 2.0, 10.0, 50.0} <= {round(x, 6) for x in xs}
