"""Benchmark history: asv results of landed commits, kept in the repository, and a creep check.

Usage (from the repository root)::

    python .ci/bench_history.py record         # asv run on HEAD, results into benchmarks/results
    python .ci/bench_history.py check          # HEAD vs the best of the last 5 recorded commits
    python .ci/bench_history.py publish        # asv publish: graphs over the recorded commits

``record`` runs the gate's benchmarks (those of ``.ci/bench_gate.py``: the batch-1
MLP, the small CNN and the cost net) with ``asv run --python=same --set-commit-hash HEAD`` into
``benchmarks/results/<machine>/``, where ``<machine>`` names this kind of machine
(architecture, CPU model, cores), and describes the machine in its ``machine.json``.
Commit the new file: the results of commit X land in a commit after X.

``check`` measures HEAD's CPU time per call of those benchmarks (in a worker of
``.ci/bench_gate.py``, the protocol of the gate) and compares each estimator's
time *as a ratio to one gradient of the same problem* with the best (lowest)
ratio among the last ``--last`` recorded commits on this kind of machine. A ratio
above ``--factor`` times the best is measured again; what stays above is
reported as creep (exit 1 only with ``--strict``). So a 10% slowdown per commit,
which the parent-vs-HEAD gate lets pass, shows once it adds up. It is advisory
in ``.ci/run``: the recorded values come from asv's timing loop and HEAD's from
the gate's, and with few recorded commits their protocol difference alone can
reach 1.2x (measured: up to 1.41x on benchmarks of the same code). Without recorded
results for this machine it says so and exits 0.

``publish`` writes asv's HTML (``.asv/html``) over ``benchmarks/results``; note
that asv's pages load their scripts from public CDNs (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GATE_BENCH = r"^(?!.*(mlp784_b32|cnn3x16|ExactBatch))"  # the gate's set (bench_gate.py)
LAST = 5
FACTOR = 1.2
GRADIENT = "bench_estimators.Gradient.time_gradient"


def _gate():
    spec = importlib.util.spec_from_file_location("bench_gate", ROOT / ".ci" / "bench_gate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gate"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def machine() -> dict:
    """Describe the machine kind: a stable name and the fields asv records."""
    import os

    from hessbench.store.provenance import cpu_name

    cpu, cores = cpu_name(), os.cpu_count() or 1
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:40]
    return {
        "machine": f"{platform.machine()}-{slug}-{cores}c",
        "arch": platform.machine(),
        "cpu": cpu,
        "num_cpu": str(cores),
        "os": f"{platform.system()} {platform.release()}",
        "ram": "",
    }


def _asv_config(tmp: Path) -> Path:
    """asv.conf.json with results in benchmarks/results (comments stripped)."""
    text = re.sub(r"(?m)^\s*//.*$", "", (ROOT / "asv.conf.json").read_text())
    conf = json.loads(text)
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"))
    conf.update(results_dir=str(RESULTS), html_dir=str(ROOT / ".asv" / "html"))
    path = tmp / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=1))
    return path


def record(args: argparse.Namespace) -> int:
    """Run asv on HEAD into benchmarks/results; print the new file."""
    m = machine()
    with tempfile.TemporaryDirectory() as tmp:
        conf = _asv_config(Path(tmp))
        fields = [f"--{k}={v}" for k, v in m.items() if k != "machine" and v]
        subprocess.run(
            ["asv", "--config", str(conf), "machine", "--yes", "--machine", m["machine"], *fields],
            check=True,
            cwd=ROOT,
        )
        head = _git("rev-parse", "HEAD")
        run = ["asv", "--config", str(conf), "run", "--python=same", "--machine", m["machine"]]
        run += ["--set-commit-hash", head, "--bench", args.bench, "--show-stderr"]
        code = subprocess.run(run, cwd=ROOT).returncode
    desc = RESULTS / m["machine"] / "machine.json"  # the machine's description, for asv too
    if desc.exists():
        desc.write_text(json.dumps({**json.loads(desc.read_text()), **m}, indent=4) + "\n")
    new = sorted((RESULTS / m["machine"]).glob(f"{head[:8]}-*.json"))
    print(f"bench history: recorded {', '.join(str(p.relative_to(ROOT)) for p in new)}")
    return code


def _values(path: Path) -> dict[str, float]:
    """``{gate benchmark id: value}`` of one asv results file."""
    data = json.loads(path.read_text())
    cols = data["result_columns"]
    out = {}
    for name, row in data["results"].items():
        res = dict(zip(cols, row, strict=False))
        values, params = res.get("result"), res.get("params") or []
        if values is None:
            continue
        combos = list(itertools.product(*[[ast.literal_eval(p) for p in ps] for ps in params]))
        for combo, value in zip(combos or [()], values, strict=False):
            if value is None:
                continue
            args = f"({', '.join(map(str, combo))})" if combo else ""
            out[f"{name}{args}"] = float(value)
    return out


def _problem(bid: str) -> str | None:
    inside = bid.partition("(")[2].rstrip(")")
    return inside.split(", ")[0] if inside else None


def ratios(values: dict[str, float]) -> dict[str, float]:
    """Each ``time_`` benchmark's value divided by the gradient's time on its problem."""
    out = {}
    for bid, v in values.items():
        meth = bid.split("(")[0].rsplit(".", 1)[-1]
        grad = values.get(f"{GRADIENT}({_problem(bid)})")
        if meth.startswith("time_") and not bid.startswith(GRADIENT) and grad:
            out[bid] = v / grad
    return out


def history(name: str, last: int, exclude: str) -> list[tuple[str, dict[str, float]]]:
    """``(commit, ratios)`` of the last ``last`` recorded ancestors of HEAD (newest first)."""
    files = {}
    for path in (RESULTS / name).glob("*.json"):
        if path.name != "machine.json":
            files.setdefault(json.loads(path.read_text())["commit_hash"], path)
    out = []
    for commit in _git("rev-list", "--max-count=500", "HEAD").split():
        if commit in files and commit != exclude:
            out.append((commit, ratios(_values(files[commit]))))
            if len(out) == last:
                break
    return out


def _measure(gate, bench: str) -> dict[str, float]:
    """HEAD's CPU time per call of the gate's benchmarks, measured as the gate does."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import shutil

        shutil.copytree(
            ROOT / "benchmarks",
            tmp / "defs" / "benchmarks",
            ignore=shutil.ignore_patterns("__pycache__", "micro", "results"),
        )
        (tmp / "logs").mkdir()
        session = gate.Session({"head": ROOT}, tmp / "defs", tmp / "logs")
        listing = session.listing()["head"]
        if listing["error"]:
            raise RuntimeError(f"HEAD cannot import the benchmarks: {listing['error']}")
        select = re.compile(bench)
        ids = [b for b in listing["ids"] if select.search(b) and gate.kind_of(b) == "time"]
        recs = session.rounds({"head": ids}, 1)["head"]
    return {b: r.value for b, r in recs.items() if r.status == "ok" and r.values}


