"""Arguments, files and figures of ``pyro-am icl``; the computation lives in :mod:`pyro_am.models`.

Files of a training run, all in one folder:

* ``model.pt``: the in-context energy's checkpoint (parameters, optimizer, random states, the
  training settings and the family's settings), which ``--resume`` continues;
* ``amortized.pt``: the amortized guide's checkpoint;
* ``history.json``: per-step loss and mean energies, the amortized ELBO per point, the settings;
* ``training.png``: those curves.
"""

from __future__ import annotations

import csv
import functools
import os

import numpy as np
import torch

from pyro_am._files import write_json
from pyro_am.cli import UsageError
from pyro_am.datasets import load_pattern_file
from pyro_am.families import GaussianMixtureFamily, make_family
from pyro_am.plotting import new_figure, save_figure

MODEL_FILE = "model.pt"
AMORTIZED_FILE = "amortized.pt"


# -- arguments -----------------------------------------------------------------------------------
def add_train_arguments(parser, presets, defaults, families, modes, dtypes) -> None:
    """Add the flags of ``pyro-am icl train``; flags left unset take the preset's value."""
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
        default="small",
        help="model size and training length: small (a few minutes on a CPU) or published "
        "(the reference setup; use a GPU) (default: %(default)s)",
    )
    parser.add_argument(
        "--family", choices=families, default="gmm", help="data-set family (default: %(default)s)"
    )
    parser.add_argument(
        "--num-components", type=int, default=3, help="mixture components K (default: %(default)s)"
    )
    parser.add_argument(
        "--prior-std", type=float, default=5.0, help="prior std of the means (default: %(default)s)"
    )
    parser.add_argument(
        "--component-std", type=float, default=0.33, help="std per component (default: %(default)s)"
    )
    parser.add_argument(
        "--num-distinct", type=int, help="number of distinct data sets (default: unlimited)"
    )
    parser.add_argument("--mode", choices=modes, help=f"conditioning (default: {defaults['mode']})")

    for name, kind, text in (
        ("width", int, "transformer width"),
        ("depth", int, "transformer blocks"),
        ("heads", int, "attention heads"),
        ("num_points", int, "points per training data set N (context sizes 0 .. N - 1)"),
        ("batch_size", int, "data sets per step"),
        ("steps", int, "contrastive-divergence steps"),
        ("amortized_steps", int, "SVI steps of the amortized guide (0 skips it)"),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, help=f"{text} (default: from --preset)"
        )

    for name, kind, text in (
        ("num_negatives", int, "Langevin chains per data set and prefix"),
        ("langevin_steps", int, "Langevin steps per negative"),
        ("step_size", float, "Langevin step size"),
        ("noise_std", float, "std of the noise added per Langevin step"),
        ("grad_clamp", float, "clamp of each gradient coordinate in Langevin; 0 turns it off"),
        ("init_scale", float, "std (gaussian) or half-width (uniform) of the initial chains"),
        ("regularization", float, "weight of the squared-energy penalty"),
        ("replay_fraction", float, "probability that a chain starts from the replay buffer"),
        ("learning_rate", float, "Adam learning rate"),
        ("clip_norm", float, "maximum gradient norm of the parameters"),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, help=f"{text} (default: {defaults[name]})"
        )

    parser.add_argument(
        "--init", choices=("uniform", "gaussian"), help=f"initial law (default: {defaults['init']})"
    )
    parser.add_argument(
        "--confinement-std",
        type=float,
        help="add |x|^2 / (2 c^2) to the energy so that exp(-E) is integrable (default: off)",
    )
    parser.add_argument(
        "--weights-prior",
        choices=("dirichlet", "stick_breaking"),
        default="dirichlet",
        help="prior on the amortized guide's mixture weights (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(dtypes),
        default="float32",
        help="floating dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="steps between checkpoints (default: %(default)s)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from --out/model.pt")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def checked(handler):
    """Wrap a subcommand so that its counts and seed are checked before it runs."""

    @functools.wraps(handler)
    def run(args):
        for name, minimum in (
            ("num_samples", 1),
            ("resolution", 2),
            ("num_datasets", 2),
            ("langevin_steps", 0),
            ("max_points", 1),
            ("seed", 0),
        ):
            value = getattr(args, name, None)
            if value is not None and value < minimum:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be an integer >= {minimum}, but got {value}.")
        return handler(args)

    return run


# -- families ------------------------------------------------------------------------------------
def family_settings(args) -> dict:
    """Collect the family flags of a training run, stored in the checkpoint to rebuild it."""
    settings = {"name": args.family, "num_distinct": args.num_distinct, "seed": args.seed}
    if args.family == "gmm":
        settings.update(
            num_components=args.num_components,
            prior_std=args.prior_std,
            component_std=args.component_std,
        )
    return settings


def family_from_settings(settings: dict | None, seed: int):
    """Rebuild a training family with unlimited data sets, for held-out draws with ``seed``."""
    settings = dict(settings or {"name": "gmm"})
    name = settings.pop("name")
    settings.pop("num_distinct", None)
    settings.pop("seed", None)
    if name == "gmm":
        return GaussianMixtureFamily(**settings, seed=seed)
    return make_family(name, seed=seed)


# -- paths ---------------------------------------------------------------------------------------
def output_paths(out: str) -> dict[str, str]:
    return {
        "model": os.path.join(out, MODEL_FILE),
        "amortized": os.path.join(out, AMORTIZED_FILE),
        "history": os.path.join(out, "history.json"),
        "training_figure": os.path.join(out, "training.png"),
    }


def model_path(path: str) -> str:
    """Accept ``model.pt`` or the folder that contains it."""
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"model {path!r} not found; run `pyro-am icl train` first.")
    return path


