"""Scale-out: Slurm job arrays through submitit, --shard i/n, collect; the CUDA path.

The executor tests run twice: with submitit's ``local`` cluster (always; no
Slurm needed) and with a real Slurm (when ``HESSBENCH_TEST_SLURM`` is set, as
``.ci/run`` does after ``.ci/slurm.sh start``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_runner import TESTS, accuracy, cli, write_suite

from hessbench.errors import HessbenchError
from hessbench.run.runner import RunOptions, collect, run_suite
from hessbench.store import shards as shards_module
from hessbench.store.records import CellStore, load, read_records
from hessbench.store.shards import Collector, Shard, parse_shard

pytest.importorskip("submitit", reason="submitit is in the dev extra: pip install -e '.[dev]'")

# one xdist worker runs every test here, one after the other (the README's command uses
# --dist loadgroup): the one-node Slurm would otherwise queue one test's jobs behind
# another's, and the time-limit tests measure from job start
pytestmark = pytest.mark.xdist_group("cluster")

ROOT = TESTS.parent
SMOKE = ROOT / "suites" / "smoke.yaml"
SLURM = bool(os.environ.get("HESSBENCH_TEST_SLURM"))
# The same tests run through a real Slurm where .ci/slurm.sh started one, else through
# submitit's local cluster (real subprocesses, no Slurm); never both, to keep CI short.
EXECUTORS = [
    pytest.param(
        "submitit-local",
        marks=pytest.mark.skipif(SLURM, reason="real Slurm is here: the slurm variant runs"),
    ),
    pytest.param(
        "slurm",
        marks=pytest.mark.skipif(
            not SLURM, reason="HESSBENCH_TEST_SLURM unset: no Slurm here (.ci/slurm.sh start)"
        ),
    ),
]
PLUGIN_ENV = {"HESSBENCH_PLUGINS": "runner_plugins", "PYTHONPATH": str(TESTS / "plugins")}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HESSBENCH_TEST_HANG"}
    return {**env, **PLUGIN_ENV, **extra}


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["cell_id"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_smoke_through_a_job_array_equals_a_local_run(tmp_path, executor):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_suite(SMOKE, RunOptions(output=ref, quick=True))
    t0 = time.monotonic()
    res = cli("run", str(SMOKE), "--quick", "-o", str(out), "--executor", executor, "--time", "5")
    print(f"{executor}: smoke --quick through the job array in {time.monotonic() - t0:.1f} s")
    assert res.returncode == 0, res.stderr
    assert "submitted 2 array tasks" in res.stderr
    pd.testing.assert_frame_equal(accuracy(load(ref)), accuracy(load(out)))
    assert len(list((out / "shards").glob("*.jsonl"))) == 2
    # collecting again changes nothing
    before = (out / "cells.jsonl").read_text()
    res = cli("collect", str(out))
    assert res.returncode == 0, res.stderr
    assert "0 new" in res.stdout
    assert (out / "cells.jsonl").read_text() == before
    assert len(set(_ids(out / "cells.jsonl"))) == len(_ids(out / "cells.jsonl")) == 14


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_cancelled_and_timed_out_jobs_are_recorded_and_a_rerun_completes_them(tmp_path, executor):
    estimators = """
