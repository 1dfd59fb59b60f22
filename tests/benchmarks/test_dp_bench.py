"""Smoke test of ``pyro-am bench dp`` at a tiny size; no timing is asserted."""

import json

import numpy as np
import pytest
import torch

from pyro_am.benchmarks.dp import LIKELIHOODS, _likelihood, make_blobs
from pyro_am.cli import main


def test_make_blobs_shapes_and_labels():
    train, train_labels, held_out, held_out_labels = make_blobs(50, 20, 3, 4, seed=1)
    assert train.shape == (50, 3)
    assert held_out.shape == (20, 3)
    assert train_labels.shape == (50,)
    assert set(np.unique(np.concatenate([train_labels, held_out_labels]))) <= {0, 1, 2, 3}


def test_benchmark_likelihoods_agree(device):
    # Both timed likelihoods must compute the same density, or the timing compares different work.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=generator, dtype=torch.float64).to(device)
    memories = torch.randn(5, 4, generator=generator, dtype=torch.float64).to(device)
    weights = torch.softmax(torch.randn(5, generator=generator, dtype=torch.float64), 0).to(device)
    scale = torch.tensor(0.7, dtype=torch.float64, device=device)

    values = [_likelihood(name, weights, memories, scale).log_prob(x) for name in LIKELIHOODS]
    # float64 throughout; the GEMM-form distances differ from the broadcast by rounding only.
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
def test_bench_dp_runs_and_writes_json(tmp_path, capsys, covariance):
    out = tmp_path / "dp.json"
    status = main(
        [
            "bench",
            "dp",
            "--num-train", "300",
            "--num-held-out", "100",
            "--dim", "8",
            "--num-blobs", "3",
            "--truncation", "8",
            "--max-iter", "100",
            "--repeats", "1",
            "--covariance", covariance,
            "--out", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out

    assert status == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] >= 1
    assert set(report["svi_step_seconds"]) == set(LIKELIHOODS)
    assert len(report["fits"]) == 2
    for row in report["fits"]:
        # Centres ~ N(0, 3^2 I) in 8-D lie about 12 noise standard deviations apart, so both fits
        # recover the three blobs (ARI 1.0 at seed 0). The reference is the blob labels.
        assert row["ari"] > 0.95
        assert row["num_memories"] == 3
        assert np.isfinite(row["held_out_log_likelihood"])
    assert "MixtureSameFamily / GaussianMixture" in printed


def test_bench_dp_rejects_bad_sizes(capsys):
    status = main(["bench", "dp", "--truncation", "1"])
    assert status == 2
    assert "--truncation must be at least 2" in capsys.readouterr().err
