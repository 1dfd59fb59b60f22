"""Smoke tests of ``pyro-am bench streaming`` and ``pyro-am bench sharded`` at tiny sizes.

No timing is asserted; the checks are on the data written and on the fits and states reported.
"""

import json

import numpy as np
import pytest

from pyro_am.benchmarks.sharded import bank_rows
from pyro_am.benchmarks.streaming import held_out_blobs, write_blobs
from pyro_am.cli import main


def test_write_blobs_chunks_match_one_draw(tmp_path, monkeypatch):
    import pyro_am.benchmarks.streaming as streaming

    path = tmp_path / "blobs.npy"
    write_blobs(path, 1000, 3, 4, seed=2)
    whole = np.load(path)
    monkeypatch.setattr(streaming, "_CHUNK_ROWS", 300)
    write_blobs(tmp_path / "chunked.npy", 1000, 3, 4, seed=2)
    assert whole.dtype == np.float32
    assert whole.shape == (1000, 3)
    # Chunks draw labels and noise per chunk, so the two files differ, but both hold the blobs:
    # every point lies within 6 noise standard deviations of one of the 4 centres.
    chunked = np.load(tmp_path / "chunked.npy")
    centres = streaming._centres(4, 3, 2)
    for points in (whole, chunked):
        nearest = np.sqrt(((points[:, None, :] - centres) ** 2).sum(-1)).min(-1)
        assert nearest.max() < 6.0
    held_out, labels = held_out_blobs(50, 3, 4, seed=2)
    assert held_out.shape == (50, 3)
    assert labels.shape == (50,)


def test_bank_rows_blocks_compose():
    whole = bank_rows(0, 70_000, 2, seed=1)
    blocks = [bank_rows(0, 65_000, 2, seed=1), bank_rows(65_000, 70_000, 2, seed=1)]
    assert np.array_equal(np.concatenate(blocks), whole.numpy())


def test_bench_streaming_tiny(tmp_path, capsys):
    out = tmp_path / "streaming.json"
    status = main(
        [
            "bench", "streaming",
            "--num-data", "30000", "--dim", "4", "--num-blobs", "3", "--batch-size", "3000",
            "--num-epochs", "2", "--truncation", "6", "--subsample", "5000",
            "--num-held-out", "3000", "--init-size", "1000", "--data-dir", str(tmp_path),
            "--out", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    assert "points/s" in printed
    report = json.loads(out.read_text())
    streamed, full = report["streaming"], report["full_batch_subsample"]
    assert report["data_file_bytes"] >= 30000 * 4 * 4
    assert (tmp_path / "blobs-30000x4.npy").is_file()
    assert streamed["steps"] == 20
    # Centres ~ N(0, 3^2 I) in 4-D lie about 8 noise standard deviations apart, so both fits
    # find the 3 blobs and agree on the held-out density to well under 0.05 nats per point.
    assert streamed["num_memories"] == full["num_memories"] == 3
    assert abs(streamed["held_out_log_likelihood"] - full["held_out_log_likelihood"]) < 0.05
    assert streamed["peak_rss_bytes"] > 0


def test_bench_streaming_rejects_missing_folder(tmp_path, capsys):
    status = main(["bench", "streaming", "--data-dir", str(tmp_path / "missing")])
    assert status == 2
    assert "is not an existing folder" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_sharded_tiny(tmp_path, capsys):
    out = tmp_path / "sharded.json"
    status = main(
        [
            "bench", "sharded", "--num-memories", "3001", "--dim", "8", "--num-queries", "16",
            "--steps", "3", "--repeats", "1", "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    report = json.loads(out.read_text())
    assert [row["processes"] for row in report["rows"]] == [1, 2]
    # float32 states; the two-process softmax combines two partial sums, about 1e-7 relative.
    assert report["rows"][1]["max_state_difference"] < 1e-5
    assert "efficiency" in capsys.readouterr().out
