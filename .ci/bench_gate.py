"""CI performance gate: benchmark HEAD's parent and HEAD, fail on a confirmed regression.

Usage (from the repository root; ``.ci/run`` calls it after the tests)::

    python .ci/bench_gate.py                    # HEAD^ vs HEAD, the gate's benchmarks
    python .ci/bench_gate.py --bench 'hesscale' # only benchmarks whose id matches
    python .ci/bench_gate.py --base HEAD~3      # another base commit

How it works (docs/benchmarks.md has the details):

- The parent commit is checked out with ``git worktree`` in a temporary folder.
  HEAD's ``benchmarks/`` (copied to a temporary folder) runs against both code
  versions, in the current interpreter: a worker process per version with
  ``PYTHONPATH`` set to that version's root, so ``import hessbench`` finds it.
  HEAD is the working tree (in CI, a fresh clone of HEAD).
- Workers run with glibc's malloc thresholds fixed (``MALLOC_MMAP_THRESHOLD_`` 32 MiB,
  ``MALLOC_TRIM_THRESHOLD_`` 4 GiB): left to adapt, they made the same code's
  timings of megabyte-sized benchmarks differ 2-4x from one process to the next.
- Rounds (default 3): each round starts a fresh worker per version; per
  benchmark both versions are set up side by side. A ``time_`` benchmark is
  timed with ``time.process_time`` (CPU time: wall-clock figures swing
  several-fold on a loaded machine) in 6 chunks of 50 ms per version,
  alternating parent and HEAD chunk by chunk; its ratio is the median over all
  chunk pairs of HEAD / parent (a load change hits both halves of a pair), its
  value the median of the samples (>= 10 ms of calls each). ``track_``
  benchmarks return their value each round; the median over rounds is compared.
- Flagged: a ``time_`` benchmark more than ``--factor`` (1.2) times slower; a
  ``track_*memory*`` benchmark more than 1.2x larger (and by more than 64 KiB);
  any other ``track_`` value (accuracy) changed by more than 1.2x either way
  (and by more than 1e-4); a benchmark that errors at HEAD but not at the parent.
- Everything flagged is run again in fresh interleaved rounds; what is flagged
  twice fails the gate (exit 1), unless HEAD's commit message has a line
  ``perf-regression-accepted: <benchmark pattern>: <reason>`` whose pattern
  (``fnmatch``, ``*`` and ``?`` wildcards) matches the benchmark's id.
- No parent, or a parent whose code cannot import the benchmarks: say why, exit 0.
- HEAD changes no file that can change a timing (only docs, tests, reports): the two
  versions would run identical code, so nothing is compared; say so, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import itertools
import json
import math
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTOR = 1.2
ROUNDS = 3
# what can change a timing: a HEAD that touches none of these is not benchmarked
CODE = ("hessbench", "benchmarks", "pyproject.toml", "constraints-cpu.txt")
CHUNKS, CHUNK_S = 6, 0.05  # per benchmark, version and round: 6 x 50 ms of timing
SAMPLE_S = 0.01  # one timing sample: calls batched up to this much CPU time
WARMUP_S = 0.05
RERUN_ROUNDS = 5  # rounds of the confirmation run of flagged benchmarks
CALL_TIMEOUT_S = 180.0  # one benchmark in a worker (setup, warm-up and timing)
MEMORY_SLACK = 64 * 1024  # bytes: smaller peak-memory increases are not flagged
TRACK_ABS = 1e-4  # smaller absolute changes of a track_ value are not flagged
# The gate's benchmarks (a regex on the id): every estimator and the gradient on the
# batch-1 MLP, the small CNN and the cost net. Left to asv's tracking: the batch-32 MLP
# (the batch-1 MLP runs the same code paths) and the large 3x16x16 CNN and the batch-32
# exact (seconds per call; the small CNN runs the same conv and pool rules).
DEFAULT_BENCH = r"^(?!.*(mlp784_b32|cnn3x16|ExactBatch))"
ACCEPT_RE = re.compile(
    r"^\s*perf-regression-accepted:\s*(?P<pattern>[^:]*?)\s*:\s*(?P<why>.*?)\s*$"
)


# --------------------------------------------------------------------------- worker


def _discover(package: str) -> dict[str, tuple]:
    """Benchmarks of ``package`` as asv finds them: ``{id: (cls, method name, params)}``."""
    import importlib
    import inspect
    import pkgutil

    pkg = importlib.import_module(package)
    found: dict[str, tuple] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        for cname, cls in vars(mod).items():
            if not inspect.isclass(cls) or cls.__module__ != mod.__name__ or cname.startswith("_"):
                continue
            params = list(getattr(cls, "params", []))
            if params and not isinstance(params[0], (list, tuple)):
                params = [params]
            combos = list(itertools.product(*params)) if params else [()]
            for meth in sorted(dir(cls)):
                if not re.match(r"^(time|track)_", meth) or not callable(getattr(cls, meth)):
                    continue
                for combo in combos:
                    args = f"({', '.join(map(str, combo))})" if combo else ""
                    found[f"{info.name}.{cname}.{meth}{args}"] = (cls, meth, combo)
    return found


class _Open:
    """The worker's open benchmark: set up, warmed up, calls per sample calibrated."""

    def __init__(self, entry: tuple) -> None:
        cls, self.meth, self.combo = entry
        self.inst = cls()
        self.func = getattr(self.inst, self.meth)
        self.number = 1

    def setup(self) -> None:
        if hasattr(self.inst, "setup"):
            self.inst.setup(*self.combo)

    def teardown(self) -> None:
        if hasattr(self.inst, "teardown"):
            self.inst.teardown(*self.combo)

    def calibrate(self) -> None:
        """Warm up; choose the calls per sample so that a sample lasts >= SAMPLE_S."""
        timer = time.process_time
        t0, n = timer(), 0
        while n < 2 or timer() - t0 < WARMUP_S:
            self.func(*self.combo)
            n += 1
        self.number = max(1, int(SAMPLE_S / max((timer() - t0) / n, 1e-9)))

    def samples(self, budget: float) -> list[float]:
        """CPU seconds per call, one value per sample, for about ``budget`` seconds."""
        timer = time.process_time
        self.func(*self.combo)  # untimed: caches were the other worker's a moment ago
        out, end = [], timer() + budget
        while not out or timer() < end:
            start = timer()
            for _ in range(self.number):
                self.func(*self.combo)
            out.append((timer() - start) / self.number)
        return out


