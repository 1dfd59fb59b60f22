"""The E-step of a mixture as a dynamical system: free-energy descent on the assignment logits.

For one datum with component log joints ``l_k = log p(x, z = k)`` and assignment logits ``v``,
``q = softmax(v)``::

    F(q) = sum_k q_k (log q_k - l_k) = -log p(x) + KL(q || p(z | x)) >= -log p(x)

with equality exactly at the posterior ``q = softmax(l)``. With ``g = l - log q`` and the softmax
Jacobian ``J = diag(q) - q q^T`` (positive semi-definite, ``J 1 = 0``)::

    Euclidean flow in v:    dv/dt = -dF/dv = J g,        dF/dt = -g^T J^2 g <= 0
    natural-gradient flow:  dv/dt = g (mod constants),   dF/dt = -g^T J g <= 0

Both flows have the posterior as their only fixed point. The natural-gradient flow is the Euclidean
one preconditioned by the Fisher information of the categorical (which is ``J``), and in q it reads
``dq/dt = J g``, the replicator equation. Two explicit schemes integrate them:

* ``"mirror"``: ``log q <- (1 - eta) log q + eta l``, normalized, i.e.
  ``q <- q^(1 - eta) exp(eta l) / Z``. This is the forward Euler step of the natural-gradient flow,
  which is mirror descent on F with the entropy as mirror map. After T steps from ``q0``,
  ``log q_T = (1 - eta)^T log q0 + (1 - (1 - eta)^T) l`` (mod constants), a geometric interpolation
  towards the posterior. Along it KL(q || posterior) decreases monotonically, so F never increases
  for every ``0 < eta <= 1`` and every ``l``, however badly scaled; ``eta = 1`` is the exact E-step
  in one step.
* ``"euler"``: ``v <- v + eta J g``, the forward Euler step of the Euclidean flow. Its stability
  bound ``eta < 2 / lambda_max(Hessian of F)`` depends on ``l``: the Hessian equals ``J``
  (eigenvalues at most 1) at the posterior but grows with ``|l - log q|`` away from it. Each datum
  therefore backtracks (halves its step until F does not increase) and grows the step by 1.5 after
  an accepted step, so F never increases here either.

All functions work on tensors of shape (..., K), batched over data (and anything else) in the
leading dimensions; K is the number of memories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyro_am._validation import check_finite, check_int, check_positive

SCHEMES = ("mirror", "euler")
_MAX_BACKTRACKS = 30


def log_normalize(logits: torch.Tensor) -> torch.Tensor:
    """Compute ``log softmax`` over the last dimension.

    Same result as :func:`torch.log_softmax`, which is several times slower on CPU for the short
    last dimension (K of order 10) that assignment logits have.
    """
    shifted = logits - logits.amax(-1, keepdim=True)
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def free_energy(assignment_logits: torch.Tensor, log_joint: torch.Tensor) -> torch.Tensor:
    """Compute ``F(q) = sum_k q_k (log q_k - l_k)`` with ``q = softmax(assignment_logits)``.

    :param torch.Tensor assignment_logits: logits v of q, shape (..., K); they need not be
        normalized.
    :param torch.Tensor log_joint: component log joints ``l_k = log p(x, z = k)``, shape (..., K).
    :returns: F of shape (...). It is at least ``-logsumexp(l)`` with equality at ``softmax(l)``.
    """
    log_q = log_normalize(assignment_logits)
    q = log_q.exp()
    # 0 log 0 = 0: a component whose q underflows to zero contributes nothing.
    terms = torch.where(q > 0, q * (log_q - log_joint), torch.zeros_like(q))
    return terms.sum(-1)


def _normalized_free_energy(log_q: torch.Tensor, log_joint: torch.Tensor) -> torch.Tensor:
    """Compute F from finite, already normalized ``log q``, so no term is 0 * inf."""
    return (log_q.exp() * (log_q - log_joint)).sum(-1)


def flow_velocity(assignment_logits: torch.Tensor, log_joint: torch.Tensor) -> torch.Tensor:
    """Compute the Euclidean flow ``dv/dt = -dF/dv = (diag(q) - q q^T)(l - log q)``.

    :param torch.Tensor assignment_logits: logits v, shape (..., K).
    :param torch.Tensor log_joint: component log joints l, shape (..., K).
    :returns: the velocity of shape (..., K); its entries sum to zero.
    """
    log_q = log_normalize(assignment_logits)
    q = log_q.exp()
    g = log_joint - log_q
    return q * (g - (q * g).sum(-1, keepdim=True))


@dataclass
class FlowResult:
    """Outcome of :func:`assignment_flow`.

    :ivar log_q: normalized final assignment log probabilities, shape (..., K).
    :ivar free_energy: F at the final state, shape (...).
    :ivar steps: number of steps taken (the same for every datum).
    :ivar converged: whether every datum's largest change of ``log q`` fell below ``tol``.
    :ivar trajectory: F after every step, shape (steps + 1, ...), or None.
    """

    log_q: torch.Tensor
    free_energy: torch.Tensor
    steps: int
    converged: bool
    trajectory: torch.Tensor | None = None


def check_flow_arguments(steps, step_size, scheme: str) -> tuple[int, float]:
    """Validate the step count, step size and scheme shared by the flow's callers."""
    steps = check_int("flow_steps", steps, minimum=1)
    check_positive("flow_step_size", step_size)
    if scheme not in SCHEMES:
        raise ValueError(f"flow_scheme must be one of {SCHEMES}, but got {scheme!r}.")
    if scheme == "mirror" and step_size > 1:
        raise ValueError(
            f"flow_step_size must be in (0, 1] for the mirror scheme, but got {step_size}; "
            "above 1 the free energy can increase."
        )
    return steps, float(step_size)


