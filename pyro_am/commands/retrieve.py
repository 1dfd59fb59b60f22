"""``pyro-am retrieve``: complete and denoise corrupted patterns with an associative memory.

The patterns (by default scikit-learn's 1,797 8x8 digits) are split into stored memories and
held-out queries. Each corruption level is a fraction of hidden pixels or a standard deviation of
Gaussian noise. It is applied to the held-out queries and to a sample of the stored patterns
("probes"), and retrieval descends a Gaussian KDE energy and a dense associative memory energy:

    KDE:  x <- sum_n softmax_n(-|x - x_n|^2 / (2 h^2)) x_n
    DAM:  x <- sum_n softmax_n(beta x_n . x) x_n,        beta = 1 / h^2

For masked queries the observed pixels stay clamped and only the hidden ones move. The default
bandwidth is ``h = d_med / 4``, with ``d_med`` the median distance from a memory to its nearest
other memory: a typical nearest neighbour then has kernel weight ``exp(-8) ~ 3e-4`` relative to the
pattern itself, so each stored pattern stays close to a fixed point of the mean-shift map, while a
query still averages over the memories within a few ``h``. The DAM shares that temperature, and on a
sphere of memories the two updates would coincide.

NOTE: the digits do not lie on a sphere (norms 2.9 to 4.8 on the [0, 1] scale), and the DAM logits
``beta x_n . x`` favour memories of large norm. With ``pyro-am retrieve --energy dam --beta B
--noise-std 0`` only 0 to 20% of the clean stored digits retrieve themselves for every B tried from
1 to 100, so low DAM exact recall here reflects the energy, not the default beta.

Reported per corruption level and energy: the fraction of held-out queries whose retrieved state's
nearest memory has the query's label, the fraction of probes whose retrieved state's nearest memory
is the probe's own original, and the mean squared error to the clean pattern (with the corrupted
input's error for comparison).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_am._files import write_json
from pyro_am.cli import UsageError
from pyro_am.datasets import (
    Dataset,
    add_noise,
    load_dataset,
    load_pattern_file,
    mask_pixels,
    scale_to_unit_interval,
    split_memories_queries,
    standardize,
)
from pyro_am.dynamics import METHODS, retrieve
from pyro_am.energies import DenseAMEnergy, Energy, GaussianKDEEnergy

logger = logging.getLogger(__name__)

ENERGIES = ("kde", "dam")
SCALINGS = ("unit", "standardize", "none")
BANDWIDTH_FACTOR = 0.25
DEFAULT_MASK_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_NOISE_STDS = (0.1, 0.25, 0.5)
NUM_EXAMPLES = 8
DEFAULT_NUM_QUERIES = 200


@dataclass(frozen=True)
class Corruption:
    """One corruption level: ``kind`` is ``"mask"`` (hidden fraction) or ``"noise"`` (std)."""

    kind: str
    level: float

    @property
    def label(self) -> str:
        return f"{self.kind} {self.level:g}"


# -- computation ---------------------------------------------------------------------------------
def median_nearest_neighbor_distance(memories: torch.Tensor, chunk: int = 1024) -> float:
    """Compute the median over memories of the Euclidean distance to the nearest other memory.

    Rows are processed ``chunk`` at a time, so memory use is O(chunk x N).
    """
    num_memories = memories.shape[0]
    if num_memories < 2:
        raise ValueError(f"need at least 2 memories to measure distances, but got {num_memories}.")
    nearest = []
    for start in range(0, num_memories, chunk):
        block = torch.cdist(memories[start : start + chunk], memories)
        rows = torch.arange(block.shape[0], device=memories.device)
        block[rows, rows + start] = math.inf
        nearest.append(block.min(dim=1).values)
    return float(torch.cat(nearest).median())


def default_bandwidth(memories: torch.Tensor) -> float:
    """Return the default KDE bandwidth ``h = d_med / 4`` (see the module docstring)."""
    bandwidth = BANDWIDTH_FACTOR * median_nearest_neighbor_distance(memories)
    if not bandwidth > 0:
        raise ValueError(
            "the median nearest-neighbour distance of the memories is 0 (more than half of them "
            "are duplicates), so no default bandwidth exists; pass --bandwidth."
        )
    return bandwidth


def build_energies(
    memories: torch.Tensor, names: tuple[str, ...], bandwidth: float, beta: float
) -> dict[str, Energy]:
    """Build the named energies (``kde``, ``dam``) over ``memories``."""
    energies = {}
    for name in names:
        if name == "kde":
            energies[name] = GaussianKDEEnergy(memories, bandwidth)
        elif name == "dam":
            energies[name] = DenseAMEnergy(memories, beta)
        else:
            raise ValueError(f"energy must be one of {ENERGIES}, but got {name!r}.")
    return energies


def corrupt(
    x: torch.Tensor,
    corruption: Corruption,
    generator: torch.Generator,
    fill: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``corruption`` to ``x``; return the corrupted batch and the observed mask or None."""
    if corruption.kind == "mask":
        return mask_pixels(x, corruption.level, generator, fill=fill)
    if corruption.kind == "noise":
        return add_noise(x, corruption.level, generator), None
    raise ValueError(f"corruption kind must be 'mask' or 'noise', but got {corruption.kind!r}.")


