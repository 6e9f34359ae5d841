"""Hessian-diagonal estimators behind one interface, and their registry.

Besides the estimators, the public face offers the pieces an estimator (or the
optimizer of :mod:`hessbench.optim`) is built from: the dataclass decorator and
field types, :func:`register`, the loss closed forms (:class:`LossSpec`), the
gradient helper, and the state guard that restores the global RNG and buffers.

>>> from hessbench.estimators import available_estimators, get_estimator
>>> "hesscale" in available_estimators()
True
>>> get_estimator("hutchinson", num_samples=10).label
'hutchinson[num_samples=10]'
"""

from hessbench.estimators._base import (
    Count,
    Estimator,
    Flag,
    all_finite,
    available_estimators,
    defer_registration,
    estimator_class,
    estimator_dataclass,
    get_estimator,
    has_active_dropout,
    loss_and_grad,
    preserve_state,
    register,
    trainable_parameters,
)
from hessbench.estimators._losses import LossSpec
from hessbench.estimators._rng import global_rng
from hessbench.estimators.adahessian import AdaHessian
from hessbench.estimators.bl89 import BL89
from hessbench.estimators.diagpp import DiagPP
from hessbench.estimators.efisher import EmpiricalFisher
from hessbench.estimators.exact import Exact
from hessbench.estimators.ggn_exact import GGNExact
from hessbench.estimators.ggn_mc import GGNMC
from hessbench.estimators.grad_sq import GradSq
from hessbench.estimators.hesscale import HesScale
from hessbench.estimators.hesscale_gn import HesScaleGN
from hessbench.estimators.hutchinson import Hutchinson
from hessbench.estimators.kfac import KFAC
from hessbench.estimators.sophia_gnb import SophiaGNB
from hessbench.estimators.xdiag import XDiag
from hessbench.estimators.zero import Zero

__all__ = [
    "BL89",
    "GGNMC",
    "KFAC",
    "AdaHessian",
    "Count",
    "DiagPP",
    "EmpiricalFisher",
    "Estimator",
    "Exact",
    "Flag",
    "GGNExact",
    "GradSq",
    "HesScale",
    "HesScaleGN",
    "Hutchinson",
    "LossSpec",
    "SophiaGNB",
    "XDiag",
    "Zero",
    "all_finite",
    "available_estimators",
    "estimator_class",
    "estimator_dataclass",
    "get_estimator",
    "global_rng",
    "has_active_dropout",
    "loss_and_grad",
    "preserve_state",
    "register",
    "trainable_parameters",
]


def _register_peers() -> None:
    # Peer libraries' implementations (BackPACK, curvlinops), registered when they
    # import; deferred to the first lookup that needs them (their imports take ~0.3 s).
    import hessbench.estimators.peers  # noqa: F401


defer_registration(_register_peers)