def assignment_flow(
    log_joint: torch.Tensor,
    init_logits: torch.Tensor | None = None,
    steps: int = 10,
    step_size: float = 0.5,
    scheme: str = "mirror",
    tol: float = 0.0,
    return_trajectory: bool = False,
    validate: bool = True,
) -> FlowResult:
    """Integrate the free-energy flow of the assignment logits for ``steps`` steps.

    :param torch.Tensor log_joint: component log joints ``l = log p(x, z = k)``, shape (..., K).
        Treated as a constant: the flow runs without gradients.
    :param torch.Tensor init_logits: starting logits of shape (..., K); None starts from uniform q.
    :param int steps: the maximum number of steps T >= 1.
    :param float step_size: eta, in (0, 1] for ``"mirror"``; for ``"euler"`` the initial step of
        the per-datum backtracking.
    :param str scheme: ``"mirror"`` or ``"euler"`` (see the module docstring).
    :param float tol: stop early once every datum's largest change of ``log q`` is at most ``tol``;
        0 runs all ``steps``.
    :param bool return_trajectory: also return F after every step.
    :param bool validate: check the arguments and that the log joints and logits are finite. A fit
        loop that has checked its inputs once can turn it off, because each finiteness check
        synchronizes with the device.
    :returns: a :class:`FlowResult`.
    """
    if validate:
        steps, step_size = check_flow_arguments(steps, step_size, scheme)
        check_positive("tol", tol, allow_zero=True)
        check_finite("log_joint", log_joint)
    log_joint = log_joint.detach()
    if init_logits is None:
        log_q = torch.full_like(log_joint, 0.0)
    else:
        if init_logits.shape != log_joint.shape:
            raise ValueError(
                f"init_logits must have the shape of log_joint, {tuple(log_joint.shape)}, "
                f"but has shape {tuple(init_logits.shape)}."
            )
        log_q = init_logits.detach()
        if validate:
            check_finite("init_logits", log_q)
    log_q = log_normalize(log_q)

    with torch.no_grad():
        if scheme == "mirror":
            outcome = _run_mirror(log_joint, log_q, steps, step_size, tol, return_trajectory)
        else:
            outcome = _run_euler(log_joint, log_q, steps, step_size, tol, return_trajectory)
    log_q, value, taken, converged, trajectory = outcome
    if trajectory is not None:
        trajectory = torch.stack(trajectory)
    return FlowResult(log_q, value, taken, converged, trajectory)


def _run_mirror(log_joint, log_q, steps, step_size, tol, keep):
    if not keep and tol == 0:
        # Each step is affine in log q up to a per-datum constant, so T steps compose to one:
        # log q_T = (1 - eta)^T log q_0 + (1 - (1 - eta)^T) l, normalized.
        contraction = (1.0 - step_size) ** steps
        log_q = log_normalize(contraction * log_q + (1.0 - contraction) * log_joint)
        return log_q, _normalized_free_energy(log_q, log_joint), steps, False, None

    value = free_energy(log_q, log_joint)
    trajectory = [value] if keep else None
    converged = False
    taken = 0
    for _ in range(steps):
        updated = log_normalize((1.0 - step_size) * log_q + step_size * log_joint)
        taken += 1
        change = (updated - log_q).abs().max() if tol > 0 else None
        log_q = updated
        if keep:
            trajectory.append(free_energy(log_q, log_joint))
        if change is not None and float(change) <= tol:
            converged = True
            break
    return log_q, free_energy(log_q, log_joint), taken, converged, trajectory


def _run_euler(log_joint, log_q, steps, step_size, tol, keep):
    value = free_energy(log_q, log_joint)
    eta = torch.full(value.shape, step_size, dtype=log_q.dtype, device=log_q.device)
    trajectory = [value] if keep else None
    converged = False
    taken = 0
    for _ in range(steps):
        velocity = flow_velocity(log_q, log_joint)
        # Backtracking per datum: a rejected step halves that datum's eta and retries.
        candidate, candidate_value = log_q, value
        pending = torch.ones(value.shape, dtype=torch.bool, device=value.device)
        for _ in range(_MAX_BACKTRACKS):
            trial = log_normalize(log_q + eta.unsqueeze(-1) * velocity)
            trial_value = free_energy(trial, log_joint)
            accept = pending & (trial_value <= value)
            candidate = torch.where(accept.unsqueeze(-1), trial, candidate)
            candidate_value = torch.where(accept, trial_value, candidate_value)
            pending = pending & ~accept
            if not bool(pending.any()):
                break
            eta = torch.where(pending, 0.5 * eta, eta)
        # A datum whose step shrank to nothing stays put and keeps its small step.
        eta = torch.where(pending, eta, 1.5 * eta)
        taken += 1
        change = (candidate - log_q).abs().max() if tol > 0 else None
        log_q, value = candidate, candidate_value
        if keep:
            trajectory.append(value)
        if change is not None and float(change) <= tol:
            converged = True
            break
    return log_q, value, taken, converged, trajectory


__all__ = [
    "SCHEMES",
    "FlowResult",
    "assignment_flow",
    "check_flow_arguments",
    "flow_velocity",
    "free_energy",
    "log_normalize",
]