def _nearest_memory(states: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
    return torch.cdist(states, memories).argmin(dim=1)


def _mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean())


def run_retrieval_experiment(
    memories: torch.Tensor,
    memory_labels: torch.Tensor | None,
    queries: torch.Tensor,
    query_labels: torch.Tensor | None,
    energies: dict[str, Energy],
    corruptions: list[Corruption],
    method: str = "fixed_point",
    max_steps: int = 100,
    tol: float = 1e-4,
    num_probes: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    progress: bool = True,
    nearest=None,
) -> tuple[list[dict], dict]:
    """Corrupt held-out queries and stored probes at each level, retrieve, and score the results.

    :param torch.Tensor memories: stored patterns, shape (N, D).
    :param torch.Tensor memory_labels: labels of the memories, shape (N,), or None.
    :param torch.Tensor queries: held-out clean patterns, shape (Q, D).
    :param torch.Tensor query_labels: labels of the queries, shape (Q,), or None.
    :param dict energies: name -> energy over ``memories``.
    :param list corruptions: the corruption levels to run.
    :param str method: retrieval method passed to :func:`~pyro_am.dynamics.retrieve`.
    :param int num_probes: number of stored patterns to corrupt and retrieve (default Q, at most N).
    :param int seed: seed of the probe choice, the masks and the noise.
    :param bool progress: show a progress bar over corruption levels.
    :param nearest: a function mapping states (Q, D) to the index of the memory each belongs to;
        by default the Euclidean nearest memory.
    :returns: ``(results, examples)``: one metrics dict per (corruption, energy), and for the figure
        the first few clean queries with their corrupted and retrieved versions per level.
    """
    if nearest is None:

        def nearest(states):
            return _nearest_memory(states, memories)

    num_memories = memories.shape[0]
    num_probes = min(queries.shape[0] if num_probes is None else num_probes, num_memories)
    generator = torch.Generator(device=memories.device).manual_seed(seed)
    probe_index = torch.randperm(num_memories, generator=generator, device=memories.device)
    probe_index = probe_index[:num_probes]
    probes = memories[probe_index]
    fill = memories.mean(dim=0)
    num_examples = min(NUM_EXAMPLES, queries.shape[0])
    examples = {"clean": queries[:num_examples].cpu().numpy(), "levels": []}
    results = []

    for corruption in tqdm(corruptions, desc="corruption levels", disable=not progress):
        corrupted_queries, query_mask = corrupt(queries, corruption, generator, fill)
        corrupted_probes, probe_mask = corrupt(probes, corruption, generator, fill)
        level_examples = {
            "label": corruption.label,
            "corrupted": corrupted_queries[:num_examples].cpu().numpy(),
            "hidden": None if query_mask is None else (~query_mask[:num_examples]).cpu().numpy(),
            "retrieved": {},
        }
        for name, energy in energies.items():
            options = dict(method=method, max_steps=max_steps, tol=tol, temperature=temperature)
            if method == "langevin":
                options["generator"] = generator
            query_result = retrieve(energy, corrupted_queries, mask=query_mask, **options)
            probe_result = retrieve(energy, corrupted_probes, mask=probe_mask, **options)

            query_nearest = nearest(query_result.states)
            probe_nearest = nearest(probe_result.states)
            # An exact duplicate of the original in the memory bank counts as the original.
            exact = (probe_nearest == probe_index) | (memories[probe_nearest] == probes).all(dim=1)
            row = {
                "corruption": corruption.kind,
                "level": corruption.level,
                "energy": name,
                "label_accuracy": None,
                "probe_label_accuracy": None,
                "exact_recall": float(exact.double().mean()),
                "mse": _mean_squared_error(query_result.states, queries),
                "mse_corrupted": _mean_squared_error(corrupted_queries, queries),
                "probe_mse": _mean_squared_error(probe_result.states, probes),
                "mean_steps": float(query_result.steps.double().mean()),
                "converged_fraction": float(query_result.converged.double().mean()),
            }
            if memory_labels is not None and query_labels is not None:
                matches = memory_labels[query_nearest] == query_labels
                probe_matches = memory_labels[probe_nearest] == memory_labels[probe_index]
                row["label_accuracy"] = float(matches.double().mean())
                row["probe_label_accuracy"] = float(probe_matches.double().mean())
            results.append(row)
            level_examples["retrieved"][name] = query_result.states[:num_examples].cpu().numpy()
            logger.info("%s %s: %s", corruption.label, name, row)
        examples["levels"].append(level_examples)
    return results, examples


