"""Result shards: one writer per file, merged into the run folder's ``cells.jsonl``.

Slurm array tasks and ``hessbench run --shard i/n`` never write ``cells.jsonl``;
each writes its own file under ``RUN_DIR/shards/`` in the record format of
:mod:`hessbench.store.records` (appended, flushed and fsynced per cell):

- ``<session>-<task>.jsonl``: array task ``<task>`` of a submission; the
  submission's manifest ``<session>.json`` names its executor, the job id of
  every array task and the cells it was given;
- ``shard-<i>-of-<n>.jsonl``: a ``--shard i/n`` run on some machine.

:class:`Collector` merges them (``hessbench collect``, and every cluster run at
its start and while it waits). Merging is idempotent: ``shards/collected.json``
remembers how far each shard was read and which array tasks are settled. The
rule per cell: a record replaces the current one unless the current one is
``ok`` or ``unsupported`` (an ok is never lost; a later record beats an earlier
failure). A settled array task is one whose job ended (the scheduler's state);
its cells that its shard lacks are recorded as ``cancelled`` (job cancelled),
``timeout`` (time limit) or ``crashed`` (any other end), with the job id and
state in the message (and ``job_state``); a plain re-run evaluates them again,
as it does missing cells, since nothing is known about them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hessbench.errors import ConfigError
from hessbench.store.records import DONE, CellStore, atomic_write, iter_records, read_records

__all__ = [
    "TERMINAL",
    "Collector",
    "Shard",
    "better",
    "job_status",
    "merged_records",
    "parse_shard",
    "shard_path",
]

SHARDS = "shards"
JOURNAL = "collected.json"
TERMINAL = frozenset(
    {"COMPLETED", "CANCELLED", "TIMEOUT", "DEADLINE", "FAILED", "OUT_OF_MEMORY", "NODE_FAIL"}
    | {"BOOT_FAIL", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
)
"""Scheduler job states after which a job writes nothing more."""

StateFn = Callable[[dict, dict], str]
"""``(manifest, task entry) -> job state`` (upper-case Slurm names, e.g. ``RUNNING``)."""


@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: the i-th of n shares (1-based)."""

    i: int
    n: int

    def __str__(self) -> str:
        return f"{self.i}/{self.n}"


