"""``pyro-am bench streaming``: a DP memory fitted by streaming SVI to data read from disk.

Data. ``num_blobs`` Gaussian blobs in ``R^D``: centres ~ N(0, 3^2 I), points = centre + N(0, I),
equal blob probabilities. ``num_data`` training points are written as one float32 ``.npy`` file
(10 million points of dimension 16 take 640 MB) in ``--data-dir``, or in a temporary folder that
is removed afterwards. They are written in chunks with plain file writes, so generating them
never keeps the whole array in memory. ``num_held_out`` further points from the same blobs are
kept in memory.

Fits. :meth:`DPMemory.fit_stream` reads the file through a memory map in batches of
``batch_size`` rows (in a shuffled block order) for ``num_epochs`` passes, after a k-means
initialization on ``init_size`` rows of the first batch. The reference is
:meth:`DPMemory.fit` (full-batch CAVI) on ``subsample`` rows drawn uniformly from the file. Both
fits use the same prior, truncation and seed.

Reported: the streaming fit's wall time and throughput (points per second over all epochs), the
process's peak resident memory after the streaming fit (``ru_maxrss``, which includes the pages
of the memory-mapped file that are resident, and the interpreter, PyTorch and the held-out set),
the held-out log likelihood per point and adjusted Rand index of both fits, and their numbers of
memories.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import tempfile
import time

import numpy as np
import torch

from pyro_am._files import write_json

logger = logging.getLogger(__name__)

CENTRE_SCALE = 3.0
_CHUNK_ROWS = 1 << 20
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _centres(num_blobs, dim, seed):
    return CENTRE_SCALE * np.random.default_rng([seed, 0]).standard_normal((num_blobs, dim))


def _draw(centres, num_points, generator):
    labels = generator.integers(len(centres), size=num_points)
    points = centres[labels] + generator.standard_normal((num_points, centres.shape[1]))
    return points.astype(np.float32), labels


def write_blobs(path, num_data, dim, num_blobs, seed=0) -> None:
    """Write ``num_data`` blob points as a float32 ``.npy`` file, one chunk of rows at a time."""
    centres = _centres(num_blobs, dim, seed)
    generator = np.random.default_rng([seed, 1])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32))}
    header.update({"fortran_order": False, "shape": (num_data, dim)})
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        for start in range(0, num_data, _CHUNK_ROWS):
            rows, _ = _draw(centres, min(_CHUNK_ROWS, num_data - start), generator)
            handle.write(rows.tobytes())
    os.replace(temporary, path)


def held_out_blobs(num_held_out, dim, num_blobs, seed=0):
    """Draw the held-out points and their blob labels from the training blobs."""
    return _draw(_centres(num_blobs, dim, seed), num_held_out, np.random.default_rng([seed, 2]))


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory(config):
    from pyro_am.models import DPMemory

    return DPMemory(
        config["dim"],
        truncation=config["truncation"],
        prior_scale=CENTRE_SCALE,
        max_truncation=max(config["truncation"], 200),
    )


def _score(model, held_out, labels, dtype) -> dict:
    from sklearn.metrics import adjusted_rand_score

    x = torch.as_tensor(held_out, dtype=dtype)
    with torch.no_grad():
        log_likelihood = float(model.log_predictive(x).mean())
        assignments = model.assign(x).argmax(-1).numpy()
    weights = model.weights.detach().numpy()
    return {
        "held_out_log_likelihood": log_likelihood,
        "ari": float(adjusted_rand_score(labels, assignments)),
        "num_memories": int((weights > 0.01).sum()),
        "truncation": int(model.num_memories),
    }


def run_benchmark(config: dict, data_dir: str) -> dict:
    """Write the data, run both fits and return the report dict."""
    from pyro_am.benchmarks.retrieval import machine_info

    dtype = DTYPES[config["dtype"]]
    path = os.path.join(data_dir, f"blobs-{config['num_data']}x{config['dim']}.npy")
    start = time.perf_counter()
    write_blobs(path, config["num_data"], config["dim"], config["num_blobs"], config["seed"])
    write_seconds = time.perf_counter() - start
    held_out, labels = held_out_blobs(
        config["num_held_out"], config["dim"], config["num_blobs"], config["seed"]
    )

    stream = _memory(config)
    result = stream.fit_stream(
        path,
        batch_size=config["batch_size"],
        num_epochs=config["num_epochs"],
        seed=config["seed"],
        init_size=config["init_size"],
        dtype=dtype,
        progress=False,
    )
    peak = peak_rss_bytes()
    streamed = {
        "seconds": result.wall_time,
        "points_per_second": config["num_data"] * config["num_epochs"] / result.wall_time,
        "steps": result.iterations,
        "num_created": result.num_created,
        "num_pruned": result.num_pruned,
        "num_merged": result.num_merged,
        "peak_rss_bytes": peak,
        **_score(stream, held_out, labels, dtype),
    }

    array = np.load(path, mmap_mode="r")
    size = min(config["subsample"], config["num_data"])
    rows = np.sort(np.random.default_rng([config["seed"], 3]).choice(len(array), size, False))
    subsample = torch.as_tensor(np.asarray(array[rows]), dtype=dtype)
    del array
    reference = _memory(config)
    reference_result = reference.fit(subsample, seed=config["seed"], progress=False)
    full_batch = {
        "seconds": reference_result.wall_time,
        "iterations": reference_result.iterations,
        **_score(reference, held_out, labels, dtype),
    }
    return {
        "benchmark": "streaming",
        "config": config,
        "machine": machine_info(torch.device("cpu")),
        "data_file_bytes": os.path.getsize(path),
        "write_seconds": write_seconds,
        "streaming": streamed,
        "full_batch_subsample": full_batch,
    }


def format_report(report: dict) -> str:
    """Format the report as plain text."""
    config, streamed, full = report["config"], report["streaming"], report["full_batch_subsample"]
    gib = streamed["peak_rss_bytes"] / 2**30
    return "\n".join(
        [
            f"{config['num_data']:,} points, D = {config['dim']}, {config['num_blobs']} blobs, "
            f"file {report['data_file_bytes'] / 2**20:.0f} MiB, batches of "
            f"{config['batch_size']:,}, {config['num_epochs']} epoch(s), fit in {config['dtype']}",
            f"streaming SVI: {streamed['seconds']:.1f} s, "
            f"{streamed['points_per_second']:,.0f} points/s, {streamed['steps']} steps, "
            f"peak RSS {gib:.2f} GiB",
            f"  memories {streamed['num_memories']} (created {streamed['num_created']}, pruned "
            f"{streamed['num_pruned']}, merged {streamed['num_merged']}), held-out log "
            f"likelihood {streamed['held_out_log_likelihood']:.4f}, ARI {streamed['ari']:.3f}",
            f"full-batch CAVI on {min(config['subsample'], config['num_data']):,} points: "
            f"{full['seconds']:.1f} s, {full['iterations']} iterations, memories "
            f"{full['num_memories']}, held-out log likelihood "
            f"{full['held_out_log_likelihood']:.4f}, ARI {full['ari']:.3f}",
        ]
    )


def _check(args) -> None:
    from pyro_am.cli import UsageError

    names = ("num_data", "dim", "num_blobs", "batch_size", "num_epochs", "truncation")
    for name in (*names, "subsample", "num_held_out", "init_size"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, but got {value}.")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir!r} is not an existing folder.")


def run(args) -> int:
    _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = {
        name: getattr(args, name)
        for name in (
            "num_data", "dim", "num_blobs", "batch_size", "num_epochs", "truncation",
            "subsample", "num_held_out", "init_size", "dtype", "seed",
        )
    }  # fmt: skip
    if args.data_dir is None:
        with tempfile.TemporaryDirectory(prefix="pyro_am_stream_") as data_dir:
            report = run_benchmark(config, data_dir)
    else:
        report = run_benchmark(config, args.data_dir)
    print(format_report(report))
    if not math.isfinite(report["streaming"]["held_out_log_likelihood"]):
        logger.warning("the streamed fit's held-out log likelihood is not finite")
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "streaming",
        help="DP memory fitted by streaming SVI to blobs on disk vs full-batch CAVI",
        description=(
            "Write Gaussian blobs to a float32 .npy file, fit a DP memory by streaming SVI over "
            "a memory map of it, and report throughput, peak memory and held-out log "
            "likelihood against full-batch CAVI on a subsample."
        ),
    )
    parser.add_argument("--num-data", type=int, default=10_000_000, help="points on disk")
    parser.add_argument("--dim", type=int, default=16, help="dimension D")
    parser.add_argument("--num-blobs", type=int, default=10, help="number of Gaussian blobs")
    parser.add_argument("--batch-size", type=int, default=100_000, help="rows per batch")
    parser.add_argument("--num-epochs", type=int, default=1, help="passes over the file")
    parser.add_argument("--truncation", type=int, default=20, help="initial truncation K")
    parser.add_argument(
        "--subsample", type=int, default=200_000, help="points of the full-batch reference fit"
    )
    parser.add_argument("--num-held-out", type=int, default=100_000, help="held-out points")
    parser.add_argument(
        "--init-size",
        type=int,
        default=20_000,
        help="rows of the first batch that seed the streaming fit's k-means initialization",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float64",
        help="dtype of the fits; the file is float32 (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        help="existing folder for the .npy file, which is kept (default: a temporary folder, "
        "removed afterwards)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the fits")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", metavar="JSON", help="write the report to this JSON file")
    parser.set_defaults(handler=run)
