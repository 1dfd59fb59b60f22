"""``pyro-am bench retrieval``: streamed fixed-point retrieval vs GEMM rate and a hand-written loop.

Throughput. B queries, N memories of dimension D, a Gaussian KDE energy, and ``steps`` mean-shift
steps with ``tol = 0`` so that every step runs. One step computes the logits ``x M^T`` and the
weighted sum ``softmax(logits) M``, two GEMMs of ``2 B N D`` flops each, and :func:`retrieve`
evaluates the final energies with one more logits GEMM::

    flops = 4 N D * (sum of steps over queries) + 2 B N D

The achieved rate is compared with the rate of ``torch.matmul`` measured in the same process, for
(a) the full shapes (B, D) @ (D, N) and (b) the block shapes that :mod:`pyro_am.streaming` uses,
both of its GEMMs. The same retrieval written by hand (``torch.cdist``, ``softmax`` and ``matmul``
over all memories) is timed next to it and the largest absolute difference of the final states is
reported.

Peak memory. A fresh subprocess, where earlier allocations cannot hide it, allocates a bank of N
memories and then runs retrieval. The growth of the peak resident set size (``ru_maxrss``, or
``torch.cuda.max_memory_allocated`` on CUDA) during retrieval is reported next to the bank's size.
The hand-written loop needs at least one (B, N) array per step; its size is computed, and it is only
measured when three such arrays fit in half of the available memory.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from pyro_am._files import write_json
from pyro_am.energies import GaussianKDEEnergy
from pyro_am.streaming import chunk_sizes

logger = logging.getLogger(__name__)

MIN_TIMING_SECONDS = 0.2


# -- timing helpers ------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function, device: torch.device, repeats: int) -> list[float]:
    """Time ``function()`` ``repeats`` times after one warm-up call; returns seconds per call."""
    function()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure_gemm_rate(
    shapes: list[tuple[tuple[int, int], tuple[int, int]]],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> float:
    """Measure the flop rate of running ``torch.matmul`` once on each pair of shapes in turn.

    Each timing repeats the products enough times to last at least ``MIN_TIMING_SECONDS``, and the
    median over ``repeats`` timings is used. Returns flops per second.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    operands = [
        (
            torch.randn(a, generator=generator, device=device, dtype=dtype),
            torch.randn(b, generator=generator, device=device, dtype=dtype),
        )
        for a, b in shapes
    ]
    flops = sum(2 * a[0] * a[1] * b[1] for a, b in shapes)

    def products():
        for left, right in operands:
            torch.matmul(left, right)

    single = min(time_call(products, device, 1))
    inner = max(1, math.ceil(MIN_TIMING_SECONDS / max(single, 1e-9)))

    def repeated():
        for _ in range(inner):
            products()

    seconds = statistics.median(time_call(repeated, device, repeats)) / inner
    return flops / seconds


# -- the two implementations ---------------------------------------------------------------------
def hand_written_retrieval(
    memories: torch.Tensor, queries: torch.Tensor, bandwidth: float, steps: int
) -> torch.Tensor:
    """Run mean-shift retrieval the direct way, materializing the (B, N) weights every step."""
    x = queries
    for _ in range(steps):
        logits = torch.cdist(x, memories).square_().mul_(-0.5 / bandwidth**2)
        x = torch.softmax(logits, dim=-1) @ memories
    return x


