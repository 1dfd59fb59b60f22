"""Tests of DPMemory against closed forms, Monte Carlo, Pyro's enumeration and scikit-learn."""

import math
import os
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoNormal
from scipy import stats
from scipy.special import logsumexp
from sklearn.datasets import load_iris, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture
from sklearn.preprocessing import StandardScaler

from pyro_am.distributions import BetaStickBreaking, StickBreakingWeights
from pyro_am.energies import GaussianMixtureEnergy
from pyro_am.models import CRPEnergy, DPFitResult, DPMemory
from pyro_am.models import _dp_cavi as cavi

VARIANTS = [
    {"covariance": "isotropic"},
    {"covariance": "diagonal"},
    {"covariance": "isotropic", "per_memory_scale": True},
    {"covariance": "diagonal", "per_memory_scale": True},
    {"covariance": "isotropic", "discount": 0.3},
    {"covariance": "isotropic", "scale": 1.0},
]


def _blobs(centres, per_blob, seed=0, spread=1.0, device="cpu"):
    generator = np.random.default_rng(seed)
    centres = np.asarray(centres, dtype=float)
    points = [c + spread * generator.normal(size=(per_blob, centres.shape[1])) for c in centres]
    labels = np.repeat(np.arange(len(centres)), per_blob)
    return torch.as_tensor(np.concatenate(points), device=device), labels


def _three_blobs(device="cpu", per_blob=60):
    return _blobs([[0, 0], [6, 0], [0, 6]], per_blob, device=device)


def _structural_iterations(result):
    return {event["iteration"] for event in result.events}


def test_four_blobs_leave_four_memories(device):
    # 500 points per blob: the empty memories' expected weights fall to about alpha / N = 5e-4,
    # below the default prune threshold of 1e-3.
    centres = [[0, 0], [8, 0], [0, 8], [8, 8]]
    data, _ = _blobs(centres, 500, device=device)
    memory = DPMemory(2, truncation=20, prior_scale=10.0)
    result = memory.fit(data, progress=False, seed=0)

    assert isinstance(result, DPFitResult)
    assert memory.num_memories == 4
    assert result.converged
    order = torch.argsort(memory.memories[:, 0] * 100 + memory.memories[:, 1])
    expected = torch.tensor([[0, 0], [0, 8], [8, 0], [8, 8]], dtype=torch.float64, device=device)
    # Each mean averages 500 unit-variance points: standard error 0.045, tolerance 4.5 of them.
    assert torch.allclose(memory.memories[order], expected, atol=0.2)
    assert torch.allclose(memory.weights, torch.full_like(memory.weights, 0.25), atol=0.01)
    assert abs(float(memory.scale) - 1.0) < 0.05
    assert result.num_pruned + result.num_merged >= 16


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_cavi_elbo_never_decreases(options, device):
    data, _ = _three_blobs(device)
    memory = DPMemory(2, truncation=8, prior_scale=5.0, **options)
    result = memory.fit(data, progress=False, seed=1, max_iter=80, tol=0.0)
    structural = _structural_iterations(result)
    elbo = result.elbo
    checked = 0
    for iteration in range(2, len(elbo) + 1):
        if iteration in structural:
            continue
        change = elbo[iteration - 1] - elbo[iteration - 2]
        # Each block update is an exact maximizer, so in float64 only rounding (about 1e-13
        # relative for a sum of 180 terms) can make the ELBO fall.
        assert change >= -1e-8 * abs(elbo[iteration - 2]), (iteration, change)
        checked += 1
    assert checked >= 20


