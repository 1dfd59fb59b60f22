"""pyro_am: associative memories as Pyro probabilistic programs.

An associative memory's energy is a negative log density, ``p(x) = exp(-E(x)) / Z``. This package
provides the energies, the retrieval dynamics that descend them, Pyro distributions and primitives
built on them, and memory models fitted by variational inference.
"""

from pyro_am.dynamics import RetrievalResult, retrieve
from pyro_am.energies import DenseAMEnergy, Energy, GaussianKDEEnergy, GaussianMixtureEnergy
from pyro_am.primitives import energy_factor, memory

__version__ = "0.1.0"

__all__ = [
    "DenseAMEnergy",
    "Energy",
    "GaussianKDEEnergy",
    "GaussianMixtureEnergy",
    "RetrievalResult",
    "__version__",
    "energy_factor",
    "memory",
    "retrieve",
]