def check(args: argparse.Namespace) -> int:
    """HEAD's gradient-normalized times vs the best of the last recorded commits."""
    m = machine()["machine"]
    head = _git("rev-parse", "HEAD")
    past = history(m, args.last, head)
    if not past:
        print(f"bench history: no recorded results for machine {m}: nothing to compare")
        return 0
    best: dict[str, tuple[float, str]] = {}
    for commit, rs in past:
        for bid, r in rs.items():
            if bid not in best or r < best[bid][0]:
                best[bid] = (r, commit[:10])
    gate = _gate()
    print(f"bench history: HEAD vs the best of {len(past)} recorded commits on {m}", flush=True)
    now = ratios(_measure(gate, args.bench))
    suspects = [b for b, r in now.items() if b in best and r > args.factor * best[b][0]]
    if suspects:
        print(f"  measuring {len(suspects)} again: {', '.join(suspects)}", flush=True)
        again = [ratios(_measure(gate, "|".join(map(re.escape, suspects)))) for _ in range(2)]
        for b in suspects:
            now[b] = statistics.median([now[b], *(a.get(b, now[b]) for a in again)])
    failures = []
    for bid in sorted(now):
        if bid not in best:
            continue
        ratio = now[bid] / best[bid][0]
        verdict = "CREEP" if ratio > args.factor else "ok"
        if verdict == "CREEP":
            failures.append(bid)
        if verdict != "ok" or args.verbose:
            print(
                f"  {bid}: {now[bid]:.3g} gradients vs best {best[bid][0]:.3g} "
                f"({best[bid][1]}): x{ratio:.2f} {verdict}"
            )
    if failures:
        what = "FAIL" if args.strict else "WARNING (advisory; --strict fails)"
        print(
            f"bench history: {what}: {len(failures)} benchmark(s) more than {args.factor}x "
            f"their best of the last {len(past)} recorded commits"
        )
        return 1 if args.strict else 0
    print(f"bench history: OK: {len(now)} benchmarks within {args.factor}x of their best")
    return 0


def publish(args: argparse.Namespace) -> int:
    """Run asv publish over benchmarks/results."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = _asv_config(Path(tmp))
        return subprocess.run(["asv", "--config", str(conf), "publish"], cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run a subcommand."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="asv run on HEAD into benchmarks/results")
    rec.add_argument("--bench", default=GATE_BENCH, help="regex on benchmark names")
    chk = sub.add_parser("check", help="HEAD vs the best of the last recorded commits")
    chk.add_argument("--last", type=int, default=LAST, help=f"recorded commits ({LAST})")
    chk.add_argument("--factor", type=float, default=FACTOR, help=f"threshold ({FACTOR})")
    chk.add_argument("--bench", default=GATE_BENCH, help="regex on benchmark ids")
    chk.add_argument("-v", "--verbose", action="store_true", help="print every benchmark")
    chk.add_argument(
        "--strict", action="store_true", help="exit 1 on creep (default: report it, exit 0)"
    )
    sub.add_parser("publish", help="asv publish (HTML in .asv/html)")
    args = parser.parse_args(argv)
    return {"record": record, "check": check, "publish": publish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
