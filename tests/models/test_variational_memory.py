import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from pyro_am.energies import GaussianMixtureEnergy
from pyro_am.models.flow import assignment_flow
from pyro_am.models.variational_memory import VariationalMemory, _fast_log_joint, elbo_gap_table


def _blobs(device, num_per_cluster=40, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 5.0]], dtype=dtype)
    labels = torch.arange(3).repeat_interleave(num_per_cluster)
    noise = torch.randn(len(labels), 2, generator=generator, dtype=dtype)
    return (centres[labels] + noise).to(device), labels


def _memory(device, scale="per_memory", **kwargs):
    locs = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    return VariationalMemory(3, 2, scale=scale, init_locs=locs, **kwargs)


def test_log_joint_matches_scipy(device):
    memory = _memory(device)
    data, _ = _blobs(device, num_per_cluster=5)
    log_joint = memory.log_joint(data).detach().cpu().numpy()
    locs = memory.locs.detach().cpu().numpy()
    expected = np.stack(
        [math.log(1 / 3) + multivariate_normal(loc, np.eye(2)).logpdf(data.cpu()) for loc in locs],
        axis=-1,
    )
    # float64 GEMM distances on O(10) values: round-off ~1e-13.
    np.testing.assert_allclose(log_joint, expected, atol=1e-10)


def test_fast_log_joint_matches_energy(device):
    data, _ = _blobs(device, num_per_cluster=5)
    locs = torch.randn(3, 2, dtype=torch.float64, device=device)
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)
    logits = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64, device=device)
    energy = GaussianMixtureEnergy(locs, scales, logits=logits)
    fast = _fast_log_joint(
        data, data.square().sum(-1), locs, torch.log_softmax(logits, -1), scales.square()
    )
    torch.testing.assert_close(fast, energy.component_log_likelihoods(data))


@pytest.mark.parametrize("scale", ["shared", "per_memory"])
def test_exact_enumeration_gives_marginal_likelihood(scale, device):
    memory = _memory(device, scale=scale)
    data, _ = _blobs(device, num_per_cluster=5)
    exact = -TraceEnum_ELBO(max_plate_nesting=1).loss(memory.model, memory.exact_guide, data)
    log_joint = memory.log_joint(data).detach().cpu().numpy()
    # Reference: scipy's logsumexp of the component log joints; float64 round-off.
    assert exact == pytest.approx(logsumexp(log_joint, axis=-1).sum(), rel=1e-12)


def test_flow_guide_elbo_equals_analytic_free_energy(device):
    memory = _memory(device, flow_steps=2, warm_start=False)
    data, _ = _blobs(device, num_per_cluster=5)
    elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(memory.model, memory.guide, data)
    analytic = -float(memory.free_energy(data).detach())
    # TraceEnum_ELBO sums z exactly under q, so both are the same float64 sum.
    assert elbo == pytest.approx(analytic, rel=1e-12)


def test_elbo_gap_shrinks_to_zero(device):
    memory = _memory(device)
    data, _ = _blobs(device, num_per_cluster=10)
    rows = elbo_gap_table(memory, data, steps=(1, 2, 4, 8, 16, 64))
    gaps = [row["gap"] for row in rows]
    # The gap is sum_n KL(q_n || posterior_n) >= 0, up to float64 round-off of the ELBO sums.
    assert all(gap >= -1e-9 for gap in gaps)
    assert all(later < earlier for earlier, later in zip(gaps[:4], gaps[1:5], strict=True))
    # After 64 halvings of the distance in log q the KL is below round-off.
    assert abs(gaps[-1]) < 1e-8


def test_svi_with_flow_guide_increases_elbo(device):
    memory = _memory(device)
    data, _ = _blobs(device)
    objective = TraceEnum_ELBO(max_plate_nesting=1)
    svi = SVI(memory.model, memory.guide, pyro.optim.Adam({"lr": 0.1}), loss=objective)
    first = svi.step(data)
    for _ in range(100):
        last = svi.step(data)
    assert last < first - 10.0
    exact = -objective.loss(memory.model, memory.exact_guide, data)
    # With warm starts the guide is within a small gap of the exact bound after 100 steps.
    assert -last == pytest.approx(exact, abs=1.0)


