"""Helpers shared by the peer estimators: seeding, layer checks, error translation."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from hessbench.errors import HessbenchError, UnsupportedError
from hessbench.estimators._layers import RULES
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._rng import draw_seed, global_rng
from hessbench.estimators._sequential import Plan, check_output

__all__ = [
    "check_layer_types",
    "draw_seed",
    "library_errors",
    "loss_module",
    "quiet_backward_hooks",
    "quiet_jvp_import",
    "rng_restored",
    "run_steps",
    "seeded_global_rng",
]


@contextlib.contextmanager
def rng_restored(device: torch.device) -> Iterator[None]:
    """Restore the global CPU RNG (and ``device``'s CUDA RNG) on exit."""
    with global_rng(device):
        yield


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Seed the global RNG from ``generator`` for the duration; restore it afterwards.

    The peer libraries draw their random numbers (Monte-Carlo labels, probe
    vectors) from the global RNG; seeding it from the caller's generator makes
    their estimates a function of that generator, as hessbench's contract asks.
    """
    with global_rng(device, generator):
        yield


def loss_module(loss: LossSpec) -> nn.Module:
    """A fresh loss module equal to the caller's: plain cross-entropy or MSE only."""
    module = loss.plain_module()
    if module is None:
        raise UnsupportedError(
            "peer libraries take nn.CrossEntropyLoss or nn.MSELoss without options only"
        )
    return module


def check_layer_types(
    plan: Plan, supported: Iterable[type], library: str, *, groups: bool = True
) -> None:
    """Refuse a layer of ``plan`` whose exact type the peer library does not handle.

    ``groups=False`` also refuses grouped convolutions.
    """
    allowed = set(supported)
    for step in plan.steps:
        m = step.module
        if type(m) not in allowed:
            names = ", ".join(sorted(t.__name__ for t in allowed & set(RULES)))
            raise UnsupportedError(
                f"layer '{step.path}' ({type(m).__name__}) is not supported by {library}; "
                f"supported layers: {names}"
            )
        if not groups and getattr(m, "groups", 1) != 1:
            raise UnsupportedError(
                f"layer '{step.path}' ({type(m).__name__}): groups={m.groups} is not supported "
                f"by {library}"
            )


def run_steps(plan: Plan, twin: nn.Module, inputs: Tensor) -> Tensor:
    """Run the layers of ``plan`` on ``twin`` (a copy of the planned model) one by one.

    Layers the plan skips (``Identity``, eval-mode ``Dropout``) are not called:
    they compute the identity. A Linear layer fed other than ``(N, features)``
    is refused naming the layer, as hessbench's own layer-by-layer pass does.
    """
    x = inputs
    for step in plan.steps:
        m = twin.get_submodule(step.path)
        if isinstance(m, nn.Linear) and x.dim() != 2:
            raise UnsupportedError(
                f"layer '{step.path}' (Linear): expects inputs of shape (N, features), "
                f"got {tuple(x.shape)}; add nn.Flatten"
            )
        x = m(x)
    check_output(twin, x.detach())
    return x


@contextlib.contextmanager
def quiet_backward_hooks() -> Iterator[None]:
    """Silence torch's notice that a full backward hook fired without input gradients.

    BackPACK's hooks on the first layer fire this way whenever the inputs do not
    require grad, which is always the case here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@contextlib.contextmanager
def quiet_jvp_import() -> Iterator[None]:
    """Silence torch's own deprecation notice on the first ``torch.func.jvp`` of a process.

    Forward-mode AD loads decompositions written with ``torch.jit.script``, which
    torch 2.13 marks deprecated; the notice is torch's, not the caller's concern.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        yield


@contextlib.contextmanager
def library_errors(library: str) -> Iterator[None]:
    """Turn a peer library's refusal (NotImplementedError, ValueError) into one line."""
    try:
        yield
    except HessbenchError:
        raise
    except (NotImplementedError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedError(f"{library}: {first}") from exc
