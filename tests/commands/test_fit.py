"""Tests of ``pyro-am fit``: outputs on small data sets, bad input, and the saved model."""

import json
import math

import numpy as np
import pytest
import torch

from pyro_am.cli import main
from pyro_am.commands.fit import Scaling, load_fitted, split_held_out
from pyro_am.diagnostics import import_arviz

az = import_arviz()

FAST = ["--max-iter", "30", "--num-samples", "20", "--no-progress"]


def run_fit(tmp_path, *arguments):
    out = tmp_path / "fit"
    status = main(["fit", *arguments, *FAST, "--out", str(out)])
    return status, out


def test_fit_iris_writes_outputs(tmp_path, capsys):
    status, out = run_fit(tmp_path, "--dataset", "iris", "--truncation", "8")
    printed = capsys.readouterr().out

    assert status == 0
    for name in ("model.pt", "fit.json", "inference_data.nc", "memories.png", "elbo.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["num_train"] == 120
    assert metrics["data"]["num_held_out"] == 30
    assert metrics["scores"]["num_memories"] >= 1
    assert math.isfinite(metrics["scores"]["held_out_log_likelihood"])
    assert -1.0 <= metrics["scores"]["held_out"]["ari"] <= 1.0
    assert 0.0 <= metrics["scores"]["held_out"]["nmi"] <= 1.0
    assert "held-out log likelihood per point" in printed
    assert "ARI" in printed


def test_fit_metrics_match_saved_model(tmp_path):
    from sklearn.datasets import load_iris
    from sklearn.metrics import adjusted_rand_score

    status, out = run_fit(tmp_path, "--dataset", "iris", "--truncation", "8", "--seed", "3")
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fitted = load_fitted(out)

    iris = load_iris()
    _, held_out_index = split_held_out(150, 0.2, seed=3)
    held_out = fitted.scaling.transform(iris.data[held_out_index])
    held_out = torch.as_tensor(held_out, dtype=fitted.model.dtype)
    # The reloaded model reproduces the reported scores; float32 parameters, so 1e-4 relative.
    log_likelihood = float(fitted.model.log_predictive(held_out).mean())
    assert log_likelihood == pytest.approx(metrics["scores"]["held_out_log_likelihood"], rel=1e-4)
    assignments = fitted.model.assign(held_out).argmax(-1).numpy()
    ari = adjusted_rand_score(iris.target[held_out_index], assignments)
    assert ari == pytest.approx(metrics["scores"]["held_out"]["ari"])
    assert fitted.dim == 4


def test_fit_inference_data_reads_back(tmp_path):
    status, out = run_fit(tmp_path, "--dataset", "wine", "--truncation", "6", "--per-memory-scale")
    assert status == 0

    idata = az.from_netcdf(str(out / "inference_data.nc"), engine="h5netcdf")
    assert idata.posterior["locs"].sizes["dim"] == 13
    assert idata.constant_data["noise_scale"].dims == ("memory",)
    assert idata.log_likelihood["obs"].sizes["observation"] == 142
    assert np.isfinite(idata.log_likelihood["obs"].values).all()
    assert idata.vi_trace["elbo"].sizes["iteration"] == idata.vi_trace.attrs["iterations"]


def test_fit_faithful_without_labels(tmp_path, capsys):
    status, out = run_fit(tmp_path, "--dataset", "faithful", "--truncation", "6")
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scores"]["held_out"]["ari"] is None
    assert "ARI" not in capsys.readouterr().out


def test_fit_data_file_and_svi(tmp_path):
    generator = np.random.default_rng(0)
    centres = np.array([[-3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    labels = np.repeat([0, 1], 60)
    patterns = centres[labels] + 0.3 * generator.standard_normal((120, 3))
    path = tmp_path / "patterns.npz"
    np.savez(path, patterns=patterns, labels=labels)

    status, out = run_fit(tmp_path, "--data", str(path), "--method", "svi", "--truncation", "4")
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fit"]["method"] == "svi"
    assert metrics["data"]["dim"] == 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--truncation", "0"], "--truncation must be at least 1"),
        (["--concentration", "0"], "--concentration must be a positive number"),
        (["--concentration", "nan"], "--concentration must be a positive number"),
        (["--discount", "1.0"], "--discount must be in [0, 1)"),
        (["--discount", "-0.1"], "--discount must be in [0, 1)"),
        (["--held-out-fraction", "1.0"], "--held-out-fraction must be in [0, 1)"),
        (["--max-iter", "0"], "--max-iter must be at least 1"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2^32 - 1]"),
        (["--dataset", "iris", "--held-out-fraction", "0.999"], "leaves 1 of 150 points"),
    ],
)
def test_fit_rejects_bad_arguments(tmp_path, capsys, arguments, message):
    status = main(["fit", *arguments, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()

    assert status == 2
    assert len(error.splitlines()) == 1
    assert message in error
    assert not (tmp_path / "out").exists()


def test_fit_rejects_out_file_before_fitting(tmp_path, capsys):
    existing = tmp_path / "not_a_folder"
    existing.write_text("")

    status = main(["fit", "--dataset", "iris", "--out", str(existing)])
    error = capsys.readouterr().err.strip()

    assert status == 2
    assert "is not a folder" in error
    assert existing.read_text() == ""


def test_fit_rejects_non_finite_data(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1.0,2.0\nnan,3.0\n4.0,5.0\n")

    status = main(["fit", "--data", str(path), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()

    assert status == 2
    assert len(error.splitlines()) == 1
    assert "NaN" in error


def test_scaling_round_trip_and_jacobian():
    data = np.array([[0.0, 10.0], [2.0, 30.0], [4.0, 20.0]])
    scaling = Scaling.fit("standardize", data)
    scaled = scaling.transform(data)

    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(scaled.std(axis=0), 1.0)
    # float64 round trip: errors are a few ulps of the largest value (30).
    np.testing.assert_allclose(scaling.inverse(scaled), data, atol=1e-13)
    # Reference: log |det diag(1 / std)| for the population standard deviations.
    expected = -np.log(data.std(axis=0)).sum()
    assert scaling.log_abs_det_jacobian() == pytest.approx(expected)


def test_split_held_out_is_a_partition():
    train, held_out = split_held_out(101, 0.3, seed=5)
    assert len(held_out) == 30
    assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(101))