def test_cavi_elbo_matches_monte_carlo(device):
    # The closed-form mean-field ELBO against a Monte Carlo average of
    # log p(x, z, v, mu) - log q(z, v, mu) with q(z) the optimal responsibilities.
    data, _ = _three_blobs(device, per_blob=30)
    memory = DPMemory(2, truncation=4, prior_scale=5.0, per_memory_scale=True)
    memory.fit(data, progress=False, seed=0, max_iter=5)
    posterior = memory._posterior()
    prior = memory._prior(data)
    step = cavi.local_step(data, data.square(), posterior)
    closed_form = memory.cavi_elbo(data)

    num_samples = 4000
    sticks = BetaStickBreaking(posterior.stick_concentration1, posterior.stick_concentration0)
    weights = sticks.sample((num_samples,))
    locs = dist.Normal(posterior.memory_loc, posterior.memory_scale).sample((num_samples,))
    variance = posterior.variance.expand_as(posterior.memory_loc)
    responsibilities = step.responsibilities
    log_lik = dist.Normal(locs.unsqueeze(1), variance.sqrt()).log_prob(data[:, None, :]).sum(-1)
    log_joint = (responsibilities * (weights.log().unsqueeze(1) + log_lik)).sum((-1, -2))
    entropy_z = -(responsibilities * responsibilities.log()).sum()
    prior_weights = StickBreakingWeights(torch.tensor(1.0, dtype=data.dtype), memory.truncation)
    log_ratio_w = prior_weights.log_prob(weights) - sticks.log_prob(weights)
    prior_locs = dist.Normal(prior.prior_mean, prior.prior_variance.sqrt())
    guide_locs = dist.Normal(posterior.memory_loc, posterior.memory_scale)
    log_ratio_mu = (prior_locs.log_prob(locs) - guide_locs.log_prob(locs)).sum((-1, -2))
    samples = log_joint + entropy_z + log_ratio_w + log_ratio_mu
    samples = samples + prior.variance_log_prior(posterior.variance)
    standard_error = float(samples.std()) / math.sqrt(num_samples)
    # Five standard errors of the Monte Carlo mean.
    assert abs(float(samples.mean()) - closed_form) < 5 * standard_error


def _standardized(loader):
    bunch = loader()
    return StandardScaler().fit_transform(bunch.data), bunch.target


