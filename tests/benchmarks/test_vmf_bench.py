"""Smoke tests of ``pyro-am bench vmf`` and ``pyro-am bench vmf-attention`` at tiny sizes.

No timing is asserted; the checks are the report's structure and the sanity of its numbers.
"""

import json
import math

import pytest
import torch

from pyro_am.benchmarks.vmf_attention import (
    attention_layer,
    balanced_beta,
    sample_tokens,
    threshold_clusters,
)
from pyro_am.cli import main


def test_bench_vmf_tiny_writes_report(tmp_path, capsys):
    out = tmp_path / "vmf.json"
    arguments = ["bench", "vmf", "--dim", "8", "--num-draws", "2000", "--kappas", "1,100"]
    status = main(arguments + ["--repeats", "1", "--out", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "vmf"
    assert "cpu_model" in report["machine"]
    assert [row["kappa"] for row in report["results"]] == [1.0, 100.0]
    for row in report["results"]:
        assert row["ours_draws_per_second"] > 0
        assert row["scipy_draws_per_second"] > 0
        # Mean of mu.x over 2000 draws: standard error below 1 / sqrt(2000) = 0.022.
        assert row["ours_mean_cosine"] == pytest.approx(row["expected_mean_cosine"], abs=0.12)
        assert row["scipy_mean_cosine"] == pytest.approx(row["expected_mean_cosine"], abs=0.12)
    assert "speedup" in capsys.readouterr().out


def test_bench_vmf_rejects_bad_kappas(capsys):
    assert main(["bench", "vmf", "--kappas", "1,-2"]) == 2
    assert "--kappas" in capsys.readouterr().err


def test_bench_vmf_attention_tiny_writes_report_and_figure(tmp_path, capsys):
    out, figure = tmp_path / "attention.json", tmp_path / "attention.png"
    arguments = ["bench", "vmf-attention", "--dims", "3", "--kappas", "200", "--num-tokens", "40"]
    arguments += ["--num-components", "2", "--num-layers", "3", "--seeds", "1"]
    status = main(arguments + ["--out", str(out), "--figure", str(figure)])
    assert status == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert len(row["attention_ari"]) == 4
    # Two components at kappa = 200 on S^2 are far apart: both baselines separate them exactly.
    assert row["kmeans_ari"] == 1.0
    assert row["em_ari"] == 1.0
    assert figure.stat().st_size > 0
    assert "vMF EM" in capsys.readouterr().out


def test_attention_layer_contracts_a_component():
    tokens, _ = sample_tokens(5, 60, 1, 20.0, generator_seed=0)
    beta = balanced_beta(5, 20.0, 60, 1)
    spread_before = 1 - tokens.mean(0).norm()
    state = tokens
    for _ in range(5):
        state = attention_layer(state, beta)
    torch.testing.assert_close(state.norm(dim=-1), torch.ones(60, dtype=torch.float64))
    # Blurring mean shift pulls one component together: its mean resultant length rises.
    assert 1 - state.mean(0).norm() < 0.5 * spread_before


def test_threshold_clusters_joins_close_tokens():
    angles = torch.tensor([0.0, 0.01, 0.02, 1.5, 1.51], dtype=torch.float64)
    tokens = torch.stack([angles.cos(), angles.sin()], dim=-1)
    labels = threshold_clusters(tokens, merge_angle=0.05)
    assert labels[0] == labels[1] == labels[2]
    assert labels[3] == labels[4]
    assert labels[0] != labels[3]
    assert math.isclose(balanced_beta(3, 1e-9, 64, 4), math.log(16) / (1 - 1e-18), rel_tol=1e-6)