def _serve(cmd: dict, found: dict, state: dict) -> dict:
    """One command: ``open`` a benchmark (a track_ one answers its value), ``sample``, ``close``."""
    if cmd["cmd"] == "open":
        bench = _Open(found[cmd["id"]])
        try:
            bench.setup()
        except NotImplementedError as exc:
            return {"status": "skipped", "detail": str(exc)}
        if bench.meth.startswith("time_"):
            state["open"] = bench
            bench.calibrate()
            return {"status": "ok"}
        try:
            value = float(bench.func(*bench.combo))
        finally:
            bench.teardown()
        if not math.isfinite(value):
            raise ValueError(f"{bench.meth} returned {value}")
        return {"status": "ok", "value": value}
    if cmd["cmd"] == "sample":
        return {"status": "ok", "samples": state["open"].samples(cmd["budget"])}
    if cmd["cmd"] == "close":
        bench = state.pop("open", None)
        if bench is not None:
            bench.teardown()
        return {"status": "ok"}
    raise ValueError(f"unknown command {cmd['cmd']!r}")


def worker(bench_parent: str, code_root: str) -> None:
    """Serve JSON commands on stdin until EOF; answer each with one JSON line on stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from the benchmarks go to stderr, not the protocol
    sys.path.insert(0, bench_parent)

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        import hessbench

        where = Path(hessbench.__file__).resolve()
        if Path(code_root).resolve() not in where.parents:
            raise ImportError(f"hessbench imported from {where}, not from {code_root}")
        found, load_error = _discover("benchmarks"), None
    except BaseException as exc:
        traceback.print_exc()
        found, load_error = {}, f"{type(exc).__name__}: {exc}"
    state: dict = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "list":
            send({"ids": sorted(found), "error": load_error})
            continue
        try:
            send(_serve(cmd, found, state))
        except BaseException as exc:
            print(f"--- {cmd}", file=sys.stderr)
            traceback.print_exc()
            state.pop("open", None)
            send({"status": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]})


# --------------------------------------------------------------------------- driver


class Worker:
    """One worker process benchmarking one code version."""

    def __init__(self, version: str, code_root: Path, bench_parent: Path, log_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "HESSBENCH_PLUGINS"}
        env.update(
            PYTHONPATH=str(code_root),
            PYTHONDONTWRITEBYTECODE="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            # glibc's malloc otherwise adapts its mmap threshold to what the process
            # freed before and returns freed memory to the system: a benchmark with
            # megabyte tensors then runs 2-4x slower in some processes than in others
            # (adahessian on costnet_b1: 2.2 to 11 ms medians, same code), and a round
            # whose HEAD worker drew the slow mode twice failed the gate on a
            # docstring change. Fixed thresholds give every worker the same allocator.
            MALLOC_MMAP_THRESHOLD_=str(32 * 2**20),
            MALLOC_TRIM_THRESHOLD_=str(4 * 2**30),
        )
        self.log = open(log_dir / f"{version}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(bench_parent), str(code_root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        self.version = version

    def ask(self, cmd: dict, timeout: float = CALL_TIMEOUT_S) -> dict:
        """Send one command and wait for its answer; an error dict if the worker dies or hangs."""
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"status": "error", "detail": "worker died", "dead": True}
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.close(kill=True)
            what = f"timed out after {timeout:.0f} s" if not ready else "crashed"
            rc = self.proc.returncode
            return {"status": "error", "detail": f"worker {what} (rc {rc})", "dead": True}
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        """Stop the worker (EOF on stdin, or kill)."""
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                with contextlib.suppress(BrokenPipeError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass
class Record:
    """A benchmark's results over rounds, for one version."""

    values: dict[int, float] = field(default_factory=dict)  # round -> value
    samples: dict[int, list[float]] = field(default_factory=dict)  # round -> time samples
    pairs: list[float] = field(default_factory=list)  # HEAD: chunk ratios HEAD / parent
    status: str = "ok"  # ok, skipped, error
    detail: str = ""

    def fail(self, res: dict) -> None:
        """Record a skip or an error (an error sticks)."""
        if self.status != "error":
            self.status, self.detail = res["status"], res.get("detail", "")

    @property
    def value(self) -> float:
        """Median over rounds."""
        return statistics.median(self.values.values())


