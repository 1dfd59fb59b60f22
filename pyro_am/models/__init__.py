"""Memory models written as Pyro programs and fitted by variational inference."""

from pyro_am.models.am_clustering import AMClustering
from pyro_am.models.amortized import AmortizedMixtureGuide
from pyro_am.models.dp_memory import CRPEnergy, DPFitResult, DPMemory
from pyro_am.models.flow import assignment_flow, free_energy
from pyro_am.models.in_context import InContextEnergy
from pyro_am.models.variational_memory import VariationalMemory, elbo_gap_table

__all__ = [
    "AMClustering",
    "AmortizedMixtureGuide",
    "CRPEnergy",
    "DPFitResult",
    "DPMemory",
    "InContextEnergy",
    "VariationalMemory",
    "assignment_flow",
    "elbo_gap_table",
    "free_energy",
]
