"""Tests of ``pyro-am retrieve --model DIR``: retrieval with a DP memory from ``pyro-am fit``."""

import json

import numpy as np
import pytest
import torch

from pyro_am.cli import main
from pyro_am.commands._retrieve_model import memory_majority_labels
from pyro_am.commands.fit import load_fitted
from pyro_am.datasets import split_memories_queries

# One shared noise scale: per-memory scales can leave a broad memory of tiny weight after 50
# iterations, which would make the expected retrievals below depend on the fit's details.
FIT_OPTIONS = [
    *("--max-iter", "50", "--num-samples", "10", "--truncation", "6"),
    *("--no-per-memory-scale", "--no-progress"),
]
NUM_QUERIES = 30


def _blobs(seed=0):
    """Three 4-D blobs whose centres differ by 12 noise standard deviations in every coordinate."""
    generator = np.random.default_rng(seed)
    centres = 12.0 * np.array([[0.0] * 4, [1.0] * 4, [-1.0] * 4])
    labels = np.repeat(np.arange(3), 60)
    patterns = centres[labels] + generator.standard_normal((len(labels), 4))
    return patterns, labels


@pytest.fixture(scope="module")
def fitted_blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retrieve_model")
    patterns, labels = _blobs()
    data = folder / "blobs.npz"
    np.savez(data, patterns=patterns, labels=labels)
    out = folder / "fit"
    status = main(["fit", "--data", str(data), *FIT_OPTIONS, "--out", str(out)])
    assert status == 0
    return data, out, patterns, labels


def _retrieve(fitted_blobs, tmp_path, *arguments):
    data, model_dir, _, _ = fitted_blobs
    out = tmp_path / "retrieve"
    status = main(
        [
            "retrieve",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--num-queries",
            str(NUM_QUERIES),
            "--no-progress",
            "--out",
            str(out),
            *arguments,
        ]
    )
    return status, out


def _responsibilities(x, weights, locs, variances):
    """Posterior p(z = k | x) of an isotropic Gaussian mixture, by direct evaluation in NumPy."""
    squared = ((x[:, None, :] - locs[None, :, :]) ** 2).sum(-1)
    dim = x.shape[1]
    log_joint = np.log(weights) - 0.5 * squared / variances - 0.5 * dim * np.log(variances)
    log_joint -= log_joint.max(axis=1, keepdims=True)
    joint = np.exp(log_joint)
    return joint / joint.sum(axis=1, keepdims=True)


def test_retrieve_model_clean_queries_reach_memory_means(fitted_blobs, tmp_path, capsys):
    status, out = _retrieve(fitted_blobs, tmp_path, "--mask-fraction", "--noise-std", "0")
    printed = capsys.readouterr().out

    assert status == 0
    assert "fitted DP memory" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    (row,) = metrics["results"]
    assert row["energy"] == "dp"
    assert row["label_accuracy"] == 1.0
    assert (out / "retrieval.png").is_file()

    # Reference: the fixed point of x <- sum_k r_k(x) mu_k from a clean query, computed by NumPy
    # iteration of the same map with the saved weights, means and variance.
    _, model_dir, patterns, labels = fitted_blobs
    fitted = load_fitted(model_dir)
    model = fitted.model
    weights = model.weights.detach().double().numpy()
    locs = model.memories.detach().double().numpy()
    variances = model.scale.detach().double().square().numpy()
    scaled = fitted.scaling.transform(patterns)
    _, _, queries, _ = split_memories_queries(scaled, labels, NUM_QUERIES, seed=0)
    states = np.asarray(queries, dtype=np.float64)
    for _ in range(200):
        states = _responsibilities(states, weights, locs, variances) @ locs
    expected_mse = float(((states - queries) ** 2).mean())
    # retrieve() stops once a step moves less than tol = 1e-4, and the memory is float32 or
    # float64, so the two fixed points agree to about 1e-4 per coordinate.
    assert row["mse"] == pytest.approx(expected_mse, abs=1e-3)


