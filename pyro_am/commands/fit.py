"""``pyro-am fit``: fit a DP memory to a data set and write the model, diagnostics and figures.

The patterns (by default scikit-learn's 1,797 8x8 digits) are scaled, split into training and
held-out points, and a :class:`~pyro_am.models.DPMemory` (a truncated Dirichlet or Pitman-Yor
process mixture of Gaussians whose components are the memories) is fitted to the training points.
The prior on the memories is centred on the training mean, ``mu_k ~ N(m0, s0^2 I)``, with ``m0``
the mean of the scaled training points and ``s0`` their root mean squared deviation from it, so
that the prior covers the data whatever the scaling.

Reported: the number of memories (those with weight above ``--weight-threshold``) and how many
were created, pruned and merged during the fit, and the held-out log likelihood per point. The log
likelihood is given in scaled units and in the data's original units, which adds the log Jacobian
of the affine scaling. When the data have labels, the adjusted Rand index and normalized mutual
information of the memory assignments ``argmax_k q(z = k | x)`` are reported too.

Written to ``--out``: ``model.pt`` and ``fit.json`` (the fitted memory and the scaling, which
``pyro-am retrieve --model DIR`` reads), ``inference_data.nc`` (ArviZ InferenceData, netCDF via
h5netcdf), ``memories.png``, ``elbo.png`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pyro_am.cli import UsageError
from pyro_am.datasets import DATASETS, Dataset, load_dataset, load_pattern_file

logger = logging.getLogger(__name__)

SCALINGS = ("auto", "unit", "standardize", "none")
METHODS = ("cavi", "svi")
COVARIANCES = ("isotropic", "diagonal")
MODEL_FILE = "model.pt"
METADATA_FILE = "fit.json"
MAX_MEMORIES_SHOWN = 40


# -- scaling -------------------------------------------------------------------------------------
@dataclass
class Scaling:
    """The affine map ``z = (x - shift) / factor`` applied per column before fitting.

    :ivar str name: ``unit`` (one global shift and factor onto [0, 1]), ``standardize`` (per
        column mean and standard deviation) or ``none``.
    :ivar list shift: the subtracted value per column.
    :ivar list factor: the divisor per column, positive.
    """

    name: str
    shift: list[float]
    factor: list[float]

    @classmethod
    def fit(cls, name: str, data: np.ndarray) -> Scaling:
        dim = data.shape[1]
        if name == "unit":
            low, high = float(data.min()), float(data.max())
            span = high - low if high > low else 1.0
            return cls(name, [low] * dim, [span] * dim)
        if name == "standardize":
            std = data.std(axis=0)
            std = np.where(std > 1e-12, std, 1.0)
            return cls(name, data.mean(axis=0).tolist(), std.tolist())
        return cls("none", [0.0] * dim, [1.0] * dim)

    def transform(self, data):
        shift, factor = self._as(data)
        return (data - shift) / factor

    def inverse(self, data):
        shift, factor = self._as(data)
        return data * factor + shift

    def log_abs_det_jacobian(self) -> float:
        """Return ``log |dz/dx| = -sum_d log factor_d``, so ``log p(x) = log p(z) + this``."""
        return -float(np.log(np.asarray(self.factor)).sum())

    def _as(self, data):
        if isinstance(data, torch.Tensor):
            return (
                torch.as_tensor(self.shift, dtype=data.dtype, device=data.device),
                torch.as_tensor(self.factor, dtype=data.dtype, device=data.device),
            )
        return np.asarray(self.shift), np.asarray(self.factor)


def choose_scaling(name: str, dataset: Dataset) -> str:
    """Resolve ``auto``: ``unit`` for images (one grey scale for all pixels), else ``standardize``.

    Per-pixel standardization would blow up the nearly constant border pixels of the digits.
    """
    if name != "auto":
        return name
    return "unit" if dataset.image_shape is not None else "standardize"


# -- computation ---------------------------------------------------------------------------------
def split_held_out(num_points: int, fraction: float, seed: int):
    """Return (train index, held-out index) from a seeded permutation; held-out may be empty."""
    order = np.random.default_rng(seed).permutation(num_points)
    num_held_out = int(round(fraction * num_points))
    num_held_out = min(num_held_out, num_points - 1)
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


def build_memory(train: torch.Tensor, settings: dict):
    """Construct the DP memory with its prior centred on the training data (module docstring)."""
    from pyro_am.models import DPMemory

    prior_mean = train.mean(dim=0)
    prior_scale = float((train - prior_mean).square().sum(dim=1).mean().div(train.shape[1]).sqrt())
    return DPMemory(
        train.shape[1],
        truncation=settings["truncation"],
        concentration=settings["concentration"],
        discount=settings["discount"],
        prior_mean=prior_mean,
        prior_scale=max(prior_scale, 1e-6),
        covariance=settings["covariance"],
        per_memory_scale=settings["per_memory_scale"],
        # A memory with few data falls back to a variance of sigma0^2, so sigma0 is the data scale.
        scale_prior=(train.shape[1], prior_scale) if settings["per_memory_scale"] else None,
    )


def fit_memory(train: torch.Tensor, settings: dict, progress: bool = True):
    """Fit a DP memory to ``train``; returns ``(model, fit_result)``."""
    model = build_memory(train, settings)
    result = model.fit(
        train,
        method=settings["method"],
        max_iter=settings["max_iter"],
        progress=progress,
        seed=settings["seed"],
    )
    return model, result


def clustering_scores(model, x: torch.Tensor, labels: np.ndarray | None) -> dict:
    """Compute ARI and NMI of ``argmax_k q(z = k | x)`` against ``labels`` (None without labels)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if labels is None or x.shape[0] == 0:
        return {"ari": None, "nmi": None}
    with torch.no_grad():
        assignments = model.assign(x).argmax(dim=-1).cpu().numpy()
    return {
        "ari": float(adjusted_rand_score(labels, assignments)),
        "nmi": float(normalized_mutual_info_score(labels, assignments)),
    }