def amortized_path(model: str, amortized: str | None) -> str | None:
    """Find the guide: ``--amortized`` if given (None for 'none'), else the one by the model."""
    if amortized is not None:
        if amortized.lower() == "none":
            return None
        if not os.path.isfile(amortized):
            raise UsageError(f"amortized guide {amortized!r} not found.")
        return amortized
    folder = model if os.path.isdir(model) else os.path.dirname(model)
    candidate = os.path.join(folder, AMORTIZED_FILE)
    return candidate if os.path.isfile(candidate) else None


def read_context(path: str) -> torch.Tensor:
    """Read 2-D context points from a pattern file, in file order."""
    data = load_pattern_file(path).data
    if data.shape[1] != 2:
        raise UsageError(f"context file {path!r} has {data.shape[1]} columns; expected 2.")
    return torch.as_tensor(data)


def limits(requested, context: torch.Tensor) -> tuple[float, float]:
    """Choose the plotting range: ``requested``, or the context's range widened by a margin."""
    if requested is not None:
        low, high = requested
        if not low < high:
            raise UsageError(f"--limits must satisfy LOW < HIGH, but got {low} {high}.")
        return float(low), float(high)
    low, high = float(context.min()), float(context.max())
    margin = max(2.0, 0.25 * (high - low))
    return low - margin, high + margin


# -- writers -------------------------------------------------------------------------------------


def write_training_outputs(paths, history, amortized, settings, metadata) -> None:
    """Write ``history.json`` and ``training.png`` of a training run."""
    amortized_history = [] if amortized is None else list(amortized.history)
    payload = {
        "settings": settings,
        "metadata": metadata,
        "history": history,
        "amortized_elbo_per_point": amortized_history,
    }
    write_json(paths["history"], payload)
    figure = new_figure(9.0, 3.0)
    left, right = figure.subplots(1, 2)
    steps = np.arange(1, len(history["loss"]) + 1)
    left.plot(steps, history["positive_energy"], lw=0.8, label="mean E(x+ | D)")
    left.plot(steps, history["negative_energy"], lw=0.8, label="mean E(x- | D)")
    left.plot(steps, history["loss"], lw=0.8, label="CD loss")
    left.set_xlabel("step")
    left.legend(fontsize=8)
    if amortized_history:
        right.plot(np.arange(1, len(amortized_history) + 1), amortized_history, lw=0.8)
        right.set_ylim(np.percentile(amortized_history, 5) - 1.0, max(amortized_history) + 0.5)
    right.set_xlabel("SVI step")
    right.set_ylabel("ELBO per point")
    save_figure(figure, paths["training_figure"])