def chance_label_accuracy(query_labels: torch.Tensor | None) -> float | None:
    """Return the accuracy of always guessing the most frequent query label."""
    if query_labels is None or query_labels.numel() == 0:
        return None
    # unique, not bincount: labels may be sparse and large, such as 10**12.
    _, counts = torch.unique(query_labels, return_counts=True)
    return float(counts.max()) / query_labels.numel()


# -- presentation --------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    """Format the per-level metrics as a plain-text table."""
    header = (
        f"{'corruption':<12} {'energy':<6} {'label acc':>9} {'exact':>7} "
        f"{'mse':>9} {'mse in':>9} {'steps':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in results:
        accuracy = "n/a" if row["label_accuracy"] is None else f"{row['label_accuracy']:.3f}"
        lines.append(
            f"{row['corruption'] + ' ' + format(row['level'], 'g'):<12} {row['energy']:<6} "
            f"{accuracy:>9} {row['exact_recall']:>7.3f} {row['mse']:>9.4f} "
            f"{row['mse_corrupted']:>9.4f} {row['mean_steps']:>6.1f}"
        )
    return "\n".join(lines)


def plot_examples(examples: dict, image_shape, value_range):
    """Draw the clean, corrupted and retrieved examples as one grid figure."""
    from pyro_am.plotting import plot_pattern_grid

    rows = [("original", examples["clean"])]
    hidden = {}
    for level in examples["levels"]:
        if level["hidden"] is not None:
            hidden[len(rows)] = level["hidden"]
        rows.append((f"{level['label']}\ncorrupted", level["corrupted"]))
        for name, states in level["retrieved"].items():
            rows.append((f"{level['label']}\n{name}", states))
    return plot_pattern_grid(rows, image_shape=image_shape, hidden=hidden, value_range=value_range)


# -- I/O -----------------------------------------------------------------------------------------


def write_outputs(out_dir: str, metrics: dict, figure) -> dict[str, str]:
    """Write ``metrics.json`` and ``retrieval.png`` to ``out_dir``; return their paths."""
    from pyro_am.plotting import save_figure

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "metrics": os.path.join(out_dir, "metrics.json"),
        "figure": os.path.join(out_dir, "retrieval.png"),
    }
    save_figure(figure, paths["figure"])
    write_json(paths["metrics"], {**metrics, "files": {"figure": "retrieval.png"}})
    return paths


# -- command -------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """Parse a device name and check that the device is available."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda or cuda:N.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available; use cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r} not found: only {torch.cuda.device_count()} CUDA device(s)."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"device {name!r} requested but MPS is not available; use cpu.")
    elif device.type != "cpu":
        raise UsageError(f"device {name!r} is not supported; use cpu, cuda or cuda:N.")
    return device


def _load(args) -> Dataset:
    if args.data is None:
        return load_dataset("digits")
    return load_pattern_file(args.data)


def _scale(data: np.ndarray, scaling: str) -> np.ndarray:
    if scaling == "unit":
        return scale_to_unit_interval(data)
    if scaling == "standardize":
        return standardize(data)[0]
    return data


