"""Tests of the ArviZ conversion against the exact posterior of a conjugate Normal model.

Model: mu ~ N(0, 10^2), x_n ~ N(mu, 1) for n = 1 .. N. The posterior is N(m, v) with
v = 1 / (1 / 100 + N) and m = v * sum(x), and the leave-one-out predictive of x_n is
N(x_n; m_-n, 1 + v_-n) with the same formulas applied to the other N - 1 points.
"""

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_am.diagnostics import (
    draw_from_guide,
    from_guide,
    from_mcmc,
    import_arviz,
    pointwise_log_likelihood,
)

az = import_arviz()

PRIOR_SCALE = 10.0
NUM_POINTS = 20


def normal_model(data):
    mu = pyro.sample("mu", dist.Normal(data.new_zeros(()), PRIOR_SCALE))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)


def exact_posterior(data: np.ndarray) -> tuple[float, float]:
    variance = 1.0 / (1.0 / PRIOR_SCALE**2 + data.size)
    return variance * data.sum(), math.sqrt(variance)


def exact_loo(data: np.ndarray) -> float:
    total = 0.0
    for n in range(data.size):
        mean, sd = exact_posterior(np.delete(data, n))
        total += scipy.stats.norm.logpdf(data[n], mean, math.sqrt(1.0 + sd**2))
    return total


@pytest.fixture
def data(device):
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(NUM_POINTS, generator=generator, dtype=torch.float64)
    # A spread below the model's unit sd keeps the variance of each log density under the 0.4
    # at which az.waic warns.
    return (1.5 + 0.7 * noise).to(device)


def exact_guide_for(data):
    mean, sd = exact_posterior(data.cpu().numpy())

    def guide(data):
        pyro.sample("mu", dist.Normal(data.new_tensor(mean), sd))

    return guide


def test_pointwise_log_likelihood_matches_scipy(data):
    draws = {"mu": torch.linspace(0.0, 3.0, 7, dtype=data.dtype, device=data.device)}
    expected = scipy.stats.norm.logpdf(
        data.cpu().numpy()[None, :], draws["mu"].cpu().numpy()[:, None], 1.0
    )

    for parallel in (True, False):
        values = pointwise_log_likelihood(normal_model, draws, (data,), parallel=parallel)
        assert set(values) == {"obs"}
        assert values["obs"].shape == (7, NUM_POINTS)
        # float64 throughout, so agreement to rounding error.
        np.testing.assert_allclose(values["obs"].cpu().numpy(), expected, rtol=1e-10)


def test_draw_from_guide_drops_plate_padding(data):
    draws = draw_from_guide(exact_guide_for(data), (data,), num_samples=5)
    assert draws["mu"].shape == (5,)


def test_from_guide_posterior_matches_exact(data):
    num_samples = 2000
    idata = from_guide(
        normal_model,
        exact_guide_for(data),
        (data,),
        num_samples=num_samples,
        dims={"obs": ["observation"]},
        elbo=[-3.0, -2.0, -1.5],
        posterior_predictive=True,
    )
    mean, sd = exact_posterior(data.cpu().numpy())

    draws = idata.posterior["mu"].values
    assert draws.shape == (1, num_samples)
    # Monte Carlo standard error of the mean is sd / sqrt(2000) = 0.022 sd; 5 errors is 0.11 sd.
    assert abs(draws.mean() - mean) < 0.11 * sd
    # The sample sd has relative standard error 1 / sqrt(2 * 2000) = 1.6%; allow 8%.
    assert abs(draws.std() / sd - 1.0) < 0.08

    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "observation")
    np.testing.assert_allclose(idata.observed_data["obs"].values, data.cpu().numpy())
    np.testing.assert_allclose(idata.vi_trace["elbo"].values, [-3.0, -2.0, -1.5])
    assert idata.posterior_predictive["obs"].shape == (1, num_samples, NUM_POINTS)

    # Replicates x_rep = mu + eps have predictive sd sqrt(1 + v) = 1.0 (v = 0.05); their mean
    # over 2000 x 20 values has standard error 0.007 around m.
    assert abs(float(idata.posterior_predictive["obs"].mean()) - mean) < 0.05


