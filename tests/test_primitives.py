"""energy_factor and memory inside Pyro traces, plates, autoguides and SVI."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.optim import Adam, ClippedAdam
from sklearn.neighbors import KernelDensity

from pyro_am import primitives
from pyro_am.distributions import GaussianKDE
from pyro_am.energies import GaussianKDEEnergy
from pyro_am.primitives import energy_factor, memory

NUM_MEMORIES, DIM = 4, 2


def _float64(*shape, device):
    return torch.randn(*shape, dtype=torch.float64, device=device)


def _kde_energy(device, num_memories=10):
    return GaussianKDEEnergy(_float64(num_memories, DIM, device=device), 0.7)


# -- energy_factor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.25, 3.0])
def test_energy_factor_log_prob_in_model(device, temperature):
    energy = _kde_energy(device)
    x = _float64(6, DIM, device=device)

    def model():
        with pyro.plate("points", 6):
            energy_factor("factor", energy, x, temperature=temperature)

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()

    site = trace.nodes["factor"]
    assert site["log_prob"].shape == (6,)
    assert site["cond_indep_stack"][0].name == "points"
    # Same float64 computation, only the order of the sum differs.
    expected = -energy(x).sum() / temperature
    torch.testing.assert_close(trace.log_prob_sum(), expected, rtol=1e-12, atol=1e-12)


def test_energy_factor_in_nested_plates(device):
    energy = _kde_energy(device)
    x = _float64(3, 5, DIM, device=device)

    def model():
        with pyro.plate("rows", 3, dim=-2), pyro.plate("columns", 5, dim=-1):
            energy_factor("factor", energy, x)

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()

    assert trace.nodes["factor"]["log_prob"].shape == (3, 5)
    torch.testing.assert_close(trace.log_prob_sum(), -energy(x).sum(), rtol=1e-12, atol=1e-12)


def test_energy_factor_scaled_by_subsampling(device):
    energy = _kde_energy(device)
    x = _float64(40, DIM, device=device)

    def model():
        with pyro.plate("points", 40, subsample_size=10) as index:
            energy_factor("factor", energy, x[index])
        return index

    trace = poutine.trace(model).get_trace()
    index = trace.nodes["_RETURN"]["value"]

    # A minibatch of 10 out of 40 is scaled by 4 so that it estimates the full sum.
    expected = -4.0 * energy(x[index]).sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected, rtol=1e-12, atol=1e-12)


def test_energy_factor_accepts_callable(device):
    x = _float64(5, DIM, device=device)

    def model():
        with pyro.plate("points", 5):
            energy_factor("factor", lambda value: 0.5 * value.square().sum(-1), x, temperature=2.0)

    trace = poutine.trace(model).get_trace()

    expected = -0.25 * x.square().sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected, rtol=1e-12, atol=1e-12)


def test_energy_factor_has_rsample_default(device):
    energy = _kde_energy(device)
    data = _float64(3, DIM, device=device)
    learned = data.clone().requires_grad_(True)

    def program():
        energy_factor("fixed", energy, data)
        energy_factor("differentiable", energy, learned)
        energy_factor("explicit", energy, data, has_rsample=True)

    trace = poutine.trace(program).get_trace()

    assert trace.nodes["fixed"]["fn"].has_rsample is False
    assert trace.nodes["differentiable"]["fn"].has_rsample is True
    assert trace.nodes["explicit"]["fn"].has_rsample is True


def test_energy_factor_in_guide_gradient(device):
    """A guide N(z; loc, 1) exp(-E(z)) has log q = log N(z; loc, 1) - E(z); check its gradient."""
    energy = _kde_energy(device)

    zeros = torch.zeros(DIM, dtype=torch.float64, device=device)

    def model():
        pyro.sample("z", dist.Normal(zeros, 2.0).to_event(1))

    def guide():
        loc = pyro.param("loc", torch.full_like(zeros, 0.3))
        z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        energy_factor("guide_energy", energy, z)

    pyro.set_rng_seed(1)
    loss = Trace_ELBO().differentiable_loss(model, guide)
    (actual,) = torch.autograd.grad(loss, [pyro.param("loc").unconstrained()])

    # Trace_ELBO runs the guide first, so reseeding reproduces its draw.
    pyro.set_rng_seed(1)
    z = poutine.trace(guide).get_trace().nodes["z"]["value"]
    loc = pyro.param("loc").unconstrained()
    noise = (z - loc).detach()
    z = loc + noise
    log_p = dist.Normal(zeros, 2.0).log_prob(z).sum()
    log_q = dist.Normal(loc, 1.0).log_prob(z).sum() - energy(z)
    (expected,) = torch.autograd.grad(-(log_p - log_q), [loc])

    # Both are the same float64 reparameterized gradient, summed in a different order.
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_energy_factor_in_guide_runs_svi(device):
    energy = _kde_energy(device)

    zeros = torch.zeros(DIM, dtype=torch.float64, device=device)

    def model():
        pyro.sample("z", dist.Normal(zeros, 2.0).to_event(1))

    def guide():
        loc = pyro.param("loc", zeros.clone())
        z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        energy_factor("guide_energy", energy, z)

    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    loss = svi.step()

    assert np.isfinite(loss)


def test_energy_factor_invalid_arguments(device):
    energy = _kde_energy(device)
    x = _float64(3, DIM, device=device)
    with pytest.raises(ValueError, match="temperature"):
        energy_factor("factor", energy, x, temperature=0.0)
    with pytest.raises(TypeError, match="energy must be"):
        energy_factor("factor", 1.0, x)
    with pytest.raises(TypeError, match="x must be a tensor"):
        energy_factor("factor", energy, [[0.0, 0.0]])
    with pytest.raises(ValueError, match="energy must map"):
        energy_factor("factor", lambda value: value.sum(), x)


# -- memory ----------------------------------------------------------------------------------------

PRIORS = {
    "scalar": lambda: dist.Normal(0.0, 1.0),
    "per_coordinate": lambda: dist.Normal(torch.zeros(DIM), 1.0),
    "event": lambda: dist.Normal(torch.zeros(DIM), 1.0).to_event(1),
    "batched_event": lambda: dist.Normal(torch.zeros(NUM_MEMORIES, DIM), 1.0).to_event(1),
    "whole_bank": lambda: dist.Normal(torch.zeros(NUM_MEMORIES, DIM), 1.0).to_event(2),
    "unreinterpreted_bank": lambda: dist.Normal(torch.zeros(NUM_MEMORIES, DIM), 1.0),
    "multivariate": lambda: dist.MultivariateNormal(torch.zeros(DIM), torch.eye(DIM)),
}


@pytest.mark.parametrize("prior_name", sorted(PRIORS))
def test_memory_with_prior_is_latent_site(prior_name):
    def model():
        return memory("memories", NUM_MEMORIES, DIM, prior=PRIORS[prior_name]())

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    site = trace.nodes["memories"]

    assert site["type"] == "sample"
    assert not site["is_observed"]
    assert site["value"].shape == (NUM_MEMORIES, DIM)
    assert site["fn"].event_shape == (DIM,)
    assert site["fn"].batch_shape == (NUM_MEMORIES,)
    assert site["log_prob"].shape == (NUM_MEMORIES,)
    (frame,) = site["cond_indep_stack"]
    assert frame.name == "memories_plate"
    assert frame.size == NUM_MEMORIES
    assert frame.dim == -1
    # Every prior here is a standard normal on each coordinate.
    expected = dist.Normal(0.0, 1.0).log_prob(site["value"]).sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(trace.nodes["_RETURN"]["value"], site["value"])


def test_memory_without_prior_is_param():
    trace = poutine.trace(lambda: memory("memories", NUM_MEMORIES, DIM)).get_trace()
    site = trace.nodes["memories"]

    assert site["type"] == "param"
    assert site["value"].shape == (NUM_MEMORIES, DIM)
    assert site["value"].dtype == torch.get_default_dtype()
    # Five standard deviations of the default initialization.
    assert site["value"].abs().max() < 5 * primitives.INIT_SCALE


def test_memory_param_init_is_reproducible():
    pyro.set_rng_seed(3)
    first = memory("memories", NUM_MEMORIES, DIM).detach().clone()
    again = memory("memories", NUM_MEMORIES, DIM).detach().clone()
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    reseeded = memory("memories", NUM_MEMORIES, DIM).detach().clone()

    assert torch.equal(first, again)
    assert torch.equal(first, reseeded)


def test_memory_param_init_and_constraint(device):
    init = torch.rand(NUM_MEMORIES, DIM, dtype=torch.float64, device=device) + 0.5

    from_tensor = memory("a", NUM_MEMORIES, DIM, init=init, constraint=constraints.positive)
    from_callable = memory("b", NUM_MEMORIES, DIM, init=lambda: 2 * init)

    torch.testing.assert_close(from_tensor, init, rtol=1e-12, atol=1e-12)
    assert from_tensor.dtype == torch.float64
    assert from_tensor.device == init.device
    assert isinstance(pyro.get_param_store()._constraints["a"], type(constraints.positive))
    torch.testing.assert_close(from_callable, 2 * init, rtol=0, atol=0)


def test_memory_invalid_arguments():
    with pytest.raises(ValueError, match="num_memories"):
        memory("memories", 0, DIM)
    with pytest.raises(TypeError, match="dim"):
        memory("memories", NUM_MEMORIES, 2.5)
    with pytest.raises(ValueError, match="init must have shape"):
        memory("memories", NUM_MEMORIES, DIM, init=torch.zeros(NUM_MEMORIES + 1, DIM))
    with pytest.raises(ValueError, match="init and constraint apply only"):
        memory("memories", NUM_MEMORIES, DIM, prior=dist.Normal(0.0, 1.0), init=torch.zeros(1))
    with pytest.raises(TypeError, match="prior must be a Pyro distribution"):
        memory("memories", NUM_MEMORIES, DIM, prior=torch.zeros(DIM))
    with pytest.raises(ValueError, match="event shape"):
        memory(
            "memories", NUM_MEMORIES, DIM, prior=dist.Normal(torch.zeros(DIM + 1), 1.0).to_event(1)
        )
    with pytest.raises(ValueError, match="does not broadcast"):
        memory("memories", NUM_MEMORIES, DIM, prior=dist.Normal(torch.zeros(DIM + 1), 1.0))
    with pytest.raises(ValueError, match="plate must have size"):
        plate = pyro.plate("other", NUM_MEMORIES + 1, dim=-1)
        memory("memories", NUM_MEMORIES, DIM, prior=dist.Normal(0.0, 1.0), plate=plate)
    with pytest.raises(ValueError, match="plate applies only"):
        memory("memories", NUM_MEMORIES, DIM, plate=pyro.plate("p", NUM_MEMORIES, dim=-1))
    with pytest.raises(ValueError, match="batch shape"):
        memory(
            "memories", NUM_MEMORIES, DIM, prior=dist.Normal(torch.zeros(7, DIM), 1.0).to_event(1)
        )


def _conjugate_model(observations, prior_scale, noise_scale):
    """Memories mu_k ~ N(0, s0^2 I) with M noisy observations of each, y ~ N(mu_k, s^2 I)."""
    num_observations = observations.shape[0]

    def model():
        prior = dist.Normal(observations.new_zeros(()), prior_scale)
        memories_plate = pyro.plate("memories_plate", NUM_MEMORIES, dim=-1)
        memories = memory("memories", NUM_MEMORIES, DIM, prior=prior, plate=memories_plate)
        with memories_plate:
            with pyro.plate("observations", num_observations, dim=-2):
                likelihood = dist.Normal(memories, noise_scale).to_event(1)
                pyro.sample("y", likelihood, obs=observations)

    # Normal-normal conjugacy: precision 1/s0^2 + M/s^2 and mean (sum_m y_m / s^2) / precision.
    precision = 1 / prior_scale**2 + num_observations / noise_scale**2
    posterior_mean = observations.sum(0) / noise_scale**2 / precision
    return model, posterior_mean, precision**-0.5


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDelta])
def test_memory_under_autoguide_svi(device, guide_class):
    observations = 1.0 + _float64(5, NUM_MEMORIES, DIM, device=device)
    model, posterior_mean, posterior_scale = _conjugate_model(observations, 2.0, 1.0)
    guide = guide_class(model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=2)

    svi = SVI(model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.998}), elbo)
    for _ in range(1500):
        svi.step()

    median = guide.median()["memories"].detach()
    # The posterior is Gaussian, so its mean is both the AutoNormal optimum and the MAP.
    if guide_class is AutoDelta:
        # MAP has a deterministic gradient, and Adam's decayed steps converge to rounding.
        torch.testing.assert_close(median, posterior_mean, rtol=0, atol=1e-6)
    else:
        scale = pyro.param("AutoNormal.scales.memories").detach()
        expected_scale = torch.full_like(scale, posterior_scale)
        # Eight-particle Monte Carlo gradients at the final learning rate leave the loc within a
        # few hundredths of the optimum (0.017 at this seed) and the scale within a few percent.
        torch.testing.assert_close(median, posterior_mean, rtol=0, atol=0.05)
        torch.testing.assert_close(scale, expected_scale, rtol=0.1, atol=0)


# -- models built from the primitives --------------------------------------------------------------


def test_svi_learns_held_out_bandwidth():
    """Held-out maximum likelihood of a KDE's bandwidth, against a grid search with scikit-learn."""
    num_points = 300
    from_first = torch.rand(num_points) < 0.5
    data = torch.where(
        from_first, -2 + 0.5 * torch.randn(num_points), 1.5 + torch.randn(num_points)
    )
    data = data.double().unsqueeze(-1)
    train, held_out = data[:150], data[150:]

    def model():
        initial = torch.tensor(1.0, dtype=torch.float64)
        bandwidth = pyro.param("bandwidth", initial, constraint=constraints.positive)
        with pyro.plate("held_out", len(held_out)):
            pyro.sample("obs", GaussianKDE(train, bandwidth), obs=held_out)

    svi = SVI(model, lambda: None, ClippedAdam({"lr": 0.05, "lrd": 0.995}), Trace_ELBO())
    for _ in range(800):
        svi.step()
    learned = pyro.param("bandwidth").item()

    def held_out_score(bandwidth):
        estimator = KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(train.numpy())
        return estimator.score(held_out.numpy())

    step = 0.005
    grid = np.arange(0.02, 1.5, step)
    scores = np.array([held_out_score(bandwidth) for bandwidth in grid])
    best = grid[scores.argmax()]
    # The second difference at the grid optimum gives f'' ~ -320, so the grid maximum lies within
    # 0.5 * |f''| * (step / 2)^2 ~ 1e-3 nats of the true maximum. A bandwidth at the true maximum
    # scores above the grid maximum, and 1e-3 nats is the margin for the optimizer's error.
    assert held_out_score(learned) > scores.max() - 1e-3
    assert abs(learned - best) <= 2 * step


