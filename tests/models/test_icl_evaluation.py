"""Tests of the in-context evaluation: energy distance, batched sampling, landscapes, metrics."""

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.mixture import GaussianMixture

from pyro_am.families import GaussianMixtureFamily, ShapesFamily
from pyro_am.models import AmortizedMixtureGuide, InContextEnergy
from pyro_am.models.amortized_training import fit_amortized_guide
from pyro_am.models.icl_evaluation import (
    energy_distance,
    evaluate_in_context,
    fitted_gmm_nll,
    landscape,
    plot_landscapes,
    plot_metrics,
    sample_in_context,
)
from pyro_am.models.icl_training import CDConfig, train_in_context_energy


def _model(mode="causal"):
    torch.manual_seed(0)
    return InContextEnergy(dim=2, width=16, depth=1, heads=2, mode=mode).double().eval()


def test_energy_distance_matches_scipy_in_one_dimension():
    generator = np.random.default_rng(0)
    x, y = generator.normal(size=40), generator.normal(1.0, 2.0, size=30)
    ours = energy_distance(torch.tensor(x)[:, None], torch.tensor(y)[:, None])
    # SciPy returns the square root of the same V-statistic; float64 sums.
    assert ours.item() == pytest.approx(stats.energy_distance(x, y) ** 2, rel=1e-10)


def test_energy_distance_batches_and_zero_for_same_sample():
    x = torch.randn(3, 20, 2, dtype=torch.float64)
    y = torch.randn(3, 25, 2, dtype=torch.float64) + 1.0
    batched = energy_distance(x, y)
    assert batched.shape == (3,)
    for b in range(3):
        assert batched[b].item() == pytest.approx(energy_distance(x[b], y[b]).item(), rel=1e-12)
    assert energy_distance(x, x).abs().max().item() < 1e-12
    assert (batched > 0).all()


@pytest.mark.parametrize("mode", ["causal", "set"])
def test_batched_sampling_matches_one_size_at_a_time(mode):
    model = _model(mode)
    context = torch.randn(2, 6, 2, dtype=torch.float64)
    sizes = [1, 3, 6]
    # Zero noise makes the chains deterministic given their starts, so the batched causal run can
    # be compared with separate runs per size from the same starts.
    config = CDConfig(
        langevin_steps=4, step_size=0.3, noise_std=0.0, init="gaussian", init_scale=6.0
    )
    generator = torch.Generator().manual_seed(0)

    samples = sample_in_context(model, context, sizes, 5, config, generator)

    generator = torch.Generator().manual_seed(0)
    starts = 6.0 * torch.randn(2, 3, 5, 2, generator=generator, dtype=torch.float64)
    assert samples.shape == (2, 3, 5, 2)
    for index, n in enumerate(sizes):
        expected = model.langevin(
            context[:, :n], starts[:, index], steps=4, step_size=0.3, temperature=0.0
        )
        # float64; the masked batched pass and the per-size pass differ only in rounding.
        torch.testing.assert_close(samples[:, index], expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["causal", "set"])
def test_landscape_matches_direct_evaluation(mode):
    model = _model(mode)
    context = torch.randn(5, 2, dtype=torch.float64)
    xs, ys, energies = landscape(model, context, [1, 5], (-3.0, 3.0), resolution=7)
    assert energies.shape == (2, 7, 7)
    with torch.no_grad():
        for index, n in enumerate([1, 5]):
            point = torch.tensor([[[xs[2], ys[4]]]], dtype=torch.float64)
            direct = model(context[None, :n], point)
            value = direct[0, -1, 0] if mode == "causal" else direct[0, 0]
            # Rows are indexed by y and columns by x; float64 rounding only.
            assert energies[index, 4, 2] == pytest.approx(value.item(), rel=1e-10, abs=1e-10)
    figure = plot_landscapes(xs, ys, energies, context.numpy(), [1, 5])
    assert len(figure.axes) == 2


def test_fitted_gmm_nll_matches_sklearn():
    generator = np.random.default_rng(0)
    context = generator.normal(size=(12, 2))
    test = generator.normal(size=(30, 2))
    assert fitted_gmm_nll(context[:2], test, 3, 1e-3, 0) is None
    reference = GaussianMixture(3, covariance_type="spherical", reg_covar=1e-3, random_state=0)
    expected = -reference.fit(context).score(test)
    assert fitted_gmm_nll(context, test, 3, 1e-3, 0) == pytest.approx(expected, rel=1e-12)


def test_evaluation_reports_every_size():
    model = _model().float()
    torch.manual_seed(0)
    amortized = AmortizedMixtureGuide(width=16, heads=2, depth=1)
    config = CDConfig(langevin_steps=2)
    result = evaluate_in_context(
        model,
        GaussianMixtureFamily(),
        config,
        amortized,
        max_points=4,
        num_datasets=3,
        num_samples=8,
        num_test=10,
    )
    assert result["sizes"] == [1, 2, 3, 4]
    for name in ("energy_distance", "energy_distance_sem", "gmm_nll", "amortized_nll"):
        assert len(result[name]) == 4
    assert result["gmm_nll"][:2] == [None, None]
    assert all(value is not None for value in result["gmm_nll"][2:])
    assert result["settings"]["langevin_steps"] == 2
    again = evaluate_in_context(
        model,
        GaussianMixtureFamily(),
        config,
        amortized,
        max_points=4,
        num_datasets=3,
        num_samples=8,
        num_test=10,
    )
    assert again == result
    assert len(plot_metrics(result).axes) == 2
    with pytest.raises(TypeError, match="GaussianMixtureFamily"):
        evaluate_in_context(model, ShapesFamily(), config)


def test_small_scale_improves_with_context_size():
    # Pretrain a small causal energy and an amortized guide with fixed seeds (about 40 s on 2
    # idle CPU cores, the longest test of the default run), then score held-out mixtures at
    # n = 1 and at n = 11, the largest trained size.
    family = GaussianMixtureFamily()
    torch.manual_seed(0)
    model = InContextEnergy(dim=2, width=32, depth=2, heads=4)
    config = CDConfig(
        steps=300,
        batch_size=16,
        num_points=12,
        step_size=1.0,
        noise_std=0.01,
        init="gaussian",
        init_scale=6.0,
        learning_rate=1e-3,
        progress=False,
    )
    train_in_context_energy(model, family, config)
    torch.manual_seed(0)
    amortized = AmortizedMixtureGuide(width=32, heads=4, depth=1)
    fit_amortized_guide(amortized, family, steps=600, batch_size=16, max_points=12, progress=False)

    result = evaluate_in_context(model, family, config, amortized, max_points=11, num_datasets=16)

    distance, sem = result["energy_distance"], result["energy_distance_sem"]
    # (b): the samples move towards the true mixture; the gap exceeds 3 standard errors of the
    # mean over 16 held-out data sets.
    assert distance[-1] < distance[0] - 3 * np.hypot(sem[0], sem[-1])
    # (c): the amortized predictive's held-out NLL per point (200 test points per data set) falls
    # by more than 0.5 nats from n = 1 to n = 11.
    assert result["amortized_nll"][-1] < result["amortized_nll"][0] - 0.5
    # Both stay above what the true mixture achieves, which no estimate should beat on average.
    assert result["amortized_nll"][-1] > result["true_nll"]
