"""One training run: build the task, train with a stepper, evaluate at intervals.

:func:`train_run` never raises for a problem of the run itself: a
:class:`~hessbench.optim.DivergenceError` or a non-finite loss ends it as
``diverged`` (with the step), any other exception as ``error``; the record
holds the curve up to that point.

Deterministic given the run: the initial weights, the training pool, the
held-out set and the minibatch order come from seeds derived from the task's
name and the seed (the same for every optimizer and learning rate, so they all
start from the same weights and see the same batches), through local
generators; the optimizer gets its own ``seed`` (Monte-Carlo estimators and
dropout masks draw from it), and training runs inside ``torch.random.fork_rng``,
so the caller's global RNG is left as it was.

=============== ===============================================================
what            seed
=============== ===============================================================
initial weights ``derive_seed(task, seed, "init")`` (as in accuracy suites)
training pool   ``derive_seed(task, seed, "data")``; digits: the fixed split
held-out set    ``derive_seed(task, seed, "eval")``; digits: the 297 held out
minibatches     ``derive_seed(task, seed, "train")``, a permutation per epoch
optimizer seed  ``derive_seed(task, seed, "optim")`` (unless ``params`` set it)
teacher weights ``derive_seed(task, "teacher")`` (independent of the seed)
=============== ===============================================================
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable

import torch
from torch import Tensor, nn

from hessbench.bench.kernels import reproducible_kernels
from hessbench.suite import build_model, evaluation_data, training_data
from hessbench.suite.plan import derive_seed
from hessbench.train.schema import RunSpec, TeacherData, TrainSuite

__all__ = ["build_data", "build_model_for", "train_run"]


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _teacher(suite: TrainSuite) -> tuple[nn.Module, float]:
    """The teacher MLP and the scale that gives its outputs unit variance."""
    from hessbench.suite import MLPModel

    data, task = suite.task.data, suite.task
    assert isinstance(data, TeacherData)
    spec = MLPModel(kind="mlp", widths=data.widths, activation=data.activation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(task.name, "teacher"))
        teacher = build_model(spec, tuple(data.input_shape), data.output_dim)
    x = torch.randn(1000, *data.input_shape, generator=_generator(task.name, "teacher-scale"))
    with torch.no_grad():
        scale = float(teacher(x).std()) or 1.0
    return teacher, scale


def _teacher_data(suite: TrainSuite, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    data = suite.task.data
    teacher, scale = _teacher(suite)
    x = torch.randn(n, *data.input_shape, generator=gen)
    noise = torch.randn(n, data.output_dim, generator=gen)
    with torch.no_grad():
        y = teacher(x) / scale + data.noise * noise
    return x, y


def build_data(suite: TrainSuite, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_heldout, y_heldout)`` in float32 (labels int64)."""
    task = suite.task
    spec = task.task_spec(suite.heldout)
    if isinstance(task.data, TeacherData):
        x, y = _teacher_data(suite, task.data.size, _generator(task.name, seed, "data"))
        xh, yh = _teacher_data(suite, suite.heldout, _generator(task.name, seed, "eval"))
        return x, y, xh, yh
    x, y = training_data(spec, seed)
    xh, yh = evaluation_data(spec, seed)
    return x, y, xh, yh


def build_model_for(suite: TrainSuite, seed: int) -> nn.Module:
    """The task's model with the seed's initial weights (float32, CPU)."""
    spec = suite.task.task_spec()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(suite.task.name, seed, "init"))
        return build_model(spec.model, spec.input_shape, spec.output_dim)


def _loss_fn(suite: TrainSuite) -> nn.Module:
    cls = nn.CrossEntropyLoss if suite.classification else nn.MSELoss
    return cls(reduction=suite.task.loss.reduction)


