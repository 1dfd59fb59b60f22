"""``pyro-am capacity``: measure how many random patterns a Gaussian KDE stores on a sphere.

For each dimension D and each N of a grid, ``--trials`` sets of N patterns are drawn uniformly on
the sphere of radius r, and :func:`pyro_am.capacity.stored_patterns` decides which are stored by
the mean-shift map at bandwidth h. The output is the stored fraction against N, N_max(D) (the
largest N with a mean stored fraction of at least ``1 - delta``), the analytic bound's prediction
(:func:`pyro_am.capacity.capacity_lower_bound`) and the fits ``log N_max = a + b D``.

Files written to ``--out``: ``capacity.png`` (curves), ``capacity.csv`` (one row per D and N) and
``capacity.json`` (settings, N_max, fits and the same rows). The default bandwidth is ``r / 3``.
With it the default grid measured N_max = 128 at D = 32, so the sweep stays small while the curves
still show both the growth in D and the crowding limit at small D.
"""

from __future__ import annotations

import csv
import json
import math
import os

import torch

from pyro_am.capacity import CapacityCurve, capacity_curve, high_dimensional_ceiling
from pyro_am.cli import UsageError
from pyro_am.commands.retrieve import resolve_device

DEFAULT_DIMS = (2, 4, 8, 16, 32)
DEFAULT_NUM_PATTERNS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DTYPES = {"float64": torch.float64, "float32": torch.float32}
CSV_FIELDS = (
    "dim",
    "num_patterns",
    "draws",
    "stored_fraction",
    "stored_fraction_se",
    "bound_fraction",
)


# -- I/O -----------------------------------------------------------------------------------------
def _replace_atomically(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_outputs(out_dir: str, curve: CapacityCurve, settings: dict) -> dict[str, str]:
    """Write ``capacity.png``, ``capacity.csv`` and ``capacity.json`` to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        name: os.path.join(out_dir, f"capacity.{suffix}")
        for name, suffix in (("figure", "png"), ("table", "csv"), ("summary", "json"))
    }
    curve.plot(paths["figure"])

    def write_table(handle):
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(curve.rows())

    def write_summary(handle):
        json.dump({"settings": settings, **curve.to_dict()}, handle, indent=2)
        handle.write("\n")

    _replace_atomically(paths["table"], write_table)
    _replace_atomically(paths["summary"], write_summary)
    return paths


def format_summary(curve: CapacityCurve) -> str:
    """Format N_max per dimension and the two fitted slopes as a small table."""
    lines = [f"{'D':>4} {'N_max':>8} {'bound N_max':>12}"]
    for dim, value, censored, bound in zip(
        curve.dims, curve.n_max, curve.censored, curve.bound_n_max, strict=True
    ):
        marker = "+" if censored else " "
        lines.append(f"{dim:>4} {value:>7d}{marker} {bound:>12d}")
    for name, (a, b) in curve.fits.items():
        lines.append(f"fit log N_max = a + b D ({name}): a = {a:.3f}, b = {b:.4f}")
    ceiling = high_dimensional_ceiling(curve.bandwidth, curve.radius, curve.ball_radius)
    lines.append(f"as D -> inf, at most {ceiling:.4g} patterns can be stored (whatever the draw)")
    if bool(curve.censored.any()):
        lines.append(
            "+ : every N of the grid passed, so N_max may be larger; extend --num-patterns"
        )
    return "\n".join(lines)


# -- command -------------------------------------------------------------------------------------
def _check_arguments(args) -> None:
    if any(dim < 2 for dim in args.dims):
        raise UsageError(f"--dims must be integers >= 2, but got {args.dims}.")
    if any(count < 1 for count in args.num_patterns):
        raise UsageError(f"--num-patterns must be positive integers, but got {args.num_patterns}.")
    for name in ("radius", "bandwidth", "ball_radius"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be a positive number, but got {value}.")
    if not (0.0 < args.delta < 1.0):
        raise UsageError(f"--delta must be in (0, 1), but got {args.delta}.")
    for name in ("trials", "min_patterns", "num_perturbations", "max_steps"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be a positive integer, but got {getattr(args, name)}.")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be an integer in [0, 2**63), but got {args.seed}.")
    # Checked before the sweep, which can take minutes, rather than when the outputs are written.
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out must be a folder, but {args.out!r} is a file.")


def run(args) -> int:
    """Run the capacity sweep for the parsed command line and write its outputs."""
    _check_arguments(args)
    device = resolve_device(args.device)
    bandwidth = args.bandwidth if args.bandwidth is not None else args.radius / 3.0
    curve = capacity_curve(
        args.dims,
        args.num_patterns,
        bandwidth,
        args.radius,
        trials=args.trials,
        seed=args.seed,
        delta=args.delta,
        ball_radius=args.ball_radius,
        min_patterns=args.min_patterns,
        num_perturbations=args.num_perturbations,
        max_steps=args.max_steps,
        dtype=DTYPES[args.dtype],
        device=device,
        progress=not args.no_progress,
    )
    settings = {
        "num_perturbations": args.num_perturbations,
        "max_steps": args.max_steps,
        "dtype": args.dtype,
        "device": str(device),
    }
    paths = write_outputs(args.out, curve, settings)
    print(
        f"capacity on the sphere: r = {curve.radius:g}, h = {curve.bandwidth:.4g}, "
        f"rho = {curve.ball_radius:.4g}, delta = {curve.delta:g}, at least {curve.trials} draws "
        f"and {curve.min_patterns} patterns per (D, N)"
    )
    print(format_summary(curve))
    print(f"wrote {paths['figure']}, {paths['table']} and {paths['summary']}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "capacity",
        help="measure the memory capacity of a Gaussian KDE on the sphere",
        description=(
            "Draw random patterns on a sphere, decide which ones the KDE mean-shift map stores, "
            "and compare N_max(D) with the analytic contraction bound."
        ),
    )
    parser.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=list(DEFAULT_DIMS),
        help="dimensions D, each >= 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--num-patterns",
        type=int,
        nargs="+",
        default=list(DEFAULT_NUM_PATTERNS),
        help="grid of pattern counts N (default: %(default)s)",
    )
    parser.add_argument(
        "--bandwidth",
        type=float,
        help="kernel bandwidth h, in the units of --radius (default: radius / 3)",
    )
    parser.add_argument(
        "--radius", type=float, default=1.0, help="radius r of the sphere (default: %(default)s)"
    )
    parser.add_argument(
        "--ball-radius",
        type=float,
        help="radius rho of the ball each stored pattern's map must keep (default: bandwidth / 2)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=4,
        help="minimum number of random pattern sets per D and N (default: %(default)s)",
    )
    parser.add_argument(
        "--min-patterns",
        type=int,
        default=200,
        help="draw sets until at least this many patterns are judged per D and N "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=0.05,
        help="N_max is the largest N with a mean stored fraction >= 1 - delta "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--num-perturbations",
        type=int,
        default=4,
        help="random starts on each ball's boundary (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=500,
        help="mean-shift steps per start; unconverged starts count as not stored "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float64", help="floating dtype of the patterns"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random patterns (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(".", "pyro-am-out", "capacity"),
        help="output folder for capacity.png, .csv and .json (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)
