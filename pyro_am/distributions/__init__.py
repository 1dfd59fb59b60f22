"""Pyro distributions built on the energies of :mod:`pyro_am.energies`."""

from pyro_am.distributions.kde import GaussianKDE
from pyro_am.distributions.mixture import GaussianMixture
from pyro_am.distributions.stick_breaking import BetaStickBreaking, StickBreakingWeights
from pyro_am.distributions.von_mises_fisher import VonMisesFisher

__all__ = [
    "GaussianKDE",
    "GaussianMixture",
    "BetaStickBreaking",
    "StickBreakingWeights",
    "VonMisesFisher",
]
