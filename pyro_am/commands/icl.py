"""``pyro-am icl``: pretrain, sample and evaluate in-context energies.

Subcommands:

* ``train``: pretrain an :class:`~pyro_am.models.InContextEnergy` by contrastive divergence on a
  family of data sets, and (unless ``--amortized-steps 0``) an
  :class:`~pyro_am.models.AmortizedMixtureGuide` by SVI on the same family. Writes ``model.pt``
  (a resumable checkpoint), ``amortized.pt``, ``history.json`` and ``training.png``, and prints the
  training throughput in context points per second.
* ``sample``: Langevin samples from ``E(. | x_1 .. x_n)`` for several n; ``samples.png`` and
  ``samples.npz``.
* ``landscape``: the energy on a grid for several n; ``landscape.png`` and ``landscape.npz``.
* ``evaluate``: the sample energy distance and the held-out NLLs against n on held-out mixtures;
  ``metrics.json``, ``metrics.csv``, ``metrics.png`` and ``landscape.png``.

``--preset small`` (the default) trains on a CPU in a few minutes. ``--preset published`` follows
R. Schaeffer, M. Khona and S. Koyejo, "In-Context Learning of Energy Functions" (2024). It uses
2-D mixtures of 3 Gaussians with means ~ N(0, 5^2 I) and component std 0.33, up to 35 context
points, and a causal pre-norm transformer with 6 layers, 8 heads and width 128. Langevin runs 15
steps with noise std 0.01. Any flag given explicitly overrides the preset.
"""

from __future__ import annotations

import os
import time

import torch

from pyro_am.cli import UsageError
from pyro_am.commands import icl_io
from pyro_am.commands.retrieve import resolve_device
from pyro_am.families import SHAPES, GaussianMixtureFamily, make_family
from pyro_am.models.amortized import AmortizedMixtureGuide
from pyro_am.models.amortized_training import fit_amortized_guide
from pyro_am.models.icl_training import CDConfig, load_checkpoint, train_in_context_energy
from pyro_am.models.in_context import MODES, InContextEnergy

FAMILIES = ("gmm", *SHAPES)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PRESETS = {
    "small": {
        "width": 64,
        "depth": 2,
        "heads": 4,
        "num_points": 16,
        "batch_size": 16,
        "steps": 600,
        "amortized_steps": 1500,
    },
    "published": {
        "width": 128,
        "depth": 6,
        "heads": 8,
        "num_points": 35,
        "batch_size": 64,
        "steps": 20000,
        "amortized_steps": 20000,
    },
}
SHARED_DEFAULTS = {
    "mode": "causal",
    "langevin_steps": 15,
    "step_size": 1.0,
    "noise_std": 0.01,
    "grad_clamp": 1.0,
    "init": "gaussian",
    "init_scale": 6.0,
    "regularization": 0.1,
    "replay_fraction": 0.0,
    "num_negatives": 4,
    "learning_rate": 1e-3,
    "clip_norm": 1.0,
}


# -- train ---------------------------------------------------------------------------------------
def _settings(args) -> dict:
    """Merge the preset, the shared defaults and the flags given explicitly."""
    settings = {**SHARED_DEFAULTS, **PRESETS[args.preset]}
    for name in (*SHARED_DEFAULTS, *PRESETS["small"]):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if settings["amortized_steps"] < 0:
        raise UsageError(
            f"--amortized-steps must be an integer >= 0 (0 skips the guide), but got "
            f"{settings['amortized_steps']}."
        )
    if settings["grad_clamp"] is not None and not settings["grad_clamp"] >= 0:
        raise UsageError(
            f"--grad-clamp must be a number >= 0 (0 turns the clamp off), but got "
            f"{settings['grad_clamp']}."
        )
    if settings["grad_clamp"] == 0:
        settings["grad_clamp"] = None
    return settings


def _family(args, dtype=torch.float32):
    if args.family == "gmm":
        return GaussianMixtureFamily(
            dim=2,
            num_components=args.num_components,
            prior_std=args.prior_std,
            component_std=args.component_std,
            num_distinct=args.num_distinct,
            seed=args.seed,
            dtype=dtype,
        )
    return make_family(args.family, num_distinct=args.num_distinct, seed=args.seed, dtype=dtype)