def test_instances_do_not_share_parameters(device):
    first, second = _memory(device), _memory(device)
    data, _ = _blobs(device, num_per_cluster=5)
    objective = TraceEnum_ELBO(max_plate_nesting=1)
    objective.loss(first.model, first.exact_guide, data)
    objective.loss(second.model, second.exact_guide, data)
    names = set(pyro.get_param_store().keys())
    assert f"{first._pyro_name}.locs" in names
    assert f"{second._pyro_name}.locs" in names
    assert first._pyro_name != second._pyro_name


def test_closed_form_fit_never_decreases_elbo(device):
    data, _ = _blobs(device)
    memory = VariationalMemory(3, 2, scale="per_memory", tol=0.0, max_iter=30).fit(data)
    history = np.array(memory.elbo_history_)
    # Generalized EM with a monotone E-step and an exact M-step; float64 round-off only.
    assert (np.diff(history) >= -1e-10).all()


@pytest.mark.parametrize("scale", ["shared", "per_memory"])
def test_fit_matches_sklearn_gaussian_mixture(scale, device):
    data, labels = _blobs(device)
    memory = VariationalMemory(3, 2, scale=scale, tol=1e-10, max_iter=500, reg_variance=1e-6)
    predicted = memory.fit(data).predict(data)
    assert adjusted_rand_score(labels.numpy(), predicted.cpu().numpy()) > 0.95
    if scale == "per_memory":
        reference = GaussianMixture(
            3, covariance_type="spherical", tol=1e-10, max_iter=500, random_state=0
        ).fit(data.cpu().numpy())
        # Same model and likelihood at convergence of EM on well-separated blobs: the mean
        # log-likelihoods agree to the convergence tolerance.
        assert memory.score(data) == pytest.approx(reference.score(data.cpu().numpy()), abs=1e-6)


def test_gradient_fit_finds_clusters(device):
    data, labels = _blobs(device)
    memory = VariationalMemory(3, 2, m_step="gradient", max_iter=200, learning_rate=0.05, tol=0)
    predicted = memory.fit(data).predict(data)
    assert adjusted_rand_score(labels.numpy(), predicted.cpu().numpy()) > 0.95
    history = memory.elbo_history_
    assert history[-1] >= history[0]


def test_fit_predict_numpy_returns_numpy():
    data, labels = _blobs("cpu")
    predicted = VariationalMemory(3, 2).fit_predict(data.numpy())
    assert isinstance(predicted, np.ndarray)
    assert adjusted_rand_score(labels.numpy(), predicted) > 0.95


def test_assign_is_posterior_after_many_steps(device):
    data, _ = _blobs(device, num_per_cluster=5)
    memory = _memory(device, flow_steps=80)
    # (1/2)^80 contraction: equal to the exact posterior up to round-off.
    torch.testing.assert_close(memory.assign(data), memory.assign(data, exact=True))


def test_retrieve_completes_missing_coordinate(device):
    data, _ = _blobs(device)
    memory = VariationalMemory(3, 2).fit(data)
    # The memory near (4, 0): its first coordinate alone picks it out from (-4, 0) and (0, 5).
    locs = memory.locs.detach()
    centre = locs[locs[:, 0].argmax()]
    query = torch.stack([centre[0] + 0.1, torch.zeros_like(centre[0])]).unsqueeze(0)
    mask = torch.tensor([[True, False]], device=device)
    result = memory.retrieve(query, mask=mask)
    assert result.states[0, 0] == centre[0] + 0.1
    # The missing coordinate moves to the nearest memory's coordinate (blobs 4 apart, unit noise).
    assert abs(float(result.states[0, 1] - centre[1])) < 0.1