def test_memory_map_under_energy_factor(device):
    """MAP memories under a Gaussian prior and a KDE energy factor pulling them to the data.

    The objective -log N(mu; 0, s0^2 I) + E_kde(mu) / T has gradient
    mu / s0^2 + (mu - F(mu)) / (T h^2), so its stationary points solve
    mu = s0^2 F(mu) / (s0^2 + T h^2), with F the mean-shift map. Iterating that map is an MM
    algorithm, so its limit from the same start is the reference.
    """
    centres = torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=torch.float64, device=device)
    data = centres.repeat_interleave(20, 0) + 0.3 * _float64(40, DIM, device=device)
    prior_scale, bandwidth, temperature = 2.0, 0.5, 0.5
    energy = GaussianKDEEnergy(data, bandwidth)
    start = torch.tensor([[-1.0, 0.5], [1.0, 0.5]], dtype=torch.float64, device=device)

    def model():
        prior = dist.Normal(torch.tensor(0.0, dtype=torch.float64, device=device), prior_scale)
        memories_plate = pyro.plate("memories_plate", 2, dim=-1)
        memories = memory("memories", 2, DIM, prior=prior, plate=memories_plate)
        with memories_plate:
            energy_factor("pull", energy, memories, temperature=temperature)

    guide = AutoDelta(model, init_loc_fn=lambda site: start)
    svi = SVI(model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.997}), Trace_ELBO())
    for _ in range(1500):
        svi.step()
    learned = guide.median()["memories"].detach()

    shrinkage = prior_scale**2 / (prior_scale**2 + temperature * bandwidth**2)
    reference = start
    for _ in range(500):
        reference = shrinkage * energy.fixed_point(reference)
    residual = learned - shrinkage * energy.fixed_point(learned)

    # The MAP gradient is deterministic, so Adam's decayed steps and the MM iteration both reach
    # the stationary point to rounding, far inside 1e-6.
    torch.testing.assert_close(learned, reference, rtol=0, atol=1e-6)
    assert residual.abs().max() < 1e-6