def run_train(args) -> int:
    """Train the energy (and the amortized guide) and write the outputs to ``--out``."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    settings = _settings(args)
    family = _family(args, dtype)
    torch.manual_seed(args.seed)
    model = InContextEnergy(
        dim=2,
        width=settings["width"],
        depth=settings["depth"],
        heads=settings["heads"],
        mode=settings["mode"],
        confinement_std=args.confinement_std,
    ).to(dtype=dtype, device=device)
    config = CDConfig(
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        num_points=settings["num_points"],
        num_negatives=settings["num_negatives"],
        langevin_steps=settings["langevin_steps"],
        step_size=settings["step_size"],
        noise_std=settings["noise_std"],
        grad_clamp=settings["grad_clamp"],
        init=settings["init"],
        init_scale=settings["init_scale"],
        regularization=settings["regularization"],
        replay_fraction=settings["replay_fraction"],
        learning_rate=settings["learning_rate"],
        clip_norm=settings["clip_norm"],
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    os.makedirs(args.out, exist_ok=True)
    paths = icl_io.output_paths(args.out)
    metadata = {"family": icl_io.family_settings(args), "preset": args.preset}
    started = time.perf_counter()
    result = train_in_context_energy(
        model, family, config, checkpoint=paths["model"], resume=args.resume, metadata=metadata
    )
    seconds = time.perf_counter() - started
    trained_steps = result.steps - result.start_step
    amortized = None
    if settings["amortized_steps"] > 0:
        amortized = AmortizedMixtureGuide(
            dim=2,
            num_components=args.num_components,
            prior_std=args.prior_std,
            weights_prior=args.weights_prior,
        ).to(dtype=dtype, device=device)
        fit_amortized_guide(
            amortized,
            family,
            steps=settings["amortized_steps"],
            batch_size=settings["batch_size"],
            max_points=settings["num_points"],
            seed=args.seed,
            checkpoint=paths["amortized"],
            resume=args.resume,
            progress=not args.no_progress,
        )
    icl_io.write_training_outputs(paths, result.history, amortized, settings, metadata)

    print(
        f"trained a {settings['mode']} in-context energy (width {settings['width']}, depth "
        f"{settings['depth']}, {settings['heads']} heads) for {result.steps} steps on "
        f"{args.family} data sets on {device}"
    )
    if trained_steps:
        points = trained_steps * config.batch_size * config.num_points
        print(
            f"throughput: {points / seconds:.4g} context points per second "
            f"({trained_steps} steps in {seconds:.1f} s)"
        )
    print(f"final loss {result.history['loss'][-1]:.4g}; wrote {args.out}")
    return 0


# -- sample, landscape, evaluate -----------------------------------------------------------------
def _load(args):
    device = resolve_device(args.device)
    path = icl_io.model_path(args.model)
    model, config, metadata = load_checkpoint(path, device=device)
    if model.dim != 2:
        raise UsageError(
            f"{path} contains a model of dimension {model.dim}, but these plots need dimension 2."
        )
    return model, config, metadata


def _context(args, model, metadata, num_points: int) -> torch.Tensor:
    parameter = next(model.parameters())
    if args.context is not None:
        points = icl_io.read_context(args.context)
    else:
        family = icl_io.family_from_settings(metadata.get("family"), seed=args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        # At least one point, so that --sizes 0 alone still has a data set to set the plot range.
        points = family.sample_points(1, max(num_points, 1), generator)[0]
    return points.to(dtype=parameter.dtype, device=parameter.device)


def _default_sizes(args, config, mode: str) -> list[int]:
    """Return ``--sizes``, or 0, 1, 2, 4, 8 and the largest trained size N - 1 when unset.

    Training covers context sizes 0 .. N - 1 in causal mode and 1 .. N - 1 in set mode.
    """
    if args.sizes is not None:
        if any(n < 0 for n in args.sizes):
            raise UsageError(f"--sizes must be integers >= 0, but got {args.sizes}.")
        return args.sizes
    largest = config.num_points - 1
    smallest = 0 if mode == "causal" else 1
    return sorted({n for n in (0, 1, 2, 4, 8) if smallest <= n < largest} | {largest})


def _check_sizes(sizes, available: int) -> list[int]:
    if not sizes or any(n < 0 or n > available for n in sizes):
        raise UsageError(f"--sizes must lie in [0, {available}], but got {sizes}.")
    return sorted(set(sizes))


def run_sample(args) -> int:
    """Draw Langevin samples for several context sizes and plot them."""
    model, config, metadata = _load(args)
    sizes = _default_sizes(args, config, model.mode)
    context = _context(args, model, metadata, max(sizes))
    sizes = _check_sizes(sizes, context.shape[0])
    if model.mode == "set" and 0 in sizes:
        raise UsageError("a set-mode model needs a context; --sizes must be >= 1.")
    from pyro_am.models.icl_evaluation import sample_in_context

    generator = torch.Generator(device=context.device).manual_seed(args.seed)
    samples = sample_in_context(
        model, context[None], sizes, args.num_samples, config, generator, args.langevin_steps
    )[0]
    paths = icl_io.write_samples(
        args.out, samples.cpu().numpy(), context.cpu().numpy(), sizes, args.figure
    )
    print(f"drew {args.num_samples} samples for n in {sizes}; wrote {', '.join(paths)}")
    return 0


def run_landscape(args) -> int:
    """Plot ``E(x | x_1 .. x_n)`` on a grid for several context sizes."""
    model, config, metadata = _load(args)
    sizes = _default_sizes(args, config, model.mode)
    context = _context(args, model, metadata, max(sizes))
    sizes = _check_sizes(sizes, context.shape[0])
    if model.mode == "set" and 0 in sizes:
        raise UsageError("a set-mode model needs a context; --sizes must be >= 1.")
    limits = icl_io.limits(args.limits, context)
    from pyro_am.models.icl_evaluation import landscape

    xs, ys, energies = landscape(model, context, sizes, limits, args.resolution)
    paths = icl_io.write_landscape(
        args.out, xs, ys, energies, context.cpu().numpy(), sizes, args.figure
    )
    print(f"energy landscapes for n in {sizes}; wrote {', '.join(paths)}")
    return 0


def run_evaluate(args) -> int:
    """Score samples and predictive NLLs against n on held-out mixtures."""
    model, config, metadata = _load(args)
    family = icl_io.family_from_settings(metadata.get("family"), seed=args.seed)
    if not isinstance(family, GaussianMixtureFamily):
        raise UsageError(
            "evaluate needs a model trained on the gmm family, whose density is known."
        )
    amortized = None
    amortized_path = icl_io.amortized_path(args.model, args.amortized)
    if amortized_path is not None:
        from pyro_am.models.amortized_training import load_amortized_guide

        amortized = load_amortized_guide(amortized_path, device=next(model.parameters()).device)
    from pyro_am.models.icl_evaluation import evaluate_in_context

    result = evaluate_in_context(
        model,
        family,
        config,
        amortized=amortized,
        max_points=args.max_points or config.num_points - 1,
        num_datasets=args.num_datasets,
        num_samples=args.num_samples,
        seed=args.seed,
        langevin_steps=args.langevin_steps,
    )
    paths = icl_io.write_metrics(args.out, result, args.figure)
    print(icl_io.format_metrics(result))
    print(f"wrote {', '.join(paths)}")
    return 0


# -- parsers -------------------------------------------------------------------------------------
def _add_common(parser, out_default: str) -> None:
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--out", default=out_default, help="output folder (default: %(default)s)")


def _add_figure(parser) -> None:
    parser.add_argument("--figure", metavar="PNG", help="also write the figure to this path")


def _add_model_input(parser) -> None:
    parser.add_argument(
        "--model",
        default=os.path.join(".", "pyro-am-out", "icl"),
        help="model.pt written by `pyro-am icl train`, or its folder (default: %(default)s)",
    )


def _add_context_input(parser) -> None:
    parser.add_argument(
        "--context",
        help="2-D points (.npy, .npz or .csv) used as the context in this order; by default one "
        "data set is drawn from the training family with --seed",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        help="context sizes n to show (default: 0, 1, 2, 4, 8 and the largest trained size)",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "icl",
        help="pretrain, sample and evaluate in-context energies",
        description="In-context energies E(x | D): a transformer pretrained by contrastive "
        "divergence on many data sets, and an amortized Pyro guide for comparison.",
    )
    commands = parser.add_subparsers(
        dest="icl_command", metavar="COMMAND", parser_class=type(parser)
    )
    commands.required = True
    out = os.path.join(".", "pyro-am-out", "icl")

    train = commands.add_parser("train", help="pretrain an in-context energy")
    icl_io.add_train_arguments(train, PRESETS, SHARED_DEFAULTS, FAMILIES, MODES, DTYPES)
    _add_common(train, out)
    train.set_defaults(handler=run_train)

    sample = commands.add_parser("sample", help="Langevin samples for several context sizes")
    _add_model_input(sample)
    _add_context_input(sample)
    sample.add_argument(
        "--num-samples",
        type=int,
        default=500,
        help="samples per context size (default: %(default)s)",
    )
    sample.add_argument(
        "--langevin-steps", type=int, help="Langevin steps (default: as in training)"
    )
    _add_common(sample, out)
    _add_figure(sample)
    sample.set_defaults(handler=icl_io.checked(run_sample))

    landscape = commands.add_parser("landscape", help="energy landscapes for several sizes")
    _add_model_input(landscape)
    _add_context_input(landscape)
    landscape.add_argument(
        "--limits",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="range of both axes (default: the context's range with a margin)",
    )
    landscape.add_argument(
        "--resolution", type=int, default=80, help="grid points per axis (default: %(default)s)"
    )
    _add_common(landscape, out)
    _add_figure(landscape)
    landscape.set_defaults(handler=icl_io.checked(run_landscape))

    evaluate = commands.add_parser("evaluate", help="sample distance and NLL against n")
    _add_model_input(evaluate)
    evaluate.add_argument(
        "--amortized",
        help="amortized.pt of the guide (default: next to the model if present; 'none' skips it)",
    )
    evaluate.add_argument(
        "--max-points",
        type=int,
        help="largest context size (default: N - 1, the largest size seen in training)",
    )
    evaluate.add_argument(
        "--num-datasets", type=int, default=16, help="held-out data sets (default: %(default)s)"
    )
    evaluate.add_argument(
        "--num-samples",
        type=int,
        default=128,
        help="Langevin samples per data set and size (default: %(default)s)",
    )
    evaluate.add_argument(
        "--langevin-steps", type=int, help="Langevin steps (default: as in training)"
    )
    _add_common(evaluate, out)
    _add_figure(evaluate)
    evaluate.set_defaults(seed=1234, handler=icl_io.checked(run_evaluate))


__all__ = ["PRESETS", "SHARED_DEFAULTS", "register"]