def test_checkpoint_round_trip(tmp_path, device):
    data, _ = _blobs(device)
    path = tmp_path / "memory.pt"
    memory = VariationalMemory(3, 2, max_iter=5, tol=0).fit(data, checkpoint=path)
    assert path.exists()
    assert not list(tmp_path.glob("*.tmp"))
    restored = VariationalMemory(3, 2, max_iter=8, tol=0)
    restored.fit(data, checkpoint=path, resume=True)
    assert restored.n_iter_ == 8
    assert len(restored.elbo_history_) == 8
    assert restored.elbo_history_[:5] == memory.elbo_history_


def test_nan_during_fit_keeps_last_parameters(tmp_path, device):
    data, _ = _blobs(device)
    path = tmp_path / "memory.pt"
    memory = VariationalMemory(3, 2, max_iter=5, tol=0).fit(data, checkpoint=path)
    before = memory.locs.detach().clone()
    # A NaN regularizer makes the M-step of the resumed iteration 5 produce NaN variances.
    memory.reg_variance = float("nan")
    memory.max_iter = 10
    with pytest.raises(RuntimeError, match="iteration 5"):
        memory.fit(data, checkpoint=path, resume=True)
    torch.testing.assert_close(memory.locs.detach(), before)
    assert bool(torch.isfinite(memory.scales.detach()).all())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_memories": 0}, "num_memories"),
        ({"flow_steps": 0}, "flow_steps"),
        ({"flow_step_size": -1.0}, "flow_step_size"),
        ({"scale": "full"}, "scale"),
        ({"m_step": "newton"}, "m_step"),
        ({"init_restarts": 0}, "init_restarts"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, name):
    arguments = {"num_memories": 3, "dim": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        VariationalMemory(**arguments)


def test_fit_rejects_bad_data():
    data, _ = _blobs("cpu", num_per_cluster=1)
    with pytest.raises(ValueError, match="num_memories"):
        VariationalMemory(4, 2).fit(data)
    with pytest.raises(ValueError, match="dim=3"):
        VariationalMemory(2, 3).fit(data)
    bad = data.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="X contains 1 NaN"):
        VariationalMemory(2, 2).fit(bad)


def test_warm_start_continues_flow(device):
    memory = _memory(device, flow_steps=1)
    data, _ = _blobs(device, num_per_cluster=5)
    exact = memory.assign(data, exact=True)
    cold = memory.flow(data, warm_start=False).log_q.exp()
    warm = memory.flow(data).log_q.exp()
    # The second call starts where the first stopped, so it has taken two steps in total.
    two_steps = memory.flow(data, warm_start=False, steps=2).log_q.exp()
    torch.testing.assert_close(warm, two_steps)
    assert (warm - exact).abs().max() < (cold - exact).abs().max()


def test_fit_follows_float32_input(device):
    data, labels = _blobs(device, dtype=torch.float32)
    memory = VariationalMemory(3, 2).fit(data)
    assert memory.locs.dtype == torch.float32
    assert memory.locs.device.type == torch.device(device).type
    predicted = memory.predict(data)
    assert adjusted_rand_score(labels.numpy(), predicted.cpu().numpy()) > 0.95


def test_guide_stores_logits_by_index(device):
    memory = _memory(device, flow_steps=1)
    data, _ = _blobs(device, num_per_cluster=4)
    first, second = torch.arange(0, 6, device=device), torch.arange(6, 12, device=device)

    def cold(x, steps):
        return assignment_flow(memory.log_joint(x).detach(), steps=steps, step_size=0.5).log_q

    memory.flow(data[:6], first)
    # The second half is new: it starts from uniform although the first half is stored.
    torch.testing.assert_close(memory.flow(data[6:], second).log_q, cold(data[6:], 1))
    # Each half continues from its own stored logits: two steps in total.
    torch.testing.assert_close(memory.flow(data[:6], first).log_q, cold(data[:6], 2))
    torch.testing.assert_close(memory.flow(data[6:], second).log_q, cold(data[6:], 2))
