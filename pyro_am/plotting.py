"""Figure helpers built on matplotlib's object API with the Agg canvas.

Figures are created as :class:`matplotlib.figure.Figure` objects and drawn on their own
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so nothing here touches ``pyplot``'s
global figure list or the process-wide backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    """Create a figure of ``width`` x ``height`` inches attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path, dpi: int = 100) -> str:
    """Write ``figure`` to ``path`` atomically (a temporary file, then a rename) and return it."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    root, suffix = os.path.splitext(path)
    temporary = f"{root}.tmp-{os.getpid()}{suffix}"
    try:
        figure.savefig(temporary, dpi=dpi)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def pattern_shape(dim: int, image_shape: tuple[int, int] | None) -> tuple[int, int]:
    """Return the (height, width) used to draw a pattern of ``dim`` coordinates.

    Patterns without an image shape are drawn as a single row of ``dim`` cells.
    """
    if image_shape is not None:
        if image_shape[0] * image_shape[1] != dim:
            raise ValueError(
                f"image_shape {tuple(image_shape)} has {image_shape[0] * image_shape[1]} cells, "
                f"but the patterns have dimension {dim}."
            )
        return tuple(image_shape)
    return (1, dim)


def plot_pattern_grid(
    rows: Sequence[tuple[str, np.ndarray]],
    image_shape: tuple[int, int] | None = None,
    hidden: dict[int, np.ndarray] | None = None,
    value_range: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """Draw a grid of patterns, one labelled row per entry of ``rows``.

    :param rows: ``(label, patterns)`` pairs, each ``patterns`` of shape (num_columns, D); every row
        must have the same number of columns.
    :param tuple image_shape: (height, width) of a pattern; None draws each pattern as a strip.
    :param dict hidden: for a row index, a boolean array of shape (num_columns, D) marking hidden
        coordinates, drawn in red.
    :param tuple value_range: (vmin, vmax) of the grey scale, shared by all cells; by default the
        range of all patterns.
    :param str title: optional figure title.
    :returns: the :class:`~matplotlib.figure.Figure`.
    """
    if not rows:
        raise ValueError("rows must contain at least one (label, patterns) pair, but it is empty.")
    arrays = [np.asarray(patterns, dtype=np.float64) for _, patterns in rows]
    num_columns = arrays[0].shape[0]
    dim = arrays[0].shape[1]
    for (label, _), array in zip(rows, arrays, strict=True):
        if array.shape != (num_columns, dim):
            raise ValueError(
                f"row {label!r} has shape {array.shape}, but every row must be "
                f"({num_columns}, {dim})."
            )
    height, width = pattern_shape(dim, image_shape)
    if value_range is None:
        value_range = (min(a.min() for a in arrays), max(a.max() for a in arrays))
    hidden = hidden or {}

    cmap = colormaps["gray"].with_extremes(bad="tab:red")
    cell = 1.0 if height > 1 else max(0.6, 8.0 / math.sqrt(dim))
    aspect_width = cell * (width / height if height > 1 else 1.0)
    label_width = 1.6
    figure = new_figure(
        label_width + aspect_width * num_columns,
        0.3 + cell * len(rows) * (1.0 if height > 1 else 0.5),
    )
    axes = figure.subplots(len(rows), num_columns, squeeze=False)
    for row_index, ((label, _), array) in enumerate(zip(rows, arrays, strict=True)):
        row_hidden = hidden.get(row_index)
        for column in range(num_columns):
            axis = axes[row_index, column]
            image = array[column].reshape(height, width)
            if row_hidden is not None:
                image = np.ma.masked_array(image, mask=row_hidden[column].reshape(height, width))
            axis.imshow(
                image,
                cmap=cmap,
                vmin=value_range[0],
                vmax=value_range[1],
                interpolation="nearest",
                aspect="auto" if height == 1 else "equal",
            )
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row_index, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


__all__ = ["new_figure", "pattern_shape", "plot_pattern_grid", "save_figure"]
