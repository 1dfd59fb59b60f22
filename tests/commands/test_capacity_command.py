"""Tests of ``pyro-am capacity``: outputs of a small sweep and one-line errors on bad input."""

import csv
import json

import pytest

from pyro_am.capacity import capacity_curve
from pyro_am.cli import main

SMALL = [
    "--dims",
    "2",
    "6",
    "--num-patterns",
    "1",
    "2",
    "4",
    "8",
    "--trials",
    "2",
    "--min-patterns",
    "16",
]


def test_capacity_writes_outputs(tmp_path, capsys):
    out = tmp_path / "capacity"
    status = main(["capacity", *SMALL, "--bandwidth", "0.3", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out

    assert status == 0
    assert (out / "capacity.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "capacity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 4
    assert {row["dim"] for row in rows} == {"2", "6"}
    summary = json.loads((out / "capacity.json").read_text())
    assert summary["dims"] == [2, 6]
    assert summary["bandwidth"] == 0.3
    assert summary["settings"]["dtype"] == "float64"
    assert set(summary["fits"]) == {"numerical", "bound"}
    assert "bound N_max" in printed
    # h = 0.3, r = 1, rho = 0.15: 1 + rho exp(r (r - rho) / h^2) / (r - rho) = 2231.2.
    assert "at most 2231 patterns" in printed

    # The command is a thin wrapper: the same settings give the same numbers from the library.
    curve = capacity_curve(
        [2, 6],
        [1, 2, 4, 8],
        0.3,
        trials=2,
        seed=0,
        min_patterns=16,
        progress=False,
    )
    assert summary["n_max"] == curve.n_max.tolist()
    assert [float(row["stored_fraction"]) for row in rows] == [
        record["stored_fraction"] for record in curve.rows()
    ]


def test_capacity_default_bandwidth_is_a_third_of_radius(tmp_path):
    out = tmp_path / "capacity"
    status = main(["capacity", *SMALL, "--radius", "2", "--no-progress", "--out", str(out)])
    assert status == 0
    summary = json.loads((out / "capacity.json").read_text())
    assert summary["bandwidth"] == pytest.approx(2 / 3)
    assert summary["ball_radius"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dims", "1"], "--dims"),
        (["--num-patterns", "0"], "--num-patterns"),
        (["--bandwidth", "-1"], "--bandwidth"),
        (["--radius", "nan"], "--radius"),
        (["--ball-radius", "0"], "--ball-radius"),
        (["--delta", "1"], "--delta"),
        (["--trials", "0"], "--trials"),
        (["--min-patterns", "0"], "--min-patterns"),
        (["--seed", "-3"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--bandwidth", "1e-300"], "bandwidth"),
        (["--device", "nonsense"], "device"),
        (["--dims", "two"], "invalid int"),
    ],
)
def test_capacity_rejects_bad_input(tmp_path, capsys, arguments, message):
    out = tmp_path / "x"
    try:
        status = main(["capacity", *arguments, "--no-progress", "--out", str(out)])
    except SystemExit as exit_:
        # argparse rejects a value it cannot convert before the handler runs.
        status = exit_.code
    error = capsys.readouterr().err.strip()

    assert status == 2
    assert len(error.splitlines()) == 1
    assert message in error
    assert not out.exists()


def test_capacity_rejects_file_as_out_before_sweep(tmp_path, capsys, monkeypatch):
    out = tmp_path / "capacity.txt"
    out.write_text("a file, not a folder\n")

    def fail_if_called(*args, **kwargs):
        raise AssertionError("the sweep ran although --out cannot be written")

    monkeypatch.setattr("pyro_am.commands.capacity.capacity_curve", fail_if_called)
    status = main(["capacity", "--dims", "2", "--no-progress", "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert len(error.splitlines()) == 1
    assert "--out must be a folder" in error