def evaluate(model, scaling, train, held_out, train_labels, held_out_labels, weight_threshold):
    """Score the fitted memory on the training and held-out points; returns a metrics dict."""
    with torch.no_grad():
        weights = model.weights.detach().cpu().numpy()
        held_out_ll = float(model.log_predictive(held_out).mean()) if len(held_out) else None
        train_ll = float(model.log_predictive(train).mean())
    jacobian = scaling.log_abs_det_jacobian()
    return {
        "num_memories": int((weights > weight_threshold).sum()),
        "truncation": int(model.num_memories),
        "weights": sorted((float(w) for w in weights), reverse=True),
        "train_log_likelihood": train_ll,
        "held_out_log_likelihood": held_out_ll,
        "held_out_log_likelihood_original_units": (
            None if held_out_ll is None else held_out_ll + jacobian
        ),
        "train": clustering_scores(model, train, train_labels),
        "held_out": clustering_scores(model, held_out, held_out_labels),
    }


# -- presentation --------------------------------------------------------------------------------
def plot_memories(memories: np.ndarray, weights: np.ndarray, dataset: Dataset, data=None):
    """Draw the memories by decreasing weight: as images, as points over 2-D data, or a heatmap.

    :param numpy.ndarray memories: memories in the data's original units, shape (K, D).
    :param numpy.ndarray weights: their weights, shape (K,).
    :param data: the original data, drawn behind the memories when D = 2.
    """
    from pyro_am.plotting import new_figure

    order = np.argsort(-weights)[:MAX_MEMORIES_SHOWN]
    memories, weights = memories[order], weights[order]
    if dataset.image_shape is not None:
        columns = min(10, len(order))
        rows = math.ceil(len(order) / columns)
        figure = new_figure(1.2 * columns, 1.35 * rows + 0.4)
        axes = figure.subplots(rows, columns, squeeze=False)
        for index, axis in enumerate(axes.flat):
            axis.set_axis_off()
            if index < len(order):
                axis.imshow(memories[index].reshape(dataset.image_shape), cmap="gray_r")
                axis.set_title(f"w={weights[index]:.3f}", fontsize=8)
    elif dataset.dim == 2:
        figure = new_figure(5.0, 4.5)
        axis = figure.subplots()
        if data is not None:
            axis.scatter(data[:, 0], data[:, 1], s=6, color="0.6", label="data")
        axis.scatter(
            memories[:, 0], memories[:, 1], s=400 * weights + 10, color="tab:red", label="memories"
        )
        axis.set_xlabel(dataset.feature_names[0])
        axis.set_ylabel(dataset.feature_names[1])
        axis.legend(fontsize=8)
    else:
        figure = new_figure(min(12.0, 2.0 + 0.35 * dataset.dim), 1.0 + 0.3 * len(order))
        axis = figure.subplots()
        image = axis.imshow(memories, aspect="auto", cmap="coolwarm")
        axis.set_yticks(range(len(order)), [f"w={w:.3f}" for w in weights], fontsize=7)
        axis.set_xticks(range(dataset.dim), dataset.feature_names, rotation=90, fontsize=7)
        figure.colorbar(image, ax=axis)
    figure.suptitle(f"{dataset.name}: memories by weight", fontsize=10)
    return figure


