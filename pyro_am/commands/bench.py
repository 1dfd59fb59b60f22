"""``pyro-am bench NAME``: run one of the benchmarks in :mod:`pyro_am.benchmarks`."""

from __future__ import annotations

import importlib

from pyro_am.benchmarks import BENCHMARK_MODULES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure speed and memory against peer implementations",
        description="Run a benchmark; results are printed and written as JSON.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="NAME", parser_class=type(parser))
    benchmarks.required = True
    for name in BENCHMARK_MODULES:
        importlib.import_module(name).register(benchmarks)