- name: hesscale
- name: test_hang_once
- name: zero
"""
    suite = write_suite(tmp_path, estimators, timeout=600)
    out, ref = tmp_path / "out", tmp_path / "ref"
    limit = "1" if executor == "slurm" else "0.5"  # minutes; Slurm's smallest limit is 1
    t0 = time.monotonic()
    # output to files: submitit's local jobs inherit it, and a pipe would stay open
    with open(tmp_path / "stdout", "w") as fo, open(tmp_path / "stderr", "w") as fe:
        rc = subprocess.run(
            [sys.executable, "-m", "hessbench", "run", str(suite), "-o", str(out), "--seed", "0",
             "--executor", executor, "--time", limit, "--no-wait"],
            stdout=fo, stderr=fe, env=_env(HESSBENCH_TEST_HANG="1"), timeout=120,
        ).returncode  # fmt: skip
    assert rc == 0, (tmp_path / "stderr").read_text()
    stdout = (tmp_path / "stdout").read_text()
    manifest = json.loads(next((out / "shards").glob("*.json")).read_text())
    tasks = manifest["tasks"]
    assert len(tasks) == 2  # (mlp, seed 0) and (reg, seed 0)
    assert stdout.split()[0] == (manifest["job_id"] or tasks[0]["job_id"])
    # both array tasks finished hesscale and now hang in test_hang_once
    shards = [out / "shards" / t["shard"] for t in tasks]
    _wait_for(
        lambda: all(p.exists() and p.read_text().count("\n") >= 1 for p in shards), 120, "hesscale"
    )
    cancelled = tasks[1]["job_id"]
    if executor == "slurm":
        subprocess.run(["scancel", cancelled], check=True)
    else:
        # the job id is the local controller's pid; it forwards SIGTERM to the task (its
        # cancel() sends SIGINT, which a shell ignores in background jobs)
        os.kill(int(cancelled), signal.SIGTERM)
    res = cli("collect", str(out), "--wait", env=_env())
    print(f"{executor}: cancel + time limit collected after {time.monotonic() - t0:.1f} s")
    assert res.returncode == 1, res.stderr  # failed cells
    df = load(out).set_index("cell_id")
    status = df["status"].to_dict()
    for task, (job, state) in zip(
        ("mlp", "reg"), ((tasks[0]["job_id"], "TIMEOUT"), (cancelled, "CANCELLED")), strict=True
    ):
        assert status[f"{task}/hesscale/seed=0"] == "ok"
        for est in ("test_hang_once", "zero"):
            cid = f"{task}/{est}/seed=0"
            assert status[cid] == state.lower(), (cid, df.loc[cid, "message"])
            assert job in df.loc[cid, "message"]
            assert state in df.loc[cid, "message"]
    # a re-run (no hang now) evaluates exactly the cancelled and timed-out cells
    t1 = time.monotonic()
    res = cli("run", str(suite), "-o", str(out), "--seed", "0", "--executor", executor, env=_env())
    print(f"{executor}: re-run in {time.monotonic() - t1:.1f} s")
    assert res.returncode == 0, res.stderr
    assert "6 cells, 2 already done" in res.stderr
    ids = _ids(out / "cells.jsonl")
    assert len(ids) == 6 + 4  # 4 failure records, then their ok records; ok never twice
    # the reference: a local run in its own process (registering the test plugins in
    # this process would leak them into other tests' registry)
    res = cli("run", str(suite), "-o", str(ref), "--seed", "0", env=_env())
    assert res.returncode == 0, res.stderr
    pd.testing.assert_frame_equal(accuracy(load(ref)), accuracy(load(out)))


def _rec(cid: str, status: str, **kw) -> dict:
    task, est, seed = cid.split("/")
    return {"cell_id": cid, "task": task, "estimator": est, "label": est, "params": {},
            "seed": int(seed.removeprefix("seed=")), "status": status, "message": "", **kw}  # fmt: skip


def test_collect_merges_shards_idempotently_and_never_loses_an_ok(tmp_path):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    main = CellStore(run)
    main.append(_rec("t/a/seed=0", "ok", l1=1.0))
    main.append(_rec("t/b/seed=0", "error"))
    main.close()
    s1 = CellStore(path=run / "shards" / "s1-0.jsonl")
    s1.append(_rec("t/a/seed=0", "error"))  # an ok is never replaced
    s1.append(_rec("t/b/seed=0", "ok", l1=2.0))  # a later ok beats a failure
    s1.close()
    manifest = {
        "session": "s1", "executor": "slurm", "folder": "unused", "job_id": "7",
        "tasks": [
            {"task": 0, "job_id": "7_0", "shard": "s1-0.jsonl",
             "cells": [_rec(c, "x") for c in ("t/a/seed=0", "t/b/seed=0", "t/c/seed=0")]},
            {"task": 1, "job_id": "7_1", "shard": "s1-1.jsonl", "cells": [_rec("t/d/seed=0", "x")]},
            {"task": 2, "job_id": "7_2", "shard": "s1-2.jsonl", "cells": [_rec("t/e/seed=0", "x")]},
        ],
    }  # fmt: skip
    (run / "shards" / "s1.json").write_text(json.dumps(manifest))
    states = {"7_0": "TIMEOUT", "7_1": "RUNNING", "7_2": "UNKNOWN"}
    c = Collector(run)
    c.step(lambda m, t: states[t["job_id"]])
    recs = read_records(run)
    assert recs["t/a/seed=0"]["status"] == "ok"
    assert recs["t/b/seed=0"]["l1"] == 2.0
    assert recs["t/c/seed=0"]["status"] == "timeout"
    assert recs["t/c/seed=0"]["message"] == "slurm job 7_0 ended TIMEOUT before this cell finished"
    assert c.in_flight == {"t/d/seed=0": "7_1"}
    assert c.unknown == {"7_2": "UNKNOWN"}
    assert "t/d/seed=0" not in recs
    lines = (run / "cells.jsonl").read_text()
    # idempotent, also for a fresh collector; a settled task is not asked about again
    asked = []
    Collector(run).step(lambda m, t: asked.append(t["job_id"]) or states[t["job_id"]])
    assert (run / "cells.jsonl").read_text() == lines
    assert asked == ["7_1", "7_2"]
    # the running task ends: its shard's cells count, nothing is synthesised for them
    s2 = CellStore(path=run / "shards" / "s1-1.jsonl")
    s2.append(_rec("t/d/seed=0", "ok"))
    s2.close()
    states["7_1"] = "CANCELLED"
    new = Collector(run).step(lambda m, t: states[t["job_id"]])
    assert [r["cell_id"] for r in new] == ["t/d/seed=0"]
    assert read_records(run)["t/d/seed=0"]["status"] == "ok"


def test_a_record_written_during_a_merge_is_merged_before_its_task_settles(tmp_path):
    """The job writes its last cell after the merge read its shard, before the task settles.

    The task is complete, but its last record was not merged: it must not settle
    (a waiting run would stop and report the cell's old failure), the next step
    merges the record. This race failed a CI run once.
    """
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    main = CellStore(run)
    main.append(_rec("t/b/seed=0", "timeout"))  # from an earlier, timed-out submission
    main.close()
    shard = run / "shards" / "s2-0.jsonl"
    first = CellStore(path=shard)
    first.append(_rec("t/a/seed=0", "ok"))
    first.close()
    manifest = {
        "session": "s2", "executor": "slurm", "folder": "unused", "job_id": "8",
        "tasks": [{"task": 0, "job_id": "8_0", "shard": "s2-0.jsonl",
                   "cells": [_rec(c, "x") for c in ("t/a/seed=0", "t/b/seed=0")]}],
    }  # fmt: skip
    (run / "shards" / "s2.json").write_text(json.dumps(manifest))
    collector = Collector(run)
    original = shards_module.iter_records

    def writes_after_the_merge(path, *args):
        out = original(path, *args)
        # the merge's read of the shard from its offset (0: nothing merged yet)
        if path == shard and args == (0,) and "written" not in collector.__dict__:
            collector.__dict__["written"] = True  # the job appends its last record now
            last = CellStore(path=shard)
            last.append(_rec("t/b/seed=0", "ok"))
            last.close()
        return out

    shards_module.iter_records = writes_after_the_merge
    try:
        collector.step(lambda m, t: "RUNNING")
    finally:
        shards_module.iter_records = original
    assert collector.pending_tasks()  # not settled on a record it has not merged
    collector.step(lambda m, t: "COMPLETED")
    assert read_records(run)["t/b/seed=0"]["status"] == "ok"
    assert not collector.pending_tasks()


def test_shares_partition_the_cells_and_collect_merges_them(tmp_path):
    suite = write_suite(tmp_path, "- name: hesscale\n- name: zero\n")
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_suite(suite, RunOptions(output=ref))
    seen = []
    for i in (1, 2, 3):
        summary = run_suite(suite, RunOptions(output=out, shard=Shard(i, 3)))
        assert summary.shard_file == out / "shards" / f"shard-{i}-of-3.jsonl"
        seen += _ids(summary.shard_file)
        groups = {(cid.split("/")[0], cid.split("/")[-1]) for cid in _ids(summary.shard_file)}
        for cid in _ids(summary.shard_file):  # whole groups only
            assert (cid.split("/")[0], cid.split("/")[-1]) in groups
    assert sorted(seen) == sorted(read_records(ref))  # each cell exactly once
    assert not (out / "cells.jsonl").exists()
    # a share re-run resumes (nothing left), then collect merges
    assert run_suite(suite, RunOptions(output=out, shard=Shard(2, 3))).todo == []
    collect(out)
    pd.testing.assert_frame_equal(accuracy(load(ref)), accuracy(load(out)))
    # shard 1/1 is a plain run into cells.jsonl
    assert run_suite(suite, RunOptions(output=out, shard=Shard(1, 1))).todo == []


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "x", "1/2/3", "-1/2"])
def test_bad_shard_values_are_one_line_errors(text):
    with pytest.raises(HessbenchError, match="--shard"):
        parse_shard(text)


def test_cli_errors_are_one_line(tmp_path):
    suite = write_suite(tmp_path, "- name: zero\n")
    res = cli("run", str(suite), "--shard", "3/2")
    assert res.returncode == 2
    assert (
        res.stderr.strip() == "hessbench: error: --shard '3/2': i must be between 1 and n (n >= 1)"
    )
    res = cli("run", str(suite), "--shard", "1/2", "--executor", "slurm")
    assert res.returncode == 2
    assert "cannot be combined" in res.stderr
    res = cli("run", str(suite), "--no-wait")
    assert res.returncode == 2
    assert "--no-wait needs --executor slurm" in res.stderr
    res = cli("run", str(suite), "--executor", "pbs")
    assert res.returncode == 2
    assert "expected local or slurm" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(suite.read_text() + "cluster: {partiton: gpu}\n")
    res = cli("run", str(bad))
    assert res.returncode == 2
    assert "cluster.partiton: unknown field" in res.stderr


def test_slurm_without_submitit_says_what_to_install(tmp_path):
    suite = write_suite(tmp_path, "- name: zero\n")
    code = (
        "import sys; sys.modules['submitit'] = None; sys.argv[0] = 'hessbench'; "
        "from hessbench.cli import app; app()"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run",
            str(suite),
            "--executor",
            "slurm",
            "-o",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "hessbench: error: --executor slurm needs submitit, which is not installed: "
        "pip install 'hessbench[slurm]'"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error_before_any_work(tmp_path):
    suite = write_suite(tmp_path, "- name: zero\n")
    out = tmp_path / "run"
    res = cli("run", str(suite), "--device", "cuda", "-o", str(out))
    assert res.returncode == 2
    assert "torch.cuda.is_available() is false" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_matches_the_cpu_run(tmp_path):
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    run_suite(SMOKE, RunOptions(output=cpu, quick=True))
    summary = run_suite(SMOKE, RunOptions(output=gpu, quick=True, device="cuda"))
    assert set(summary.statuses) == {"ok"}
    meta = json.loads((gpu / "metadata.json").read_text())
    assert meta["device"] == "cuda"
    df = load(gpu)
    assert (df["peak_bytes"] > 0).all()
    assert (df["grad_peak_bytes"] > 0).all()
    a, b = accuracy(load(cpu)), accuracy(df)
    assert (a["status"] == b["status"]).all()
    # float32 on different hardware: close, not bitwise
    det = ~a.index.str.contains("hutchinson|ggn_mc")  # random probes differ between devices
    pd.testing.assert_frame_equal(a[det], b[det], rtol=1e-3, atol=1e-6)
