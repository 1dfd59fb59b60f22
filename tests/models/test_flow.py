import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_am.models.flow import (
    assignment_flow,
    flow_velocity,
    free_energy,
    log_normalize,
)

# Random log joints: K components, entries spread over several nats as real mixtures produce.
log_joints = st.tuples(
    st.integers(min_value=2, max_value=8),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.floats(min_value=0.1, max_value=30.0),
)


def _log_joint(num_components, seed, spread, rows=16, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    values = spread * torch.randn(rows, num_components, generator=generator, dtype=torch.float64)
    return values.to(device)


@settings(max_examples=40, deadline=None)
@given(log_joints, st.sampled_from([0.1, 0.5, 1.0]))
def test_mirror_flow_never_increases_free_energy(case, step_size):
    log_joint = _log_joint(*case)
    result = assignment_flow(log_joint, steps=20, step_size=step_size, return_trajectory=True)
    # float64 round-off in F is about 1e-15 times its magnitude (at most ~1e2 here).
    assert (result.trajectory.diff(dim=0) <= 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(log_joints, st.floats(min_value=0.05, max_value=5.0))
def test_euler_flow_never_increases_free_energy(case, step_size):
    log_joint = _log_joint(*case)
    result = assignment_flow(
        log_joint, steps=20, step_size=step_size, scheme="euler", return_trajectory=True
    )
    assert (result.trajectory.diff(dim=0) <= 1e-12).all()


@pytest.mark.parametrize("spread", [1.0, 10.0, 100.0])
def test_mirror_fixed_point_is_posterior(spread, device):
    log_joint = _log_joint(6, 1, spread, device=device)
    result = assignment_flow(log_joint, steps=80, step_size=0.5)
    posterior = torch.softmax(log_joint, dim=-1)
    # (1/2)^80 contraction leaves only float64 round-off, far below the 1e-6 requirement.
    torch.testing.assert_close(result.log_q.exp(), posterior, atol=1e-6, rtol=0)
    # At the posterior F = -log p(x) = -logsumexp(l); round-off ~1e-15 relative.
    torch.testing.assert_close(
        result.free_energy, -torch.logsumexp(log_joint, -1), atol=1e-9, rtol=1e-12
    )


def test_euler_fixed_point_is_posterior(device):
    log_joint = _log_joint(3, 2, 1.0, device=device)
    posterior_logits = torch.log_softmax(log_joint, dim=-1)
    # The velocity vanishes exactly at the posterior, up to float64 round-off.
    velocity = flow_velocity(posterior_logits, log_joint)
    assert velocity.abs().max() < 1e-12
    # The Euclidean flow converges at a rate of about eta * min_k p_k per step, so it needs many
    # steps; 20000 is ample for K = 3 and unit-spread log joints.
    result = assignment_flow(log_joint, steps=20000, step_size=1.0, scheme="euler", tol=1e-14)
    torch.testing.assert_close(result.log_q.exp(), log_joint.softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        result.free_energy, -torch.logsumexp(log_joint, -1), atol=1e-6, rtol=0
    )


def test_mirror_steps_match_closed_form():
    log_joint = _log_joint(5, 3, 4.0)
    start = _log_joint(5, 4, 1.0)
    stepped = assignment_flow(log_joint, start, steps=7, step_size=0.3, return_trajectory=True)
    contraction = 0.7**7
    expected = torch.log_softmax(
        contraction * torch.log_softmax(start, -1) + (1 - contraction) * log_joint, -1
    )
    composed = assignment_flow(log_joint, start, steps=7, step_size=0.3)
    torch.testing.assert_close(stepped.log_q, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(composed.log_q, expected, atol=1e-12, rtol=0)


def test_free_energy_bounds_negative_log_evidence():
    log_joint = _log_joint(4, 5, 3.0, rows=64)
    logits = _log_joint(4, 6, 2.0, rows=64)
    kl = (logits.softmax(-1) * (logits.log_softmax(-1) - log_joint.log_softmax(-1))).sum(-1)
    # F = -log p(x) + KL(q || posterior), computed independently with torch.log_softmax.
    expected = -torch.logsumexp(log_joint, -1) + kl
    torch.testing.assert_close(free_energy(logits, log_joint), expected, atol=1e-12, rtol=0)
    assert (kl >= 0).all()


def test_velocity_is_negative_gradient():
    log_joint = _log_joint(5, 7, 2.0, rows=4)
    logits = _log_joint(5, 8, 1.0, rows=4).requires_grad_(True)
    (gradient,) = torch.autograd.grad(free_energy(logits, log_joint).sum(), logits)
    torch.testing.assert_close(flow_velocity(logits.detach(), log_joint), -gradient)


def test_log_normalize_matches_torch():
    logits = _log_joint(10, 9, 50.0, rows=32)
    torch.testing.assert_close(log_normalize(logits), torch.log_softmax(logits, -1))


def test_flow_follows_dtype_and_device(device):
    log_joint = _log_joint(3, 10, 1.0).float().to(device)
    result = assignment_flow(log_joint, steps=3)
    assert result.log_q.dtype == torch.float32
    assert result.log_q.device.type == torch.device(device).type


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"steps": 0}, "flow_steps"),
        ({"step_size": 0.0}, "flow_step_size"),
        ({"step_size": 1.5}, "flow_step_size"),
        ({"scheme": "rk4"}, "flow_scheme"),
        ({"tol": -1.0}, "tol"),
    ],
)
def test_flow_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        assignment_flow(_log_joint(3, 0, 1.0), **kwargs)


def test_flow_rejects_nan_log_joint():
    log_joint = _log_joint(3, 0, 1.0)
    log_joint[0, 0] = float("nan")
    with pytest.raises(ValueError, match="log_joint"):
        assignment_flow(log_joint)
