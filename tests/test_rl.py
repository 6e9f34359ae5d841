"""The rl suite kind: schema, A2C runs, determinism, resume, divergence and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("gymnasium")

from hessbench.errors import DivergenceError
from hessbench.rl import a2c
from hessbench.rl.cli import is_rl_suite, run_rl_command
from hessbench.rl.report import RL_OUTPUTS, render_rl_report
from hessbench.rl.runner import read_rl_runs, run_rl_suite
from hessbench.rl.schema import parse_rl_suite, plan_rl_runs
from hessbench.suite import SuiteError

TINY = """\
kind: rl
name: tiny
optimizers:
  - {name: adam, lr: 0.001}
  - {name: adahesscale_scaled, lr: [0.001, 0.01]}
seeds: 2
total_steps: 240
eval_every: 80
num_envs: 4
n_steps: 5
hidden: [8]
"""


def _write(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ schema
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("bogus: 1\n", "t.yaml: bogus: unknown field"),
        ("gamma: 1.5\n", "t.yaml: gamma: "),
        ("env: Pong-v5\n", "t.yaml: env: "),
        ("critic_lr: .inf\n", "t.yaml: critic_lr: Input should be a finite number (got inf)"),
        ("critic_lr: 1e400\n", "t.yaml: critic_lr: Input should be a finite number"),
        ("critic_lr: .nan\n", "t.yaml: critic_lr: Input should be "),
    ],
)
def test_schema_errors_are_one_line(extra, message):
    with pytest.raises(SuiteError) as info:
        parse_rl_suite(TINY + extra, "t.yaml")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_schema_cross_field_errors():
    with pytest.raises(SuiteError) as info:
        parse_rl_suite(TINY.replace("{name: adam,", "{name: nope,"), "t.yaml")
    assert str(info.value).startswith("t.yaml: optimizers[0]: unknown optimizer 'nope'")
    with pytest.raises(SuiteError) as info:
        parse_rl_suite(TINY.replace("eval_every: 80", "eval_every: 1000"), "t.yaml")
    assert str(info.value) == "t.yaml: eval_every: more than total_steps (240)"
    with pytest.raises(SuiteError, match="total_steps: fewer than one update's 20"):
        parse_rl_suite(TINY.replace("total_steps: 240", "total_steps: 10"), "t.yaml")


def test_plan_and_kind_detection(tmp_path):
    suite = parse_rl_suite(TINY)
    ids = [r.id for r in plan_rl_runs(suite)]
    assert len(ids) == 6
    assert ids[0] == "CartPole-v1/adam/lr=0.001/seed=0"
    assert is_rl_suite(_write(tmp_path))
    assert not is_rl_suite(Path("suites/smoke.yaml"))


# ------------------------------------------------------------------ runs
def test_run_end_to_end_deterministic_and_global_rng_untouched():
    suite = parse_rl_suite(TINY)
    run = plan_rl_runs(suite)[2]  # adahesscale_scaled, lr 0.001, seed 0
    state = torch.get_rng_state()
    first = a2c.run_a2c(run)
    assert torch.equal(torch.get_rng_state(), state)
    second = a2c.run_a2c(run)
    assert first["status"] == "ok", first.get("message")
    assert first["curve"]["step"] == [80, 160, 240]
    assert first["curve"]["return"] == second["curve"]["return"]
    assert first["episodes"] == second["episodes"]
    assert first["final_return"] == a2c.final_return(
        first["curve"]["step"], first["curve"]["return"], 240
    )
    other_seed = a2c.run_a2c(plan_rl_runs(suite)[3])
    assert other_seed["episodes"] != first["episodes"]


def test_suite_resume_divergence_and_report(tmp_path, monkeypatch):
    path = _write(tmp_path)
    out = tmp_path / "run"
    real_make = a2c.__dict__.get("make_stepper")
    assert real_make is None  # imported lazily inside run_a2c

    import hessbench.optim

    make = hessbench.optim.make_stepper

    def failing(name, model, loss_fn, lr, **kw):
        stepper = make(name, model, loss_fn, lr, **kw)
        if name == "adahesscale_scaled" and lr == 0.01:

            def boom(x, y):
                raise DivergenceError("diverged at step 1: the loss is nan", 1)

            stepper.step = boom
        return stepper

    monkeypatch.setattr(hessbench.optim, "make_stepper", failing)
    summary = run_rl_suite(path, out, jobs=1)
    assert summary.statuses == {"ok": 4, "diverged": 2}
    records = read_rl_runs(out)
    diverged = records["CartPole-v1/adahesscale_scaled/lr=0.01/seed=1"]
    assert diverged["status"] == "diverged"
    assert diverged["diverged_at"] == 20
    assert diverged["final_return"] is None
    assert json.loads((out / "metadata.json").read_text())["kind"] == "rl"

    # resume: nothing left to do, the file is unchanged
    before = (out / "runs.jsonl").read_bytes()
    again = run_rl_suite(path, out, jobs=1)
    assert again.todo == []
    assert (out / "runs.jsonl").read_bytes() == before
    # a torn last record is re-run
    lines = before.decode().splitlines(keepends=True)
    (out / "runs.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])
    third = run_rl_suite(path, out, jobs=1)
    assert [r.id for r in third.todo] == [json.loads(lines[-1])["cell_id"]]

    files = render_rl_report(out, tmp_path / "report", command="hessbench report run")
    assert set(files) == set(RL_OUTPUTS)
    for name in RL_OUTPUTS:
        assert (tmp_path / "report" / name).stat().st_size > 0
    table = pd.read_csv(tmp_path / "report/tables/final.csv")
    row = table[(table["optimizer"] == "adahesscale_scaled") & (table["lr"] == 0.001)].iloc[0]
    finals = [
        r["final_return"]
        for r in records.values()
        if r["label"] == "adahesscale_scaled" and r["lr"] == 0.001
    ]
    assert float(row["final_return_median"]) == pd.Series(finals).median()
    assert row["chosen"] == "yes"  # the other rate diverged on every seed
    report = (tmp_path / "report/report.md").read_text()
    assert "![Return against environment steps](figures/returns.png)" in report
    page = (tmp_path / "report/index.html").read_text()
    assert '<meta name="hessbench-kind" content="rl">' in page
    assert '<a href="../index.html">' in page
    assert '<img src="figures/returns.png"' in page
    assert '<div class="scroll"><table' in page
    again_files = render_rl_report(out, tmp_path / "report2", command="hessbench report run")
    assert again_files == files  # deterministic bytes


def test_cli_runs_with_progress(tmp_path, capsys):
    text = TINY.replace("seeds: 2", "seeds: 1").replace("[0.001, 0.01]", "0.001")
    assert run_rl_command(_write(tmp_path, text), tmp_path / "run", jobs=1) == 0
    assert "final return" in capsys.readouterr().out


def test_missing_gymnasium_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_gym(name, *args, **kwargs):
        if name == "gymnasium":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gym)
    with pytest.raises(Exception, match=r"pip install 'hessbench\[rl\]'") as info:
        a2c.require_gymnasium()
    assert "\n" not in str(info.value)