class Session:
    """Two code versions, their worker logs and the benchmark ids each one has."""

    def __init__(self, roots: dict[str, Path], bench_parent: Path, log_dir: Path) -> None:
        self.roots, self.bench_parent, self.log_dir = roots, bench_parent, log_dir

    def spawn(self, version: str) -> Worker:
        """A fresh worker for ``version``."""
        return Worker(version, self.roots[version], self.bench_parent, self.log_dir)

    def listing(self) -> dict[str, dict]:
        """``{version: {"ids": [...], "error": str | None}}``."""
        out = {}
        for v in self.roots:
            w = self.spawn(v)
            out[v] = w.ask({"cmd": "list"}, timeout=300)
            w.close()
            if "ids" not in out[v]:
                out[v] = {"ids": [], "error": out[v].get("detail", "worker failed")}
        return out

    def _ask(self, workers: dict[str, Worker], v: str, cmd: dict) -> dict:
        """Ask ``workers[v]``; replace it with a fresh one if it died."""
        res = workers[v].ask(cmd)
        if res.get("dead"):
            workers[v] = self.spawn(v)
        return res

    def rounds(self, ids: dict[str, list[str]], rounds: int) -> dict[str, dict[str, Record]]:
        """Run ``ids[version]`` in interleaved rounds, with fresh workers each round.

        Per benchmark, both versions are set up side by side; a ``time_`` benchmark
        is then sampled in CHUNKS chunks of CHUNK_S seconds, alternating versions
        chunk by chunk, so that a change of machine load hits both alike.
        """
        recs = {v: {b: Record() for b in ids[v]} for v in self.roots}
        order = sorted(set().union(*ids.values()))
        for r in range(rounds):
            t0 = time.perf_counter()
            workers = {v: self.spawn(v) for v in self.roots}
            ask = functools.partial(self._ask, workers)
            for i, bid in enumerate(order):
                present = [v for v in self.roots if bid in recs[v]]
                if (r + i) % 2:
                    present.reverse()
                timed = []
                for v in present:
                    res = ask(v, {"cmd": "open", "id": bid})
                    if res["status"] != "ok":
                        recs[v][bid].fail(res)
                    elif "value" in res:
                        recs[v][bid].values[r] = res["value"]
                    else:
                        timed.append(v)
                        recs[v][bid].samples[r] = []
                for k in range(CHUNKS):
                    chunk = {}
                    for v in timed[:] if k % 2 == 0 else timed[::-1]:
                        res = ask(v, {"cmd": "sample", "budget": CHUNK_S})
                        if res["status"] != "ok":
                            recs[v][bid].fail(res)
                            timed.remove(v)
                            continue
                        recs[v][bid].samples[r] += res["samples"]
                        chunk[v] = statistics.median(res["samples"])
                    if len(chunk) == 2:
                        recs["head"][bid].pairs.append(chunk["head"] / chunk["parent"])
                for v in timed:
                    ask(v, {"cmd": "close"})
                    recs[v][bid].values[r] = statistics.median(recs[v][bid].samples[r])
            for w in workers.values():
                w.close()
            print(f"  round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s", flush=True)
        return recs


