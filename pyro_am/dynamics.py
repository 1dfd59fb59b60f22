"""Retrieval dynamics on any :class:`~pyro_am.energies.Energy`.

Three methods move a batch of queries ``x`` of shape (..., D):

* ``fixed_point``: ``x <- F(x)``, the energy's majorize-minimize map; E never increases.
* ``gradient``: ``x <- x - eta grad E(x)`` with per-query backtracking (halve ``eta`` until E does
  not increase, grow it again by 1.5 after an accepted step), so E never increases.
* ``langevin``: ``x <- x - eta grad E(x) + sqrt(2 eta T) eps``, unadjusted Langevin at temperature
  T. Its stationary law tends to ``exp(-E / T)`` as ``eta -> 0``. It runs ``max_steps`` steps.

With a boolean ``mask`` of observed coordinates the observed coordinates stay clamped and only the
others move (pattern completion). For the fixed-point method the update of the missing coordinates
is ``F(x)`` restricted to them: F minimizes a quadratic bound that is separable across coordinates,
so its restriction minimizes the bound over the missing coordinates with the observed ones fixed,
and E still never increases. For KDE and mixtures with one shared scale this is the
responsibility-weighted mean of the memories' missing coordinates, responsibilities taken from the
current full vector. With per-component scales each responsibility is also weighted by the
component's precision in that coordinate.

A query stops when its largest coordinate change falls below ``tol``; converged queries are no
longer updated, so later steps cost only the active queries.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from pyro_am._validation import check_finite, check_int, check_positive
from pyro_am.energies import Energy

logger = logging.getLogger(__name__)

METHODS = ("fixed_point", "gradient", "langevin")
_MAX_BACKTRACKS = 30


@dataclass
class RetrievalResult:
    """Outcome of :func:`retrieve`.

    :ivar states: final states, shape (..., D).
    :ivar energies: energies of the final states, shape (...).
    :ivar steps: number of updates applied to each query, shape (...), int64.
    :ivar converged: whether the query's last change fell below ``tol``, shape (...).
        Always false for Langevin, which has no stopping rule.
    :ivar trajectory: the states after every step, shape (steps + 1, ..., D), or None.
        Queries that stopped early repeat their final state.
    """

    states: torch.Tensor
    energies: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    trajectory: torch.Tensor | None = None


def _check_mask(mask, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor of observed coordinates, got {mask.dtype}.")
    try:
        mask = torch.broadcast_to(mask, shape)
    except RuntimeError as error:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the queries' shape "
            f"{tuple(shape)}."
        ) from error
    return mask


def retrieve(
    energy: Energy,
    x0: torch.Tensor,
    method: str = "fixed_point",
    mask: torch.Tensor | None = None,
    max_steps: int = 100,
    tol: float = 1e-5,
    step_size: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> RetrievalResult:
    """Run retrieval dynamics on ``energy`` from the queries ``x0``.

    :param Energy energy: the energy to descend.
    :param torch.Tensor x0: initial states of shape (..., D), on the energy's device and dtype.
    :param str method: ``"fixed_point"``, ``"gradient"`` or ``"langevin"``.
    :param torch.Tensor mask: optional boolean tensor broadcastable to ``x0``; True marks observed
        coordinates, which stay clamped to their values in ``x0``.
    :param int max_steps: the maximum number of updates per query.
    :param float tol: a query stops once its largest coordinate change is below ``tol``.
    :param float step_size: initial step size eta for ``gradient`` and ``langevin``. The default is
        the energy's ``default_step_size`` (h^2 for a KDE, where one gradient step is a mean-shift
        step); Langevin uses a tenth of it.
    :param float temperature: Langevin temperature T > 0.
    :param torch.Generator generator: random source for Langevin noise.
    :param bool return_trajectory: also return every intermediate state.
    :returns: a :class:`RetrievalResult`.
    """
    if not isinstance(energy, Energy):
        raise TypeError(f"energy must be a pyro_am Energy, but got {type(energy).__name__}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, but got {method!r}.")
    max_steps = check_int("max_steps", max_steps, minimum=0)
    check_positive("tol", tol, allow_zero=True)
    check_positive("temperature", temperature)
    if method == "fixed_point" and not energy.has_fixed_point:
        raise ValueError(
            f"method='fixed_point' needs a closed-form fixed-point map, which "
            f"{type(energy).__name__} does not have; use method='gradient'."
        )
    if step_size is None:
        step_size = energy.default_step_size
        if method == "langevin":
            step_size *= 0.1
    check_positive("step_size", step_size)

    x, batch_shape = energy._flatten(x0, "x0")
    check_finite("x0", x)
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(
            f"generator is on device {generator.device} but the queries are on {x.device}; "
            f"create it with torch.Generator(device={str(x.device)!r})."
        )
    x = x.detach().clone()
    flat_mask = _check_mask(mask, (*batch_shape, energy.dim), x.device)
    if flat_mask is not None:
        flat_mask = flat_mask.reshape(-1, energy.dim)

    with torch.no_grad():
        if method == "fixed_point":
            outcome = _run_fixed_point(energy, x, flat_mask, max_steps, tol, return_trajectory)
        elif method == "gradient":
            outcome = _run_gradient(
                energy, x, flat_mask, max_steps, tol, step_size, return_trajectory
            )
        else:
            outcome = _run_langevin(
                energy,
                x,
                flat_mask,
                max_steps,
                step_size,
                temperature,
                generator,
                return_trajectory,
            )
        states, steps, converged, trajectory = outcome
        energies = energy._energy(states)

    dim = energy.dim
    if trajectory is not None:
        trajectory = torch.stack(trajectory).reshape(len(trajectory), *batch_shape, dim)
    logger.debug(
        "retrieve(%s): %d of %d queries converged, at most %d steps",
        method,
        int(converged.sum()),
        converged.numel(),
        int(steps.max()) if steps.numel() else 0,
    )
    return RetrievalResult(
        states=states.reshape(*batch_shape, dim),
        energies=energies.reshape(batch_shape),
        steps=steps.reshape(batch_shape),
        converged=converged.reshape(batch_shape),
        trajectory=trajectory,
    )


def _clamp(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return new if mask is None else torch.where(mask, old, new)


def _run_fixed_point(energy, x, mask, max_steps, tol, keep):
    num_queries = x.shape[0]
    steps = torch.zeros(num_queries, dtype=torch.long, device=x.device)
    converged = torch.zeros(num_queries, dtype=torch.bool, device=x.device)
    active = torch.arange(num_queries, device=x.device)
    trajectory = [x.clone()] if keep else None
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        current = x[active]
        updated = _clamp(
            energy._fixed_point(current), current, None if mask is None else mask[active]
        )
        change = (updated - current).abs().amax(dim=-1)
        x[active] = updated
        steps[active] += 1
        done = change <= tol
        converged[active[done]] = True
        active = active[~done]
        if keep:
            trajectory.append(x.clone())
    return x, steps, converged, trajectory


def _run_gradient(energy, x, mask, max_steps, tol, step_size, keep):
    num_queries = x.shape[0]
    steps = torch.zeros(num_queries, dtype=torch.long, device=x.device)
    converged = torch.zeros(num_queries, dtype=torch.bool, device=x.device)
    eta = torch.full((num_queries,), float(step_size), dtype=x.dtype, device=x.device)
    active = torch.arange(num_queries, device=x.device)
    trajectory = [x.clone()] if keep else None
    current_energy, current_grad = energy._energy_and_grad(x)
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        point, value, grad = x[active], current_energy[active], current_grad[active]
        if mask is not None:
            grad = grad.masked_fill(mask[active], 0.0)
        step = eta[active]
        # Backtracking: shrink the step of every query whose energy would rise. Each trial also
        # returns its gradient, so an accepted step needs no second pass over the memories, and
        # the energy a later step compares against is the one this comparison accepted.
        pending = torch.ones(active.numel(), dtype=torch.bool, device=x.device)
        candidate = point.clone()
        candidate_value = value.clone()
        candidate_grad = current_grad[active]
        for _ in range(_MAX_BACKTRACKS):
            index = pending.nonzero(as_tuple=True)[0]
            trial = point[index] - step[index].unsqueeze(-1) * grad[index]
            trial_value, trial_grad = energy._energy_and_grad(trial)
            accepted = trial_value <= value[index]
            candidate[index[accepted]] = trial[accepted]
            candidate_value[index[accepted]] = trial_value[accepted]
            candidate_grad[index[accepted]] = trial_grad[accepted]
            pending[index[accepted]] = False
            step[index[~accepted]] *= 0.5
            if not bool(pending.any()):
                break
        # A query whose step shrank to nothing stays put, which counts as converged below.
        change = (candidate - point).abs().amax(dim=-1)
        x[active] = candidate
        eta[active] = torch.where(pending, step, step * 1.5)
        steps[active] += 1
        current_energy[active] = candidate_value
        current_grad[active] = candidate_grad
        done = change <= tol
        converged[active[done]] = True
        active = active[~done]
        if keep:
            trajectory.append(x.clone())
    return x, steps, converged, trajectory


def _run_langevin(energy, x, mask, max_steps, step_size, temperature, generator, keep):
    num_queries = x.shape[0]
    noise_scale = math.sqrt(2.0 * step_size * temperature)
    trajectory = [x.clone()] if keep else None
    for _ in range(max_steps):
        grad = energy._grad(x)
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        x = _clamp(x - step_size * grad + noise_scale * noise, x, mask)
        if keep:
            trajectory.append(x.clone())
    steps = torch.full((num_queries,), max_steps, dtype=torch.long, device=x.device)
    converged = torch.zeros(num_queries, dtype=torch.bool, device=x.device)
    return x, steps, converged, trajectory


__all__ = ["METHODS", "RetrievalResult", "retrieve"]