def test_from_guide_loo_and_waic_match_exact_loo(data):
    idata = from_guide(normal_model, exact_guide_for(data), (data,), num_samples=2000)
    expected = exact_loo(data.cpu().numpy())

    loo = az.loo(idata)
    waic = az.waic(idata)

    # With 2000 exact posterior draws PSIS-LOO has Monte Carlo error near 0.05 for N = 20, and
    # WAIC differs from exact LOO by O(1/N) per point; 0.5 in total covers both.
    assert abs(loo.elpd_loo - expected) < 0.5
    assert abs(waic.elpd_waic - expected) < 0.5
    assert (loo.pareto_k.values < 0.7).all()


def test_from_guide_summary_and_trace_plot(data):
    pyro.clear_param_store()
    guide = AutoNormal(normal_model)
    svi = SVI(normal_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(300)]

    idata = from_guide(
        normal_model, guide, (data,), num_samples=500, elbo=[-loss for loss in losses]
    )
    summary = az.summary(idata, var_names=["mu"], kind="stats")
    loc = pyro.param("AutoNormal.locs.mu").detach().item()
    scale = pyro.param("AutoNormal.scales.mu").detach().item()
    # The reference is the fitted guide itself: 500 draws give the mean a Monte Carlo error of
    # 0.045 scale (allow 0.2) and the sd a relative error of 3% (allow 12%). az.summary rounds
    # to 2 decimals, which adds up to 0.005.
    assert abs(summary.loc["mu", "mean"] - loc) < 0.2 * scale + 0.005
    assert abs(summary.loc["mu", "sd"] / scale - 1.0) < 0.12 + 0.005 / scale
    assert idata.vi_trace["elbo"].sizes["iteration"] == 300

    axes = az.plot_trace(idata, var_names=["mu"])
    assert axes.shape == (1, 2)
    plt.close("all")


def test_from_guide_netcdf_round_trip(data, tmp_path):
    idata = from_guide(normal_model, exact_guide_for(data), (data,), num_samples=50, elbo=[-1.0])
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path), engine="h5netcdf")

    loaded = az.from_netcdf(str(path), engine="h5netcdf")
    assert {"posterior", "log_likelihood", "observed_data", "vi_trace"} <= set(loaded.groups())
    np.testing.assert_allclose(loaded.posterior["mu"].values, idata.posterior["mu"].values)


def test_from_guide_rejects_model_without_observations(data):
    def prior_only(data):
        pyro.sample("mu", dist.Normal(data.new_zeros(()), 1.0))

    with pytest.raises(ValueError, match="no observed sample site"):
        from_guide(prior_only, exact_guide_for(data), (data,), num_samples=4)


