"""The runner: resumable, crash-isolated, deterministic runs of a suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from hessbench.errors import HessbenchError
from hessbench.run.runner import RunOptions, run_suite
from hessbench.store.records import SCHEMA_VERSION, load, load_parts, read_records

TESTS = Path(__file__).parent
ACCURACY = ["l1", "abs_truth", "rel_l1", "cosine", "spearman", "sign_agreement"]

SUITE = """
name: tiny
defaults:
  seeds: [0, 1]
  timeout_s: {timeout}
  timing: {{warmup: 0, min_repeats: 1, max_repeats: 1, min_time_s: 0.001}}
tasks:
  - name: mlp
    model: {{kind: mlp, widths: [5], activation: tanh}}
    loss: {{kind: cross_entropy}}
    data: {{kind: synthetic, input_shape: [4], num_classes: 3}}
    eval: {{batch_size: 2, num_batches: 2}}
  - name: reg
    model: {{kind: mlp, widths: [4], activation: sigmoid}}
    loss: {{kind: mse}}
    data: {{kind: synthetic, input_shape: [3], output_dim: 2}}
    eval: {{batch_size: 1, num_batches: 2}}
estimators:
{estimators}
"""

DEFAULT_ESTIMATORS = """
  - name: exact
  - name: hesscale
  - name: bl89
  - name: hutchinson
    params: {num_samples: [1, 3]}
  - name: ggn_mc
  - name: zero
"""


def write_suite(tmp_path: Path, estimators: str = DEFAULT_ESTIMATORS, timeout: float = 120) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        SUITE.format(
            estimators=textwrap.indent(textwrap.dedent(estimators).strip(), "  "), timeout=timeout
        )
    )
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hessbench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def accuracy(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("cell_id").sort_index()[["status", *ACCURACY]]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, object]:
    """One uninterrupted ``jobs=1`` run of the default suite (read-only for the tests).

    It is the reference that several tests compare against; each of them used to
    repeat this exact run (the same suite text, so the same cells and numbers).
    """
    tmp = tmp_path_factory.mktemp("default_run")
    out = tmp / "run"
    summary = run_suite(write_suite(tmp), RunOptions(output=out))
    return out, summary


def test_run_writes_every_cell_and_summary(default_run):
    out, summary = default_run
    df = load(out)
    assert len(df) == len(summary.planned) == 2 * 2 * 7
    assert set(df["status"]) == {"ok"}
    assert (df.loc[df["estimator"] == "zero", "rel_l1"] == 1.0).all()
    assert (df.loc[df["estimator"] == "exact", "l1"] < 1e-6).all()
    assert df["l1_over_hesscale"][df["estimator"] == "hesscale"].eq(1.0).all()
    assert (out / "results.csv").read_text().startswith("cell_id,")
    meta = json.loads((out / "metadata.json").read_text())
    for key in ("suite_text", "suite_hash", "hessbench_version", "torch", "numpy", "python", "cpu"):
        assert meta[key]
    assert meta["sessions"][0]["finished"] >= meta["sessions"][0]["started"]
    parts = load_parts(out)
    assert set(parts["level"]) == {"param", "layer"}
    # per-parameter l1 adds up to the cell's l1
    cell = df[df["label"] == "hesscale"].iloc[0]
    p = parts[(parts["cell_id"] == cell["cell_id"]) & (parts["level"] == "param")]
    assert p["l1"].sum() == pytest.approx(cell["l1"], rel=1e-9)


def test_rerun_resumes_and_skips_finished_cells(tmp_path):
    suite = write_suite(tmp_path)
    out = tmp_path / "run"
    run_suite(suite, RunOptions(output=out, estimators=["hesscale"]))
    first = read_records(out)
    summary = run_suite(suite, RunOptions(output=out))
    assert len(summary.todo) == len(summary.planned) - len(first)
    lines = (out / "cells.jsonl").read_text().splitlines()
    ids = [json.loads(line)["cell_id"] for line in lines]
    assert len(ids) == len(set(ids)) == len(summary.planned)


def _pool(work, records: list, units=("u1", "u2"), on_start=lambda uid: None) -> list[dict]:
    """``run_batches`` over one batch of ``units`` with one worker, into ``records``."""
    from hessbench.run.pool import Batch, run_batches

    run_batches(
        [Batch("b", [(u, None) for u in units])],
        work,
        jobs=1,
        threads=1,
        timeout_s=None,
        on_start=on_start,
        on_record=records.append,
    )
    return records


def test_workers_that_cannot_start_stop_the_pool_with_a_one_line_error(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS / "plugins"))
    from runner_plugins import DiesOnOpen

    records = []
    with pytest.raises(HessbenchError, match=r"die before their first unit \(exit code 3, 3 in"):
        _pool(DiesOnOpen(), records)
    assert records == []  # no unit started, so none is marked crashed


@pytest.mark.skipif(
    "forkserver" not in __import__("multiprocessing").get_all_start_methods(),
    reason="workers are spawned here",
)
def test_slurms_time_limit_warning_does_not_kill_the_fork_server(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS / "plugins"))
    from runner_plugins import SignalsItsServer

    records = _pool(SignalsItsServer(), [])
    assert records == [{"id": "u1", "status": "ok"}, {"id": "u2", "status": "ok"}]


def test_a_stop_of_the_whole_job_does_not_blame_the_running_cell(monkeypatch):
    """Slurm's time limit sends SIGTERM to every process of the job at once: a worker
    (or its fork server) may die a moment before the parent gets its own SIGTERM.
    The parent waits a grace period before recording ``crashed``, so its own SIGTERM
    stops the run first."""
    import threading

    monkeypatch.syspath_prepend(str(TESTS / "plugins"))
    from runner_plugins import TerminatedWork

    def stop(signum, frame):
        raise KeyboardInterrupt

    # this process's SIGTERM comes 0.3 s after its worker's
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, stop)
    records = []
    try:
        with pytest.raises(KeyboardInterrupt):
            _pool(TerminatedWork(), records, ("u1",), on_start=lambda uid: timer.start())
    finally:
        timer.cancel()  # never a SIGTERM after the handler is gone
        if timer.is_alive():
            timer.join()
        signal.signal(signal.SIGTERM, previous)
    assert records == []


def test_failures_are_isolated_per_cell(tmp_path):
    estimators = """