def test_retrieve_model_noisy_queries_keep_labels(fitted_blobs, tmp_path):
    status, out = _retrieve(fitted_blobs, tmp_path, "--mask-fraction", "0.5", "--noise-std", "0.1")
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {row["corruption"]: row for row in metrics["results"]}
    # Blobs 12 standard deviations apart: a query with one of two coordinates hidden, or with
    # noise of 0.1 (in standardized units), still lies far closer to its own blob's memory.
    assert rows["noise"]["label_accuracy"] == 1.0
    assert rows["noise"]["exact_recall"] == 1.0
    assert rows["mask"]["mse"] < rows["mask"]["mse_corrupted"]


def test_retrieve_model_rejects_dimension_mismatch(fitted_blobs, tmp_path, capsys):
    other = tmp_path / "three_columns.npy"
    np.save(other, np.random.default_rng(0).standard_normal((50, 3)))
    _, model_dir, _, _ = fitted_blobs
    status = main(
        ["retrieve", "--model", str(model_dir), "--data", str(other), "--out", str(tmp_path)]
    )
    message = capsys.readouterr().err

    assert status == 2
    assert "dimension 3" in message
    assert "dimension 4" in message
    assert len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", [["--bandwidth", "1"], ["--beta", "2"], ["--energy", "kde"]])
def test_retrieve_model_rejects_energy_flags(fitted_blobs, tmp_path, capsys, flag):
    status, _ = _retrieve(fitted_blobs, tmp_path, *flag)
    message = capsys.readouterr().err

    assert status == 2
    assert flag[0] in message
    assert "--model" in message


def _copy_model(fitted_blobs, tmp_path):
    _, model_dir, _, _ = fitted_blobs
    copy = tmp_path / "model_copy"
    copy.mkdir()
    for name in ("model.pt", "fit.json"):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    return copy


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "model.pt").write_bytes(b""), "is not a DP memory"),
        (lambda folder: (folder / "model.pt").write_text("junk"), "is not a DP memory"),
        (lambda folder: (folder / "fit.json").write_text("[1, 2]"), "is not a fit.json"),
        (lambda folder: (folder / "fit.json").write_text("{"), "is not a fit.json"),
        (
            lambda folder: (folder / "fit.json").write_text(
                json.dumps({**json.loads((folder / "fit.json").read_text()), "scaling": None})
            ),
            "is not a fit.json",
        ),
        (
            lambda folder: (folder / "fit.json").write_text(
                json.dumps(
                    {
                        **json.loads((folder / "fit.json").read_text()),
                        "scaling": {"name": "none", "shift": [0.0], "factor": [1.0]},
                    }
                )
            ),
            "scaling shift values for dimension 4",
        ),
    ],
)
def test_retrieve_model_rejects_damaged_folder(fitted_blobs, tmp_path, capsys, damage, message):
    folder = _copy_model(fitted_blobs, tmp_path)
    damage(folder)
    status = main(["retrieve", "--model", str(folder), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err

    assert status == 2
    assert message in error
    assert len(error.strip().splitlines()) == 1


def test_retrieve_model_missing_folder(tmp_path, capsys):
    status = main(["retrieve", "--model", str(tmp_path / "absent"), "--out", str(tmp_path)])
    message = capsys.readouterr().err

    assert status == 2
    assert "model.pt" in message


def test_memory_majority_labels_matches_counting():
    generator = torch.Generator().manual_seed(0)
    assignments = torch.randint(0, 5, (200,), generator=generator)
    labels = torch.randint(0, 4, (200,), generator=generator)
    assignments[assignments == 3] = 2  # memory 3 gets no pattern

    majority = memory_majority_labels(assignments, labels, num_memories=5)

    for memory in range(5):
        members = labels[assignments == memory].tolist()
        if not members:
            assert majority[memory] == -1
            continue
        counts = np.bincount(members, minlength=4)
        assert majority[memory] == int(np.argmax(counts))