def benchmark_problem(batch, num_memories, dim, device, dtype, seed=0):
    """Build memories ~ N(0, I), queries near random memories, and the bandwidth sqrt(D) / 2.

    Queries are memories plus noise of standard deviation 1/2, so a query is about sqrt(D) / 2 from
    its own memory and sqrt(2.25 D) from the others. With h = sqrt(D) / 2 the logits then differ by
    a few units, the softmax spreads over many memories and no exponential is subnormal, which
    would slow some CPUs down and make the timing depend on the data.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    memories = torch.randn(num_memories, dim, generator=generator, device=device, dtype=dtype)
    index = torch.randint(num_memories, (batch,), generator=generator, device=device)
    noise = torch.randn(batch, dim, generator=generator, device=device, dtype=dtype)
    queries = memories[index] + 0.5 * noise
    return memories, queries, 0.5 * math.sqrt(dim)


def run_throughput(batch, num_memories, dim, steps, repeats, device, dtype=torch.float32, seed=0):
    """Time streamed and hand-written retrieval and the GEMM references; returns a result dict."""
    from pyro_am.dynamics import retrieve

    memories, queries, bandwidth = benchmark_problem(batch, num_memories, dim, device, dtype, seed)
    energy = GaussianKDEEnergy(memories, bandwidth)
    outcome = {}

    def streamed():
        outcome["result"] = retrieve(energy, queries, max_steps=steps, tol=0.0)

    def hand_written():
        outcome["reference"] = hand_written_retrieval(memories, queries, bandwidth, steps)

    streamed_times = time_call(streamed, device, repeats)
    hand_written_times = time_call(hand_written, device, repeats)
    streamed_seconds = statistics.median(streamed_times)
    hand_written_seconds = statistics.median(hand_written_times)
    result = outcome["result"]
    total_steps = int(result.steps.sum())
    flops = 4 * num_memories * dim * total_steps + 2 * batch * num_memories * dim
    achieved = flops / streamed_seconds

    query_chunk, memory_chunk = chunk_sizes(batch, num_memories)
    full_rate = measure_gemm_rate([((batch, dim), (dim, num_memories))], device, dtype, repeats)
    block_rate = measure_gemm_rate(
        [
            ((query_chunk, dim), (dim, memory_chunk)),
            ((query_chunk, memory_chunk), (memory_chunk, dim)),
        ],
        device,
        dtype,
        repeats,
    )
    difference = float((result.states - outcome["reference"]).abs().max())
    return {
        "bandwidth": bandwidth,
        "steps_run": total_steps / batch,
        "flops": flops,
        "streamed_seconds": streamed_seconds,
        "streamed_times": streamed_times,
        "streamed_flops_per_second": achieved,
        "hand_written_seconds": hand_written_seconds,
        "hand_written_times": hand_written_times,
        "hand_written_flops_per_second": 4
        * batch
        * num_memories
        * dim
        * steps
        / hand_written_seconds,
        "speedup_over_hand_written": hand_written_seconds / streamed_seconds,
        "max_abs_difference": difference,
        "gemm_full_shape": [[batch, dim], [dim, num_memories]],
        "gemm_full_flops_per_second": full_rate,
        "ratio_to_full_gemm": achieved / full_rate,
        "gemm_block_shapes": [
            [[query_chunk, dim], [dim, memory_chunk]],
            [[query_chunk, memory_chunk], [memory_chunk, dim]],
        ],
        "gemm_block_flops_per_second": block_rate,
        "ratio_to_block_gemm": achieved / block_rate,
    }


# -- peak memory in a subprocess -----------------------------------------------------------------
def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _start_peak_window(device: torch.device) -> tuple[int, str]:
    """Reset the peak-memory counter if possible; return the baseline and how peaks are read.

    On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the resident high-water mark
    (VmHWM) to the current resident size, so import-time spikes before the retrieval cannot hide
    its growth. Elsewhere the baseline is the peak so far (``ru_maxrss``), which can only
    underestimate the growth.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        resident = _proc_status_bytes("VmRSS")
        if resident is not None:
            return resident, "VmHWM after clear_refs"
    except OSError:
        pass
    return _peak_bytes(device, "ru_maxrss"), "ru_maxrss"


