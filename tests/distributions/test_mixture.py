"""GaussianMixture against Pyro's MixtureSameFamily(Categorical, Independent(Normal))."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_am.distributions import GaussianMixture

NUM_COMPONENTS, DIM = 5, 3
SCALE_SHAPES = [(), (NUM_COMPONENTS,), (NUM_COMPONENTS, DIM)]


def _parameters(device, scale_shape, requires_grad=False):
    options = {"dtype": torch.float64, "device": device}
    locs = 2.0 * torch.randn(NUM_COMPONENTS, DIM, **options)
    scales = 0.5 + torch.rand(scale_shape, **options)
    logits = torch.randn(NUM_COMPONENTS, **options)
    return [tensor.requires_grad_(requires_grad) for tensor in (locs, scales, logits)]


def _reference(locs, scales, logits):
    """Pyro's own mixture, with the scales broadcast to (K, D) as Normal needs."""
    if scales.dim() == 1:
        scales = scales.unsqueeze(-1)
    component = dist.Independent(dist.Normal(locs, scales.expand_as(locs)), 1)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), component)


@pytest.mark.parametrize("scale_shape", SCALE_SHAPES)
def test_log_prob_matches_mixture_same_family(device, scale_shape):
    locs, scales, logits = _parameters(device, scale_shape)
    x = 3.0 * torch.randn(4, 6, DIM, dtype=torch.float64, device=device)

    actual = GaussianMixture(locs, scales, logits=logits).log_prob(x)
    expected = _reference(locs, scales, logits).log_prob(x)

    assert actual.shape == (4, 6)
    # float64, K = 5: the GEMM form loses about eps * |x|^2 / s^2 ~ 1e-14, far under 1e-10.
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale_shape", SCALE_SHAPES)
def test_weights_match_logits(device, scale_shape):
    locs, scales, logits = _parameters(device, scale_shape)
    x = torch.randn(10, DIM, dtype=torch.float64, device=device)
    weights = torch.softmax(logits, dim=-1)

    from_weights = GaussianMixture(locs, scales, weights=weights).log_prob(x)
    from_logits = GaussianMixture(locs, scales, logits=logits).log_prob(x)

    # Only log(softmax(logits)) differs from log(weights), by a few ulps in float64.
    torch.testing.assert_close(from_weights, from_logits, rtol=1e-12, atol=1e-12)


def test_uniform_weights_by_default(device):
    locs, scales, _ = _parameters(device, ())
    x = torch.randn(10, DIM, dtype=torch.float64, device=device)
    uniform = torch.zeros(NUM_COMPONENTS, dtype=torch.float64, device=device)

    actual = GaussianMixture(locs, scales).log_prob(x)
    expected = _reference(locs, scales, uniform).log_prob(x)

    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale_shape", SCALE_SHAPES)
def test_gradients_match_mixture_same_family(device, scale_shape):
    parameters = _parameters(device, scale_shape, requires_grad=True)
    x = 2.0 * torch.randn(20, DIM, dtype=torch.float64, device=device)

    actual = torch.autograd.grad(GaussianMixture(*parameters).log_prob(x).sum(), parameters)
    expected = torch.autograd.grad(_reference(*parameters).log_prob(x).sum(), parameters)

    for name, got, want in zip(["locs", "scales", "logits"], actual, expected, strict=True):
        # float64 sums of 20 terms of size O(1): 1e-10 leaves four orders of margin.
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"gradient wrt {name}")


@pytest.mark.parametrize("scale_shape", SCALE_SHAPES)
def test_responsibilities_are_posterior(device, scale_shape):
    locs, scales, logits = _parameters(device, scale_shape)
    x = 2.0 * torch.randn(7, 2, DIM, dtype=torch.float64, device=device)
    reference = _reference(locs, scales, logits)

    # Bayes' rule on the reference: log pi_k + log N(x; mu_k, s_k^2) - log p(x).
    joint = reference.mixture_distribution.logits + reference.component_distribution.log_prob(
        x.unsqueeze(-2)
    )
    expected = torch.softmax(joint, dim=-1)
    actual = GaussianMixture(locs, scales, logits=logits).responsibilities(x)

    assert actual.shape == (7, 2, NUM_COMPONENTS)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale_shape", SCALE_SHAPES)
