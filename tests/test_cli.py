import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from pyro_am.cli import main
from pyro_am.commands.retrieve import (
    chance_label_accuracy,
    default_bandwidth,
    median_nearest_neighbor_distance,
)
from pyro_am.datasets import load_dataset, split_memories_queries

NUM_QUERIES = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _results_by_level(metrics):
    return {(row["corruption"], row["level"], row["energy"]): row for row in metrics["results"]}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One small run of the main job, shared by the checks below."""
    out = tmp_path_factory.mktemp("retrieve")
    device = os.environ.get("PYRO_AM_TEST_DEVICE", "cpu")
    argv = [
        "retrieve",
        "--num-queries",
        str(NUM_QUERIES),
        "--mask-fraction",
        "0.25",
        "--noise-std",
        "0",
        "0.1",
        "--no-progress",
        "--device",
        device,
        "--out",
        str(out),
    ]
    status = main(argv)
    with open(out / "metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    return status, out, metrics


def test_retrieve_writes_png_and_json(digits_run):
    status, out, metrics = digits_run
    assert status == 0
    with open(out / "retrieval.png", "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    assert metrics["files"] == {"figure": "retrieval.png"}
    assert metrics["data"]["num_memories"] == 1797 - NUM_QUERIES
    assert metrics["data"]["num_queries"] == NUM_QUERIES
    assert metrics["data"]["dim"] == 64
    assert len(metrics["results"]) == 3 * 2
    for row in metrics["results"]:
        for key in ("label_accuracy", "exact_recall", "mse", "mse_corrupted", "mean_steps"):
            assert np.isfinite(row[key]), (key, row)


def test_retrieve_stored_patterns_recall_themselves(digits_run):
    # From an uncorrupted stored pattern the KDE state moves by about N_near * exp(-8) * d_med
    # (its neighbours' kernel weights under h = d_med / 4), far below half the distance to the
    # nearest other memory, so every probe must still be nearest to itself.
    results = _results_by_level(digits_run[2])
    assert results[("noise", 0.0, "kde")]["exact_recall"] == 1.0
    assert results[("noise", 0.0, "kde")]["probe_mse"] < 1e-4


def test_retrieve_clean_queries_match_nearest_neighbour(digits_run):
    # Reference: scikit-learn's 1-nearest-neighbour classifier on the same split. With a small
    # bandwidth a clean query moves towards its nearest memories, so its accuracy should agree with
    # 1-NN up to a few of the 60 queries (0.05 = 3 queries).
    _, _, metrics = digits_run
    digits = load_dataset("digits")
    memories, memory_labels, queries, query_labels = split_memories_queries(
        digits.data / 16.0, digits.labels, NUM_QUERIES, seed=0
    )
    nearest_neighbour = KNeighborsClassifier(n_neighbors=1).fit(memories, memory_labels)
    reference = nearest_neighbour.score(queries, query_labels)
    results = _results_by_level(metrics)
    assert abs(results[("noise", 0.0, "kde")]["label_accuracy"] - reference) <= 0.05


def test_retrieve_corrupted_queries_beat_chance(digits_run):
    # Chance (the most frequent label among 60 queries of 10 balanced classes) is about 0.13. 1-NN
    # on digits is ~0.97 accurate, and a quarter of the pixels hidden or noise of std 0.1 (a tenth
    # of the pixel range) leaves most of a digit. Even at accuracy 0.9 the binomial standard error
    # for 60 queries is 0.04, so 0.7 is a margin of 5 standard errors and still 5x chance.
    _, _, metrics = digits_run
    chance = metrics["data"]["chance_label_accuracy"]
    assert chance < 0.25
    results = _results_by_level(metrics)
    for level in (("mask", 0.25), ("noise", 0.1)):
        assert results[(*level, "kde")]["label_accuracy"] > 0.7, results[(*level, "kde")]
    assert results[("mask", 0.25, "dam")]["label_accuracy"] > 3 * chance


def test_retrieve_reduces_error(digits_run):
    # Masked pixels start at the memories' mean, and completion moves them towards a digit that
    # agrees with the observed pixels. A noisy held-out query, however, is pulled onto a different
    # (stored) digit, which can be farther from it than the noise, so for noise only the stored
    # probes are checked: they return to their originals, leaving far less than the noise's
    # mean squared error std^2 = 0.01.
    results = _results_by_level(digits_run[2])
    mask_row = results[("mask", 0.25, "kde")]
    assert mask_row["mse"] < mask_row["mse_corrupted"], mask_row
    noise_row = results[("noise", 0.1, "kde")]
    assert noise_row["probe_mse"] < 0.1 * noise_row["mse_corrupted"], noise_row


def test_retrieve_prints_table(tmp_path, capsys):
    status = main(
        [
            "retrieve",
            "--num-queries",
            "20",
            "--mask-fraction",
            "0.5",
            "--noise-std",
            "--energy",
            "kde",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    output = capsys.readouterr().out
    assert status == 0
    assert "mask 0.5" in output
    assert "kde" in output
    assert " dam " not in output
    assert "wrote" in output


def test_default_bandwidth_is_quarter_median_nn():
    # Brute-force reference: the full distance matrix with the diagonal excluded.
    memories = torch.randn(300, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    distances = torch.cdist(memories, memories) + torch.diag(torch.full((300,), float("inf")))
    expected = float(distances.min(dim=1).values.median())
    assert median_nearest_neighbor_distance(memories, chunk=64) == pytest.approx(expected)
    assert default_bandwidth(memories) == pytest.approx(expected / 4)


@pytest.mark.parametrize("method", ["gradient", "langevin"])
def test_retrieve_other_methods(tmp_path, method):
    status = main(
        [
            "retrieve",
            "--num-queries",
            "10",
            "--mask-fraction",
            "0.25",
            "--noise-std",
            "--method",
            method,
            "--max-steps",
            "5",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0
    with open(tmp_path / "metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert metrics["settings"]["method"] == method
    assert all(np.isfinite(row["mse"]) for row in metrics["results"])


def test_retrieve_csv_with_labels(tmp_path):
    iris = load_dataset("iris")
    path = tmp_path / "iris.csv"
    header = ",".join([*iris.feature_names, "label"]).replace(" ", "_")
    table = np.column_stack([iris.data, iris.labels])
    np.savetxt(path, table, delimiter=",", header=header, comments="", fmt="%.10g")
    out = tmp_path / "out"
    status = main(
        [
            "retrieve",
            "--data",
            str(path),
            "--scale",
            "standardize",
            "--num-queries",
            "30",
            "--mask-fraction",
            "0.25",
            "--noise-std",
            "0.2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    with open(out / "metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert metrics["data"]["dim"] == 4
    # Iris has three balanced classes; 1-NN is ~0.95 accurate on standardized iris.
    assert all(row["label_accuracy"] > 0.6 for row in metrics["results"] if row["energy"] == "kde")
    assert os.path.exists(out / "retrieval.png")


def test_retrieve_npy_without_labels(tmp_path, capsys):
    path = tmp_path / "patterns.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 6)))
    out = tmp_path / "out"
    status = main(
        [
            "retrieve",
            "--data",
            str(path),
            "--num-queries",
            "10",
            "--mask-fraction",
            "0.25",
            "--noise-std",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    assert "n/a" in capsys.readouterr().out
    with open(out / "metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert all(row["label_accuracy"] is None for row in metrics["results"])
    assert metrics["data"]["chance_label_accuracy"] is None


def test_chance_label_accuracy_with_sparse_labels():
    labels = torch.tensor([0, 10**15, 10**15, 7])
    assert chance_label_accuracy(labels) == 0.5


def test_retrieve_csv_with_large_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.where(np.arange(40) % 2 == 0, 0, 10**15)
    table = np.column_stack([rng.normal(size=(40, 3)) + labels[:, None] * 1e-15, labels])
    path = tmp_path / "large_labels.csv"
    np.savetxt(path, table, delimiter=",", header="a,b,c,label", comments="", fmt="%.17g")
    out = tmp_path / "out"
    argv = ["retrieve", "--data", str(path), "--num-queries", "10", "--mask-fraction", "0.25"]
    status = main([*argv, "--noise-std", "--no-progress", "--out", str(out)])
    assert status == 0
    with open(out / "metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert 0.5 <= metrics["data"]["chance_label_accuracy"] <= 1.0


# -- bad input: exit status 2 and one line on stderr, no traceback -------------------------------
def _bad_files(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10))
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]))
    (tmp_path / "garbage.npy").write_bytes(b"this is not an array")
    (tmp_path / "word.csv").write_text("1,2\n3,x\n")
    (tmp_path / "patterns.txt").write_text("1,2\n")
    np.save(tmp_path / "small.npy", np.zeros((5, 2)) + np.arange(5)[:, None])
    # Nearest neighbours 1.4e-20 apart give a default bandwidth whose square underflows float32.
    np.save(tmp_path / "tiny.npy", 1e-20 * np.arange(20.0).reshape(10, 2))
    (tmp_path / "file.txt").write_text("not a folder\n")


BAD_ARGUMENTS = [
    (["--data", "{tmp}/missing.npy"], "missing.npy"),
    (["--data", "{tmp}/garbage.npy"], "garbage.npy"),
    (["--data", "{tmp}/flat.npy"], "2-D"),
    (["--data", "{tmp}/nan.npy"], "NaN"),
    (["--data", "{tmp}/word.csv"], "non-numeric"),
    (["--data", "{tmp}/patterns.txt"], "suffix"),
    (["--data", "{tmp}/small.npy", "--num-queries", "5"], "--num-queries"),
    (["--bandwidth", "-1"], "--bandwidth"),
    (["--bandwidth", "0"], "--bandwidth"),
    (["--beta", "nan"], "--beta"),
    (["--mask-fraction", "1.0"], "--mask-fraction"),
    (["--mask-fraction", "-0.2"], "--mask-fraction"),
    (["--noise-std", "-1"], "--noise-std"),
    (["--num-queries", "0"], "--num-queries"),
    (["--max-steps", "0"], "--max-steps"),
    (["--device", "tpu9"], "tpu9"),
    (["--device", "not a device"], "not a device"),
    (["--mask-fraction", "--noise-std"], "no corruption levels"),
    (["--bandwidth", "1e-300"], "--bandwidth"),
    (["--bandwidth", "1e-30"], "--bandwidth"),
    (["--beta", "1e39"], "--beta"),
    (["--data", "{tmp}/tiny.npy", "--scale", "none", "--num-queries", "2"], "default bandwidth"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--out", "{tmp}/file.txt"], "--out"),
]


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS)
def test_retrieve_bad_input_exits_2(tmp_path, capsys, arguments, message):
    _bad_files(tmp_path)
    argv = ["retrieve", "--no-progress", "--out", str(tmp_path / "out")]
    argv += [argument.format(tmp=tmp_path) for argument in arguments]
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pyro-am retrieve: error:")
    assert message in lines[0]
    assert "Traceback" not in captured.err
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_retrieve_cuda_unavailable_exits_2(capsys, tmp_path):
    status = main(["retrieve", "--device", "cuda", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 2
    assert "CUDA is not available" in captured.err


@pytest.mark.parametrize("arguments", [["--mask-fraction", "half"], ["--energy", "hopfield"]])
def test_retrieve_argparse_errors_exit_2(capsys, arguments):
    with pytest.raises(SystemExit) as info:
        main(["retrieve", *arguments])
    captured = capsys.readouterr()
    assert info.value.code == 2
    assert "Traceback" not in captured.err
    assert "error:" in captured.err


def test_module_entry_point_missing_file(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pyro_am", "retrieve", "--data", "missing.npy", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert "missing.npy" in lines[0]
    assert "not found" in lines[0]
    assert "Traceback" not in completed.stderr
