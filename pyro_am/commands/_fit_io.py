"""The files of ``pyro-am fit``: writing the outputs folder and reading the fitted memory back.

``model.pt`` and ``fit.json`` together are the fitted memory and the scaling of its data, which
:func:`load_fitted` reads. Each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from dataclasses import dataclass

from pyro_am._files import write_json
from pyro_am.commands._fit_data import Scaling

MODEL_FILE = "model.pt"
METADATA_FILE = "fit.json"


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
    write_json(paths["metadata"], metadata)

    paths["inference_data"] = os.path.join(out_dir, "inference_data.nc")
    temporary = f"{paths['inference_data']}.tmp-{os.getpid()}"
    inference_data.to_netcdf(temporary, engine="h5netcdf")
    os.replace(temporary, paths["inference_data"])

    paths["metrics"] = os.path.join(out_dir, "metrics.json")
    files = {name: os.path.basename(path) for name, path in paths.items()}
    write_json(paths["metrics"], {**metrics, "files": files})
    return paths


@dataclass
class FittedMemory:
    """A DP memory written by ``pyro-am fit`` with the scaling of its data.

    :ivar model: the :class:`~pyro_am.models.DPMemory`.
    :ivar scaling: the map from the data's units to the model's.
    :ivar metadata: the contents of ``fit.json``.
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
    :raises ValueError: if either file is unreadable or the two disagree.
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
    try:
        with open(metadata_path, encoding="utf-8") as handle:
            metadata = json.load(handle)
        scaling = Scaling(**metadata["scaling"])
        dim = int(metadata["dim"])
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"{metadata_path!r} is not a fit.json written by `pyro-am fit` ({error!r}); "
            "fit the model again."
        ) from error
    for name, values in (("shift", scaling.shift), ("factor", scaling.factor)):
        if len(values) != dim:
            raise ValueError(
                f"{metadata_path!r} gives {len(values)} scaling {name} values for dimension "
                f"{dim}; fit the model again."
            )
    if not all(math.isfinite(f) and f > 0 for f in scaling.factor):
        raise ValueError(
            f"{metadata_path!r} has a scaling factor that is not a positive number; fit the "
            "model again."
        )
    try:
        model = DPMemory.load(model_path)
    # torch.load raises one of these on a truncated, foreign or corrupt file.
    except (
        RuntimeError,
        EOFError,
        KeyError,
        TypeError,
        ValueError,
        pickle.UnpicklingError,
        struct.error,
    ) as error:
        raise ValueError(
            f"{model_path!r} is not a DP memory written by `pyro-am fit` ({type(error).__name__}); "
            "fit the model again."
        ) from error
    if model.dim != dim:
        raise ValueError(
            f"{model_path!r} has dimension {model.dim} but {metadata_path!r} gives {dim}; fit the "
            "model again."
        )
    return FittedMemory(model, scaling, metadata)