- name: hesscale
- name: test_segfault
- name: test_hang
- name: test_raises
- name: test_nan
- name: zero
"""
    suite = write_suite(tmp_path, estimators, timeout=8)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "HESSBENCH_PLUGINS": "runner_plugins",
        "PYTHONPATH": str(TESTS / "plugins"),
    }
    # One task (one group): every failure kind still hits it, each on a fresh worker
    # after the crash and the timeout; a second task only repeated the same sequence.
    res = cli("run", str(suite), "-o", str(out), "--seed", "0", "--task", "mlp", env=env)
    assert res.returncode == 1, res.stderr  # some cells failed
    df = load(out).set_index("cell_id")
    by_est = df.groupby("estimator")["status"].agg(set)
    assert by_est["hesscale"] == {"ok"}
    assert by_est["zero"] == {"ok"}
    assert by_est["test_segfault"] == {"crashed"}
    assert by_est["test_hang"] == {"timeout"}
    assert by_est["test_raises"] == {"error"}
    assert by_est["test_nan"] == {"error"}
    crashed = df[df["estimator"] == "test_segfault"]["message"].iloc[0]
    assert "SIGSEGV" in crashed
    assert df[df["estimator"] == "test_raises"]["message"].iloc[0] == (
        "RuntimeError: deliberate failure"
    )
    assert "non-finite estimate" in df[df["estimator"] == "test_nan"]["message"].iloc[0]
    # --retry-failed runs only the failed cells again (healed now, so they complete)
    res = cli(
        "run", str(suite), "-o", str(out), "--seed", "0", "--task", "mlp", "--retry-failed",
        env={**env, "HESSBENCH_TEST_HEALED": "1"},
    )  # fmt: skip
    assert "6 cells, 2 already done" in res.stderr, res.stderr
    assert res.returncode == 0, res.stderr
    assert set(load(out)["status"]) == {"ok"}
    ids = [json.loads(line)["cell_id"] for line in (out / "cells.jsonl").read_text().splitlines()]
    assert len(ids) == 6 + 4  # the 4 failures once more, now ok; the 2 ok cells not re-run
    assert sorted(ids[6:]) == sorted(df.index[df["status"] != "ok"])


def test_unsupported_cells_carry_the_reason(tmp_path):
    estimators = """
- name: exact
  params: {method: hvp, max_params: 5}
