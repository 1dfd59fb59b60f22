"""``pyro-am fit``: fit a DP memory to a data set and write the model, diagnostics and figures.

The patterns (by default scikit-learn's 1,797 8x8 digits) are scaled, split into training and
held-out points, and a :class:`~pyro_am.models.DPMemory` (a truncated Dirichlet or Pitman-Yor
process mixture of Gaussians whose components are the memories) is fitted to the training points.
The prior on the memories is centred on the training mean, ``mu_k ~ N(m0, s0^2 I)``, with ``m0``
the mean of the scaled training points and ``s0`` their root mean squared deviation from it, so
that the prior covers the data whatever the scaling. Each memory has its own noise scale unless
``--no-per-memory-scale`` asks for one scale shared by all memories.

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

import argparse
import logging
import math
import os
from dataclasses import asdict

import numpy as np
import torch

from pyro_am.cli import UsageError
from pyro_am.commands._fit_data import SCALINGS as SCALINGS
from pyro_am.commands._fit_data import Scaling, choose_scaling, load_data, split_held_out
from pyro_am.commands._fit_io import METADATA_FILE as METADATA_FILE
from pyro_am.commands._fit_io import MODEL_FILE as MODEL_FILE
from pyro_am.commands._fit_io import FittedMemory as FittedMemory
from pyro_am.commands._fit_io import load_fitted as load_fitted
from pyro_am.commands._fit_io import write_outputs
from pyro_am.commands._fit_report import MAX_MEMORIES_SHOWN as MAX_MEMORIES_SHOWN
from pyro_am.commands._fit_report import format_summary, plot_elbo, plot_memories
from pyro_am.datasets import DATASETS

logger = logging.getLogger(__name__)

METHODS = ("cavi", "svi")
COVARIANCES = ("isotropic", "diagonal")
# Two points are the fewest from which a memory's mean and noise scale can both be estimated.
MIN_TRAIN_POINTS = 2


# -- computation ---------------------------------------------------------------------------------
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
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be an integer in [0, 2^32 - 1], but got {args.seed}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder; pass a folder path.")


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
    if len(train_index) < MIN_TRAIN_POINTS:
        raise UsageError(
            f"--held-out-fraction {args.held_out_fraction:g} leaves {len(train_index)} of "
            f"{dataset.num_patterns} points for training, but the fit needs at least "
            f"{MIN_TRAIN_POINTS}; lower the fraction."
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
    model.add_argument(
        "--truncation", type=int, default=20, help="initial truncation K >= 1 (default: 20)"
    )
    model.add_argument(
        "--concentration",
        type=float,
        default=1.0,
        help="stick-breaking concentration alpha > 0 (default: 1.0)",
    )
    model.add_argument(
        "--discount",
        type=float,
        default=0.0,
        help="Pitman-Yor discount d in [0, 1); 0, the default, is the Dirichlet process",
    )
    model.add_argument(
        "--covariance",
        choices=COVARIANCES,
        default="isotropic",
        help="noise covariance of each memory: s^2 I (isotropic, the default) or diagonal",
    )
    model.add_argument(
        "--per-memory-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learn one noise scale per memory (the default), or with --no-per-memory-scale one "
        "scale shared by all memories",
    )

    fitting = parser.add_argument_group("fitting")
    fitting.add_argument(
        "--method",
        choices=METHODS,
        default="cavi",
        help="closed-form coordinate ascent (cavi, the default) or Pyro SVI (svi)",
    )
    fitting.add_argument("--max-iter", type=int, default=200, help="iterations (default: 200)")
    fitting.add_argument(
        "--seed", type=int, default=0, help="seed of the split and the fit (default: 0)"
    )
    fitting.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)"
    )
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