# The energies run in float32, where h^2, beta and their reciprocals must be normal numbers.
MIN_BETA = float(torch.finfo(torch.float32).tiny)
MAX_BETA = 1 / MIN_BETA
MIN_BANDWIDTH = math.sqrt(MIN_BETA)
MAX_BANDWIDTH = math.sqrt(MAX_BETA)
MAX_SEED = 2**64 - 1


def resolve_num_queries(num_queries: int | None, num_patterns: int) -> int:
    """Return ``num_queries``, or by default 200 or a fifth of the patterns if that is fewer."""
    if num_queries is not None:
        return num_queries
    return max(1, min(DEFAULT_NUM_QUERIES, num_patterns // 5))


def _bandwidth_in_range(bandwidth: float) -> bool:
    return MIN_BANDWIDTH <= bandwidth <= MAX_BANDWIDTH


def _check_arguments(args) -> None:
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
        raise UsageError(f"--bandwidth must be a positive number, but got {args.bandwidth}.")
    if args.bandwidth is not None and not _bandwidth_in_range(args.bandwidth):
        raise UsageError(
            f"--bandwidth must be in [{MIN_BANDWIDTH:.2g}, {MAX_BANDWIDTH:.2g}] so that h^2 and "
            f"1 / h^2 are normal float32 numbers, but got {args.bandwidth:g}."
        )
    if args.beta is not None and not (math.isfinite(args.beta) and args.beta > 0):
        raise UsageError(f"--beta must be a positive number, but got {args.beta}.")
    if args.beta is not None and not (MIN_BETA <= args.beta <= MAX_BETA):
        raise UsageError(
            f"--beta must be in [{MIN_BETA:.2g}, {MAX_BETA:.2g}] so that beta and 1 / beta are "
            f"normal float32 numbers, but got {args.beta:g}."
        )
    for fraction in args.mask_fraction:
        if not (0.0 <= fraction < 1.0):
            raise UsageError(f"--mask-fraction must be in [0, 1), but got {fraction}.")
    for std in args.noise_std:
        if not (math.isfinite(std) and std >= 0):
            raise UsageError(f"--noise-std must be a non-negative number, but got {std}.")
    if args.num_queries is not None and args.num_queries < 1:
        raise UsageError(f"--num-queries must be at least 1, but got {args.num_queries}.")
    if args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, but got {args.max_steps}.")
    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise UsageError(f"--tol must be a non-negative number, but got {args.tol}.")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a positive number, but got {args.temperature}.")
    if not args.mask_fraction and not args.noise_std:
        raise UsageError("no corruption levels: give at least one --mask-fraction or --noise-std.")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, 2^64 - 1], but got {args.seed}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder; pass a folder path.")


def _prepare(args):
    """Load, scale and split the patterns named by ``args``; return the dataset and the split."""
    device = resolve_device(args.device)
    dataset = _load(args)
    args.num_queries = resolve_num_queries(args.num_queries, dataset.num_patterns)
    if args.num_queries >= dataset.num_patterns:
        raise UsageError(
            f"--num-queries must be below the number of patterns ({dataset.num_patterns}) so "
            f"that some remain stored, but got {args.num_queries}."
        )
    # float32 is ample here: on [0, 1] digits the GEMM-form distance error, eps |x|^2 / h^2, is
    # about 6e-8 * 23 / 0.065 ~ 2e-5 in the logits.
    data = torch.as_tensor(_scale(dataset.data, args.scale), dtype=torch.float32, device=device)
    labels = None
    if dataset.labels is not None:
        labels = torch.as_tensor(dataset.labels, dtype=torch.long, device=device)
    split = split_memories_queries(data, labels, args.num_queries, seed=args.seed)
    return dataset, data, split


def _settings(args, memories: torch.Tensor, bandwidth: float, beta: float) -> dict:
    bandwidth_rule = "given" if args.bandwidth is not None else "median nearest-neighbour / 4"
    return {
        "method": args.method,
        "max_steps": args.max_steps,
        "tol": args.tol,
        "temperature": args.temperature,
        "seed": args.seed,
        "device": str(memories.device),
        "dtype": str(memories.dtype).removeprefix("torch."),
        "bandwidth": bandwidth,
        "bandwidth_rule": bandwidth_rule,
        "beta": beta,
        "beta_rule": "given" if args.beta is not None else "1 / bandwidth^2",
    }


def _print_summary(dataset: Dataset, metrics: dict, paths: dict) -> None:
    settings = metrics["settings"]
    print(
        f"{dataset.name}: {metrics['data']['num_memories']} memories, "
        f"{metrics['data']['num_queries']} held-out queries, dimension {dataset.dim}; "
        f"bandwidth {settings['bandwidth']:.4g}, beta {settings['beta']:.4g}, "
        f"method {settings['method']}"
    )
    print(format_table(metrics["results"]))
    chance = metrics["data"]["chance_label_accuracy"]
    if chance is not None:
        print(
            f"label acc: nearest memory of the retrieved state has the query's label "
            f"(chance {chance:.3f}); exact: a corrupted stored pattern retrieves itself"
        )
    print(f"wrote {paths['metrics']} and {paths['figure']}")


def _check_model_arguments(args) -> None:
    """Reject the flags that configure the KDE and DAM energies when ``--model`` is given."""
    for flag, value in (
        ("--bandwidth", args.bandwidth),
        ("--beta", args.beta),
        ("--energy", args.energy),
        ("--scale", args.scale),
    ):
        if value is not None:
            raise UsageError(
                f"{flag} does not apply with --model, which retrieves with the fitted memory's "
                "energy in its own scaling; drop one of the two."
            )


def _corruptions(args) -> list[Corruption]:
    corruptions = [Corruption("mask", float(f)) for f in args.mask_fraction]
    return corruptions + [Corruption("noise", float(s)) for s in args.noise_std]


def _make_out_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the --out folder {path!r}: {error.strerror}.") from error


def run_model(args) -> int:
    """Retrieve with the memory fitted by ``pyro-am fit`` in the folder ``args.model``."""
    from pyro_am.commands import _retrieve_model as fitted_retrieval
    from pyro_am.commands.fit import load_fitted

    _check_model_arguments(args)
    _check_arguments(args)
    device = resolve_device(args.device)
    fitted = load_fitted(args.model)
    model = fitted.model.to(device)
    dataset, data, memories, memory_labels, queries, query_labels = (
        fitted_retrieval.prepare_model_experiment(args, fitted, device)
    )
    _make_out_dir(args.out)
    results, examples = run_retrieval_experiment(
        memories,
        memory_labels,
        queries,
        query_labels,
        {fitted_retrieval.MODEL_ENERGY: model.energy()},
        _corruptions(args),
        method=args.method,
        max_steps=args.max_steps,
        tol=args.tol,
        seed=args.seed,
        temperature=args.temperature,
        progress=not args.no_progress,
        nearest=fitted_retrieval.most_responsible(model),
    )
    metrics = {
        "data": {
            "name": dataset.name,
            "num_patterns": dataset.num_patterns,
            "dim": dataset.dim,
            "num_memories": int(memories.shape[0]),
            "num_queries": int(queries.shape[0]),
            "num_probes": min(int(queries.shape[0]), int(memories.shape[0])),
            "scale": fitted.scaling.name,
            "chance_label_accuracy": chance_label_accuracy(query_labels),
        },
        "settings": fitted_retrieval.model_settings(args, model),
        "results": results,
    }
    examples = fitted_retrieval.to_data_units(examples, fitted.scaling)
    value_range = (float(dataset.data.min()), float(dataset.data.max()))
    figure = plot_examples(examples, dataset.image_shape, value_range)
    paths = write_outputs(args.out, metrics, figure)
    print(
        f"{dataset.name}: fitted DP memory from {args.model} with "
        f"{metrics['data']['num_memories']} memories, {metrics['data']['num_queries']} queries, "
        f"dimension {dataset.dim}; method {args.method}; errors in the model's units"
    )
    print(format_table(results))
    if metrics["data"]["chance_label_accuracy"] is not None:
        print(
            "label acc: the most responsible memory of the retrieved state has the query's label "
            f"(chance {metrics['data']['chance_label_accuracy']:.3f}); exact: a corrupted memory "
            "mean returns to its own memory"
        )
    print(f"wrote {paths['metrics']} and {paths['figure']}")
    return 0


def run(args) -> int:
    """Run the retrieval experiment for the parsed command line and write its outputs."""
    if args.model is not None:
        return run_model(args)
    args.scale = args.scale or "unit"
    args.energy = args.energy or "both"
    _check_arguments(args)
    dataset, data, split = _prepare(args)
    memories, memory_labels, queries, query_labels = split

    bandwidth = args.bandwidth if args.bandwidth is not None else default_bandwidth(memories)
    if not _bandwidth_in_range(bandwidth):
        raise UsageError(
            f"the default bandwidth {bandwidth:g} (median nearest-neighbour distance / 4) is "
            f"outside [{MIN_BANDWIDTH:.2g}, {MAX_BANDWIDTH:.2g}], where h^2 and 1 / h^2 are "
            "normal float32 numbers; rescale the data with --scale or pass --bandwidth."
        )
    beta = args.beta if args.beta is not None else 1.0 / bandwidth**2
    _make_out_dir(args.out)
    names = ENERGIES if args.energy == "both" else (args.energy,)
    energies = build_energies(memories, names, bandwidth, beta)
    corruptions = _corruptions(args)

    results, examples = run_retrieval_experiment(
        memories,
        memory_labels,
        queries,
        query_labels,
        energies,
        corruptions,
        method=args.method,
        max_steps=args.max_steps,
        tol=args.tol,
        seed=args.seed,
        temperature=args.temperature,
        progress=not args.no_progress,
    )
    metrics = {
        "data": {
            "name": dataset.name,
            "num_patterns": dataset.num_patterns,
            "dim": dataset.dim,
            "num_memories": int(memories.shape[0]),
            "num_queries": int(queries.shape[0]),
            "num_probes": min(int(queries.shape[0]), int(memories.shape[0])),
            "scale": args.scale,
            "chance_label_accuracy": chance_label_accuracy(query_labels),
        },
        "settings": _settings(args, memories, bandwidth, beta),
        "results": results,
    }

    value_range = (float(data.min()), float(data.max()))
    figure = plot_examples(examples, dataset.image_shape, value_range)
    paths = write_outputs(args.out, metrics, figure)
    _print_summary(dataset, metrics, paths)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "retrieve",
        help="complete and denoise corrupted patterns (default: 8x8 digits)",
        description=(
            "Store patterns in an associative memory, corrupt held-out and stored patterns by "
            "masking pixels or adding Gaussian noise, retrieve them, and report label accuracy, "
            "exact recall and mean squared error per corruption level."
        ),
    )
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="patterns to use instead of the digits: .npy (2-D), .npz (patterns, optional "
        "labels) or .csv (optional header; a last column named 'label' contains labels)",
    )
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="retrieve with the DP memory that `pyro-am fit --out DIR` wrote, in its own "
        "scaling, instead of a KDE and a dense associative memory over stored patterns; the "
        "patterns default to the data set it was fitted to",
    )
    parser.add_argument(
        "--scale",
        choices=SCALINGS,
        help="map all values to [0, 1] by the global min and max (unit, the default), "
        "standardize each column, or keep the raw values (none)",
    )

    parser.add_argument(
        "--energy",
        choices=(*ENERGIES, "both"),
        help="Gaussian KDE, dense associative memory, or both (default)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="fixed_point",
        help="retrieval dynamics (default: %(default)s)",
    )
    parser.add_argument(
        "--bandwidth",
        type=float,
        help="KDE bandwidth h, in scaled data units (default: median nearest-neighbour "
        "distance / 4)",
    )
    parser.add_argument(
        "--beta",
        type=float,
        help="DAM inverse temperature, in 1 / (scaled data units)^2 (default: 1 / bandwidth^2)",
    )

    parser.add_argument(
        "--mask-fraction",
        type=float,
        nargs="*",
        default=list(DEFAULT_MASK_FRACTIONS),
        metavar="F",
        help="fractions of pixels (coordinates) to hide, each in [0, 1); give none to skip "
        "masking (default: %(default)s)",
    )
    parser.add_argument(
        "--noise-std",
        type=float,
        nargs="*",
        default=list(DEFAULT_NOISE_STDS),
        metavar="S",
        help="standard deviations of added Gaussian noise, in scaled data units"
        "; give none to skip noise (default: %(default)s)",
    )

    parser.add_argument(
        "--num-queries",
        type=int,
        help="held-out queries, and stored patterns probed for exact recall (default: 200, or "
        "a fifth of the patterns if that is fewer)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=100,
        help="maximum retrieval steps per query (default: %(default)s)",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="stop a query once its largest coordinate change is below this (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="Langevin temperature, used by --method langevin (default: %(default)s)",
    )

    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, masks and noise (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(".", "pyro-am-out", "retrieve"),
        help="output folder for metrics.json and retrieval.png (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)
