import json
import math

import numpy as np

from pyro_am.benchmarks.clustering import format_table, score_labels, summarize
from pyro_am.cli import main


def test_bench_clustering_tiny_writes_report(tmp_path, capsys):
    out = tmp_path / "clustering.json"
    status = main(
        [
            "bench",
            "clustering",
            "--datasets",
            "iris",
            "--seeds",
            "1",
            "--methods",
            "variational",
            "kmeans",
            "gmm",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "clustering"
    assert "cpu_model" in report["machine"]
    methods = {row["method"] for row in report["summary"]}
    assert methods == {"variational", "kmeans", "gmm"}
    for record in report["records"]:
        # Iris with 3 clusters: every method recovers much of the species structure.
        assert record["ari"] > 0.3
        assert math.isfinite(record["fit_seconds"])
    assert "variational" in capsys.readouterr().out


def test_bench_clustering_rejects_unknown_method(capsys):
    status = main(["bench", "clustering", "--methods", "spectral", "--seeds", "1"])
    assert status == 2
    assert "spectral" in capsys.readouterr().err


def test_score_labels_perfect_clustering():
    data = np.array([[0.0], [0.1], [5.0], [5.1]])
    scores = score_labels(data, np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))
    assert scores["ari"] == 1.0
    assert scores["nmi"] == 1.0
    assert scores["silhouette"] > 0.9


def test_summarize_median_and_iqr():
    records = [
        {
            "dataset": "d",
            "method": "m",
            "ari": value,
            "nmi": 0.0,
            "silhouette": 0.0,
            "fit_seconds": 1.0,
        }
        for value in (0.0, 1.0, 2.0, 3.0, 4.0)
    ]
    (row,) = summarize(records)
    # numpy percentiles with linear interpolation: 25th = 1, 75th = 3.
    assert row["ari"] == {"median": 2.0, "iqr": 2.0}


def test_format_table_labels_time_in_milliseconds():
    row = {"dataset": "d", "method": "m"}
    for metric in ("ari", "nmi", "silhouette"):
        row[metric] = {"median": 0.5, "iqr": 0.1}
    row["fit_seconds"] = {"median": 0.25, "iqr": 0.125}
    header, _, line, footer = format_table([row]).splitlines()
    assert "fit_ms" in header
    assert "fit_seconds" not in header
    assert "250.000 (125.000)" in line
    assert "milliseconds" in footer