def parse_shard(text: str) -> Shard:
    """``"2/4"`` -> ``Shard(2, 4)``; anything else is a one-line :class:`ConfigError`.

    >>> parse_shard("2/4")
    Shard(i=2, n=4)
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 1/4")
    i, n = int(m[1]), int(m[2])
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {text!r}: i must be between 1 and n (n >= 1)")
    return Shard(i, n)


def shard_path(run_dir: Path, shard: Shard) -> Path:
    """The file a ``--shard i/n`` run writes (n > 1)."""
    return Path(run_dir) / SHARDS / f"shard-{shard.i}-of-{shard.n}.jsonl"


def job_status(state: str) -> str:
    """The cell status for a cell its ended job did not record."""
    if state == "CANCELLED":
        return "cancelled"
    if state in ("TIMEOUT", "DEADLINE"):
        return "timeout"
    return "crashed"


def better(new: dict, old: dict | None) -> bool:
    """Whether record ``new`` replaces the current record ``old`` of its cell."""
    if old is None:
        return True
    if old.get("status") in DONE:
        return False
    return new != old


def _shard_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / SHARDS).glob("*.jsonl"))


def manifests(run_dir: Path) -> list[dict]:
    """The submission manifests of a run folder, oldest session first."""
    out = []
    for path in sorted((Path(run_dir) / SHARDS).glob("*.json")):
        if path.name != JOURNAL:
            out.append(json.loads(path.read_text(encoding="utf-8")))
    return out


def merged_records(run_dir: Path) -> dict[str, dict]:
    """``cells.jsonl`` with every shard merged in, in memory (nothing is written)."""
    current = read_records(run_dir)
    for path in _shard_files(run_dir):
        for rec in iter_records(path)[0]:
            if better(rec, current.get(rec["cell_id"])):
                current[rec["cell_id"]] = rec
    return current


@dataclass
class Collector:
    """Merges a run folder's shards into ``cells.jsonl``; hold the run lock while using it."""

    run_dir: Path
    current: dict[str, dict] = field(init=False)
    in_flight: dict[str, str] = field(init=False, default_factory=dict)
    """Cells of array tasks still pending or running: cell id -> job id."""
    unknown: dict[str, str] = field(init=False, default_factory=dict)
    """Array tasks whose job state could not be read: job id -> state."""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.current = read_records(self.run_dir)
        path = self.run_dir / SHARDS / JOURNAL
        journal = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        self.offsets: dict[str, int] = journal.get("offsets", {})
        self.settled: set[str] = set(journal.get("settled", []))
        self._ids: dict[str, set[str]] = {}  # shard name -> cell ids merged from it

    def _recorded(self, name: str) -> set[str]:
        """The cells of shard ``name`` up to where it was merged."""
        if name not in self._ids:
            path = self.run_dir / SHARDS / name
            records, _ = iter_records(path, 0, self.offsets.get(name, 0))
            self._ids[name] = {r["cell_id"] for r in records}
        return self._ids[name]

    def pending_tasks(self) -> list[tuple[dict, dict]]:
        """``(manifest, task)`` of every array task not settled yet."""
        return [
            (m, t)
            for m in manifests(self.run_dir)
            for t in m["tasks"]
            if f"{m['session']}/{t['task']}" not in self.settled
        ]

    def step(self, state_of: StateFn | None) -> list[dict]:
        """Merge what the shards hold now and settle ended array tasks; the new records.

        ``state_of`` gives a job's state (None: no job is asked about, nothing settles).
        States are read before the shards, so a task seen ended has its final shard.
        """
        tasks = self.pending_tasks() if state_of is not None else []
        states = [state_of(m, t) for m, t in tasks] if state_of is not None else []
        new: list[dict] = []
        store: CellStore | None = None

        def add(rec: dict) -> None:
            nonlocal store
            if better(rec, self.current.get(rec["cell_id"])):
                if store is None:
                    store = CellStore(self.run_dir)
                store.append(rec)
                self.current[rec["cell_id"]] = rec
                new.append(rec)

        try:
            for path in _shard_files(self.run_dir):
                ids = self._recorded(path.name)
                records, end = iter_records(path, self.offsets.get(path.name, 0))
                for rec in records:
                    add(rec)
                    ids.add(rec["cell_id"])
                self.offsets[path.name] = end
            self.in_flight, self.unknown = {}, {}
            for (m, t), state in zip(tasks, states, strict=True):
                # what was merged, not the shard as it is now: a record written after the
                # merge above would otherwise settle its task without being merged
                recorded = self._recorded(t["shard"])
                missing = [c for c in t["cells"] if c["cell_id"] not in recorded]
                if state in TERMINAL or not missing:  # a full shard needs no job state
                    for cell in missing:
                        add(self._missing(m, t, cell, state))
                    self.settled.add(f"{m['session']}/{t['task']}")
                elif state in ("UNKNOWN", ""):
                    self.unknown[t["job_id"]] = state or "UNKNOWN"
                else:
                    self.in_flight.update((c["cell_id"], t["job_id"]) for c in missing)
        finally:
            if store is not None:
                store.close()
            if self.offsets or self.settled:
                atomic_write(
                    self.run_dir / SHARDS / JOURNAL,
                    json.dumps(
                        {"offsets": self.offsets, "settled": sorted(self.settled)}, indent=1
                    ),
                )
        return new

    @staticmethod
    def _missing(manifest: dict, task: dict, cell: dict, state: str) -> dict:
        kind = "slurm job" if manifest["executor"] == "slurm" else f"{manifest['executor']} job"
        return {
            **cell,
            "status": job_status(state),
            "message": f"{kind} {task['job_id']} ended {state} before this cell finished",
            "job_state": state,
        }