@pytest.mark.parametrize("loader", [load_iris, load_wine], ids=["iris", "wine"])
@pytest.mark.parametrize(
    "covariance,sklearn_covariance", [("isotropic", "spherical"), ("diagonal", "diag")]
)
def test_ari_matches_sklearn(loader, covariance, sklearn_covariance):
    # Both fit a truncated DP mixture with truncation 10, concentration 1 and 200 iterations
    # from a k-means initialization, with one noise scale per memory (scikit-learn has no
    # shared-scale option). scikit-learn's own default concentration is 1 / truncation, so it is
    # set to 1 here. The medians over five seeds are compared, with 0.05 of slack.
    data, labels = _standardized(loader)
    ours, theirs = [], []
    for seed in range(5):
        memory = DPMemory(
            data.shape[1], truncation=10, covariance=covariance, per_memory_scale=True
        )
        memory.fit(data, progress=False, seed=seed)
        predicted = memory.assign(torch.as_tensor(data)).argmax(-1).numpy()
        ours.append(adjusted_rand_score(labels, predicted))
        reference = BayesianGaussianMixture(
            n_components=10,
            weight_concentration_prior_type="dirichlet_process",
            weight_concentration_prior=1.0,
            covariance_type=sklearn_covariance,
            max_iter=200,
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reference.fit(data)
        theirs.append(adjusted_rand_score(labels, reference.predict(data)))
    assert np.median(ours) >= np.median(theirs) - 0.05, (ours, theirs)


def test_cavi_and_svi_elbos_agree(device):
    data, _ = _three_blobs(device)
    estimator = Trace_ELBO(num_particles=100)

    cavi_memory = DPMemory(2, truncation=4, prior_scale=5.0)
    cavi_memory.fit(data, progress=False, seed=0)
    pyro.set_rng_seed(1)
    cavi_elbo = -estimator.loss(cavi_memory.model, cavi_memory.guide, data)

    svi_memory = DPMemory(2, truncation=4, prior_scale=5.0)
    result = svi_memory.fit(data, method="svi", max_iter=400, lr=0.02, progress=False, seed=0)
    pyro.set_rng_seed(1)
    svi_elbo = -estimator.loss(svi_memory.model, svi_memory.guide, data)

    assert result.method == "svi"
    assert len(result.elbo) == result.iterations
    # The estimate with 100 particles has a standard error well under 0.1% of the ELBO here.
    assert abs(svi_elbo - cavi_elbo) <= 0.01 * abs(cavi_elbo)
    # The marginalized ELBO is at least the mean-field one at the same q(v, mu) (Jensen).
    assert cavi_elbo >= cavi_memory.cavi_elbo(data) - 0.01 * abs(cavi_elbo)


@pytest.mark.parametrize(
    "options", VARIANTS[:4], ids=lambda o: "-".join(f"{v}" for v in o.values())
)
def test_marginalized_and_enumerated_elbos_agree(options, device):
    # With the same guide draws, TraceEnum_ELBO's exact sum over z equals the GEMM mixture's
    # log-sum-exp, so the two estimates agree to float64 rounding.
    data, _ = _three_blobs(device, per_blob=20)
    marginalized = DPMemory(2, truncation=5, prior_scale=5.0, **options)
    marginalized.fit(data, progress=False, seed=0, max_iter=5)
    enumerated = DPMemory(2, truncation=5, prior_scale=5.0, assignment="enumerated", **options)
    enumerated.load_state(marginalized.state())

    pyro.set_rng_seed(3)
    expected = Trace_ELBO(num_particles=10).loss(marginalized.model, marginalized.guide, data)
    pyro.set_rng_seed(3)
    enum_elbo = TraceEnum_ELBO(num_particles=10, max_plate_nesting=1)
    actual = enum_elbo.loss(enumerated.model, enumerated.guide, data)
    assert actual == pytest.approx(expected, rel=1e-10)


def test_observation_likelihood_matches_mixture_same_family(device):
    data, _ = _three_blobs(device, per_blob=20)
    memory = DPMemory(2, truncation=5, prior_scale=5.0, covariance="diagonal")
    memory.fit(data, progress=False, seed=0, max_iter=5)
    guide_trace = pyro.poutine.trace(memory.guide).get_trace(data)
    model_trace = pyro.poutine.trace(
        pyro.poutine.replay(memory.model, trace=guide_trace)
    ).get_trace(data)
    weights = model_trace.nodes["weights"]["value"]
    locs = model_trace.nodes["locs"]["value"]
    scale = memory.scale.expand_as(locs)
    reference = dist.MixtureSameFamily(
        dist.Categorical(weights), dist.Independent(dist.Normal(locs, scale), 1)
    )
    observed = model_trace.nodes["obs"]["fn"].log_prob(data)
    assert torch.allclose(observed, reference.log_prob(data), rtol=1e-10, atol=1e-10)


def test_svi_with_minibatches_and_autonormal(device):
    data, _ = _three_blobs(device)
    memory = DPMemory(2, truncation=4, prior_scale=5.0)
    result = memory.fit(data, method="svi", max_iter=30, batch_size=32, progress=False, seed=0)
    assert all(math.isfinite(value) for value in result.elbo)

    memory.initialize(data, seed=0)
    guide = AutoNormal(memory.model)
    svi = SVI(memory.model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(data, subsample_size=64) for _ in range(20)]
    assert all(math.isfinite(loss) for loss in losses)
    names = set(pyro.get_param_store().keys())
    assert f"{memory._pyro_name}.noise_scale" in names
    assert any(name.startswith("AutoNormal.locs.locs") for name in names)


def test_predictive_samples_data(device):
    data, _ = _three_blobs(device, per_blob=10)
    memory = DPMemory(2, truncation=4, prior_scale=5.0)
    memory.fit(data, progress=False, seed=0, max_iter=5)
    samples = Predictive(memory.model, guide=memory.guide, num_samples=7)(None, num_data=11)
    assert samples["obs"].shape == (7, 11, 2)
    weights = samples["weights"].reshape(7, memory.truncation)
    assert torch.allclose(weights.sum(-1), torch.ones(7, dtype=data.dtype))


def test_instances_do_not_share_parameters(device):
    data, _ = _three_blobs(device, per_blob=20)
    first = DPMemory(2, truncation=4, prior_scale=5.0)
    second = DPMemory(2, truncation=4, prior_scale=5.0)
    first.initialize(data, seed=0)
    second.initialize(data, seed=1)
    before = second.variational_parameters()
    svi = SVI(first.model, first.guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(5):
        svi.step(data)
    svi_second = SVI(second.model, second.guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    svi_second.evaluate_loss(data)
    after = second.variational_parameters()
    assert first._pyro_name != second._pyro_name
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    names = list(pyro.get_param_store().keys())
    assert any(name.startswith(first._pyro_name + ".") for name in names)
    assert any(name.startswith(second._pyro_name + ".") for name in names)


def test_save_load_round_trip(tmp_path, device):
    data, _ = _three_blobs(device)
    memory = DPMemory(2, truncation=6, prior_scale=5.0, per_memory_scale=True, discount=0.2)
    memory.fit(data, progress=False, seed=0)
    path = tmp_path / "memory.pt"
    memory.save(path)
    loaded = DPMemory.load(path)

    assert os.listdir(tmp_path) == ["memory.pt"]
    assert loaded._pyro_name != memory._pyro_name
    assert loaded.num_memories == memory.num_memories
    assert loaded.discount == memory.discount
    for name, value in memory.variational_parameters().items():
        assert torch.equal(loaded.variational_parameters()[name], value), name
    assert torch.equal(loaded.log_predictive(data), memory.log_predictive(data))
    assert torch.equal(loaded.memory_counts, memory.memory_counts)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"truncation": 0}, "truncation"),
        ({"concentration": 0.0}, "concentration"),
        ({"concentration": -1.0}, "concentration"),
        ({"discount": 1.0}, "discount"),
        ({"discount": -0.1}, "discount"),
        ({"prior_scale": 0.0}, "prior_scale"),
        ({"scale": -1.0}, "scale"),
        ({"covariance": "full"}, "covariance"),
        ({"assignment": "sampled"}, "assignment"),
        ({"max_truncation": 2, "truncation": 5}, "max_truncation"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DPMemory(2, **kwargs)


def test_bad_data_raises():
    memory = DPMemory(2, truncation=3)
    data = torch.randn(10, 2, dtype=torch.float64)
    data[3, 1] = math.nan
    with pytest.raises(ValueError, match="data"):
        memory.fit(data, progress=False)
    with pytest.raises(ValueError, match=r"data must have shape \(num_data, 2\)"):
        memory.fit(torch.randn(10, 3), progress=False)
    with pytest.raises(ValueError, match="method"):
        memory.fit(torch.randn(10, 2), method="gibbs", progress=False)
    with pytest.raises(ValueError, match="batch"):
        memory.partial_fit(torch.randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 data"):
        memory.fit(torch.randn(1, 2), progress=False)


def test_dtype_follows_input():
    data, _ = _three_blobs(per_blob=10)
    memory = DPMemory(2, truncation=3, prior_scale=5.0)
    memory.fit(data.numpy(), progress=False, max_iter=3)
    assert memory.memories.dtype == torch.float64
    memory.fit(data.float(), progress=False, max_iter=3)
    assert memory.memories.dtype == torch.float32
    assert memory.log_predictive(data.float()).dtype == torch.float32


def test_resume_equals_uninterrupted(tmp_path, device):
    data, _ = _three_blobs(device)
    path = tmp_path / "fit.pt"
    options = {"progress": False, "tol": 0.0, "seed": 0}

    reference = DPMemory(2, truncation=8, prior_scale=5.0)
    expected = reference.fit(data, max_iter=20, **options)

    first = DPMemory(2, truncation=8, prior_scale=5.0)
    first.fit(data, max_iter=10, checkpoint=str(path), **options)
    resumed = DPMemory(2, truncation=8, prior_scale=5.0)
    result = resumed.fit(data, max_iter=20, checkpoint=str(path), resume=True, **options)

    assert result.iterations == 20
    assert result.elbo == pytest.approx(expected.elbo, rel=1e-12)
    assert result.events == expected.events
    for name, value in reference.variational_parameters().items():
        assert torch.allclose(resumed.variational_parameters()[name], value, rtol=1e-12), name


def test_svi_checkpoint_resumes(tmp_path, device):
    data, _ = _three_blobs(device, per_blob=20)
    path = str(tmp_path / "svi.pt")
    memory = DPMemory(2, truncation=4, prior_scale=5.0)
    memory.fit(data, method="svi", max_iter=10, checkpoint=path, progress=False, seed=0)
    resumed = DPMemory(2, truncation=4, prior_scale=5.0)
    result = resumed.fit(
        data, method="svi", max_iter=15, checkpoint=path, resume=True, progress=False
    )
    assert result.iterations == 15
    assert len(result.elbo) == 15
    with pytest.raises(ValueError, match="method"):
        DPMemory(2, truncation=4).fit(data, checkpoint=path, resume=True, progress=False)


def test_nan_elbo_stops_cavi_and_keeps_parameters(monkeypatch, device):
    data, _ = _three_blobs(device)
    reference = DPMemory(2, truncation=6, prior_scale=5.0)
    calls = {"count": 0}
    original = cavi.local_step

    def counting(*args, **kwargs):
        calls["count"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(cavi, "local_step", counting)
    reference.fit(data, max_iter=4, tol=0.0, progress=False, seed=0)
    good_calls = calls["count"]

    def failing(*args, **kwargs):
        calls["count"] += 1
        step = original(*args, **kwargs)
        if calls["count"] == good_calls + 1:
            step.log_normalizers[0] = math.nan
        return step

    calls["count"] = 0
    monkeypatch.setattr(cavi, "local_step", failing)
    memory = DPMemory(2, truncation=6, prior_scale=5.0)
    with pytest.raises(FloatingPointError, match="iteration 5"):
        memory.fit(data, max_iter=10, tol=0.0, progress=False, seed=0)
    for name, value in reference.variational_parameters().items():
        assert torch.equal(memory.variational_parameters()[name], value), name


def test_nan_loss_stops_svi_and_keeps_parameters(monkeypatch, device):
    from pyro_am.models import _dp_fit

    data, _ = _three_blobs(device, per_blob=20)
    reference = DPMemory(2, truncation=4, prior_scale=5.0)
    reference.fit(data, method="svi", max_iter=3, progress=False, seed=0)

    class FailingSVI(_dp_fit.SVI):
        steps = 0

        def step(self, *args, **kwargs):
            FailingSVI.steps += 1
            if FailingSVI.steps == 4:
                return math.nan
            return super().step(*args, **kwargs)

    monkeypatch.setattr(_dp_fit, "SVI", FailingSVI)
    memory = DPMemory(2, truncation=4, prior_scale=5.0)
    with pytest.raises(FloatingPointError, match="step 4"):
        memory.fit(data, method="svi", max_iter=10, progress=False, seed=0)
    for name, value in reference.variational_parameters().items():
        assert torch.allclose(memory.variational_parameters()[name], value), name


def test_truncation_grows_from_one(device):
    data, labels = _three_blobs(device, per_blob=100)
    memory = DPMemory(2, truncation=1, prior_scale=5.0)
    result = memory.fit(data, progress=False, seed=0)
    assert result.num_created >= 2
    assert memory.num_memories >= 3
    predicted = memory.assign(data).argmax(-1).cpu().numpy()
    assert adjusted_rand_score(labels, predicted) > 0.95
    created = [event for event in result.events if event["kind"] == "created"]
    assert all(set(event) == {"iteration", "kind", "memory", "weight"} for event in created)


def test_crp_energy_matches_brute_force(device):
    data, _ = _three_blobs(device)
    memory = DPMemory(2, truncation=5, prior_scale=5.0, discount=0.25, concentration=2.0)
    memory.fit(data, progress=False, seed=0)
    energy = memory.energy(new_memory=True)
    assert isinstance(energy, CRPEnergy)

    x = torch.tensor([[0.5, 0.2], [3.0, 3.0], [20.0, -4.0]], dtype=torch.float64, device=device)
    means = memory.memories.cpu().numpy()
    counts = memory.memory_counts.cpu().numpy()
    variance = float(memory.scale) ** 2
    num_memories = len(counts)
    terms = [
        np.log(counts[k] - 0.25)
        + stats.multivariate_normal(means[k], variance * np.eye(2)).logpdf(x.cpu().numpy())
        for k in range(num_memories)
    ]
    terms.append(
        np.log(2.0 + 0.25 * num_memories)
        + stats.multivariate_normal(np.zeros(2), (variance + 25.0) * np.eye(2)).logpdf(
            x.cpu().numpy()
        )
    )
    expected = -logsumexp(np.stack(terms), axis=0)
    np.testing.assert_allclose(energy.energy(x).cpu().numpy(), expected, rtol=1e-10)
    normalized = -expected - np.log(counts.sum() + 2.0)
    np.testing.assert_allclose(energy.log_prob(x).cpu().numpy(), normalized, rtol=1e-10)


def test_partial_fit_follows_crp_rule(device):
    # Blobs of spread 0.3 under a kernel scale of 1: every datum is far more likely under its
    # blob's memory than under the new-memory term, so exactly one memory opens per blob.
    data, labels = _blobs([[0, 0], [10, 0], [0, 10]], 30, spread=0.3, device=device)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    memory = DPMemory(2, scale=1.0, prior_scale=10.0)
    assigned = memory.partial_fit(data[order])

    assert memory.num_memories == 3
    assert adjusted_rand_score(labels[order.numpy()], assigned.cpu().numpy()) == 1.0
    assert torch.equal(memory.memory_counts.sort().values, torch.full((3,), 30.0).double())

    # A far datum: the brute-force CRP scores favour a new memory, which starts at
    # (s0^2 x + s^2 m0) / (s0^2 + s^2) and, with one datum, stays there.
    x = torch.tensor([[40.0, 40.0]], dtype=torch.float64, device=device)
    energy = memory.energy(new_memory=True)
    responsibilities = energy.responsibilities(x)
    assert int(responsibilities.argmax()) == memory.num_memories
    memory.partial_fit(x)
    assert memory.num_memories == 4
    expected = 100.0 * x[0] / (100.0 + 1.0)
    assert torch.allclose(memory.memories[-1], expected, rtol=1e-12)


def test_partial_fit_after_fit_joins_memories(device):
    data, _ = _three_blobs(device)
    memory = DPMemory(2, truncation=6, prior_scale=5.0)
    memory.fit(data, progress=False, seed=0)
    before = memory.num_memories
    counts = memory.memory_counts.sum()
    assigned = memory.partial_fit(data[:10])
    assert memory.num_memories == before
    assert float(memory.memory_counts.sum()) == pytest.approx(float(counts) + 10)
    assert torch.equal(assigned, memory.assign(data[:10]).argmax(-1))


def test_log_predictive_and_energy_match_scipy(device):
    data, _ = _three_blobs(device)
    memory = DPMemory(2, truncation=5, prior_scale=5.0, per_memory_scale=True)
    memory.fit(data, progress=False, seed=0)
    x = torch.tensor([[0.3, -0.1], [5.0, 5.0]], dtype=torch.float64, device=device)
    weights = memory.weights.cpu().numpy()
    means = memory.memories.cpu().numpy()
    parameters = memory.variational_parameters()
    noise = parameters["noise_scale"].cpu().numpy() ** 2
    memory_variance = parameters["memory_scale"].cpu().numpy() ** 2
    predictive = [
        np.log(weights[k])
        + stats.multivariate_normal(means[k], np.diag(noise[k] + memory_variance[k])).logpdf(x)
        for k in range(len(weights))
    ]
    expected = logsumexp(np.stack(predictive), axis=0)
    np.testing.assert_allclose(memory.log_predictive(x).cpu().numpy(), expected, rtol=1e-10)

    plug_in = [
        np.log(weights[k]) + stats.multivariate_normal(means[k], noise[k] * np.eye(2)).logpdf(x)
        for k in range(len(weights))
    ]
    energy = memory.energy()
    assert isinstance(energy, GaussianMixtureEnergy)
    expected_energy = -logsumexp(np.stack(plug_in), axis=0)
    np.testing.assert_allclose(energy.energy(x).cpu().numpy(), expected_energy, rtol=1e-10)
    assert memory.assign(x).shape == (2, memory.num_memories)
    assert torch.allclose(memory.assign(x).sum(-1), torch.ones(2, dtype=torch.float64))


def test_retrieve_denoises_to_memories(device):
    data, _ = _three_blobs(device)
    memory = DPMemory(2, truncation=6, prior_scale=5.0)
    memory.fit(data, progress=False, seed=0)
    queries = torch.tensor([[5.5, 0.4], [0.3, 6.4]], dtype=torch.float64, device=device)
    states = memory.retrieve(queries, max_steps=200).states
    nearest = torch.cdist(states, memory.memories).min(-1).values
    # The fixed point of a mixture energy lies near, not at, a memory because the other
    # components pull it; with the memories 6 noise scales apart the pull is below 1e-3.
    assert (nearest < 1e-2).all()
    mask = torch.tensor([True, False], device=device)
    completed = memory.retrieve(queries, mask=mask).states
    assert torch.equal(completed[:, 0], queries[:, 0])
