"""Hessian-diagonal estimators behind one interface, and their registry.

>>> from hessbench.estimators import available_estimators, get_estimator
>>> "hesscale" in available_estimators()
True
>>> get_estimator("hutchinson", num_samples=10).label
'hutchinson[num_samples=10]'
"""

from hessbench.estimators._base import (
    Estimator,
    available_estimators,
    estimator_class,
    get_estimator,
    trainable_parameters,
)
from hessbench.estimators.adahessian import AdaHessian
from hessbench.estimators.bl89 import BL89
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
from hessbench.estimators.zero import Zero

__all__ = [
    "BL89",
    "GGNMC",
    "KFAC",
    "AdaHessian",
    "EmpiricalFisher",
    "Estimator",
    "Exact",
    "GGNExact",
    "GradSq",
    "HesScale",
    "HesScaleGN",
    "Hutchinson",
    "SophiaGNB",
    "Zero",
    "available_estimators",
    "estimator_class",
    "get_estimator",
    "trainable_parameters",
]

# Peer libraries' implementations (BackPACK, curvlinops), registered when they import.
import hessbench.estimators.peers  # noqa: F401
