"""Pyro distributions built on the energies of :mod:`pyro_am.energies`."""

from pyro_am.distributions.mixture import GaussianMixture

__all__ = ["GaussianMixture"]
