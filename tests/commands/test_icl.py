"""Tests of ``pyro-am icl``: outputs of tiny runs, resume, presets and one-line errors."""

import csv
import json

import numpy as np
import pytest
import torch

from pyro_am.cli import main
from pyro_am.models.amortized_training import load_amortized_guide
from pyro_am.models.icl_training import load_checkpoint

TINY = [
    "--width",
    "8",
    "--depth",
    "1",
    "--heads",
    "2",
    "--num-points",
    "5",
    "--batch-size",
    "3",
    "--langevin-steps",
    "2",
    "--num-negatives",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("icl")
    status = main(
        ["icl", "train", *TINY, "--steps", "4", "--amortized-steps", "3", "--out", str(out)]
    )
    assert status == 0
    return out


def test_train_writes_outputs(trained, capsys):
    assert (trained / "training.png").read_bytes()[:4] == b"\x89PNG"
    history = json.loads((trained / "history.json").read_text())
    assert len(history["history"]["loss"]) == 4
    assert len(history["amortized_elbo_per_point"]) == 3
    assert history["settings"]["width"] == 8
    assert history["metadata"]["family"]["name"] == "gmm"
    model, config, metadata = load_checkpoint(trained / "model.pt")
    assert model.config["depth"] == 1
    assert config.steps == 4
    assert config.noise_std == 0.01
    assert metadata["preset"] == "small"
    guide = load_amortized_guide(trained / "amortized.pt")
    assert guide.num_components == 3


def test_train_prints_throughput(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["icl", "train", *TINY, "--steps", "2", "--amortized-steps", "0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "context points per second" in printed
    assert not (out / "amortized.pt").exists()

    # Resuming with more steps continues the same run.
    args = ["icl", "train", *TINY, "--steps", "3", "--amortized-steps", "0", "--resume"]
    assert main([*args, "--out", str(out)]) == 0
    assert "(1 steps in" in capsys.readouterr().out
    _, config, _ = load_checkpoint(out / "model.pt")
    history = json.loads((out / "history.json").read_text())
    assert len(history["history"]["loss"]) == 3
    assert config.steps == 3


def test_published_preset_builds_reference_model(tmp_path):
    out = tmp_path / "published"
    args = ["--num-points", "3", "--batch-size", "1", "--num-negatives", "1", "--no-progress"]
    status = main(
        [
            "icl",
            "train",
            "--preset",
            "published",
            *args,
            "--langevin-steps",
            "1",
            "--steps",
            "1",
            "--amortized-steps",
            "0",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    model, config, _ = load_checkpoint(out / "model.pt")
    assert (model.width, model.depth, model.heads, model.mode) == (128, 6, 8, "causal")
    assert config.noise_std == 0.01
    assert config.langevin_steps == 1


def test_sample_and_landscape(trained, tmp_path):
    out = tmp_path / "figures"
    common = ["--model", str(trained), "--sizes", "0", "2", "4", "--out", str(out)]
    assert main(["icl", "sample", *common, "--num-samples", "6"]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["samples"].shape == (3, 6, 2)
    assert samples["context"].shape == (4, 2)
    copy = tmp_path / "docs" / "in_context_landscape.png"
    assert main(["icl", "landscape", *common, "--resolution", "9", "--figure", str(copy)]) == 0
    landscape = np.load(out / "landscape.npz")
    assert landscape["energies"].shape == (3, 9, 9)
    assert (out / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    assert copy.read_bytes()[:4] == b"\x89PNG"


def test_context_file_is_used_in_order(trained, tmp_path):
    context = np.array([[0.0, 1.0], [2.0, -1.0], [4.0, 3.0]])
    path = tmp_path / "context.npy"
    np.save(path, context)
    out = tmp_path / "out"
    args = ["--model", str(trained), "--context", str(path), "--sizes", "1", "3"]
    assert main(["icl", "landscape", *args, "--resolution", "5", "--out", str(out)]) == 0
    stored = np.load(out / "landscape.npz")
    np.testing.assert_array_equal(stored["context"], context.astype(np.float32))


def test_evaluate_writes_metrics(trained, tmp_path):
    out = tmp_path / "metrics"
    args = ["--model", str(trained), "--max-points", "3", "--num-datasets", "2"]
    assert main(["icl", "evaluate", *args, "--num-samples", "4", "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["sizes"] == [1, 2, 3]
    assert len(result["amortized_nll"]) == 3
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["n"] for row in rows] == ["1", "2", "3"]
    assert rows[0]["gmm_nll"] == ""
    assert float(rows[2]["energy_distance"]) == pytest.approx(result["energy_distance"][2])
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["icl", "train", "--steps", "0"], "steps must be an integer"),
        (["icl", "train", "--width", "10", "--heads", "4"], "divisible by heads"),
        (["icl", "train", "--device", "cuda:7"], "cuda"),
        (["icl", "sample", "--model", "missing-folder"], "not found"),
        (["icl", "train", "--amortized-steps", "-1"], "--amortized-steps must be an integer >= 0"),
        (["icl", "train", "--grad-clamp", "-1"], "--grad-clamp must be a number >= 0"),
    ],
)
def test_bad_input_exits_with_one_line(args, message, capsys, tmp_path):
    status = main([*args, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert status == 2
    assert message in error
    assert len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["sample", "landscape"])
def test_sizes_zero_alone_uses_prior(command, trained, tmp_path):
    # n = 0 is the context-free energy; it is in the default sizes, so it must also work alone.
    out = tmp_path / "out"
    args = ["icl", command, "--model", str(trained), "--sizes", "0", "--out", str(out)]
    if command == "sample":
        args += ["--num-samples", "4"]
    assert main(args) == 0
    saved = np.load(out / f"{'samples' if command == 'sample' else 'landscape'}.npz")
    assert saved["sizes"].tolist() == [0]


@pytest.mark.parametrize("command", ["sample", "landscape"])
def test_negative_sizes_exit_with_one_line(command, trained, capsys, tmp_path):
    args = ["icl", command, "--model", str(trained), "--sizes", "-1", "--out", str(tmp_path)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "--sizes must be integers >= 0, but got [-1]" in error
    assert len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["sample", "landscape", "evaluate"])
def test_empty_model_file_exits_with_one_line(command, capsys, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    status = main(["icl", command, "--model", str(path), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert status == 2
    assert "model.pt' cannot be read" in error
    assert len(error.strip().splitlines()) == 1


def test_bad_sizes_exit_with_one_line(trained, capsys, tmp_path):
    path = tmp_path / "context.npy"
    np.save(path, np.zeros((3, 2)))
    args = ["icl", "landscape", "--model", str(trained), "--context", str(path), "--sizes", "4"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "--sizes must lie in [0, 3], but got [4]" in error
    assert len(error.strip().splitlines()) == 1
    assert main(["icl", "sample", "--model", str(trained), "--num-samples", "0"]) == 2
    assert "--num-samples must be an integer >= 1" in capsys.readouterr().err


def test_model_dtype_flag(tmp_path):
    out = tmp_path / "double"
    args = [*TINY, "--steps", "1", "--amortized-steps", "1", "--dtype", "float64"]
    assert main(["icl", "train", *args, "--out", str(out)]) == 0
    model, _, _ = load_checkpoint(out / "model.pt")
    assert next(model.parameters()).dtype == torch.float64