def _save_copies(figure, paths) -> None:
    for path in paths:
        save_figure(figure, path)


def write_samples(out, samples, context, sizes, figure_path=None) -> list[str]:
    """Write ``samples.npz`` and ``samples.png``, and the figure to ``figure_path`` if given."""
    from pyro_am.models.icl_evaluation import plot_samples

    os.makedirs(out, exist_ok=True)
    data_path = os.path.join(out, "samples.npz")
    np.savez(data_path, samples=samples, context=context, sizes=np.asarray(sizes))
    paths = [data_path, os.path.join(out, "samples.png"), *([figure_path] if figure_path else [])]
    low = min(float(samples.min()), float(context.min())) - 1.0
    high = max(float(samples.max()), float(context.max())) + 1.0
    _save_copies(plot_samples(samples, context, sizes, (low, high)), paths[1:])
    return paths


def write_landscape(out, xs, ys, energies, context, sizes, figure_path=None) -> list[str]:
    """Write ``landscape.npz`` and ``landscape.png``, and the figure to ``figure_path`` if given."""
    from pyro_am.models.icl_evaluation import plot_landscapes

    os.makedirs(out, exist_ok=True)
    data_path = os.path.join(out, "landscape.npz")
    np.savez(data_path, xs=xs, ys=ys, energies=energies, context=context, sizes=np.asarray(sizes))
    paths = [data_path, os.path.join(out, "landscape.png"), *([figure_path] if figure_path else [])]
    _save_copies(plot_landscapes(xs, ys, energies, context, sizes), paths[1:])
    return paths


METRIC_COLUMNS = ("energy_distance", "energy_distance_sem", "amortized_nll", "gmm_nll")


def write_metrics(out, result: dict, figure_path=None) -> list[str]:
    """Write ``metrics.json``, ``metrics.csv`` (one row per n) and ``metrics.png``, and the
    figure to ``figure_path`` if given."""
    from pyro_am.models.icl_evaluation import plot_metrics

    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "metrics.json")
    write_json(json_path, result)
    csv_path = os.path.join(out, "metrics.csv")
    columns = [name for name in METRIC_COLUMNS if name in result]
    with open(csv_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["n", *columns, "energy_distance_floor", "true_nll"])
        for index, n in enumerate(result["sizes"]):
            row = [result[name][index] for name in columns]
            row = ["" if value is None else value for value in row]
            writer.writerow([n, *row, result["energy_distance_floor"], result["true_nll"]])
    figures = [os.path.join(out, "metrics.png"), *([figure_path] if figure_path else [])]
    _save_copies(plot_metrics(result), figures)
    return [json_path, csv_path, *figures]


def format_metrics(result: dict) -> str:
    """Format the metrics as a table with one row per context size."""
    lines = [f"{'n':>4} {'energy dist.':>13} {'amortized NLL':>14} {'GMM NLL':>9}"]
    amortized = result.get("amortized_nll", [None] * len(result["sizes"]))
    for index, n in enumerate(result["sizes"]):
        gmm = result["gmm_nll"][index]
        guide = amortized[index]
        lines.append(
            f"{n:>4} {result['energy_distance'][index]:>13.4g} "
            f"{'-' if guide is None else f'{guide:.4g}':>14} "
            f"{'-' if gmm is None else f'{gmm:.4g}':>9}"
        )
    lines.append(
        f"noise floor of the energy distance {result['energy_distance_floor']:.4g}; "
        f"true mixture NLL {result['true_nll']:.4g}"
    )
    return "\n".join(lines)
