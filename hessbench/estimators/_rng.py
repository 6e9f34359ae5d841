"""The global RNG, saved, seeded from a caller's generator, and restored: written once.

Estimators take their randomness from a ``torch.Generator``; a model's own
forward (dropout) and peer libraries draw from the global RNG instead. The
helpers here let them do so as a function of the caller's generator, and leave
the global RNG as they found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["draw_seed", "global_rng", "rng_state", "set_rng_state"]


def draw_seed(generator: torch.Generator) -> int:
    """One 62-bit seed drawn from ``generator`` (advances it by one draw)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global CPU RNG state, and ``device``'s CUDA RNG state when it is a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    """Restore a state of :func:`rng_state`."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def global_rng(device: torch.device, seed_from: torch.Generator | None = None) -> Iterator[None]:
    """Restore the global RNG on exit; with ``seed_from``, seed it from that generator first.

    Seeding draws one seed from ``seed_from`` (:func:`draw_seed`) and seeds the CPU
    RNG and, on a GPU, ``device``'s CUDA RNG with it, so what the global RNG gives
    inside is a function of the caller's generator.
    """
    saved = rng_state(device)
    if seed_from is not None:
        seed = draw_seed(seed_from)
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        set_rng_state(device, saved)
