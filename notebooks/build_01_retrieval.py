"""Write notebooks/01_retrieval.ipynb (stored without outputs; the tests execute it)."""

from pathlib import Path

from _notebook import write_notebook

CELLS = [
    (
        "markdown",
        """# Retrieval on handwritten digits

An associative memory stores patterns and retrieves them from corrupted cues by descending an
energy. Here the memories are scikit-learn's 8x8 digits, the energies are a Gaussian kernel density
estimate and a dense associative memory (modern Hopfield network), and the cues are digits with
masked pixels or added noise.""",
    ),
    (
        "code",
        """import os

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits

from pyro_am import DenseAMEnergy, GaussianKDEEnergy, retrieve

SMALL = os.environ.get("PYRO_AM_NOTEBOOK_SMALL") == "1"
num_memories = 300 if SMALL else 1500
generator = torch.Generator().manual_seed(0)

digits = load_digits()
patterns = torch.as_tensor(digits.data, dtype=torch.float64) / 16.0
labels = torch.as_tensor(digits.target)
order = torch.randperm(len(patterns), generator=generator)
memories, memory_labels = patterns[order[:num_memories]], labels[order[:num_memories]]
queries, query_labels = patterns[order[num_memories:]], labels[order[num_memories:]]
queries, query_labels = queries[:100], query_labels[:100]
memories.shape, queries.shape""",
    ),
    (
        "markdown",
        """## The energy is a negative log density

`GaussianKDEEnergy` is `E(x) = -log sum_n exp(-|x - x_n|^2 / (2 h^2))`, and `log_prob` adds the
normalizer, so it is the log density of the kernel density estimate. The bandwidth below is a
fraction of the median distance from a memory to its nearest neighbour.""",
    ),
    (
        "code",
        """distances = torch.cdist(memories, memories)
distances.fill_diagonal_(float("inf"))
bandwidth = 0.5 * distances.min(dim=1).values.median().item()
kde = GaussianKDEEnergy(memories, bandwidth)
dam = DenseAMEnergy(memories, beta=1.0 / bandwidth**2)
print(f"bandwidth {bandwidth:.3f}")
print("mean log density of held-out digits:", kde.log_prob(queries).mean().item())""",
    ),
    (
        "markdown",
        """## Completing digits with half of their pixels masked

The mask marks observed pixels. They stay clamped, and the fixed-point map fills in the others
with the responsibility-weighted mean of the memories' pixels.""",
    ),
    (
        "code",
        """observed = torch.rand(queries.shape, generator=generator, dtype=torch.float64) > 0.5
cue = torch.where(observed, queries, torch.full_like(queries, 0.5))
completed = retrieve(kde, cue, method="fixed_point", mask=observed, max_steps=50)


def nearest_label(states):
    return memory_labels[torch.cdist(states, memories).argmin(dim=1)]


accuracy = (nearest_label(completed.states) == query_labels).double().mean().item()
print(
    f"label accuracy after completion: {accuracy:.2f}; converged: "
    f"{completed.converged.double().mean().item():.2f}"
)""",
    ),
    (
        "markdown",
        """## Denoising: the KDE and the dense associative memory

On Gaussian noise, the KDE's fixed-point map is mean shift and the dense associative memory's is
the modern Hopfield update, one step of softmax attention with the memories as keys and values.
The Hopfield logits `beta x_n . xi` favour memories of large norm (bright digits), so on raw
digits it often lands on the wrong memory. When every memory has the same norm the two energies
agree up to constants (`beta E_dam = E_kde + log N` with `h^2 = 1 / beta`), so normalizing the
memories and the cues removes the bias.""",
    ),
    (
        "code",
        """noise = torch.randn(queries.shape, generator=generator, dtype=torch.float64)
noisy = queries + 0.3 * noise
denoised = retrieve(kde, noisy, method="fixed_point", max_steps=50)
hopfield = retrieve(dam, noisy, method="fixed_point", max_steps=50)


def normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


unit_memories = normalize(memories)
unit_dam = DenseAMEnergy(unit_memories, beta=50.0)
unit_hopfield = retrieve(unit_dam, normalize(noisy), method="fixed_point", max_steps=50)
unit_labels = memory_labels[(normalize(unit_hopfield.states) @ unit_memories.T).argmax(dim=1)]

for name, states in [("noisy", noisy), ("KDE", denoised.states), ("Hopfield", hopfield.states)]:
    accuracy = (nearest_label(states) == query_labels).double().mean().item()
    print(f"{name:22s} label accuracy {accuracy:.2f}")
accuracy = (unit_labels == query_labels).double().mean().item()
print(f"{'Hopfield, unit norms':22s} label accuracy {accuracy:.2f}")""",
    ),
    (
        "code",
        """figure, axes = plt.subplots(3, 8, figsize=(8, 3.2))
for column in range(8):
    for row, image in enumerate([queries[column], noisy[column], denoised.states[column]]):
        axes[row, column].imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        axes[row, column].axis("off")
axes[0, 0].set_title("clean", loc="left")
axes[1, 0].set_title("noisy", loc="left")
axes[2, 0].set_title("retrieved", loc="left")
figure.tight_layout()""",
    ),
    (
        "markdown",
        """## Sampling with Langevin dynamics

With injected noise the same energy is sampled rather than descended: unadjusted Langevin at
temperature `T` draws from `exp(-E / T)` up to a bias of order the step size.""",
    ),
    (
        "code",
        """start = memories[:4].repeat(8, 1)
samples = retrieve(
    kde,
    start,
    method="langevin",
    max_steps=50 if SMALL else 200,
    temperature=1.0,
    generator=generator,
)
print("mean distance moved:", (samples.states - start).norm(dim=1).mean().item())""",
    ),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).resolve().with_name("01_retrieval.ipynb"))