def test_mean_and_variance_match_reference(device, scale_shape):
    locs, scales, logits = _parameters(device, scale_shape)
    mixture = GaussianMixture(locs, scales, logits=logits)
    reference = _reference(locs, scales, logits)

    torch.testing.assert_close(mixture.mean, reference.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixture.variance, reference.variance, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale_shape", SCALE_SHAPES)
def test_sample_moments(device, scale_shape):
    locs, scales, logits = _parameters(device, scale_shape)
    mixture = GaussianMixture(locs, scales, logits=logits)
    num_samples = 200_000

    samples = mixture.sample((num_samples,))

    assert samples.shape == (num_samples, DIM)
    # Five standard errors of the sample mean and of the sample variance. The variance's standard
    # error is sqrt((m4 - var^2) / n), with the fourth central moment m4 estimated from the samples.
    mean_error = 5 * (mixture.variance / num_samples).sqrt()
    centred = samples - mixture.mean
    fourth_moment = centred.pow(4).mean(0)
    variance_error = 5 * ((fourth_moment - mixture.variance.square()) / num_samples).sqrt()
    assert ((samples.mean(0) - mixture.mean).abs() < mean_error).all()
    assert ((samples.var(0) - mixture.variance).abs() < variance_error).all()


def test_expand_shares_parameters(device):
    locs, scales, logits = _parameters(device, (NUM_COMPONENTS,))
    mixture = GaussianMixture(locs, scales, logits=logits)

    expanded = mixture.expand((4, 2))
    x = torch.randn(4, 2, DIM, dtype=torch.float64, device=device)

    assert mixture.batch_shape == ()
    assert mixture.event_shape == (DIM,)
    assert expanded.batch_shape == (4, 2)
    assert expanded.event_shape == (DIM,)
    assert expanded.sample().shape == (4, 2, DIM)
    assert expanded.mean.shape == (4, 2, DIM)
    assert expanded.log_prob(x[0, 0]).shape == (4, 2)
    torch.testing.assert_close(expanded.log_prob(x), mixture.log_prob(x), rtol=0, atol=0)
    assert expanded.locs is mixture.locs


def test_infer_shapes():
    batch_shape, event_shape = GaussianMixture.infer_shapes((NUM_COMPONENTS, DIM), ())
    assert batch_shape == ()
    assert event_shape == (DIM,)


def test_follows_float32(device):
    locs, scales, logits = (tensor.float() for tensor in _parameters(device, ()))
    mixture = GaussianMixture(locs, scales, logits=logits)
    x = torch.randn(3, DIM, device=device)

    assert mixture.log_prob(x).dtype == torch.float32
    assert mixture.sample().dtype == torch.float32
    assert mixture.log_prob(x).device == locs.device


def test_invalid_arguments(device):
    locs, scales, logits = _parameters(device, ())
    with pytest.raises(ValueError, match="locs must have shape"):
        GaussianMixture(locs[0], scales)
    with pytest.raises(ValueError, match="scales"):
        GaussianMixture(locs, -scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        GaussianMixture(locs, torch.ones(NUM_COMPONENTS + 1, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="either weights or logits"):
        GaussianMixture(locs, scales, logits=logits, weights=logits.softmax(-1))
    with pytest.raises(ValueError, match="weights must sum to one"):
        GaussianMixture(locs, scales, weights=torch.full_like(logits, 0.5))
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture(torch.full_like(locs, float("nan")), scales)


def test_validate_args_checks_values(device):
    locs, scales, logits = _parameters(device, ())
    mixture = GaussianMixture(locs, scales, logits=logits, validate_args=True)
    with pytest.raises(ValueError, match="event_shape"):
        mixture.log_prob(torch.zeros(4, DIM + 1, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="support"):
        mixture.log_prob(torch.full((DIM,), float("nan"), dtype=torch.float64, device=device))

    unchecked = GaussianMixture(locs, scales, logits=logits, validate_args=False)
    assert unchecked.expand((3,))._validate_args is False


def test_svi_with_subsampled_plate(device):
    """Maximum likelihood of the component means under minibatch SVI moves them to the clusters."""
    true_locs = torch.tensor([[-4.0, 0.0], [4.0, 0.0]], dtype=torch.float64, device=device)
    components = torch.arange(400, device=device) % 2
    data = true_locs[components] + 0.5 * torch.randn(400, 2, dtype=torch.float64, device=device)

    def model(data):
        init = torch.tensor([[-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64, device=device)
        locs = pyro.param("locs", init)
        with pyro.plate("data", len(data), subsample_size=100) as index:
            pyro.sample("obs", GaussianMixture(locs, torch.tensor(0.5).to(locs)), obs=data[index])

    def guide(data):
        pass

    svi = SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(300)]

    learned = pyro.param("locs").detach()
    order = learned[:, 0].argsort()
    # Each cluster mean is estimated from 200 points of scale 0.5 (standard error 0.035), and Adam
    # at lr 0.1 with minibatches of 100 jitters by about as much, so 0.3 covers both.
    torch.testing.assert_close(learned[order], true_locs, rtol=0, atol=0.3)
    assert losses[-1] < losses[0]