def _peak_bytes(device: torch.device, method: str) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if method == "VmHWM after clear_refs":
        return _proc_status_bytes("VmHWM")
    # ru_maxrss is in kibibytes on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory_child(config: dict) -> dict:
    """Allocate the memory bank, run one retrieval, and return the peak-memory growth during it.

    Runs inside the subprocess started by :func:`measure_peak_memory`.
    """
    from pyro_am.dynamics import retrieve

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    memories, queries, bandwidth = benchmark_problem(
        config["batch"], config["num_memories"], config["dim"], device, torch.float32
    )
    _synchronize(device)
    before, method = _start_peak_window(device)
    start = time.perf_counter()
    if config["implementation"] == "streamed":
        energy = GaussianKDEEnergy(memories, bandwidth)
        states = retrieve(energy, queries, max_steps=config["steps"], tol=0.0).states
    else:
        states = hand_written_retrieval(memories, queries, bandwidth, config["steps"])
    _synchronize(device)
    seconds = time.perf_counter() - start
    after = _peak_bytes(device, method)
    return {
        "peak_method": method,
        "peak_before_bytes": before,
        "peak_after_bytes": after,
        "peak_growth_bytes": max(0, after - before),
        "seconds": seconds,
        "finite": bool(torch.isfinite(states).all()),
    }