def plot_elbo(elbo, method: str):
    """Draw the ELBO per iteration of the fit."""
    from matplotlib.ticker import MaxNLocator

    from pyro_am.plotting import new_figure

    figure = new_figure(5.0, 3.2)
    axis = figure.subplots()
    axis.plot(np.arange(1, len(elbo) + 1), elbo, color="tab:blue")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("iteration")
    axis.set_ylabel("ELBO")
    axis.set_title(f"ELBO trace ({method.upper()})", fontsize=10)
    return figure


def format_summary(metrics: dict) -> str:
    """Format the metrics printed at the end of a fit."""
    data, fit, scores = metrics["data"], metrics["fit"], metrics["scores"]
    threshold = metrics["settings"]["weight_threshold"]
    lines = [
        f"{data['name']}: {data['num_train']} training and {data['num_held_out']} held-out "
        f"points of dimension {data['dim']}, scaling {data['scaling']}",
        f"fit: {fit['method']}, {fit['iterations']} iterations "
        f"({'converged' if fit['converged'] else 'not converged'}), "
        f"{fit['wall_time']:.2f} s",
        f"memories: {scores['num_memories']} with weight > {threshold:g}"
        f" (truncation {scores['truncation']}; {fit['num_created']} created, "
        f"{fit['num_pruned']} pruned, {fit['num_merged']} merged during the fit)",
    ]
    held_out = scores["held_out_log_likelihood"]
    if held_out is not None:
        lines.append(
            f"held-out log likelihood per point: {held_out:.4f} (scaled units), "
            f"{scores['held_out_log_likelihood_original_units']:.4f} (original units)"
        )
    for split in ("train", "held_out"):
        if scores[split]["ari"] is not None:
            lines.append(
                f"{split.replace('_', '-')} ARI {scores[split]['ari']:.3f}, "
                f"NMI {scores[split]['nmi']:.3f} (assignments vs labels)"
            )
    return "\n".join(lines)


# -- I/O -----------------------------------------------------------------------------------------
def _write_json(path: str, payload: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)


def write_outputs(out_dir, model, metadata, inference_data, metrics, figures) -> dict[str, str]:
    """Write the model, its metadata, the InferenceData, the figures and metrics.json."""
    from pyro_am.plotting import save_figure

    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.png") for name in figures}
    for name, figure in figures.items():
        save_figure(figure, paths[name])

    paths["model"] = os.path.join(out_dir, MODEL_FILE)
    model.save(paths["model"])
    paths["metadata"] = os.path.join(out_dir, METADATA_FILE)
    _write_json(paths["metadata"], metadata)

    paths["inference_data"] = os.path.join(out_dir, "inference_data.nc")
    temporary = f"{paths['inference_data']}.tmp-{os.getpid()}"
    inference_data.to_netcdf(temporary, engine="h5netcdf")
    os.replace(temporary, paths["inference_data"])

    paths["metrics"] = os.path.join(out_dir, "metrics.json")
    files = {name: os.path.basename(path) for name, path in paths.items()}
    _write_json(paths["metrics"], {**metrics, "files": files})
    return paths


@dataclass
class FittedMemory:
    """A DP memory written by ``pyro-am fit`` with the scaling of its data.

    :ivar model: the :class:`~pyro_am.models.DPMemory`.
    :ivar Scaling scaling: the map from the data's units to the model's.
    :ivar dict metadata: the contents of ``fit.json``.
    """

    model: object
    scaling: Scaling
    metadata: dict

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])


def load_fitted(directory) -> FittedMemory:
    """Read a model folder written by ``pyro-am fit``.

    :raises FileNotFoundError: if the folder lacks ``model.pt`` or ``fit.json``.
    """
    from pyro_am.models import DPMemory

    directory = os.fspath(directory)
    model_path = os.path.join(directory, MODEL_FILE)
    metadata_path = os.path.join(directory, METADATA_FILE)
    for path in (model_path, metadata_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path!r} not found; --model must be a folder written by `pyro-am fit --out`."
            )
    with open(metadata_path, encoding="utf-8") as handle:
        metadata = json.load(handle)
    scaling = Scaling(**metadata["scaling"])
    return FittedMemory(DPMemory.load(model_path), scaling, metadata)


