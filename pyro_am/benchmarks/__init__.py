"""Benchmarks run by ``pyro-am bench NAME``; each module exposes ``register(subparsers)``.

Benchmarks measure wall time and memory against peer implementations in one process, print a table
and write JSON. Their results are recorded in docs/benchmarks.md; tests never assert timings.
"""

BENCHMARK_MODULES = (
    "pyro_am.benchmarks.retrieval",
    "pyro_am.benchmarks.clustering",
    "pyro_am.benchmarks.dp",
    "pyro_am.benchmarks.vmf",
    "pyro_am.benchmarks.vmf_attention",
    "pyro_am.benchmarks.streaming",
    "pyro_am.benchmarks.sharded",
    "pyro_am.benchmarks.icl",
)
