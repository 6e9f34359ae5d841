"""Train suites: schema, runs with curves, resume, determinism, divergence, reports."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hessbench.suite import SuiteError
from hessbench.train import is_train_suite
from hessbench.train.loop import train_run
from hessbench.train.report import TRAIN_OUTPUTS, best_lrs, render_train_report
from hessbench.train.runner import TrainOptions, load_runs, read_runs, run_train_suite
from hessbench.train.schema import parse_train_suite, plan_runs

SUITE = """
kind: train
name: tiny_train
description: a tiny regression for the tests
task:
  name: teach
  model: {kind: mlp, widths: [6], activation: tanh}
  loss: {kind: mse}
  data: {kind: teacher, input_shape: [3], output_dim: 2, widths: [4], size: 64}
seeds: [0, 1]
steps: 12
eval_every: 5
batch_size: 8
heldout_size: 32
optimizers:
  - {name: adam, lr: [0.01, 0.05]}
  - {name: adahesscale, lr: 0.01}
  - {name: sgd, lr: [0.05, 1.0e+8]}
"""


def write(tmp_path: Path, text: str = SUITE, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny suite run once: (suite file, run folder)."""
    tmp = tmp_path_factory.mktemp("train")
    suite = write(tmp)
    out = tmp / "run"
    run_train_suite(suite, TrainOptions(output=out))
    return suite, out


def curves_only(records: dict) -> dict:
    """Every record without the wall-clock times (the part that must be reproducible)."""
    keep = {}
    for rid, rec in records.items():
        rec = {k: v for k, v in rec.items() if not k.endswith("time_s") and k != "elapsed_s"}
        rec["curve"] = {k: v for k, v in rec["curve"].items() if k != "time_s"}
        keep[rid] = rec
    return keep


# --- schema ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("  - {name: adam, lr: [0.01, 0.05]}", "  - {name: adamm, lr: 0.01}"),
         "x.yaml: optimizers[0]: unknown optimizer 'adamm'; available: adahesscale, "),
        (("  - {name: adam, lr: [0.01, 0.05]}", "  - {name: adam, lr: [0.01, 0.01]}"),
         "x.yaml: optimizers[0].lr[1]: learning rate 0.01 appears twice"),
        (("  - {name: adam, lr: [0.01, 0.05]}", "  - {name: adam, lr: -1}"),
         "x.yaml: optimizers[0].lr: Input should be greater than 0"),
        (("  - {name: adam, lr: [0.01, 0.05]}", "  - {name: adam, lr: .inf}"),
         "x.yaml: optimizers[0].lr: Input should be a finite number"),
        (("  - {name: adam, lr: [0.01, 0.05]}", "  - {name: adam, lr: [0.01, 1e999]}"),
         "x.yaml: optimizers[0].lr[1]: Input should be a finite number"),
        (("  - {name: adam, lr: [0.01, 0.05]}", "  - {name: adam, lr: .nan}"),
         "x.yaml: optimizers[0].lr: Input should be a finite number"),
        (("  - {name: adam, lr: [0.01, 0.05]}", "  - {name: adam, lr: 0.1, params: {betaz: 1}}"),
         "x.yaml: optimizers[0].params: optimizer adam: unknown hyper-parameter 'betaz'"),
        (("eval_every: 5", "eval_every: 50"), "x.yaml: eval_every: more than steps (12)"),
        (("steps: 12", "steps: 12\nlr: 3"), "x.yaml: lr: unknown field"),
        (("loss: {kind: mse}", "loss: {kind: cross_entropy}"),
         "x.yaml: task.loss.kind: teacher data need loss mse"),
        (("loss: {kind: mse}", "loss: {kind: huber}"),
         "x.yaml: task.loss.kind: train suites take loss cross_entropy or mse"),
        (("batch_size: 8", "batch_size: 100"), "x.yaml: batch_size: more than the 64 training"),
        (("activation: tanh}", "activation: tahn}"), "x.yaml: task.model.activation: 'tahn' is not"),
        (("  - {name: adahesscale, lr: 0.01}", "  - {name: adam, lr: 0.3}"),
         "x.yaml: optimizers[1]: label 'adam' again"),
        (("kind: train", "kind: trian"), "x.yaml: kind: 'trian' is not one of train"),
    ],
)  # fmt: skip
def test_schema_errors_name_file_and_field(change, expected):
    old, new = change
    assert old in SUITE
    with pytest.raises(SuiteError) as err:
        parse_train_suite(SUITE.replace(old, new, 1), "x.yaml")
    assert expected in str(err.value), str(err.value)