@pytest.fixture
def mcmc_two_chains(data, monkeypatch):
    # Pyro runs chains in worker processes when the machine has spare cores. Reporting one core
    # makes it run them one after another in this process, which is faster for this small model.
    monkeypatch.setattr(pyro.infer.mcmc.api.mp, "cpu_count", lambda: 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=2 is more than available_cpu")
        mcmc = MCMC(
            NUTS(normal_model),
            num_samples=300,
            warmup_steps=150,
            num_chains=2,
            disable_progbar=True,
        )
    mcmc.run(data)
    return mcmc


def test_from_mcmc_posterior_matches_exact(data, mcmc_two_chains):
    idata = from_mcmc(mcmc_two_chains, dims={"obs": ["observation"]}, posterior_predictive=True)
    mean, sd = exact_posterior(data.cpu().numpy())

    draws = idata.posterior["mu"]
    assert draws.shape == (2, 300)
    # NUTS on a Gaussian gives nearly independent draws: 600 draws have Monte Carlo error
    # 0.04 sd; allow 0.25 sd for autocorrelation.
    assert abs(float(draws.mean()) - mean) < 0.25 * sd
    # The sd estimate from ~600 draws has relative error ~3%; allow 15%.
    assert abs(float(draws.std()) / sd - 1.0) < 0.15

    assert idata.sample_stats["diverging"].shape == (2, 300)
    assert idata.sample_stats["lp"].shape == (2, 300)
    assert len(idata.sample_stats.attrs["acceptance_rate"]) == 2
    assert idata.posterior_predictive["obs"].shape == (2, 300, NUM_POINTS)


def test_from_mcmc_lp_is_log_joint(data, mcmc_two_chains):
    idata = from_mcmc(mcmc_two_chains)
    mu = idata.posterior["mu"].values[0, :5]
    x = data.cpu().numpy()
    expected = scipy.stats.norm.logpdf(mu, 0.0, PRIOR_SCALE) + np.array(
        [scipy.stats.norm.logpdf(x, value, 1.0).sum() for value in mu]
    )
    # float64 model, so agreement to rounding error.
    np.testing.assert_allclose(idata.sample_stats["lp"].values[0, :5], expected, rtol=1e-10)


def test_from_mcmc_works_with_arviz_functions(data, mcmc_two_chains):
    idata = from_mcmc(mcmc_two_chains)

    summary = az.summary(idata, var_names=["mu"])
    # Two well-mixed chains of a Gaussian target give r_hat near 1.
    assert summary.loc["mu", "r_hat"] < 1.05
    loo = az.loo(idata)
    # 600 MCMC draws: PSIS-LOO Monte Carlo error near 0.1; allow 0.6.
    assert abs(loo.elpd_loo - exact_loo(data.cpu().numpy())) < 0.6
    assert np.isfinite(az.waic(idata).elpd_waic)

    axes = az.plot_trace(idata, var_names=["mu"])
    assert axes.shape == (1, 2)
    plt.close("all")


def fit_three_blobs(device, **options):
    from pyro_am.models import DPMemory

    generator = torch.Generator().manual_seed(2)
    centres = torch.tensor([[-4.0, 0.0], [0.0, 3.0], [4.0, 0.0]], dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(40)
    data = centres[labels] + 0.5 * torch.randn(120, 2, generator=generator, dtype=torch.float64)
    data = data.to(device)
    memory = DPMemory(2, truncation=6, prior_scale=4.0, **options)
    result = memory.fit(data, method="cavi", max_iter=100, progress=False, seed=0)
    return memory, result, data


@pytest.fixture
def fitted_memory(device):
    return fit_three_blobs(device)


def test_to_inference_data_groups_and_dims(fitted_memory):
    from pyro_am.diagnostics import to_inference_data

    memory, result, data = fitted_memory
    idata = to_inference_data(
        memory, data, num_samples=40, fit_result=result, feature_names=["a", "b"], seed=0
    )
    num_memories = memory.truncation

    assert {"posterior", "log_likelihood", "observed_data", "posterior_predictive"} <= set(
        idata.groups()
    )
    assert idata.posterior["locs"].dims == ("chain", "draw", "memory", "dim")
    assert idata.posterior["locs"].shape == (1, 40, num_memories, 2)
    assert idata.posterior["weights"].dims == ("chain", "draw", "memory")
    assert list(idata.posterior["dim"].values) == ["a", "b"]
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "observation")
    assert idata.posterior_predictive["obs"].shape == (1, 40, 120, 2)
    assert idata.vi_trace["elbo"].sizes["iteration"] == len(result.elbo)
    assert idata.vi_trace.attrs["num_created"] == result.num_created


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
@pytest.mark.parametrize("per_memory_scale", [False, True])
def test_to_inference_data_log_likelihood_matches_scipy(device, covariance, per_memory_scale):
    from scipy.special import logsumexp

    from pyro_am.diagnostics import to_inference_data

    memory, _, data = fit_three_blobs(
        device, covariance=covariance, per_memory_scale=per_memory_scale
    )
    idata = to_inference_data(memory, data, num_samples=5, posterior_predictive=False, seed=0)
    weights = idata.posterior["weights"].values[0]
    memories = idata.posterior["locs"].values[0]
    scale = memory.scale.cpu().numpy()
    if per_memory_scale and covariance == "isotropic":
        scale = scale[:, None]
    scale = np.broadcast_to(scale, memories.shape[1:])
    # ArviZ stores a scalar as an array of shape (1,), so compare the values.
    stored = idata.constant_data["noise_scale"].values
    np.testing.assert_allclose(stored.reshape(memory.scale.shape), memory.scale.cpu().numpy())
    x = data.cpu().numpy()

    for draw in range(5):
        component = scipy.stats.norm.logpdf(x[:, None, :], memories[draw][None], scale[None])
        component = component.sum(-1)
        expected = logsumexp(np.log(weights[draw]) + component, axis=1)
        # float64 throughout; GEMM-form distances lose ~1e-12 relative accuracy here.
        np.testing.assert_allclose(idata.log_likelihood["obs"].values[0, draw], expected, rtol=1e-8)


def test_to_inference_data_draws_follow_guide(fitted_memory):
    from pyro_am.diagnostics import to_inference_data

    memory, _, data = fitted_memory
    num_samples = 400
    idata = to_inference_data(memory, data, num_samples=num_samples, posterior_predictive=False)
    parameters = memory.variational_parameters()

    draws = idata.posterior["locs"].values[0]
    loc = parameters["memory_loc"].cpu().numpy()
    scale = parameters["memory_scale"].cpu().numpy()
    # Each coordinate's sample mean has standard error scale / sqrt(400) = scale / 20; allow
    # 5 standard errors.
    assert (np.abs(draws.mean(0) - loc) < 5 * scale / np.sqrt(num_samples)).all()
    # The weights' sample mean has standard error below 0.5 / 20 = 0.025 for any Beta sticks;
    # the reference is the expected weight E_q[w] computed in closed form.
    weights = idata.posterior["weights"].values[0].mean(0)
    np.testing.assert_allclose(weights, memory.weights.cpu().numpy(), atol=0.05)


def test_to_inference_data_loo_waic_summary(fitted_memory):
    from pyro_am.diagnostics import to_inference_data

    memory, _, data = fitted_memory
    idata = to_inference_data(memory, data, num_samples=400, posterior_predictive=False, seed=0)

    loo = az.loo(idata)
    waic = az.waic(idata)
    in_sample = float(memory.log_predictive(data).sum())
    # LOO and WAIC subtract an effective number of parameters from the in-sample fit: positive
    # and at most the 3 memories x (2 coordinates + 1 weight) that carry data, with margin.
    assert 0 < in_sample - loo.elpd_loo < 20
    assert 0 < in_sample - waic.elpd_waic < 20
    summary = az.summary(idata, var_names=["weights"], kind="stats")
    assert len(summary) == memory.truncation

    axes = az.plot_trace(idata, var_names=["weights"])
    assert axes.shape == (1, 2)
    plt.close("all")


def test_to_inference_data_rejects_wrong_dimension(fitted_memory):
    from pyro_am.diagnostics import to_inference_data

    memory, _, data = fitted_memory
    with pytest.raises(ValueError, match="must have shape"):
        to_inference_data(memory, data[:, :1], num_samples=4)


def test_to_inference_data_rejects_empty_or_nan_data(fitted_memory):
    from pyro_am.diagnostics import to_inference_data

    memory, _, data = fitted_memory
    with pytest.raises(ValueError, match="num_data >= 1"):
        to_inference_data(memory, data[:0], num_samples=4)
    corrupted = data.clone()
    corrupted[3, 1] = math.nan
    with pytest.raises(ValueError, match="data contains 1 NaN"):
        to_inference_data(memory, corrupted, num_samples=4)
