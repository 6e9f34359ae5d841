"""Optional peer estimators: other libraries' implementations of the same quantities.

Each wraps a published implementation behind hessbench's interface, so a suite
can run, say, ``ggn_mc`` and ``backpack.diag_ggn_mc`` side by side and report
whose is faster and whether they agree. They are registered only when their
library imports (the ``peers`` extra; see ``docs/peers.md`` for an install that
keeps your torch):

- BackPACK (``backpack-for-pytorch``): ``backpack.diag_hessian``,
  ``backpack.diag_ggn_exact``, ``backpack.diag_ggn_mc``, ``backpack.kfac``;
- curvlinops (``curvlinops-for-pytorch``): ``curvlinops.hutchinson``,
  ``curvlinops.kfac``.

A library that is missing, or fails to import, registers nothing. A wrapper
that fails to import against an installed library (say, a release that renamed
an extension) is left out and named by :func:`skipped_peers`, so that core
hessbench still imports; ``tests/test_peers.py`` checks that none is skipped.
"""

from __future__ import annotations

import importlib
import warnings

__all__ = ["PEERS", "available_peers", "skipped_peers"]

# library -> the modules of this package that wrap it
PEERS: dict[str, tuple[str, ...]] = {
    "backpack": (
        "backpack_diag_hessian",
        "backpack_diag_ggn_exact",
        "backpack_diag_ggn_mc",
        "backpack_kfac",
    ),
    "curvlinops": ("curvlinops_hutchinson", "curvlinops_kfac"),
}


def _imports(library: str) -> bool:
    try:
        # Their import-time warnings are theirs (curvlinops' linear_operator calls the
        # deprecated torch.jit.script), not hessbench's: an error-on-warning filter
        # (pytest's, here) must not unregister them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(library)
    except Exception:  # a missing library, or one broken against this torch
        return False
    return True


_LOADED = [lib for lib in PEERS if _imports(lib)]
_SKIPPED: dict[str, str] = {}
for _lib in _LOADED:
    for _module in PEERS[_lib]:
        try:
            importlib.import_module(f"{__name__}.{_module}")
        except ImportError as _exc:
            _SKIPPED[_module] = f"{type(_exc).__name__}: {_exc}"


def available_peers() -> list[str]:
    """The peer libraries that imported in this process (their wrappers are registered)."""
    return list(_LOADED)


def skipped_peers() -> dict[str, str]:
    """Wrapper modules left out although their library imported, with the reason."""
    return dict(_SKIPPED)
