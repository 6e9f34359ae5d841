"""Optional peer estimators: other libraries' implementations of the same quantities.

Each wraps a published implementation behind hessbench's interface, so a suite
can run, say, ``ggn_mc`` and ``backpack.diag_ggn_mc`` side by side and report
whose is faster and whether they agree. They are registered only when their
library imports (the ``peers`` extra; see ``docs/peers.md`` for an install that
keeps your torch):

- BackPACK (``backpack-for-pytorch``): ``backpack.diag_hessian``,
  ``backpack.diag_ggn_exact``, ``backpack.diag_ggn_mc``, ``backpack.kfac``;
- curvlinops (``curvlinops-for-pytorch``): ``curvlinops.hutchinson``,
  ``curvlinops.kfac``, ``curvlinops.xdiag``.

The wrapper modules import without their library (they import it inside their
methods), so they can be collected and documented anywhere. A library that is
missing, or fails to import, registers nothing. A wrapper whose library imports
but lacks a name it uses (its ``requires``; say, a release that renamed an
extension) is not registered and is named by :func:`skipped_peers`;
``tests/test_peers.py`` checks that none is skipped.
"""

from __future__ import annotations

import importlib
import warnings

from hessbench.estimators._base import register

__all__ = ["PEERS", "available_peers", "skipped_peers"]

# library -> {module of this package: the estimator class it defines}
PEERS: dict[str, dict[str, str]] = {
    "backpack": {
        "backpack_diag_hessian": "BackpackDiagHessian",
        "backpack_diag_ggn_exact": "BackpackDiagGGNExact",
        "backpack_diag_ggn_mc": "BackpackDiagGGNMC",
        "backpack_kfac": "BackpackKFAC",
    },
    "curvlinops": {
        "curvlinops_hutchinson": "CurvlinopsHutchinson",
        "curvlinops_kfac": "CurvlinopsKFAC",
        "curvlinops_xdiag": "CurvlinopsXDiag",
    },
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


def _missing(requires: tuple[str, ...]) -> str | None:
    """The first ``module:name`` of ``requires`` that does not import, or None."""
    for item in requires:
        module, _, name = item.partition(":")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return item
    return None


_LOADED = [lib for lib in PEERS if _imports(lib)]
_SKIPPED: dict[str, str] = {}
for _lib in _LOADED:
    for _module, _class in PEERS[_lib].items():
        _cls = getattr(importlib.import_module(f"{__name__}.{_module}"), _class)
        _lacking = _missing(_cls.requires)
        if _lacking is None:
            register(_cls)
        else:
            _SKIPPED[_cls.name] = f"{_lib} has no {_lacking}"


def available_peers() -> list[str]:
    """The peer libraries that imported in this process."""
    return list(_LOADED)


def skipped_peers() -> dict[str, str]:
    """Estimators left unregistered although their library imported, with the reason."""
    return dict(_SKIPPED)