def kind_of(bid: str) -> str:
    """``time``, ``memory`` or ``track`` (accuracy and other tracked values)."""
    meth = bid.split("(")[0].rsplit(".", 1)[-1]
    if meth.startswith("time_"):
        return "time"
    return "memory" if "memory" in meth else "track"


def flagged(bid: str, parent: float, head: float, ratio: float, factor: float) -> bool:
    """Whether HEAD's value is a regression (or, for accuracy, a change) beyond ``factor``.

    ``ratio`` is HEAD / parent: for times the median of the chunk pairs' ratios.
    """
    kind = kind_of(bid)
    if kind == "time":
        return ratio > factor
    if kind == "memory":
        return ratio > factor and head - parent > MEMORY_SLACK
    return (ratio > factor or ratio < 1 / factor) and abs(head - parent) > TRACK_ABS


def fmt(bid: str, value: float | None) -> str:
    """A value in its unit."""
    if value is None:
        return "-"
    kind = kind_of(bid)
    if kind == "time":
        return f"{value * 1e6:.1f} us" if value < 1e-3 else f"{value * 1e3:.3f} ms"
    if kind == "memory":
        return f"{value / 1024:.1f} KiB" if value < 2**20 else f"{value / 2**20:.2f} MiB"
    return f"{value:.4g}"


def accepted_patterns(message: str) -> list[tuple[str, str]]:
    """``(pattern, reason)`` of each ``perf-regression-accepted:`` line with a reason."""
    out = []
    for line in message.splitlines():
        m = ACCEPT_RE.match(line)
        if not m:
            continue
        if not m["pattern"] or not m["why"]:
            print(f"bench gate: ignored (needs '<benchmark>: <reason>'): {line.strip()}")
            continue
        out.append((m["pattern"], m["why"]))
    return out


