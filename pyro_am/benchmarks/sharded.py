"""``pyro-am bench sharded``: retrieval over a memory bank split across 1 and 2 processes.

Bank. ``num_memories`` rows drawn from N(0, I) in ``R^D``, generated in chunks of 65,536 rows
from seeds that depend only on the chunk, so each rank generates exactly its own block of the
same bank. Queries are the first ``num_queries`` memories plus N(0, ``noise``^2 I).

Run. For each process count P, :func:`pyro_am.distributed.launch_local` starts P gloo processes
on 127.0.0.1, one intra-op thread each, and each rank holds a contiguous block of the bank in a
:class:`~pyro_am.sharded.ShardedMemoryBank`. After one untimed step, the ranks meet at a barrier
and run ``steps`` fixed-point steps of Gaussian KDE retrieval (``tol = 0``, so every query takes
every step). A step costs one all-gather of ``B x (D + 2)`` numbers per rank. The time of a run
is the slowest rank's, and the report gives the median over ``repeats`` runs.

Reported per P: seconds, query steps per second, memory-query pairs per second
(``N B steps / seconds``), the scaling efficiency ``T_1 / (P T_P)``, and the largest difference
between the retrieved states and those of P = 1. The CPU seconds are the processor time summed
over the ranks (``time.process_time``), and the CPU efficiency ``C_1 / C_P`` is the share of the
work that is not overhead of splitting. Processor time does not count the time a process waits
for a core, so it stays meaningful when other jobs share the machine, where wall time does not.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import torch

from pyro_am import distributed

_CHUNK_ROWS = 1 << 16


def bank_rows(start: int, stop: int, dim: int, seed: int) -> torch.Tensor:
    """Return rows ``[start, stop)`` of the benchmark bank as a float32 tensor."""
    parts = []
    for chunk in range(start // _CHUNK_ROWS, (stop - 1) // _CHUNK_ROWS + 1):
        rows = np.random.default_rng([seed, chunk]).standard_normal((_CHUNK_ROWS, dim))
        low = max(start - chunk * _CHUNK_ROWS, 0)
        high = min(stop - chunk * _CHUNK_ROWS, _CHUNK_ROWS)
        parts.append(rows[low:high].astype(np.float32))
    return torch.from_numpy(np.concatenate(parts))


def _queries(config) -> torch.Tensor:
    memories = bank_rows(0, config["num_queries"], config["dim"], config["seed"])
    noise = np.random.default_rng([config["seed"], 1 << 40]).standard_normal(memories.shape)
    return memories + config["noise"] * torch.from_numpy(noise.astype(np.float32))


def _retrieval_worker(rank, world_size, config):
    from pyro_am.dynamics import retrieve
    from pyro_am.sharded import ShardedMemoryBank

    start, stop = distributed.shard_bounds(config["num_memories"], rank, world_size)
    bank = ShardedMemoryBank(bank_rows(start, stop, config["dim"], config["seed"]))
    energy = bank.energy("kde", bandwidth=config["bandwidth"])
    queries = _queries(config)
    energy.fixed_point(queries)
    seconds, cpu_seconds = [], []
    result = None
    for _ in range(config["repeats"]):
        distributed.barrier()
        begin, cpu_begin = time.perf_counter(), time.process_time()
        result = retrieve(energy, queries, method="fixed_point", max_steps=config["steps"], tol=0.0)
        elapsed = time.perf_counter() - begin
        cpu = time.process_time() - cpu_begin
        seconds.append(max(distributed.all_gather_object(elapsed)))
        cpu_seconds.append(sum(distributed.all_gather_object(cpu)))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "states": result.states,
        "steps": result.steps,
    }


def run_benchmark(config: dict) -> dict:
    """Run the retrieval with 1 and 2 processes; returns the report dict."""
    from pyro_am.benchmarks.retrieval import machine_info

    rows = []
    reference = None
    for world_size in config["process_counts"]:
        results = distributed.launch_local(_retrieval_worker, world_size, args=(config,))
        seconds = statistics.median(results[0]["seconds"])
        cpu_seconds = statistics.median(results[0]["cpu_seconds"])
        states = results[0]["states"]
        if reference is None:
            reference = (seconds, states, cpu_seconds)
        work = config["num_queries"] * config["steps"]
        rows.append(
            {
                "processes": world_size,
                "seconds": seconds,
                "all_seconds": results[0]["seconds"],
                "query_steps_per_second": work / seconds,
                "pairs_per_second": config["num_memories"] * work / seconds,
                "efficiency": reference[0] / (world_size * seconds),
                "cpu_seconds": cpu_seconds,
                "all_cpu_seconds": results[0]["cpu_seconds"],
                "cpu_efficiency": reference[2] / cpu_seconds,
                "max_state_difference": float((states - reference[1]).abs().max()),
            }
        )
    return {
        "benchmark": "sharded",
        "config": config,
        "machine": machine_info(torch.device("cpu")),
        "rows": rows,
    }


def format_report(report: dict) -> str:
    """Format the report as a plain-text table."""
    config = report["config"]
    lines = [
        f"KDE fixed-point retrieval: {config['num_memories']:,} memories, D = {config['dim']}, "
        f"{config['num_queries']} queries, {config['steps']} steps, gloo on 127.0.0.1, "
        "1 thread per process",
        f"  {'P':>2} {'seconds':>9} {'query steps/s':>14} {'pairs/s':>10} {'efficiency':>10} "
        f"{'CPU s':>8} {'CPU eff.':>8} {'max |diff|':>10}",
    ]
    for row in report["rows"]:
        lines.append(
            f"  {row['processes']:>2} {row['seconds']:>9.3f} "
            f"{row['query_steps_per_second']:>14.1f} {row['pairs_per_second']:>10.3g} "
            f"{row['efficiency']:>10.2f} {row['cpu_seconds']:>8.2f} "
            f"{row['cpu_efficiency']:>8.2f} {row['max_state_difference']:>10.2g}"
        )
    return "\n".join(lines)


def _check(args) -> None:
    from pyro_am.cli import UsageError

    for name in ("num_memories", "dim", "num_queries", "steps", "repeats"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, but got {value}.")
    if args.num_memories < 2:
        raise UsageError(f"--num-memories must be at least 2, but got {args.num_memories}.")
    if args.num_queries > args.num_memories:
        raise UsageError(
            f"--num-queries must be at most --num-memories ({args.num_memories}), but got "
            f"{args.num_queries}."
        )
    if not args.bandwidth > 0:
        raise UsageError(f"--bandwidth must be positive, but got {args.bandwidth}.")
    if not args.noise >= 0:
        raise UsageError(f"--noise must be non-negative, but got {args.noise}.")


def run(args) -> int:
    _check(args)
    config = {
        "num_memories": args.num_memories,
        "dim": args.dim,
        "num_queries": args.num_queries,
        "steps": args.steps,
        "bandwidth": args.bandwidth,
        "noise": args.noise,
        "repeats": args.repeats,
        "seed": args.seed,
        "process_counts": [1, 2],
    }
    report = run_benchmark(config)
    print(format_report(report))
    if args.out:
        directory = os.path.dirname(args.out)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temporary = f"{args.out}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, args.out)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sharded",
        help="KDE retrieval over a memory bank split across 1 and 2 gloo processes",
        description=(
            "Split a memory bank across 1 and 2 processes on this machine (gloo on 127.0.0.1), "
            "run fixed-point KDE retrieval, and report throughput and scaling efficiency."
        ),
    )
    parser.add_argument("--num-memories", type=int, default=1_000_000, help="memories N")
    parser.add_argument("--dim", type=int, default=64, help="dimension D")
    parser.add_argument("--num-queries", type=int, default=256, help="queries B")
    parser.add_argument("--steps", type=int, default=10, help="fixed-point steps per run")
    parser.add_argument("--bandwidth", type=float, default=4.0, help="KDE bandwidth h")
    parser.add_argument(
        "--noise", type=float, default=0.5, help="standard deviation of the query noise"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bank and the queries")
    parser.add_argument("--out", metavar="JSON", help="write the report to this JSON file")
    parser.set_defaults(handler=run)
