"""``pyro-am fit --distributed`` on 2 gloo processes against plain ``pyro-am fit``.

The workers are started by :func:`pyro_am.distributed.launch_local`, which sets the variables that
``torchrun`` sets, on 127.0.0.1.
"""

import argparse
import contextlib
import io
import json

import numpy as np
import pytest

from pyro_am import distributed
from pyro_am.cli import main
from pyro_am.commands._fit_distributed import read_training_rows
from pyro_am.commands.fit import load_data

ARGUMENTS = [
    "fit", "--truncation", "8", "--max-iter", "30", "--num-samples", "20", "--no-progress",
    "--seed", "2",
]  # fmt: skip


def _write_blobs(path):
    generator = np.random.default_rng(0)
    centres = 4.0 * generator.standard_normal((3, 4))
    points = centres[generator.integers(3, size=301)] + generator.standard_normal((301, 4))
    np.save(path, points.astype(np.float32))


def _fit_worker(rank, world_size, data, out_root):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(
            [*ARGUMENTS, "--data", data, "--distributed", "--out", f"{out_root}/rank{rank}"]
        )
    return status, printed.getvalue()


def test_distributed_fit_matches_single_process(tmp_path, capsys):
    data = str(tmp_path / "blobs.npy")
    _write_blobs(data)
    results = distributed.launch_local(
        _fit_worker, 2, args=(data, str(tmp_path)), timeout_seconds=240
    )
    assert [status for status, _ in results] == [0, 0]
    # Rank 1 fits its shard but writes and prints nothing.
    assert not (tmp_path / "rank1").exists()
    assert results[1][1] == ""
    assert "held-out log likelihood per point" in results[0][1]
    for name in ("model.pt", "fit.json", "inference_data.nc", "metrics.json"):
        assert (tmp_path / "rank0" / name).is_file(), name

    assert main([*ARGUMENTS, "--data", data, "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    parallel = json.loads((tmp_path / "rank0" / "metrics.json").read_text())
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert parallel["settings"]["world_size"] == 2
    assert parallel["fit"]["iterations"] == single["fit"]["iterations"]
    assert parallel["fit"]["num_created"] == single["fit"]["num_created"]
    assert parallel["scores"]["num_memories"] == single["scores"]["num_memories"]
    # float32 fits whose sums differ only in order: agreement to about 1e-6 relative per step,
    # so 1e-4 over 30 iterations.
    assert parallel["fit"]["final_elbo"] == pytest.approx(single["fit"]["final_elbo"], rel=1e-4)
    assert parallel["scores"]["held_out_log_likelihood"] == pytest.approx(
        single["scores"]["held_out_log_likelihood"], rel=1e-4
    )


@pytest.mark.parametrize("source", ["npy", "dataset"])
def test_read_training_rows_matches_loaded_data(tmp_path, source):
    if source == "npy":
        path = str(tmp_path / "blobs.npy")
        _write_blobs(path)
        args = argparse.Namespace(data=path, dataset=None)
    else:
        args = argparse.Namespace(data=None, dataset="iris")
    index = np.array([0, 3, 4, 17, 100])
    rows = read_training_rows(args, index)
    # The reference is the full array as the single-process command loads it.
    assert np.array_equal(rows, load_data(args).data[index])
    assert rows.dtype == np.float64


def test_distributed_fit_without_torchrun_is_a_usage_error(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    status = main(
        [*ARGUMENTS, "--dataset", "iris", "--distributed", "--out", str(tmp_path / "out")]
    )
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1
    assert "--distributed needs a torchrun launch" in error
    assert not (tmp_path / "out").exists()
