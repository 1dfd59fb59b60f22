import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from pyro_am.models.am_clustering import AMClustering, clustering_dynamics


def _blobs(device, num_per_cluster=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor(
        [[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 3.0, 3.0]], dtype=torch.float64
    )
    labels = torch.arange(3).repeat_interleave(num_per_cluster)
    noise = 0.5 * torch.randn(len(labels), 3, generator=generator, dtype=torch.float64)
    return (centres[labels] + noise).to(device), labels


def test_dynamics_step_matches_mixture_fixed_point(device):
    data, _ = _blobs(device, num_per_cluster=3)
    model = AMClustering(3, beta=0.7)
    model.memories_ = data[[0, 3, 6]].clone()
    # With eta = 1/2 one step is the fixed-point map of the uniform mixture with variance
    # 1 / (2 beta), which GaussianMixtureEnergy computes independently.
    stepped = clustering_dynamics(data, model.memories_, 0.7, steps=1, step_size=0.5)
    torch.testing.assert_close(stepped, model.energy().fixed_point(data))


def test_dynamics_gradient_matches_autograd(device):
    data, _ = _blobs(device, num_per_cluster=2)
    memories = data[[0, 2, 4]].clone()
    beta = 0.3
    x = data.clone().requires_grad_(True)
    energy = -torch.logsumexp(-beta * torch.cdist(x, memories).square(), dim=-1) / beta
    (gradient,) = torch.autograd.grad(energy.sum(), x)
    stepped = clustering_dynamics(data, memories, beta, steps=1, step_size=0.1)
    torch.testing.assert_close(stepped, data - 0.1 * gradient)


def test_dynamics_keep_observed_coordinates(device):
    data, _ = _blobs(device, num_per_cluster=2)
    observed = torch.zeros_like(data, dtype=torch.bool)
    observed[:, 0] = True
    final = clustering_dynamics(
        data, data[[0, 2, 4]], 1.0, steps=3, step_size=0.5, observed=observed
    )
    assert torch.equal(final[:, 0], data[:, 0])


def test_fit_finds_separated_clusters(device):
    data, labels = _blobs(device)
    model = AMClustering(3, beta=1.0, steps=3, mask_fraction=0.34, max_epochs=60, seed=1)
    predicted = model.fit_predict(data)
    assert adjusted_rand_score(labels.numpy(), predicted.cpu().numpy()) > 0.95
    # Adam on the reconstruction loss: the final loss is below the first epoch's.
    assert model.loss_history_[-1] < model.loss_history_[0]


def test_fit_numpy_returns_numpy():
    data, _ = _blobs("cpu", num_per_cluster=10)
    labels = AMClustering(3, max_epochs=5).fit_predict(data.numpy())
    assert isinstance(labels, np.ndarray)
    assert labels.shape == (30,)


def test_nan_loss_keeps_last_memories():
    data, _ = _blobs("cpu", num_per_cluster=10)
    # Adam moves each memory by about lr per step, so lr = 1e308 sends them to infinity.
    model = AMClustering(3, max_epochs=3, learning_rate=1e308)
    with pytest.raises(RuntimeError, match="epoch 0"):
        model.fit(data)
    assert bool(torch.isfinite(model.memories_).all())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_memories": 0}, "num_memories"),
        ({"beta": 0.0}, "beta"),
        ({"steps": 0}, "steps"),
        ({"mask_fraction": 0.0}, "mask_fraction"),
        ({"mask_fraction": 1.0}, "mask_fraction"),
        ({"step_size": 0.6}, "step_size"),
        ({"init_restarts": 0}, "init_restarts"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AMClustering(**{"num_memories": 3, **kwargs})


def test_fit_rejects_bad_data():
    data, _ = _blobs("cpu", num_per_cluster=1)
    with pytest.raises(ValueError, match="num_memories"):
        AMClustering(4).fit(data)
    bad = data.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="X contains 1 NaN"):
        AMClustering(2).fit(bad)
    fitted = AMClustering(2, max_epochs=2).fit(data)
    with pytest.raises(ValueError, match="shape"):
        fitted.predict(data[:, :2])
