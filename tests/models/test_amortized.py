"""Tests of the amortized mixture guide: its ELBO against SciPy, SVI, Predictive, normalization."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from scipy import stats
from scipy.special import logsumexp

from pyro_am.families import GaussianMixtureFamily
from pyro_am.models import AmortizedMixtureGuide
from pyro_am.models.amortized_training import (
    _per_point,
    fit_amortized_guide,
    load_amortized_guide,
)

PRIORS = ["dirichlet", "stick_breaking"]


def _guide(weights_prior="dirichlet", dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = {"width": 16, "heads": 2, "depth": 1, "weights_prior": weights_prior, **kwargs}
    return AmortizedMixtureGuide(dim=2, **options).to(dtype=dtype)


def _context(batch=2, size=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    family = GaussianMixtureFamily(dtype=torch.float64)
    return family.sample_points(batch, size, generator)


def _stick_breaking_log_density(weights, first, second):
    # Sticks v_k = w_k / r_k with remainders r_k = sum_{j>=k} w_j; the Jacobian of w -> v is
    # prod_k 1 / r_k.
    remainders = np.cumsum(weights[::-1])[::-1]
    sticks = weights[:-1] / remainders[:-1]
    return float(np.sum(stats.beta.logpdf(sticks, first, second) - np.log(remainders[:-1])))


@pytest.mark.parametrize("weights_prior", PRIORS)
def test_elbo_matches_scipy(weights_prior):
    amortized = _guide(weights_prior)
    context = _context()

    pyro.set_rng_seed(3)
    loss = Trace_ELBO().loss(amortized.model, amortized.guide, context)
    pyro.set_rng_seed(3)
    trace = poutine.trace(amortized.guide).get_trace(context)
    parameters = {
        k: v.detach().numpy() for k, v in amortized.variational_parameters(context).items()
    }

    elbo = 0.0
    for b in range(2):
        locs = trace.nodes["locs"]["value"][b, 0].detach().numpy()
        weights = trace.nodes["weights"]["value"][b, 0].detach().numpy()
        scales = trace.nodes["scales"]["value"][b, 0].detach().numpy()
        prior = stats.norm(0.0, 5.0).logpdf(locs).sum()
        prior += stats.lognorm(s=1.0, scale=0.5).logpdf(scales).sum()
        guide = stats.norm(parameters["loc"][b], parameters["scale"][b]).logpdf(locs).sum()
        guide += (
            stats.lognorm(s=parameters["scale_scale"][b], scale=np.exp(parameters["scale_loc"][b]))
            .logpdf(scales)
            .sum()
        )
        if weights_prior == "dirichlet":
            prior += stats.dirichlet(np.ones(3)).logpdf(weights)
            guide += stats.dirichlet(parameters["concentration"][b]).logpdf(weights)
        else:
            prior += _stick_breaking_log_density(weights, np.ones(2), np.ones(2))
            guide += _stick_breaking_log_density(
                weights, parameters["concentration1"][b], parameters["concentration0"][b]
            )
        components = np.stack(
            [
                stats.multivariate_normal(locs[k], scales[k] ** 2 * np.eye(2)).logpdf(
                    context[b].numpy()
                )
                for k in range(3)
            ]
        )
        likelihood = logsumexp(components + np.log(weights)[:, None], axis=0).sum()
        elbo += likelihood + prior - guide

    # float64 throughout; SciPy evaluates each density independently of Pyro.
    assert loss == pytest.approx(-elbo, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("weights_prior", PRIORS)
def test_svi_steps_improve_elbo(weights_prior):
    amortized = _guide(weights_prior, dtype=torch.float32)
    family = GaussianMixtureFamily()
    fit_amortized_guide(amortized, family, steps=30, batch_size=8, max_points=8, progress=False)

    history = amortized.history
    assert len(history) == 30
    # The untrained guide puts its means far from the data, so the ELBO per point starts near -100.
    # It climbs by tens of nats within 30 steps, and a 5-nat gain is far outside step noise.
    assert np.mean(history[-5:]) > np.mean(history[:5]) + 5.0
    assert not amortized.encoder.training


def test_per_point_elbo_divides_by_context_size():
    amortized = _guide()
    context = _context(batch=3, size=7)
    pyro.set_rng_seed(4)
    full = Trace_ELBO().loss(amortized.model, amortized.guide, context)
    pyro.set_rng_seed(4)
    scaled = Trace_ELBO().loss(_per_point(amortized.model), _per_point(amortized.guide), context)
    # The same guide draw, every log density scaled by 1 / n; float64.
    assert scaled == pytest.approx(full / 7, rel=1e-12)


def test_plain_svi_trains_the_encoder():
    amortized = _guide(dtype=torch.float32)
    context = _context().float()
    before = {k: v.clone() for k, v in amortized.encoder.state_dict().items()}
    svi = SVI(amortized.model, amortized.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(context)
    changed = [not torch.equal(before[k], v) for k, v in amortized.encoder.state_dict().items()]
    assert all(changed)


@pytest.mark.parametrize("weights_prior", PRIORS)
def test_predictive_draws_from_the_guide(weights_prior):
    amortized = _guide(weights_prior)
    context = _context(batch=3, size=6)

    predictive = Predictive(amortized.model, guide=amortized.guide, num_samples=400, parallel=True)
    samples = predictive(context, num_predictive=7)

    assert samples["locs"].shape == (400, 3, 1, 3, 2)
    assert samples["weights"].shape == (400, 3, 1, 3)
    assert samples["scales"].shape == (400, 3, 1, 3)
    assert samples["predictive"].shape == (400, 3, 7, 2)
    parameters = amortized.variational_parameters(context)
    mean = samples["locs"][:, :, 0].mean(0)
    standard_error = parameters["scale"] / math.sqrt(400)
    # 18 Gaussian means of 400 draws each, within 5 standard errors.
    assert ((mean - parameters["loc"]).abs() < 5 * standard_error).all()
    ones = torch.ones(400, 3, 1, dtype=torch.float64)
    torch.testing.assert_close(samples["weights"].sum(-1), ones)


def test_serial_predictive_matches_shapes():
    amortized = _guide("stick_breaking")
    samples = Predictive(amortized.model, guide=amortized.guide, num_samples=3)(
        _context(batch=2, size=4), num_predictive=5
    )
    assert samples["locs"].shape == (3, 2, 1, 3, 2)
    assert samples["predictive"].shape == (3, 2, 5, 2)


def test_guide_is_permutation_invariant():
    amortized = _guide("stick_breaking")
    context = _context(batch=2, size=9)
    permutation = torch.randperm(9)
    with torch.no_grad():
        original = amortized.variational_parameters(context)
        permuted = amortized.variational_parameters(context[:, permutation])
    for name, value in original.items():
        # float64; a permutation only reorders sums inside attention.
        torch.testing.assert_close(permuted[name], value, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("weights_prior", PRIORS)
def test_predictive_density_integrates_to_one(weights_prior):
    amortized = _guide(weights_prior)
    context = _context(batch=1, size=4) / 4.0
    pyro.set_rng_seed(1)
    draws = amortized.sample_posterior(context, num_samples=6)
    locs, scales = draws["locs"][:, 0], draws["scales"][:, 0]

    # A uniform grid covers every component by 9 of its standard deviations, with a spacing of
    # half the smallest one. The midpoint rule is then exact to far below 1e-6 for Gaussians.
    low = (locs - 9 * scales[..., None]).min().item()
    high = (locs + 9 * scales[..., None]).max().item()
    spacing = 0.5 * scales.min().item()
    axis = torch.arange(low, high, spacing, dtype=torch.float64) + 0.5 * spacing
    grid = torch.cartesian_prod(axis, axis)
    total = 0.0
    for chunk in grid.split(200_000):
        log_density = amortized.predictive_log_prob(context, chunk[None], draws=draws)
        total += log_density.exp().sum().item() * spacing**2

    # The S-draw predictive is a finite Gaussian mixture, so its integral is exactly one.
    assert total == pytest.approx(1.0, abs=1e-4)


def test_predictive_log_prob_matches_scipy_mixture():
    amortized = _guide()
    context = _context(batch=2, size=3)
    queries = 3 * torch.randn(2, 5, 2, dtype=torch.float64)
    pyro.set_rng_seed(0)
    draws = amortized.sample_posterior(context, num_samples=4)

    ours = amortized.predictive_log_prob(context, queries, draws=draws)

    for b in range(2):
        terms = [
            np.log(draws["weights"][s, b, k].item())
            + stats.multivariate_normal(
                draws["locs"][s, b, k].numpy(), draws["scales"][s, b, k].item() ** 2 * np.eye(2)
            ).logpdf(queries[b].numpy())
            for s in range(4)
            for k in range(3)
        ]
        expected = logsumexp(np.stack(terms), axis=0) - math.log(4)
        # float64 GEMM distances against SciPy's direct evaluation.
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(amortized.energy(context, queries, draws=draws), -ours)


def test_fit_resume_matches_uninterrupted(tmp_path):
    family = GaussianMixtureFamily()
    options = {"batch_size": 4, "max_points": 5, "progress": False, "checkpoint_every": 2}

    straight = _guide(dtype=torch.float32)
    fit_amortized_guide(straight, family, steps=6, **options)

    path = tmp_path / "amortized.pt"
    first = _guide(dtype=torch.float32)
    fit_amortized_guide(first, family, steps=3, checkpoint=path, **options)
    pyro.set_rng_seed(99)
    resumed = _guide(dtype=torch.float32, seed=5)
    fit_amortized_guide(resumed, family, steps=6, checkpoint=path, resume=True, **options)

    for name, value in straight.encoder.state_dict().items():
        # Same arithmetic in the same order on the CPU: the runs agree exactly.
        assert torch.equal(resumed.encoder.state_dict()[name], value), name
    assert resumed.history == straight.history
    loaded = load_amortized_guide(path)
    for name, value in straight.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[name], value), name


def test_fit_ignores_stale_store_parameters():
    family = GaussianMixtureFamily()
    options = {"steps": 2, "batch_size": 4, "max_points": 5, "progress": False}
    fit_amortized_guide(_guide(dtype=torch.float32), family, **options)
    second = _guide(dtype=torch.float32, seed=1)
    before = {k: v.clone() for k, v in second.encoder.state_dict().items()}
    fit_amortized_guide(second, family, **options)
    assert any(not torch.equal(before[k], v) for k, v in second.encoder.state_dict().items())


class _PoisonedFamily(GaussianMixtureFamily):
    def __init__(self, bad_step):
        super().__init__()
        self.bad_step, self.calls = bad_step, 0

    def sample_points(self, num_datasets, num_points, generator=None):
        points = super().sample_points(num_datasets, num_points, generator)
        self.calls += 1
        return points * 1e30 if self.calls == self.bad_step + 1 else points


def test_fit_stops_on_nan_and_keeps_parameters():
    options = {"batch_size": 4, "max_points": 5, "progress": False}
    amortized = _guide(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="stopped at step 2"):
        fit_amortized_guide(amortized, _PoisonedFamily(bad_step=2), steps=5, **options)
    reference = _guide(dtype=torch.float32)
    fit_amortized_guide(reference, GaussianMixtureFamily(), steps=2, **options)
    for name, value in reference.encoder.state_dict().items():
        # The stopped run keeps exactly the parameters after its first two steps.
        assert torch.equal(amortized.encoder.state_dict()[name], value), name


def test_state_round_trip():
    amortized = _guide("stick_breaking")
    rebuilt = AmortizedMixtureGuide.from_state(amortized.state())
    context = _context()
    for name, value in amortized.variational_parameters(context).items():
        assert torch.equal(rebuilt.variational_parameters(context)[name], value)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="weights_prior must be one of"):
        AmortizedMixtureGuide(weights_prior="pitman")
    with pytest.raises(ValueError, match="num_components must be >= 2 for stick breaking"):
        AmortizedMixtureGuide(num_components=1, weights_prior="stick_breaking")
    amortized = _guide()
    with pytest.raises(ValueError, match=r"context must have shape \(B, n, 2\) with n >= 1"):
        amortized.variational_parameters(torch.zeros(1, 0, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        amortized.variational_parameters(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="queries must have shape"):
        amortized.predictive_log_prob(_context(), torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="family has dimension 2"):
        fit_amortized_guide(
            AmortizedMixtureGuide(dim=3, width=8, heads=2, depth=1), GaussianMixtureFamily()
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "cannot be read"), (b"garbage\n", "cannot be read"), (None, "lacks 'config'")],
)
def test_load_rejects_unreadable_guide_file(tmp_path, content, message):
    path = tmp_path / "amortized.pt"
    if content is None:
        torch.save({"model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_amortized_guide(path)
