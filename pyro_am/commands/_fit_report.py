"""Presentation for ``pyro-am fit``: figures of the memories and the ELBO trace, and the summary."""

from __future__ import annotations

import math

import numpy as np

from pyro_am.datasets import Dataset

MAX_MEMORIES_SHOWN = 40


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