@torch.no_grad()
def _evaluate(
    model: nn.Module, suite: TrainSuite, x: Tensor, y: Tensor, chunk: int = 1024
) -> tuple[float, float | None]:
    """Mean held-out loss per sample (per element for MSE) and accuracy (classification)."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for xb, yb in zip(x.split(chunk), y.split(chunk), strict=True):
        out = model(xb)
        if suite.classification:
            total += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
            count += len(yb)
        else:
            total += float(nn.functional.mse_loss(out, yb, reduction="sum"))
            count += yb.numel()
    model.train()
    accuracy = correct / len(y) if suite.classification else None
    return total / count, accuracy


def _stepper(run: RunSpec, model: nn.Module, loss_fn: nn.Module):
    from hessbench.optim import make_stepper

    kwargs = dict(run.optimizer.params)
    # The optimizer's own random numbers (Monte-Carlo estimators, dropout masks).
    kwargs.setdefault("seed", derive_seed(run.suite.task.name, run.seed, "optim"))
    return make_stepper(run.optimizer.name, model, loss_fn, run.lr, **kwargs)


def training_clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """The clock training time is measured with, and its name for reports.

    On CPU the process's CPU time (``time.process_time``): with a fixed number of
    torch threads it measures the work done, whatever else runs on the machine.
    On CUDA wall-clock time after synchronizing the device, since the work is on
    the GPU.
    """
    if device.type == "cuda":

        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return wall, "wall-clock time"
    return time.process_time, "CPU time"


def train_run(run: RunSpec) -> dict:
    """Train one run and return its record (never raises for the run's own failures).

    The record: ``cell_id`` (the run id), ``kind: train``, task, optimizer (preset
    name), label, params, lr, seed, status (``ok``, ``diverged``, ``error``),
    message, ``diverged_at`` (the step whose loss or gradient was not finite),
    ``steps_done``, ``curve`` (lists ``step``, ``time_s``, ``train_loss``,
    ``heldout_loss``, ``heldout_accuracy``), the ``final_*`` values (the last
    evaluation), ``train_time_s``, ``eval_time_s``, ``num_params``, ``clock``.

    Times are measured with :func:`training_clock`: the process's CPU time on
    CPU (robust to other processes sharing the machine; the runs use a fixed
    number of threads, 1 by default), synchronized wall-clock time on CUDA.
    """
    suite, start = run.suite, time.perf_counter()
    record: dict = {
        "cell_id": run.id,
        "kind": "train",
        "task": suite.task.name,
        "optimizer": run.optimizer.name,
        "label": run.optimizer.display,
        "order": suite.optimizers.index(run.optimizer),
        "params": dict(run.optimizer.params),
        "lr": run.lr,
        "seed": run.seed,
        "status": "ok",
        "message": "",
        "diverged_at": None,
        "steps_done": 0,
    }
    curve: dict[str, list] = {
        "step": [],
        "time_s": [],
        "train_loss": [],
        "heldout_loss": [],
        "heldout_accuracy": [],
    }
    record["curve"] = curve
    train_time = eval_time = 0.0
    try:
        from hessbench.optim import DivergenceError

        dtype = getattr(torch, suite.dtype)
        device = torch.device(suite.device)
        clock, record["clock"] = training_clock(device)
        x, y, xh, yh = (
            t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for t in build_data(suite, run.seed)
        )
        model = build_model_for(suite, run.seed).to(device=device, dtype=dtype)
        record["num_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        loss_fn = _loss_fn(suite)
        order_gen = _generator(suite.task.name, run.seed, "train")
        per_epoch = len(x) // suite.batch_size
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), reproducible_kernels(device):
            optim_seed = derive_seed(suite.task.name, run.seed, "optim")
            torch.manual_seed(optim_seed)
            stepper = _stepper(run, model, loss_fn)
            model.train()

            def evaluate(step: int, interval: list[float]) -> bool:
                nonlocal eval_time
                t0 = clock()
                loss, acc = _evaluate(model, suite, xh, yh)
                eval_time += clock() - t0
                curve["step"].append(step)
                curve["time_s"].append(train_time)
                curve["train_loss"].append(sum(interval) / len(interval) if interval else None)
                curve["heldout_loss"].append(loss)
                curve["heldout_accuracy"].append(acc)
                return math.isfinite(loss)

            evaluate(0, [])
            interval: list[float] = []
            for step in range(suite.steps):
                if step % per_epoch == 0:
                    order = torch.randperm(len(x), generator=order_gen).to(device)
                idx = order[(step % per_epoch) * suite.batch_size :][: suite.batch_size]
                t0 = clock()
                try:
                    loss = float(stepper.step(x[idx], y[idx]))
                except DivergenceError as exc:
                    record.update(status="diverged", diverged_at=step + 1, message=str(exc))
                    break
                finally:
                    train_time += clock() - t0
                record["steps_done"] = step + 1
                if not math.isfinite(loss):
                    record.update(
                        status="diverged", diverged_at=step + 1, message="non-finite loss"
                    )
                    break
                interval.append(loss)
                if (step + 1) % suite.eval_every == 0 or step + 1 == suite.steps:
                    if not evaluate(step + 1, interval):
                        record.update(
                            status="diverged",
                            diverged_at=step + 1,
                            message="non-finite held-out loss",
                        )
                        break
                    interval = []
    except Exception as exc:  # a bug or an unsupported model: this run only
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        record.update(status="error", message=last)
    record["train_time_s"] = train_time
    record["eval_time_s"] = eval_time
    record["elapsed_s"] = time.perf_counter() - start
    for key in ("train_loss", "heldout_loss", "heldout_accuracy"):
        values = curve[key]
        record[f"final_{key}"] = values[-1] if values and record["status"] == "ok" else None
    return record