def _run_child(config: dict) -> dict:
    code = (
        "import json, sys\n"
        "from pyro_am.benchmarks.retrieval import peak_memory_child\n"
        "print(json.dumps(peak_memory_child(json.loads(sys.argv[1]))))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"peak-memory subprocess ({config['implementation']}) failed with exit status "
            f"{completed.returncode}: {tail[0]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_peak_memory(batch, num_memories, dim, steps, device, threads=None) -> dict:
    """Measure peak-memory growth of streamed retrieval (and, if it fits, the hand-written loop)."""
    config = {
        "batch": batch,
        "num_memories": num_memories,
        "dim": dim,
        "steps": steps,
        "device": str(device),
        "threads": threads,
    }
    itemsize = torch.finfo(torch.float32).bits // 8
    weights_bytes = batch * num_memories * itemsize
    streamed = _run_child({**config, "implementation": "streamed"})
    report = {
        "batch": batch,
        "num_memories": num_memories,
        "dim": dim,
        "steps": steps,
        "bank_bytes": num_memories * dim * itemsize,
        "streamed": streamed,
        "hand_written_weights_bytes": weights_bytes,
        "hand_written": None,
        "hand_written_status": "computed, not run",
    }
    available = _available_memory_bytes(device)
    if available is not None and 3 * weights_bytes < available // 2:
        report["hand_written"] = _run_child({**config, "implementation": "hand_written"})
        report["hand_written_status"] = "measured"
    return report


# -- report --------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    """Describe the machine: CPU model, core count, torch version, threads, GPU and date."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _gib(value: float) -> str:
    return f"{value / 2**30:.3f} GiB"


def format_report(report: dict) -> str:
    """Format the benchmark report as a plain-text table."""
    config = report["config"]
    lines = [
        f"pyro-am bench retrieval on {report['machine']['device']} "
        f"({report['machine']['torch_threads']} threads), float32"
    ]
    throughput = report["throughput"]
    if throughput is not None:
        lines.append(
            f"fixed-point retrieval, KDE, B={config['batch']} N={config['num_memories']} "
            f"D={config['dim']} steps={config['steps']}"
        )
        rows = [
            (
                "streamed retrieve()",
                throughput["streamed_seconds"],
                throughput["streamed_flops_per_second"],
            ),
            (
                "hand-written cdist+softmax+matmul",
                throughput["hand_written_seconds"],
                throughput["hand_written_flops_per_second"],
            ),
        ]
        lines.append(f"{'implementation':<36} {'seconds':>9} {'GFLOP/s':>9}")
        for name, seconds, rate in rows:
            lines.append(f"{name:<36} {seconds:>9.4f} {rate / 1e9:>9.2f}")
        lines += [
            f"GEMM rate, full shape {throughput['gemm_full_shape']}: "
            f"{throughput['gemm_full_flops_per_second'] / 1e9:.2f} GFLOP/s, "
            f"ratio {throughput['ratio_to_full_gemm']:.3f}",
            f"GEMM rate, block shapes {throughput['gemm_block_shapes']}: "
            f"{throughput['gemm_block_flops_per_second'] / 1e9:.2f} GFLOP/s, "
            f"ratio {throughput['ratio_to_block_gemm']:.3f}",
            f"speedup over hand-written: {throughput['speedup_over_hand_written']:.2f}x, "
            f"max abs difference {throughput['max_abs_difference']:.3g}",
        ]
    memory = report["peak_memory"]
    if memory is not None:
        lines.append(
            f"peak memory, B={memory['batch']} N={memory['num_memories']} D={memory['dim']} "
            f"steps={memory['steps']}: bank {_gib(memory['bank_bytes'])}, streamed growth "
            f"{_gib(memory['streamed']['peak_growth_bytes'])}"
        )
        hand_written = memory["hand_written"]
        measured = (
            f", measured growth {_gib(hand_written['peak_growth_bytes'])}"
            if hand_written is not None
            else ""
        )
        lines.append(
            f"hand-written (B, N) weights: {_gib(memory['hand_written_weights_bytes'])} per array "
            f"({memory['hand_written_status']}{measured})"
        )
    return "\n".join(lines)


def run(args) -> int:
    from pyro_am.cli import UsageError
    from pyro_am.commands.retrieve import resolve_device

    device = resolve_device(args.device)
    for name in (
        "batch",
        "num_memories",
        "dim",
        "steps",
        "repeats",
        "memory_batch",
        "memory_num_memories",
        "memory_dim",
        "memory_steps",
    ):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, but got {value}.")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, but got {args.threads}.")
        torch.set_num_threads(args.threads)

    report = {
        "benchmark": "retrieval",
        "machine": machine_info(device),
        "config": {
            "batch": args.batch,
            "num_memories": args.num_memories,
            "dim": args.dim,
            "steps": args.steps,
            "repeats": args.repeats,
            "dtype": "float32",
            "energy": "GaussianKDEEnergy",
            "method": "fixed_point",
            "tol": 0.0,
        },
        "throughput": None,
        "peak_memory": None,
    }
    if not args.skip_throughput:
        logger.info("timing throughput")
        report["throughput"] = run_throughput(
            args.batch, args.num_memories, args.dim, args.steps, args.repeats, device
        )
    if not args.skip_memory:
        logger.info("measuring peak memory in a subprocess")
        report["peak_memory"] = measure_peak_memory(
            args.memory_batch,
            args.memory_num_memories,
            args.memory_dim,
            args.memory_steps,
            device,
            threads=args.threads,
        )
    print(format_report(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "retrieval",
        help="streamed fixed-point retrieval vs GEMM rate and a hand-written loop",
        description=(
            "Time fixed-point retrieval of B queries against N memories in D dimensions, compare "
            "its flop rate with torch.matmul and its speed with a hand-written cdist + softmax + "
            "matmul loop, and measure peak memory for a large memory bank."
        ),
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--batch", type=int, default=4096, help="queries B (default: 4096)")
    parser.add_argument(
        "--num-memories", type=int, default=16384, help="memories N (default: 16384)"
    )
    parser.add_argument("--dim", type=int, default=256, help="dimension D (default: 256)")
    parser.add_argument("--steps", type=int, default=10, help="fixed-point steps (default: 10)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repeats, of which the median is used (default: %(default)s)",
    )
    parser.add_argument(
        "--memory-batch",
        type=int,
        default=1024,
        help="queries for the peak-memory run (default: %(default)s)",
    )
    parser.add_argument(
        "--memory-num-memories",
        type=int,
        default=1_000_000,
        help="memories for the peak-memory run (default: 1000000)",
    )
    parser.add_argument(
        "--memory-dim",
        type=int,
        default=64,
        help="dimension for the peak-memory run (default: %(default)s)",
    )
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=2,
        help="steps of the peak-memory run; every step allocates the same blocks (default: 2)",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="skip the timing part")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory part")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", metavar="JSON", help="write the report to this JSON file")
    parser.set_defaults(handler=run)
