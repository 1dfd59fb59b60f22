import json
import math

import torch

from pyro_am.benchmarks.retrieval import hand_written_retrieval, measure_gemm_rate
from pyro_am.cli import main
from pyro_am.dynamics import retrieve
from pyro_am.energies import GaussianKDEEnergy


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_retrieval_tiny_writes_report(tmp_path, capsys, device):
    out = tmp_path / "bench.json"
    status = main(
        [
            "bench",
            "retrieval",
            "--device",
            str(device),
            "--batch",
            "32",
            "--num-memories",
            "512",
            "--dim",
            "16",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--memory-batch",
            "64",
            "--memory-num-memories",
            "20000",
            "--memory-dim",
            "8",
            "--memory-steps",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    assert "GFLOP/s" in capsys.readouterr().out
    with open(out, encoding="utf-8") as handle:
        report = json.load(handle)

    assert set(report) >= {"benchmark", "machine", "config", "throughput", "peak_memory"}
    for key in ("cpu_model", "torch", "torch_threads", "date", "device"):
        assert report["machine"][key], key
    assert report["machine"]["torch_threads"] == 1
    assert report["config"]["batch"] == 32

    throughput = report["throughput"]
    for key in (
        "streamed_seconds",
        "streamed_flops_per_second",
        "hand_written_seconds",
        "hand_written_flops_per_second",
        "speedup_over_hand_written",
        "gemm_full_flops_per_second",
        "ratio_to_full_gemm",
        "gemm_block_flops_per_second",
        "ratio_to_block_gemm",
        "flops",
    ):
        assert _positive_finite(throughput[key]), (key, throughput[key])
    assert len(throughput["streamed_times"]) == 1
    assert len(throughput["hand_written_times"]) == 1
    # tol = 0 and a softmax spread over many memories: every query runs every step.
    assert throughput["steps_run"] == 3
    assert throughput["flops"] == 4 * 512 * 16 * 3 * 32 + 2 * 32 * 512 * 16
    # Both sides compute the same float32 mean-shift; 3 steps of rounding stay near 1e-6.
    assert 0 <= throughput["max_abs_difference"] < 1e-4

    memory = report["peak_memory"]
    assert memory["bank_bytes"] == 20000 * 8 * 4
    assert memory["hand_written_weights_bytes"] == 64 * 20000 * 4
    for part in ("streamed", "hand_written"):
        assert memory[part]["finite"]
        assert memory[part]["peak_method"] in ("VmHWM after clear_refs", "ru_maxrss")
        assert _positive_finite(memory[part]["peak_after_bytes"])
        # Growth can be 0 if the retrieval stays under the peak reached while importing torch.
        assert memory[part]["peak_growth_bytes"] >= 0
    assert memory["hand_written_status"] == "measured"


def test_hand_written_retrieval_matches_streamed(device):
    # Reference for the benchmark's comparison: both are the KDE mean-shift map; float64 leaves
    # only rounding (~1e-14) between the GEMM-form and cdist distances.
    generator = torch.Generator(device=device).manual_seed(0)
    memories = torch.randn(200, 5, generator=generator, device=device, dtype=torch.float64)
    queries = torch.randn(7, 5, generator=generator, device=device, dtype=torch.float64)
    energy = GaussianKDEEnergy(memories, 0.8)
    streamed = retrieve(energy, queries, max_steps=4, tol=0.0).states
    direct = hand_written_retrieval(memories, queries, 0.8, 4)
    torch.testing.assert_close(streamed, direct, atol=1e-10, rtol=0)


def test_measure_gemm_rate_positive(device):
    rate = measure_gemm_rate([((16, 8), (8, 32))], device, torch.float32, repeats=1)
    assert _positive_finite(rate)


def test_bench_retrieval_rejects_zero_batch(capsys):
    assert main(["bench", "retrieval", "--batch", "0", "--skip-memory"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
