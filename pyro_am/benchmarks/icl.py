"""``pyro-am bench icl``: contrastive-divergence training throughput of in-context energies.

For each device, an :class:`~pyro_am.models.InContextEnergy` of the chosen preset (see
``pyro-am icl train --preset``) is trained by :func:`~pyro_am.models.icl_training.
train_in_context_energy` on 2-D Gaussian mixtures. One call of ``--steps`` optimizer steps is
timed ``--repeats`` times after one untimed warm-up call, and the median is reported as

* context points per second: ``steps x batch_size x num_points / seconds``, the training data the
  model consumes;
* energy evaluations per second: every Langevin step scores all ``batch_size x num_points x
  num_negatives`` chains, and the loss scores those chains and the positives once more, so one
  optimizer step makes ``batch_size x num_points x (num_negatives x (langevin_steps + 1) + 1)``
  query evaluations, each with a gradient.

The CUDA timings synchronize the device before reading the clock.
"""

from __future__ import annotations

import logging
import statistics

import torch

from pyro_am._files import write_json
from pyro_am.benchmarks.retrieval import machine_info, time_call
from pyro_am.families import GaussianMixtureFamily
from pyro_am.models.icl_training import CDConfig, train_in_context_energy
from pyro_am.models.in_context import InContextEnergy

logger = logging.getLogger(__name__)


def measure_throughput(preset: dict, device, steps: int, repeats: int, seed: int = 0) -> dict:
    """Time ``steps`` CD steps of a model built from ``preset`` on ``device``; median of repeats.

    :param dict preset: ``width``, ``depth``, ``heads``, ``num_points``, ``batch_size`` and the
        shared Langevin settings of :data:`pyro_am.commands.icl.SHARED_DEFAULTS`.
    :returns: a dict with the median seconds per call and both rates.
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    model = InContextEnergy(
        dim=2, width=preset["width"], depth=preset["depth"], heads=preset["heads"]
    ).to(device)
    config = CDConfig(
        steps=steps,
        batch_size=preset["batch_size"],
        num_points=preset["num_points"],
        num_negatives=preset["num_negatives"],
        langevin_steps=preset["langevin_steps"],
        step_size=preset["step_size"],
        noise_std=preset["noise_std"],
        grad_clamp=preset["grad_clamp"],
        init=preset["init"],
        init_scale=preset["init_scale"],
        learning_rate=preset["learning_rate"],
        seed=seed,
        progress=False,
    )
    family = GaussianMixtureFamily(device=device)

    def train():
        train_in_context_energy(model, family, config)

    seconds = statistics.median(time_call(train, device, repeats))
    points = steps * config.batch_size * config.num_points
    chains = config.num_negatives * (config.langevin_steps + 1) + 1
    return {
        "device": str(device),
        "seconds": seconds,
        "context_points_per_second": points / seconds,
        "energy_evaluations_per_second": points * chains / seconds,
    }


def format_report(report: dict) -> str:
    """Format the throughput of every device as a plain-text table."""
    config = report["config"]
    lines = [
        f"pyro-am bench icl, preset {config['preset']}: width {config['width']}, depth "
        f"{config['depth']}, {config['heads']} heads, {config['batch_size']} data sets of "
        f"{config['num_points']} points, {config['num_negatives']} chains x "
        f"{config['langevin_steps']} Langevin steps; {config['steps']} steps per call, median "
        f"of {config['repeats']}",
        f"{'device':>10} {'s per call':>11} {'context points/s':>17} {'energy evals/s':>15}",
    ]
    for row in report["results"]:
        lines.append(
            f"{row['device']:>10} {row['seconds']:>11.3f} "
            f"{row['context_points_per_second']:>17.4g} "
            f"{row['energy_evaluations_per_second']:>15.4g}"
        )
    return "\n".join(lines)


def run(args) -> int:
    from pyro_am.cli import UsageError
    from pyro_am.commands.icl import PRESETS, SHARED_DEFAULTS
    from pyro_am.commands.retrieve import resolve_device

    devices = [resolve_device(name) for name in args.devices]
    for name in ("steps", "repeats"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, but got {value}.")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, but got {args.threads}.")
        torch.set_num_threads(args.threads)
    preset = {**SHARED_DEFAULTS, **PRESETS[args.preset]}
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, but got {args.batch_size}.")
        preset["batch_size"] = args.batch_size

    results = []
    for device in devices:
        logger.info("timing %s on %s", args.preset, device)
        results.append(measure_throughput(preset, device, args.steps, args.repeats))
    keys = ("width", "depth", "heads", "batch_size", "num_points", "num_negatives")
    report = {
        "benchmark": "icl",
        "machine": {str(device): machine_info(device) for device in devices},
        "config": {
            "preset": args.preset,
            **{key: preset[key] for key in keys},
            "langevin_steps": preset["langevin_steps"],
            "steps": args.steps,
            "repeats": args.repeats,
        },
        "results": results,
    }
    print(format_report(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "icl",
        help="training throughput of in-context energies on CPU and GPU",
        description=(
            "Time contrastive-divergence training of an in-context energy and report context "
            "points and energy evaluations per second on each device."
        ),
    )
    parser.add_argument(
        "--preset",
        choices=("small", "published"),
        default="published",
        help="model and batch of `pyro-am icl train --preset` (default: %(default)s)",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        default=["cpu"],
        help="devices to time in turn, e.g. cpu cuda (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="optimizer steps per timed call (default: 5)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls; the median is used (default: 3)"
    )
    parser.add_argument("--batch-size", type=int, help="data sets per step (default: preset's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", metavar="JSON", help="write the report to this JSON file")
    parser.set_defaults(handler=run)


__all__ = ["format_report", "measure_throughput"]