def test_plan_ids_and_is_train_suite(tmp_path):
    suite = parse_train_suite(SUITE)
    ids = [r.id for r in plan_runs(suite)]
    assert len(ids) == len(set(ids)) == 2 * (2 + 1 + 2)
    assert ids[:2] == ["teach/adam/lr=0.01/seed=0", "teach/adam/lr=0.01/seed=1"]
    assert "teach/sgd/lr=1e+08/seed=1" in ids
    assert is_train_suite(write(tmp_path))
    assert not is_train_suite(Path("suites/smoke.yaml"))
    labelled = SUITE.replace(
        "{name: adahesscale, lr: 0.01}", "{name: adam, lr: 0.1, params: {betas: [0.8, 0.9]}}"
    )
    assert parse_train_suite(labelled).optimizers[1].display == "adam[betas=[0.8,0.9]]"


def test_shipped_suites_are_valid():
    for path in sorted(Path("suites").glob("train_*.yaml")):
        assert is_train_suite(path)
        suite = parse_train_suite(path.read_text(), str(path))
        assert len(suite.seed_list) >= 10  # the README compares optimizers on these
        grid = sum(len(o.lrs) for o in suite.optimizers)
        assert len(plan_runs(suite)) == grid * len(suite.seed_list)


# --- runs ----------------------------------------------------------------------------------


def test_runs_record_curves(finished):
    _, out = finished
    records = read_runs(out)
    assert len(records) == 10
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert len(ok) == 8
    for rec in ok:
        curve = rec["curve"]
        assert curve["step"] == [0, 5, 10, 12]
        assert curve["time_s"][0] == 0
        assert np.all(np.diff(curve["time_s"]) > 0)
        assert curve["train_loss"][0] is None
        assert all(math.isfinite(v) for v in curve["train_loss"][1:])
        assert all(math.isfinite(v) for v in curve["heldout_loss"])
        assert curve["heldout_accuracy"] == [None] * 4  # regression
        assert rec["final_heldout_loss"] == curve["heldout_loss"][-1]
        assert rec["steps_done"] == 12
        assert rec["train_time_s"] == curve["time_s"][-1]
    adam = records["teach/adam/lr=0.05/seed=0"]["curve"]["heldout_loss"]
    assert adam[-1] < adam[0]  # it learns
    # the same seed starts every optimizer from the same weights
    starts = {r["curve"]["heldout_loss"][0] for r in records.values() if r["seed"] == 0}
    assert len(starts) == 1
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["kind"] == "train"
    assert meta["suite"] == "tiny_train"
    assert (out / "runs.csv").read_text().startswith("run_id,")


def test_a_diverging_lr_is_recorded_not_crashed(finished):
    _, out = finished
    records = read_runs(out)
    for seed in (0, 1):
        rec = records[f"teach/sgd/lr=1e+08/seed={seed}"]
        assert rec["status"] == "diverged", rec
        assert 1 <= rec["diverged_at"] <= 12
        assert "diverged" in rec["message"]
        assert rec["final_heldout_loss"] is None
        assert rec["curve"]["step"][0] == 0  # the curve up to the divergence is kept


def test_resume_skips_finished_runs_and_reproduces_them(finished, tmp_path):
    suite, first = finished
    out = tmp_path / "resumed"
    part = run_train_suite(suite, TrainOptions(output=out, seeds=[1]))
    assert len(part.todo) == 5
    rest = run_train_suite(suite, TrainOptions(output=out))
    assert len(rest.planned) == 10
    assert len(rest.todo) == 5
    assert {r.seed for r in rest.todo} == {0}
    again = run_train_suite(suite, TrainOptions(output=out))
    assert again.todo == []
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 10
    assert curves_only(read_runs(out)) == curves_only(read_runs(first))


def test_worker_processes_give_the_same_numbers(finished, tmp_path):
    suite, first = finished
    out = tmp_path / "jobs"
    run_train_suite(suite, TrainOptions(output=out, jobs=2, seeds=[0]))
    mine = curves_only(read_runs(out))
    theirs = {k: v for k, v in curves_only(read_runs(first)).items() if k.endswith("seed=0")}
    assert mine == theirs


def test_train_run_leaves_the_global_rng_alone():
    suite = parse_train_suite(
        SUITE.replace("steps: 12", "steps: 3").replace("every: 5", "every: 3")
    )
    torch.manual_seed(123)
    state = torch.get_rng_state()
    rec = train_run(plan_runs(suite)[2])
    assert rec["status"] == "ok"
    assert torch.equal(torch.get_rng_state(), state)


def test_classification_records_accuracy(tmp_path):
    text = (
        SUITE.replace("loss: {kind: mse}", "loss: {kind: cross_entropy}")
        .replace("{kind: teacher, input_shape: [3], output_dim: 2, widths: [4], size: 64}",
                 "{kind: synthetic, input_shape: [3], num_classes: 3, size: 64}")
        .replace("seeds: [0, 1]", "seeds: [0]")
    )  # fmt: skip
    suite = parse_train_suite(text)
    rec = train_run(plan_runs(suite)[0])
    assert rec["status"] == "ok"
    acc = rec["curve"]["heldout_accuracy"]
    assert len(acc) == 4
    assert all(0 <= a <= 1 for a in acc)
    assert acc[-1] == rec["final_heldout_accuracy"]


