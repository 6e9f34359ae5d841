"""Estimators that misbehave on purpose, for the runner's failure-isolation tests.

Imported by the tests (which registers them) and, through pickling, by the
worker processes that evaluate their cells.

With ``HESSBENCH_TEST_HEALED`` set, the four always-failing ones behave like the
zero estimator instead, so that a ``--retry-failed`` re-run can complete their cells.
"""

from __future__ import annotations

import os
import signal
import time
from typing import ClassVar

from hessbench.estimators._base import estimator_dataclass, register
from hessbench.estimators.zero import Zero


def _healed() -> bool:
    return bool(os.environ.get("HESSBENCH_TEST_HEALED"))


@register
@estimator_dataclass
class Segfault(Zero):
    """Kills its own process with SIGSEGV, like a crash in native code."""

    name: ClassVar[str] = "test_segfault"

    def _estimate(self, model, loss, inputs, targets, generator):
        if _healed():
            return super()._estimate(model, loss, inputs, targets, generator)
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)


@register
@estimator_dataclass
class Hang(Zero):
    """Never returns."""

    name: ClassVar[str] = "test_hang"

    def _estimate(self, model, loss, inputs, targets, generator):
        if _healed():
            return super()._estimate(model, loss, inputs, targets, generator)
        time.sleep(3600)


@register
@estimator_dataclass
class Raises(Zero):
    """Raises an ordinary exception."""

    name: ClassVar[str] = "test_raises"

    def _estimate(self, model, loss, inputs, targets, generator):
        if _healed():
            return super()._estimate(model, loss, inputs, targets, generator)
        raise RuntimeError("deliberate failure\nsecond line")


@register
@estimator_dataclass
class NaNs(Zero):
    """Returns NaN for every entry."""

    name: ClassVar[str] = "test_nan"

    def _estimate(self, model, loss, inputs, targets, generator):
        out = super()._estimate(model, loss, inputs, targets, generator)
        if _healed():
            return out
        return {k: v + float("nan") for k, v in out.items()}


@register
@estimator_dataclass
class HangWhenAsked(Zero):
    """Never returns while ``HESSBENCH_TEST_HANG`` is set; otherwise the zero estimator.

    The cluster tests set it for the first submission only (it reaches the array
    tasks through their environment), so that a re-run can complete the cells.
    """

    name: ClassVar[str] = "test_hang_once"

    def _estimate(self, model, loss, inputs, targets, generator):
        if os.environ.get("HESSBENCH_TEST_HANG"):
            time.sleep(3600)
        return super()._estimate(model, loss, inputs, targets, generator)


class DiesOnOpen:
    """A pool :class:`~hessbench.run.pool.Work` whose worker exits before its first unit."""

    def open(self, batch):
        os._exit(3)

    def failed(self, batch, unit_id, unit, status, message):
        return {"id": unit_id, "status": status, "message": message}


class TerminatedWork:
    """A pool :class:`~hessbench.run.pool.Work` whose units kill their worker with SIGTERM."""

    def open(self, batch):
        def unit(unit_id, unit):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)

        return unit

    def failed(self, batch, unit_id, unit, status, message):
        return {"id": unit_id, "status": status, "message": message}


class SignalsItsServer:
    """A pool :class:`~hessbench.run.pool.Work` whose units send SIGUSR2 to their parent
    process (the fork server), as Slurm does to every process before a time limit."""

    def open(self, batch):
        def unit(unit_id, unit):
            os.kill(os.getppid(), signal.SIGUSR2)
            time.sleep(0.3)  # the server's death, if it dies, is seen before the record
            return {"id": unit_id, "status": "ok"}

        return unit

    def failed(self, batch, unit_id, unit, status, message):
        return {"id": unit_id, "status": status, "message": message}