def acceptance(bid: str, patterns: list[tuple[str, str]]) -> str | None:
    """The reason of the first pattern matching ``bid`` (with or without its module)."""
    short = bid.split(".", 1)[1] if "." in bid else bid
    for pattern, why in patterns:
        if fnmatch.fnmatchcase(bid, pattern) or fnmatch.fnmatchcase(short, pattern):
            return why
    return None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def compare(
    first: dict[str, dict[str, Record]],
    second: dict[str, dict[str, Record]] | None,
    factor: float,
) -> dict[str, tuple]:
    """Per benchmark: ``(parent value, head value, ratio, verdict, detail)``."""
    out = {}
    parent, head = first["parent"], first["head"]
    for bid in sorted(set(parent) | set(head)):
        p, h = parent.get(bid), head.get(bid)
        pv = p.value if p and p.status == "ok" and p.values else None
        hv = h.value if h and h.status == "ok" and h.values else None
        ratio = None
        if pv is not None and hv is not None:
            ratio = hv / pv if pv > 0 else (math.inf if hv > 0 else 1.0)
            if kind_of(bid) == "time":
                # the median of HEAD / parent over chunk pairs measured back to back
                ratio = statistics.median(h.pairs) if h.pairs else ratio
        if h is None:
            out[bid] = (pv, None, None, "removed", "")
        elif h.status == "skipped":
            out[bid] = (pv, None, None, "skipped", h.detail)
        elif h.status == "error":
            worked = p is not None and p.status == "ok"
            verdict = "ERROR" if p is None or worked else "error (parent too)"
            out[bid] = (pv, None, None, verdict, h.detail)
        elif p is None or p.status == "skipped":
            out[bid] = (None, hv, None, "new", "")
        elif p.status == "error":
            out[bid] = (None, hv, None, "fixed", "")
        elif flagged(bid, pv, hv, ratio, factor):
            out[bid] = (pv, hv, ratio, "FLAGGED", "")
        else:
            better = kind_of(bid) != "track" and ratio is not None and ratio < 1 / factor
            out[bid] = (pv, hv, ratio, "better" if better else "ok", "")
    if second is not None:  # confirmation: what stays flagged twice is a regression
        again = compare(second, None, factor)
        for bid, (pv, hv, ratio, verdict, detail) in out.items():
            if verdict in ("FLAGGED", "ERROR"):
                v2 = again.get(bid)
                confirmed = v2 is not None and v2[3] == verdict
                if confirmed and verdict == "FLAGGED":
                    out[bid] = (*v2[:3], "REGRESSION", f"first run {fmt(bid, hv)}")
                elif confirmed:
                    out[bid] = (pv, hv, ratio, "ERROR", detail)
                else:
                    out[bid] = (pv, hv, ratio, "noise", "not confirmed on re-run")
    return out


def print_table(results: dict[str, tuple]) -> None:
    """Parent vs HEAD, one row per benchmark."""
    width = max([len(b) for b in results] + [9])
    print(f"{'benchmark':<{width}}  {'parent':>12}  {'HEAD':>12}  {'ratio':>6}  result")
    for bid, (pv, hv, ratio, verdict, detail) in results.items():
        r = f"{ratio:.2f}" if ratio is not None else "-"
        extra = f"  ({detail})" if detail else ""
        print(f"{bid:<{width}}  {fmt(bid, pv):>12}  {fmt(bid, hv):>12}  {r:>6}  {verdict}{extra}")


def gate(args: argparse.Namespace) -> int:
    """Run the gate; the exit status."""
    t_start = time.perf_counter()
    try:
        head = _git("rev-parse", "HEAD")
        parent = _git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"bench gate: skipped: {args.base} does not exist (first commit or shallow clone)")
        return 0
    print(f"bench gate: parent {parent[:10]} vs HEAD {head[:10]} (working tree)", flush=True)
    dirty = bool(_git("status", "--porcelain", "--", *CODE))
    if dirty:
        print("  note: uncommitted changes in hessbench/ or benchmarks/ are part of HEAD here")
    elif not _git("diff", "--name-only", parent, "HEAD", "--", *CODE):
        print(f"bench gate: skipped: no file under {', '.join(CODE)} differs from the parent")
        return 0
    message = _git("log", "-1", "--format=%B", "HEAD")
    patterns = accepted_patterns(message)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    worktree = tmp / "parent"
    try:
        try:
            _git("worktree", "add", "--detach", "--quiet", str(worktree), parent)
        except subprocess.CalledProcessError as exc:
            print(f"bench gate: skipped: cannot check out the parent: {exc.stderr.strip()}")
            return 0
        shutil.copytree(
            ROOT / "benchmarks",
            tmp / "defs" / "benchmarks",
            ignore=shutil.ignore_patterns("__pycache__", "micro", "results"),
        )
        (tmp / "logs").mkdir()
        session = Session({"parent": worktree, "head": ROOT}, tmp / "defs", tmp / "logs")
        return _gate_run(args, session, patterns, tmp, t_start)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "remove", "--force", str(worktree))
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "prune")


