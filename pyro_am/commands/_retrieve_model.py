"""``pyro-am retrieve --model DIR``: retrieval with a memory fitted by ``pyro-am fit``.

The folder contains a :class:`~pyro_am.models.DPMemory` and the affine scaling it was fitted in.
Patterns (``--data FILE``, or else the data set named in the folder's ``fit.json``) are mapped
into the model's units and split by ``--seed`` into a labelling set and held-out queries. The
queries are corrupted as in the KDE experiment (masked coordinates, or Gaussian noise whose
standard deviation is given in the model's units) and descend the memory's mixture energy::

    x <- sum_k r_k(x) mu_k,   r_k(x) = p(z = k | x),  the responsibility-weighted mean

with masked coordinates clamped. A retrieved state belongs to its most responsible memory. Each
memory is labelled by the majority label of the labelling set's patterns that it is most
responsible for. Label accuracy is the fraction of queries whose retrieved state's memory has
the query's label, and exact recall is the fraction of corrupted memory means whose retrieved
state belongs to the same memory. Mean squared errors are in the model's units.

NOTE: the split here is not the fit's held-out split, so queries may include patterns that the
memory was fitted on.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_am.cli import UsageError
from pyro_am.datasets import (
    DATASETS,
    Dataset,
    load_dataset,
    load_pattern_file,
    split_memories_queries,
)

MODEL_ENERGY = "dp"


def load_queries_dataset(args, metadata: dict) -> Dataset:
    """Load ``--data`` or, without it, the bundled data set that the model was fitted to."""
    if args.data is not None:
        return load_pattern_file(args.data)
    name = metadata.get("dataset")
    if name not in DATASETS:
        raise UsageError(
            f"the model in {args.model!r} was fitted to {name!r}, which is not a bundled data "
            "set; pass the patterns with --data FILE."
        )
    return load_dataset(name)


def memory_majority_labels(
    assignments: torch.Tensor, labels: torch.Tensor, num_memories: int
) -> torch.Tensor:
    """Label each memory by the most frequent label among the patterns assigned to it.

    :param torch.Tensor assignments: the most responsible memory of each pattern, shape (M,).
    :param torch.Tensor labels: non-negative integer labels of the patterns, shape (M,).
    :param int num_memories: K.
    :returns: shape (K,), int64; -1 for a memory that no pattern is assigned to. Ties go to the
        smallest label.
    """
    num_labels = int(labels.max()) + 1 if labels.numel() else 1
    counts = torch.zeros(num_memories, num_labels, dtype=torch.long, device=labels.device)
    counts.index_put_((assignments, labels), torch.ones_like(labels), accumulate=True)
    majority = counts.argmax(dim=1)
    return torch.where(counts.sum(dim=1) > 0, majority, torch.full_like(majority, -1))


def prepare_model_experiment(args, fitted, device: torch.device):
    """Scale and split the patterns for ``fitted``; return what the experiment needs.

    :returns: ``(dataset, model_units_data, memories, memory_labels, queries, query_labels)``.
    :raises UsageError: if the patterns' dimension differs from the model's.
    """
    model = fitted.model
    dataset = load_queries_dataset(args, fitted.metadata)
    if dataset.dim != model.dim:
        raise UsageError(
            f"the patterns have dimension {dataset.dim} but the model in {args.model!r} has "
            f"dimension {model.dim}; pass patterns with {model.dim} columns."
        )
    from pyro_am.commands.retrieve import resolve_num_queries

    args.num_queries = resolve_num_queries(args.num_queries, dataset.num_patterns)
    if args.num_queries >= dataset.num_patterns:
        raise UsageError(
            f"--num-queries must be below the number of patterns ({dataset.num_patterns}) so "
            f"that some remain to label the memories, but got {args.num_queries}."
        )
    scaled = fitted.scaling.transform(np.asarray(dataset.data, dtype=np.float64))
    data = torch.as_tensor(scaled, dtype=model.dtype, device=device)
    labels = None
    if dataset.labels is not None:
        labels = torch.as_tensor(dataset.labels, dtype=torch.long, device=device)
    labelling, labelling_labels, queries, query_labels = split_memories_queries(
        data, labels, args.num_queries, seed=args.seed
    )

    memories = model.memories.detach()
    memory_labels = None
    if labelling_labels is not None and query_labels is not None:
        with torch.no_grad():
            assignments = model.assign(labelling).argmax(dim=-1)
        memory_labels = memory_majority_labels(assignments, labelling_labels, memories.shape[0])
    return dataset, data, memories, memory_labels, queries, query_labels


def most_responsible(model):
    """Return a function mapping states (Q, D) to the index of their most responsible memory."""

    def nearest(states: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.assign(states).argmax(dim=-1)

    return nearest


def model_settings(args, model) -> dict:
    """Describe the retrieval settings of the ``--model`` experiment for ``metrics.json``."""
    return {
        "model": args.model,
        "energy": "mixture energy of the fitted DP memory",
        "num_memories": int(model.num_memories),
        "method": args.method,
        "max_steps": args.max_steps,
        "tol": args.tol,
        "temperature": args.temperature,
        "seed": args.seed,
        "device": str(model.memories.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "units": "the model's scaled units",
    }


def to_data_units(examples: dict, scaling) -> dict:
    """Map the example images of the figure from the model's units back to the data's."""

    def inverse(values):
        return np.asarray(scaling.inverse(np.asarray(values, dtype=np.float64)))

    converted = {"clean": inverse(examples["clean"]), "levels": []}
    for level in examples["levels"]:
        converted["levels"].append(
            {
                "label": level["label"],
                "corrupted": inverse(level["corrupted"]),
                "hidden": level["hidden"],
                "retrieved": {name: inverse(v) for name, v in level["retrieved"].items()},
            }
        )
    return converted
