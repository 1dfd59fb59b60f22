"""Shared fixtures: the device under test and a seeded random state.

Set ``PYRO_AM_TEST_DEVICE=cuda`` to run the suite on a GPU; the default is the CPU.
"""

import os

import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")

TEST_DEVICE = torch.device(os.environ.get("PYRO_AM_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Seed every random source and empty Pyro's global parameter store around each test."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