def _gate_run(args, session: Session, patterns, tmp: Path, t_start: float) -> int:
    listing = session.listing()
    if listing["parent"]["error"]:
        print(
            f"bench gate: skipped: the parent's code cannot import the benchmarks: "
            f"{listing['parent']['error']}"
        )
        return 0
    if listing["head"]["error"]:
        print(f"bench gate: FAIL: HEAD cannot import the benchmarks: {listing['head']['error']}")
        print((tmp / "logs" / "head.log").read_text(errors="replace")[-3000:])
        return 1
    select_re = re.compile(args.bench)
    ids = {v: [b for b in listing[v]["ids"] if select_re.search(b)] for v in listing}
    n = len(set(ids["parent"]) | set(ids["head"]))
    print(f"  {n} benchmarks, {args.rounds} interleaved rounds, factor {args.factor}", flush=True)
    first = session.rounds(ids, args.rounds)
    results = compare(first, None, args.factor)
    suspects = [b for b, r in results.items() if r[3] in ("FLAGGED", "ERROR")]
    if suspects:
        print(f"  re-running {len(suspects)} flagged: {', '.join(suspects)}", flush=True)
        sub = {v: [b for b in ids[v] if b in suspects] for v in ids}
        second = session.rounds(sub, max(args.rounds, RERUN_ROUNDS))
        results = compare(first, second, args.factor)
    failures = []
    for bid, (pv, hv, ratio, verdict, _) in list(results.items()):
        if verdict in ("REGRESSION", "ERROR"):
            why = acceptance(bid, patterns)
            if why is None:
                failures.append(bid)
            else:
                results[bid] = (pv, hv, ratio, "accepted", f"{verdict.lower()}: {why}")
    if args.json:
        keys = ("benchmark", "parent", "head", "ratio", "result", "detail")
        rows = [dict(zip(keys, (b, *r), strict=True)) for b, r in results.items()]
        for row in rows:  # the per-round values behind each median
            for v in ("parent", "head"):
                rec = first[v].get(row["benchmark"])
                row[f"{v}_rounds"] = list(rec.values.values()) if rec else []
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print_table(results)
    print()
    for bid, (_, _, _, verdict, _) in results.items():
        if verdict == "accepted":
            print(f"bench gate: {bid}: regression accepted by the commit message")
    if any(r[3] == "ERROR" for r in results.values()):
        print("worker log (HEAD), last lines:")
        print((tmp / "logs" / "head.log").read_text(errors="replace")[-3000:])
    elapsed = time.perf_counter() - t_start
    if failures:
        print(
            f"bench gate: FAIL: {len(failures)} confirmed regression(s) or new error(s) "
            f"in {elapsed:.0f} s: {', '.join(failures)}"
        )
        print(
            "  (to accept one, add to the commit message a line "
            "'perf-regression-accepted: <benchmark pattern>: <reason>')"
        )
        return 1
    print(
        f"bench gate: OK: {len(results)} benchmarks compared, no confirmed regression, "
        f"{elapsed:.0f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; run the gate or, internally, a worker."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD^", help="commit to compare HEAD with (HEAD^)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds ({ROUNDS})")
    parser.add_argument("--factor", type=float, default=FACTOR, help=f"threshold ({FACTOR})")
    parser.add_argument(
        "--bench", default=DEFAULT_BENCH, help="regex on benchmark ids (default: the gate's set)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    return gate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
