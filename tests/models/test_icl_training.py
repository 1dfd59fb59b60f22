"""Tests of contrastive-divergence pretraining: loss, sign, checkpoints, resume and the NaN stop."""

import math
import os

import pytest
import torch

from pyro_am.families import GaussianMixtureFamily
from pyro_am.models import InContextEnergy
from pyro_am.models.icl_training import (
    CDConfig,
    ReplayBuffer,
    contrastive_divergence_loss,
    load_checkpoint,
    train_in_context_energy,
)


def _small_model(mode="causal", seed=0):
    torch.manual_seed(seed)
    return InContextEnergy(dim=2, width=16, depth=1, heads=2, mode=mode)


def _config(**kwargs):
    options = {
        "steps": 6,
        "batch_size": 4,
        "num_points": 6,
        "num_negatives": 2,
        "langevin_steps": 3,
        "progress": False,
        "checkpoint_every": 2,
    }
    return CDConfig(**{**options, **kwargs})


def test_loss_matches_closed_form_and_gradient():
    positive = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    negative = torch.tensor([1.5, 0.25], dtype=torch.float64, requires_grad=True)
    weight = 0.3

    loss = contrastive_divergence_loss(positive, negative, weight)
    loss.backward()

    mean_positive, mean_negative = 1.5 / 3, 1.75 / 2
    penalty = (0.25 + 1.0 + 4.0) / 3 + (2.25 + 0.0625) / 2
    # Closed form in float64.
    assert loss.item() == pytest.approx(mean_positive - mean_negative + weight * penalty, rel=1e-12)
    # d/dE+ = 1/n + 2 lambda E+ / n pushes positive energies down; d/dE- = -1/m + 2 lambda E- / m
    # pushes negative energies up.
    torch.testing.assert_close(positive.grad, (1.0 + 2 * weight * positive.detach()) / 3)
    torch.testing.assert_close(negative.grad, (-1.0 + 2 * weight * negative.detach()) / 2)


@pytest.mark.parametrize("mode", ["causal", "set"])
def test_training_lowers_data_energy_below_negatives(mode):
    model = _small_model(mode)
    family = GaussianMixtureFamily()
    config = _config(
        steps=40,
        learning_rate=1e-2,
        step_size=1.0,
        init="gaussian",
        init_scale=6.0,
        regularization=0.01,
    )

    untrained = _small_model(mode)
    result = train_in_context_energy(model, family, config)

    # Held-out data sets: 8 context points, then 64 new points of the same mixture against 64
    # points of the chains' initial law N(0, 6^2 I).
    generator = torch.Generator().manual_seed(123)
    batch = family.sample(16, 8, generator)
    data = batch.sample(64, generator)
    noise = 6.0 * torch.randn(16, 64, 2, generator=generator)

    def gap(energy_model):
        with torch.no_grad():
            cache = energy_model.encode_context(batch.points)
            data_energy = energy_model.full_context_energy(cache, data)
            noise_energy = energy_model.full_context_energy(cache, noise)
        return (data_energy.mean() - noise_energy.mean()).item()

    # Minimizing mean E+ - mean E- gives data lower energy than the initial law. With the sign of
    # the loss flipped, the same 40 steps give gaps of +1.19 (causal) and +0.59 (set).
    assert gap(model) < -0.1
    assert gap(model) < gap(untrained) - 0.1
    assert result.steps == 40
    assert len(result.history["loss"]) == 40
    assert not model.training


@pytest.mark.parametrize("replay_fraction", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["causal", "set"])
def test_resume_matches_uninterrupted_run(tmp_path, mode, replay_fraction):
    family = GaussianMixtureFamily()
    config = _config(replay_fraction=replay_fraction, replay_capacity=20)

    straight = _small_model(mode)
    train_in_context_energy(straight, family, config)

    path = tmp_path / "run" / "model.pt"
    first = _small_model(mode)
    train_in_context_energy(
        first,
        family,
        _config(steps=4, replay_fraction=replay_fraction, replay_capacity=20),
        checkpoint=path,
    )
    resumed = _small_model(mode, seed=1)
    result = train_in_context_energy(resumed, family, config, checkpoint=path, resume=True)

    for name, value in straight.state_dict().items():
        # Same arithmetic in the same order on the CPU: the runs agree exactly.
        assert torch.equal(resumed.state_dict()[name], value), name
    assert len(result.history["loss"]) == 6
    assert result.steps == 6
    assert result.start_step == 4
    assert sorted(os.listdir(path.parent)) == ["model.pt"]


def test_checkpoint_rebuilds_model_and_settings(tmp_path):
    model = _small_model("set")
    path = tmp_path / "model.pt"
    config = _config(steps=2)
    train_in_context_energy(
        model,
        GaussianMixtureFamily(),
        config,
        checkpoint=path,
        metadata={"family": {"name": "gmm"}},
    )

    loaded, loaded_config, metadata = load_checkpoint(path)
    context, queries = torch.randn(2, 3, 2), torch.randn(2, 4, 2)
    assert torch.equal(loaded(context, queries), model(context, queries))
    assert loaded_config == config
    assert metadata == {"family": {"name": "gmm"}}
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_rejects_other_architecture(tmp_path):
    path = tmp_path / "model.pt"
    train_in_context_energy(
        _small_model(), GaussianMixtureFamily(), _config(steps=1), checkpoint=path
    )
    other = InContextEnergy(dim=2, width=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="does not match"):
        train_in_context_energy(
            other, GaussianMixtureFamily(), _config(), checkpoint=path, resume=True
        )


