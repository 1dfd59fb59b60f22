"""Pyro primitives for associative memories: an energy factor and a memory bank.

An energy ``E`` at temperature ``T`` contributes the unnormalized log density ``-E(x) / T`` to a
model, which is the factor ``exp(-E(x) / T)``::

    log p(..., x) = ... - E(x) / T

A memory bank is a tensor of shape (num_memories, dim). It is either a latent variable with a prior
over each memory, declared in a plate over the memories::

    m_k ~ prior,   k = 1 .. num_memories   (independently, each of shape (dim,))

or, without a prior, a parameter fitted by maximum likelihood.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pyro_am._validation import as_float_tensor, check_int, check_positive

INIT_SCALE = 0.1
"""Standard deviation of the default random initialization of memories declared as parameters."""


def energy_factor(
    name: str,
    energy: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    temperature: float = 1.0,
    *,
    has_rsample: bool | None = None,
) -> torch.Tensor:
    """Add ``-E(x) / T`` to the log density of the current model or guide.

    The factor has shape ``x.shape[:-1]``, the batch shape of ``x``, so inside a
    :class:`pyro.plate` each datum contributes its own term and subsampling scales it like any
    other site. Each batch dimension needs a plate, because Pyro's ELBOs reject a site whose
    batch shape no plate accounts for. This is :func:`pyro.factor` with the log factor computed
    from an energy::

        energy = GaussianKDEEnergy(data, bandwidth)
        memories = memory("memories", 16, 2)
        with pyro.plate("memories_plate", 16):
            energy_factor("fit", energy, memories)

    In a guide, Pyro needs to know whether ``x`` is reparameterized. By default ``has_rsample`` is
    ``x.requires_grad``: a tensor drawn by ``rsample`` or computed from parameters gives True, and a
    tensor drawn by a discrete or other non-reparameterized sample gives False, which adds the
    score-function term. Pass ``has_rsample=True`` for a guide factor whose ``x`` is fixed data but
    whose energy has learnable parameters. In a model the flag has no effect.

    :param str name: name of the factor site.
    :param energy: an :class:`~pyro_am.energies.Energy` or any callable mapping x of shape
        (..., D) to energies of shape (...).
    :param torch.Tensor x: points of shape (..., D) at which the energy is evaluated.
    :param float temperature: temperature T > 0; the factor is ``exp(-E(x) / T)``.
    :param bool has_rsample: whether ``x`` is reparameterized; see above.
    :returns: the log factor ``-E(x) / T``, of shape ``x.shape[:-1]``.
    :rtype: torch.Tensor
    """
    check_positive("temperature", temperature)
    if not callable(energy):
        raise TypeError(f"energy must be an Energy or a callable, but got {type(energy)}.")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of shape (..., D), but got {type(x)}.")
    if x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (..., D), but has shape {tuple(x.shape)}.")

    log_factor = -energy(x) / temperature
    if log_factor.shape != x.shape[:-1]:
        raise ValueError(
            f"energy must map x of shape {tuple(x.shape)} to shape {tuple(x.shape[:-1])}, "
            f"but returned shape {tuple(log_factor.shape)}."
        )

    if has_rsample is None:
        has_rsample = x.requires_grad
    pyro.factor(name, log_factor, has_rsample=has_rsample)
    return log_factor


def memory(
    name: str,
    num_memories: int,
    dim: int,
    prior: dist.Distribution | None = None,
    init: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    constraint: constraints.Constraint | None = None,
    *,
    plate: pyro.plate | None = None,
) -> torch.Tensor:
    """Declare a bank of memories of shape (num_memories, dim) and return it.

    With a ``prior``, the memories are a latent site ``pyro.sample(name, prior)`` inside
    ``pyro.plate(name + "_plate", num_memories, dim=-1)``, each memory an event of shape (dim,).
    An autoguide then fits a posterior over them::

        def model(data):
            memories = memory("memories", 8, 2, prior=dist.Normal(0.0, 5.0))
            with pyro.plate("data", len(data)):
                pyro.sample("obs", GaussianMixture(memories, 0.5), obs=data)

        guide = AutoNormal(model)

    A later site that needs the same plate, such as a factor with one term per memory, must reuse
    the plate object rather than build a second one of the same name (Pyro rejects that as a
    duplicate site)::

        memories_plate = pyro.plate("memories_plate", 8, dim=-1)
        memories = memory("memories", 8, 2, prior=dist.Normal(0.0, 5.0), plate=memories_plate)
        with memories_plate:
            energy_factor("fit", energy, memories)

    The prior may have event shape (dim,), or event shape () and a batch shape that broadcasts to
    (dim,), such as ``Normal(0, 1)`` or ``Normal(zeros(dim), 1)``, which is then made an event
    with ``to_event(1)``. It may also carry the whole bank as an event of shape
    (num_memories, dim), such as ``Normal(zeros(num_memories, dim), 1).to_event(2)``. The
    leftmost of the two reinterpreted dimensions then becomes the plate's batch dimension again.

    Without a prior, the memories are ``pyro.param(name, init, constraint=constraint)``. The
    default ``init`` draws ``INIT_SCALE * randn(num_memories, dim)`` once, when the parameter is
    first created, in the default dtype on the CPU; :func:`pyro.set_rng_seed` makes it
    reproducible. Pass ``init`` (a tensor or a callable returning one) to choose the dtype and
    device.

    :param str name: name of the sample or param site; the plate is ``name + "_plate"``.
    :param int num_memories: number of memories, at least 1.
    :param int dim: dimension of each memory, at least 1.
    :param prior: prior of each memory, or None to declare a parameter.
    :param init: initial value of shape (num_memories, dim), a tensor or a callable returning one;
        only without a prior.
    :param constraint: constraint of the parameter (default real); only without a prior.
    :param pyro.plate plate: the plate over the memories, of size ``num_memories`` and ``dim=-1``;
        by default ``pyro.plate(name + "_plate", num_memories, dim=-1)``. Only with a prior.
    :returns: the memories, of shape (num_memories, dim) outside any other plate.
    :rtype: torch.Tensor
    """
    check_int("num_memories", num_memories)
    check_int("dim", dim)
    shape = (num_memories, dim)

    if prior is None:
        if plate is not None:
            raise ValueError("plate applies only to memories declared with a prior.")
        return _memory_param(name, shape, init, constraint)

    if init is not None or constraint is not None:
        raise ValueError(
            "init and constraint apply only to memories declared without a prior; with a prior, "
            "initialize the guide instead, for example AutoNormal(model, init_loc_fn=...)."
        )
    prior = _per_memory_prior(prior, num_memories, dim)
    if plate is None:
        plate = pyro.plate(name + "_plate", num_memories, dim=-1)
    elif plate.size != num_memories or plate.dim != -1 or plate.subsample_size != num_memories:
        raise ValueError(
            f"plate must have size {num_memories}, dim -1 and no subsampling, but has size "
            f"{plate.size}, dim {plate.dim} and subsample size {plate.subsample_size}."
        )
    with plate:
        return pyro.sample(name, prior)


def _memory_param(name, shape, init, constraint) -> torch.Tensor:
    if constraint is None:
        constraint = constraints.real

    if init is None:

        def init():
            return INIT_SCALE * torch.randn(shape)

    def checked_init():
        value = init() if callable(init) else init
        value = as_float_tensor("init", value)
        if value.shape != shape:
            raise ValueError(f"init must have shape {shape}, but has shape {tuple(value.shape)}.")
        return value

    # pyro.param calls the initializer only when the parameter is not yet in the store.
    return pyro.param(name, checked_init, constraint=constraint)


def _per_memory_prior(prior, num_memories, dim) -> dist.Distribution:
    """Return ``prior`` as a distribution with event shape (dim,) and batch shape () or (N,)."""
    if not isinstance(prior, dist.Distribution):
        raise TypeError(f"prior must be a Pyro distribution or None, but got {type(prior)}.")

    event_shape = tuple(prior.event_shape)
    if event_shape == (num_memories, dim) and isinstance(prior, dist.Independent):
        if prior.reinterpreted_batch_ndims < 2:
            raise ValueError(
                f"prior has event shape {event_shape}, but only {prior.reinterpreted_batch_ndims} "
                "reinterpreted dimension, so its memories cannot be split off; pass a prior of "
                f"event shape ({dim},) instead."
            )
        prior = dist.Independent(prior.base_dist, prior.reinterpreted_batch_ndims - 1)
        event_shape = tuple(prior.event_shape)
    if event_shape == ():
        try:
            batch_shape = torch.broadcast_shapes(prior.batch_shape, (dim,))
        except RuntimeError as error:
            raise ValueError(
                f"prior has batch shape {tuple(prior.batch_shape)}, which does not broadcast with "
                f"the memory dimension ({dim},)."
            ) from error
        prior = prior.expand(batch_shape).to_event(1)
        event_shape = tuple(prior.event_shape)
    if event_shape != (dim,):
        raise ValueError(
            f"prior must have event shape ({dim},), () or ({num_memories}, {dim}), but has event "
            f"shape {event_shape}."
        )
    if tuple(prior.batch_shape) not in ((), (1,), (num_memories,)):
        raise ValueError(
            f"prior must have batch shape (), (1,) or ({num_memories},) so that it broadcasts over "
            f"the memory plate, but has batch shape {tuple(prior.batch_shape)}."
        )
    return prior


__all__ = ["INIT_SCALE", "energy_factor", "memory"]