- name: hesscale
"""
    out = tmp_path / "run"
    run_suite(write_suite(tmp_path, estimators), RunOptions(output=out, seeds=[0]))
    df = load(out)
    msgs = df[df["estimator"] == "exact"]["message"]
    assert (df[df["estimator"] == "exact"]["status"] == "unsupported").all()
    assert msgs.str.contains("max_params=5").all()


def test_jobs_do_not_change_accuracy(tmp_path, default_run):
    j1, _ = default_run  # jobs=1
    suite = write_suite(tmp_path)
    run_suite(suite, RunOptions(output=tmp_path / "j2", jobs=2))
    pd.testing.assert_frame_equal(accuracy(load(j1)), accuracy(load(tmp_path / "j2")))


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, default_run):
    suite = write_suite(tmp_path)
    ref, _ = default_run
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessbench", "run", str(suite), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cells = out / "cells.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if cells.exists() and len(cells.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(read_records(out))
    assert 5 <= n_before < 28, "the kill should land mid-run"
    res = cli("run", str(suite), "-o", str(out))
    assert res.returncode == 0, res.stderr
    lines = cells.read_text().splitlines()
    ids = [json.loads(line)["cell_id"] for line in lines]
    assert len(ids) == len(set(ids)), "a finished cell was written twice"
    pd.testing.assert_frame_equal(accuracy(load(ref)), accuracy(load(out)))


def test_sigterm_leaves_a_resumable_folder(tmp_path):
    suite = write_suite(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessbench", "run", str(suite), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cells = out / "cells.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        cells.exists() and cells.read_text().count("\n") >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert (out / "results.csv").exists()
    done = len(read_records(out))
    res = cli("run", str(suite), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert f"{done} already done" in res.stderr


def test_a_locked_folder_is_refused(tmp_path):
    from hessbench.store.records import run_lock

    suite = write_suite(tmp_path)
    out = tmp_path / "run"
    with run_lock(out), pytest.raises(HessbenchError, match="being written by pid"):
        run_suite(suite, RunOptions(output=out))


def test_a_changed_suite_needs_force(tmp_path):
    suite = write_suite(tmp_path)
    out = tmp_path / "run"
    run_suite(suite, RunOptions(output=out, estimators=["zero"]))
    suite.write_text(suite.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    with pytest.raises(HessbenchError, match="different version of the suite"):
        run_suite(suite, RunOptions(output=out))
    summary = run_suite(suite, RunOptions(output=out, force=True, estimators=["zero"]))
    assert len(summary.todo) == len(summary.planned)


def test_newer_schema_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rec = {"schema_version": SCHEMA_VERSION + 1, "cell_id": "a/b/seed=0"}
    (out / "cells.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(HessbenchError, match="newer"):
        load(out)


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    suite = write_suite(tmp_path)
    out = tmp_path / "run"
    run_suite(suite, RunOptions(output=out, estimators=["zero"]))
    n = len(read_records(out))
    with open(out / "cells.jsonl", "a") as fh:
        fh.write('{"cell_id": "torn')
    assert len(read_records(out)) == n
    run_suite(suite, RunOptions(output=out, estimators=["zero", "hesscale"]))
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_cli_exit_codes_and_messages(tmp_path):
    suite = write_suite(tmp_path)
    res = cli("validate", str(suite))
    assert res.returncode == 0, res.stderr
    assert "cells" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(suite.read_text().replace("activation: tanh", "activation: tahn"))
    res = cli("run", str(bad))
    assert res.returncode == 2
    assert "tasks[0].model.activation" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli("run", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2
    res = cli("run", str(suite), "--dry-run", "--estimator", "hesscale")
    assert res.returncode == 0
    assert len(res.stdout.split()) == 4
    out = tmp_path / "run"
    res = cli("run", str(suite), "-o", str(out), "--estimator", "zero", "--seed", "0")
    assert res.returncode == 0, res.stderr
    assert "results.csv" in res.stdout
    res = cli("show", str(out))
    assert res.returncode == 0
    assert "zero" in res.stdout
    res = cli("show", str(tmp_path / "nowhere"))
    assert res.returncode == 2


def test_the_groups_left_after_an_even_deal_are_split_across_the_workers():
    from hessbench.run.cells import _balanced
    from hessbench.run.pool import Batch

    batches = [Batch(k, [(f"{k}{i}", i) for i in range(5)]) for k in "abcde"]
    out = _balanced(batches, 2)
    assert [b.key for b in out] == ["a", "b", "c", "d", "e", "e"]
    assert [u for u, _ in out[-2].units] == ["e0", "e2", "e4"]
    assert [u for u, _ in out[-1].units] == ["e1", "e3"]
    assert _balanced(batches[:4], 2) == batches[:4]  # an even deal: unchanged
    assert _balanced(batches, 1) == batches
    tiny = [Batch("x", [("x0", 0)])]
    assert [b.units for b in _balanced(tiny, 3)] == [[("x0", 0)]]  # no empty batches