# -- command -------------------------------------------------------------------------------------
def _check_arguments(args) -> None:
    if args.truncation < 1:
        raise UsageError(f"--truncation must be at least 1, but got {args.truncation}.")
    if not (math.isfinite(args.concentration) and args.concentration > 0):
        raise UsageError(
            f"--concentration must be a positive number, but got {args.concentration}."
        )
    if not (math.isfinite(args.discount) and 0 <= args.discount < 1):
        raise UsageError(f"--discount must be in [0, 1), but got {args.discount}.")
    if args.max_iter < 1:
        raise UsageError(f"--max-iter must be at least 1, but got {args.max_iter}.")
    if not (math.isfinite(args.held_out_fraction) and 0 <= args.held_out_fraction < 1):
        raise UsageError(
            f"--held-out-fraction must be in [0, 1), but got {args.held_out_fraction}."
        )
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, but got {args.num_samples}.")
    if not (0 < args.weight_threshold < 1):
        raise UsageError(f"--weight-threshold must be in (0, 1), but got {args.weight_threshold}.")
    if args.data is not None and args.dataset is not None:
        raise UsageError("give --data FILE or --dataset NAME, not both.")


def load_data(args) -> Dataset:
    """Load ``--data FILE`` or ``--dataset NAME`` (default digits) and check it has >= 2 points."""
    if args.data is not None:
        dataset = load_pattern_file(args.data)
    else:
        dataset = load_dataset(args.dataset or "digits")
    if not np.isfinite(dataset.data).all():
        raise UsageError(f"{dataset.name} contains NaN or infinite values; remove them first.")
    if dataset.num_patterns < 2:
        raise UsageError(
            f"{dataset.name} has {dataset.num_patterns} pattern(s); a fit needs at least 2."
        )
    return dataset