# --- choosing the learning rate and reports ----------------------------------------------


def test_best_lr_prefers_all_seeds_ok_then_lowest_median():
    rows = []
    for lr, losses in [(0.1, [1.0, 0.1, None]), (0.01, [0.5, 0.6, 0.7]), (0.001, [0.4, 0.9, 0.9])]:
        for seed, loss in enumerate(losses):
            rows.append(
                {
                    "label": "opt",
                    "order": 0,
                    "lr": lr,
                    "seed": seed,
                    "status": "ok" if loss is not None else "diverged",
                    "final_heldout_loss": loss if loss is not None else math.nan,
                    "final_heldout_accuracy": math.nan,
                    "final_train_loss": 1.0,
                    "train_time_s": 1.0,
                    "steps_done": 10,
                    "diverged_at": math.nan if loss is not None else 3,
                }
            )
    runs = pd.DataFrame(rows)
    # 0.1 has the lowest median of its ok seeds but a diverged seed; 0.01 beats 0.001 (0.6 < 0.9)
    assert best_lrs(runs) == {"opt": 0.01}
    runs.loc[runs["lr"] == 0.001, "final_heldout_loss"] = [0.1, 0.2, 0.3]
    assert best_lrs(runs) == {"opt": 0.001}


def test_report_writes_every_file_and_the_table_holds_the_medians(finished, tmp_path):
    _, run = finished
    out = tmp_path / "report"
    report = render_train_report(run, out)
    expected = {n for n in TRAIN_OUTPUTS if "accuracy_vs_steps" not in n}  # a regression
    assert set(report.files) == expected
    assert all((out / n).stat().st_size > 0 for n in expected)
    skipped = [f.name for f in report.figures if f.figure is None]
    assert skipped == ["accuracy_vs_steps"]
    runs, _ = load_runs(run)
    final = pd.read_csv(out / "tables/final.csv")
    assert list(final["optimizer"]) == ["adam", "adahesscale", "sgd"]
    for row in final.itertuples():
        ok = runs[(runs["label"] == row.optimizer) & (runs["lr"] == row.lr)]
        assert row.heldout_loss_median == ok["final_heldout_loss"].median()
    assert final.set_index("optimizer").loc["sgd", "lr"] == 0.05  # not the diverging 1e8
    per_lr = pd.read_csv(out / "tables/per_lr.csv")
    diverged = per_lr[per_lr["lr"] == 1e8].iloc[0]
    assert diverged["diverged"] == 2
    assert diverged["ok"] == 0
    md = (out / "report.md").read_text()
    assert "![Loss against steps](figures/loss_vs_steps.png)" in md
    assert "| sgd | 0.05 (chosen) |" in (out / "tables/per_lr.md").read_text()
    assert (out / "tables/final.tex").read_text().count(r"\toprule") == 1
    # the same page for a browser, as every kind of report has (hessbench.report.document)
    page = (out / "index.html").read_text()
    assert '<meta name="viewport"' in page
    assert '<meta name="hessbench-kind" content="train">' in page
    assert '<a href="../index.html">' in page
    assert '<img src="figures/loss_vs_steps.png"' in page
    assert page.count("<table") == page.count('<div class="scroll"><table') == 3
    assert '<a href="#final-loss-at-the-chosen-learning-rate">' in page
    # deterministic: the same run gives the same bytes
    again = render_train_report(run, out)
    assert again.files == report.files


def test_report_names_the_clock_the_runs_were_timed_with(finished, tmp_path):
    _, run = finished
    runs, _ = load_runs(run)
    assert set(runs["clock"]) == {"CPU time"}  # on CPU: process CPU time (training_clock)
    render_train_report(run, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "cumulative training CPU time" in md
    assert "wall-clock" not in md


def test_commands(finished, tmp_path, capsys):
    from hessbench.train import train_command, train_report_command, train_validate_command

    suite, run = finished
    assert train_validate_command(suite) == 0
    assert "10 runs of 12 steps" in capsys.readouterr().out
    assert train_command(suite, run, dry_run=True) == 0
    assert "teach/sgd/lr=1e+08/seed=1" in capsys.readouterr().out
    assert train_command(suite, run) == 0  # everything done: nothing re-runs
    assert "results:" in capsys.readouterr().out
    assert len((run / "runs.jsonl").read_text().splitlines()) == 10
    assert train_report_command(run, tmp_path / "r") == 0
    assert (tmp_path / "r" / "report.md").exists()