def test_resume_rejects_other_family(tmp_path):
    path = tmp_path / "model.pt"
    gmm = {"family": {"name": "gmm", "seed": 0}}
    train_in_context_energy(
        _small_model(), GaussianMixtureFamily(), _config(steps=1), checkpoint=path, metadata=gmm
    )
    moons = {"family": {"name": "moons", "seed": 0}}
    with pytest.raises(ValueError, match="trained on the family"):
        train_in_context_energy(
            _small_model(),
            GaussianMixtureFamily(),
            _config(steps=2),
            checkpoint=path,
            resume=True,
            metadata=moons,
        )
    assert load_checkpoint(path)[2] == gmm


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (exec, ("import os; os.environ['PYRO_AM_TEST_UNPICKLED'] = '1'",))


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"PK\x03\x04truncated"])
def test_unreadable_checkpoint_raises_value_error(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="model.pt' cannot be read"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="model.pt' cannot be read"):
        train_in_context_energy(
            _small_model(), GaussianMixtureFamily(), _config(), checkpoint=path, resume=True
        )


def test_checkpoint_with_pickled_code_is_not_run(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    train_in_context_energy(
        _small_model(), GaussianMixtureFamily(), _config(steps=1), checkpoint=path
    )
    state = torch.load(path, weights_only=True)
    state["metadata"] = {"payload": _RunsCodeWhenUnpickled()}
    torch.save(state, path)
    monkeypatch.delenv("PYRO_AM_TEST_UNPICKLED", raising=False)

    with pytest.raises(ValueError, match="objects other than tensors"):
        load_checkpoint(path)
    assert "PYRO_AM_TEST_UNPICKLED" not in os.environ


class _PoisonedFamily(GaussianMixtureFamily):
    """Returns points so large at one step that the float32 LayerNorm variance overflows."""

    def __init__(self, bad_step):
        super().__init__()
        self.bad_step = bad_step
        self.calls = 0

    def sample_points(self, num_datasets, num_points, generator=None):
        points = super().sample_points(num_datasets, num_points, generator)
        self.calls += 1
        if self.calls == self.bad_step + 1:
            points = points * 1e30
        return points


@pytest.mark.parametrize(
    ("langevin_steps", "cause"), [(3, "Langevin sampler failed"), (0, "the loss is nan")]
)
def test_nan_loss_stops_and_keeps_parameters(langevin_steps, cause):
    model = _small_model()
    with pytest.raises(RuntimeError, match=f"stopped at step 3: {cause}"):
        train_in_context_energy(
            model, _PoisonedFamily(bad_step=3), _config(langevin_steps=langevin_steps)
        )

    reference = _small_model()
    train_in_context_energy(
        reference, GaussianMixtureFamily(), _config(steps=3, langevin_steps=langevin_steps)
    )
    for name, value in reference.state_dict().items():
        # The stopped run made exactly the first three updates of the clean run.
        assert torch.equal(model.state_dict()[name], value), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_replay_buffer_keeps_newest_points():
    buffer = ReplayBuffer(capacity=5, dim=1, dtype=torch.float64, device="cpu")
    buffer.push(torch.arange(3.0, dtype=torch.float64)[:, None])
    buffer.push(torch.arange(3.0, 7.0, dtype=torch.float64)[:, None])
    # Seven points through a buffer of five: the two oldest (0 and 1) were overwritten.
    assert sorted(buffer.points.flatten().tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    generator = torch.Generator().manual_seed(0)
    drawn = buffer.sample(50, generator)
    assert set(drawn.flatten().tolist()) <= {2.0, 3.0, 4.0, 5.0, 6.0}
    small = ReplayBuffer(capacity=3, dim=1, dtype=torch.float64, device="cpu")
    small.push(torch.arange(7.0, dtype=torch.float64)[:, None])
    # One push larger than the buffer keeps its newest points.
    assert small.points.flatten().tolist() == [4.0, 5.0, 6.0]


def test_config_validation():
    with pytest.raises(ValueError, match="num_points must be an integer in \\[2"):
        CDConfig(num_points=1)
    with pytest.raises(ValueError, match="init must be one of"):
        CDConfig(init="laplace")
    with pytest.raises(ValueError, match="replay_fraction must be in"):
        CDConfig(replay_fraction=1.5)
    with pytest.raises(ValueError, match="noise_std must be finite"):
        CDConfig(noise_std=-0.1)
    assert CDConfig(step_size=0.5, noise_std=0.01).temperature == pytest.approx(1e-4)
    assert math.isclose(CDConfig(step_size=2.0, noise_std=0.2).temperature, 0.01)


def test_family_dimension_must_match():
    model = InContextEnergy(dim=3, width=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="family has dimension 2"):
        train_in_context_energy(model, GaussianMixtureFamily(), _config())
    with pytest.raises(TypeError, match="model must be an InContextEnergy"):
        train_in_context_energy(torch.nn.Linear(2, 1), GaussianMixtureFamily(), _config())