def run(args) -> int:
    from pyro_am.commands.retrieve import resolve_device
    from pyro_am.diagnostics import to_inference_data

    _check_arguments(args)
    device = resolve_device(args.device)
    if args.distributed:
        from pyro_am.commands._fit_distributed import join_process_group, run_worker

        rank, world_size, device = join_process_group(device)
        if rank != 0:
            return run_worker(args, device)
    dataset = load_data(args)
    scaling_name = choose_scaling(args.scale, dataset)

    train_index, held_out_index = split_held_out(
        dataset.num_patterns, args.held_out_fraction, args.seed
    )
    scaling = Scaling.fit(scaling_name, dataset.data[train_index])
    scaled = scaling.transform(dataset.data)
    train = torch.as_tensor(scaled[train_index], dtype=torch.float32, device=device)
    held_out = torch.as_tensor(scaled[held_out_index], dtype=torch.float32, device=device)
    labels = dataset.labels
    train_labels = None if labels is None else labels[train_index]
    held_out_labels = None if labels is None else labels[held_out_index]

    settings = {
        "truncation": args.truncation,
        "concentration": args.concentration,
        "discount": args.discount,
        "covariance": args.covariance,
        "per_memory_scale": args.per_memory_scale,
        "method": args.method,
        "max_iter": args.max_iter,
        "seed": args.seed,
        "held_out_fraction": args.held_out_fraction,
        "num_samples": args.num_samples,
        "posterior_predictive": args.posterior_predictive,
        "weight_threshold": args.weight_threshold,
        "device": str(device),
    }
    if args.distributed:
        from pyro_am.commands._fit_distributed import fit_memory_sharded

        settings["world_size"] = world_size
        model, result = fit_memory_sharded(
            train, settings, scaling, dataset.num_patterns, progress=not args.no_progress
        )
    else:
        model, result = fit_memory(train, settings, progress=not args.no_progress)
    scores = evaluate(
        model, scaling, train, held_out, train_labels, held_out_labels, args.weight_threshold
    )
    inference_data = to_inference_data(
        model,
        train,
        num_samples=args.num_samples,
        fit_result=result,
        feature_names=dataset.feature_names,
        posterior_predictive=args.posterior_predictive,
        seed=args.seed,
    )

    metrics = {
        "data": {
            "name": dataset.name,
            "num_patterns": dataset.num_patterns,
            "num_train": int(train.shape[0]),
            "num_held_out": int(held_out.shape[0]),
            "dim": dataset.dim,
            "scaling": scaling_name,
        },
        "settings": settings,
        "fit": {
            "method": result.method,
            "iterations": int(result.iterations),
            "converged": bool(result.converged),
            "num_created": int(result.num_created),
            "num_pruned": int(result.num_pruned),
            "num_merged": int(result.num_merged),
            "wall_time": float(result.wall_time),
            "final_elbo": float(result.elbo[-1]) if result.elbo else None,
        },
        "scores": scores,
    }
    metadata = {
        "dim": dataset.dim,
        "dataset": dataset.name,
        "feature_names": list(dataset.feature_names),
        "image_shape": None if dataset.image_shape is None else list(dataset.image_shape),
        "scaling": asdict(scaling),
        "settings": settings,
    }
    with torch.no_grad():
        memories = scaling.inverse(model.memories.detach().cpu().numpy().astype(np.float64))
        weights = model.weights.detach().cpu().numpy()
    figures = {
        "memories": plot_memories(memories, weights, dataset, dataset.data),
        "elbo": plot_elbo(result.elbo, result.method),
    }
    paths = write_outputs(args.out, model, metadata, inference_data, metrics, figures)

    print(format_summary(metrics))
    print(f"wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))} to {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fit a DP memory (default: 8x8 digits) and write the model and diagnostics",
        description=(
            "Fit a Dirichlet process (or Pitman-Yor) memory, a mixture of Gaussians that creates "
            "and prunes memories as the data require, and report the number of memories, the "
            "held-out log likelihood and, with labels, ARI and NMI. Writes the model (readable by "
            "`pyro-am retrieve --model DIR`), ArviZ InferenceData as netCDF, figures and "
            "metrics.json."
        ),
    )

    source = parser.add_argument_group("data")
    source.add_argument("--dataset", choices=DATASETS, help="bundled data set (default: digits)")
    source.add_argument(
        "--data",
        metavar="FILE",
        help="patterns to fit instead: .npy (2-D), .npz (patterns, optional labels) or .csv "
        "(optional header; a last column named 'label' holds labels)",
    )
    source.add_argument(
        "--scale",
        choices=SCALINGS,
        default="auto",
        help="unit: one global map onto [0, 1]; standardize: per-column mean 0, sd 1; none; "
        "auto (default): unit for images, standardize otherwise",
    )
    source.add_argument(
        "--held-out-fraction",
        type=float,
        default=0.2,
        help="fraction of points held out for the log likelihood, in [0, 1) (default: 0.2)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--truncation", type=int, default=20, help="initial truncation K (>= 1)")
    model.add_argument(
        "--concentration", type=float, default=1.0, help="stick-breaking concentration alpha > 0"
    )
    model.add_argument(
        "--discount", type=float, default=0.0, help="Pitman-Yor discount d in [0, 1); 0 is the DP"
    )
    model.add_argument(
        "--covariance",
        choices=COVARIANCES,
        default="isotropic",
        help="noise covariance of each memory: s^2 I (isotropic, the default) or diagonal",
    )
    model.add_argument(
        "--per-memory-scale",
        action="store_true",
        help="learn one noise scale per memory instead of one shared by all memories",
    )

    fitting = parser.add_argument_group("fitting")
    fitting.add_argument("--method", choices=METHODS, default="cavi")
    fitting.add_argument("--max-iter", type=int, default=200, help="iterations (default: 200)")
    fitting.add_argument("--seed", type=int, default=0, help="seed of the split and the fit")
    fitting.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    fitting.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fitting.add_argument(
        "--distributed",
        action="store_true",
        help="fit data-parallel under torchrun (torchrun --nproc-per-node N -m pyro_am fit "
        "--distributed ...): each rank fits its shard of the training points, gloo on CPU and "
        "nccl on CUDA, and rank 0 writes the outputs",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--num-samples",
        type=int,
        default=200,
        help="posterior draws stored in the InferenceData (default: 200)",
    )
    output.add_argument(
        "--posterior-predictive",
        action="store_true",
        help="also store one replicate of the training data per draw in the InferenceData "
        "(num-samples x N x D values; 70 MB for the digits at the defaults)",
    )
    output.add_argument(
        "--weight-threshold",
        type=float,
        default=1e-2,
        help="a memory counts when its weight exceeds this (default: %(default)s)",
    )
    output.add_argument(
        "--out",
        default=os.path.join(".", "pyro-am-out", "fit"),
        help="output folder (default: %(default)s)",
    )

    parser.set_defaults(handler=run)
