"""Write notebooks/02_dp_memory.ipynb (stored without outputs; the tests execute it)."""

from pathlib import Path

from _notebook import write_notebook

CELLS = [
    (
        "markdown",
        """# A DP memory of handwritten digits

A DP memory is a Gaussian mixture whose components are the memories, with a truncated
stick-breaking (Dirichlet process) prior on the weights, so the fit decides how many memories the
data need. This notebook fits one to scikit-learn's 8x8 digits by coordinate ascent (CAVI) and
looks at the memories it learned. It then scores the memory on held-out digits, shows the rule
that creates memories, completes digits with the fitted memory, and reads its posterior with
ArviZ. Set `PYRO_AM_NOTEBOOK_SMALL=1` to run it at a reduced size.""",
    ),
    (
        "code",
        """import os

import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pyro_am.diagnostics import import_arviz, to_inference_data
from pyro_am.models import DPMemory

az = import_arviz()
SMALL = os.environ.get("PYRO_AM_NOTEBOOK_SMALL") == "1"
pyro.set_rng_seed(0)

digits = load_digits()
patterns = torch.as_tensor(digits.data, dtype=torch.float64) / 16.0
labels = digits.target
order = np.random.default_rng(0).permutation(len(patterns))
num_train = 600 if SMALL else 1500
train, test = patterns[order[:num_train]], patterns[order[num_train:]]
train_labels, test_labels = labels[order[:num_train]], labels[order[num_train:]]
train.shape, test.shape""",
    ),
    (
        "markdown",
        """## Fitting by coordinate ascent

The prior on each memory is `N(m0, s0^2 I)` with `m0` the mean training digit and `s0` the pixel
standard deviation, so the prior covers the data. The fit starts from k-means with 10 memories.
The truncation grows while the last stick keeps more than 1% of the weight, and memories whose
weight falls below 0.1% are pruned. Each change is recorded in `result.events`.""",
    ),
    (
        "code",
        """memory = DPMemory(
    dim=64,
    truncation=10,
    concentration=1.0,
    prior_mean=train.mean(0),
    prior_scale=float(train.std()),
)
result = memory.fit(train, method="cavi", max_iter=200, progress=False, seed=0)
print(f"{result.iterations} iterations, converged: {result.converged}")
print(f"{memory.num_memories} memories: {result.num_created} created, {result.num_pruned} pruned")
print(f"noise scale s = {float(memory.scale):.3f}")
for event in result.events[:5]:
    print(event)

figure, axis = plt.subplots(figsize=(5, 3))
axis.plot(np.arange(1, len(result.elbo) + 1), result.elbo)
axis.set_xlabel("iteration")
axis.set_ylabel("ELBO")
figure.tight_layout()""",
    ),
    (
        "markdown",
        """## The memories

The memories are the posterior means of the components, drawn here by decreasing expected
weight. Most are one digit class drawn in one style.""",
    ),
    (
        "code",
        """weights = memory.weights.numpy()
ranked = np.argsort(-weights)
columns = 10
rows = int(np.ceil(len(ranked) / columns))
figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.3), squeeze=False)
for axis in axes.flat:
    axis.axis("off")
for axis, k in zip(axes.flat, ranked, strict=False):
    axis.imshow(memory.memories[k].reshape(8, 8).numpy(), cmap="gray_r")
    axis.set_title(f"{weights[k]:.3f}", fontsize=8)
figure.tight_layout()""",
    ),
    (
        "markdown",
        """## Held-out digits

`log_predictive` is the posterior predictive density under the variational posterior,
`sum_k E[w_k] N(x; m_k, (s^2 + t_k^2) I)`; pixels are in [0, 1], so the density can exceed 1.
Assigning each digit to its most responsible memory gives a clustering, scored against the digit
labels. There are more memories than classes, which lowers the adjusted Rand index more than the
normalized mutual information.""",
    ),
    (
        "code",
        """with torch.no_grad():
    held_out = memory.log_predictive(test).mean().item()
    assignments = memory.assign(test).argmax(-1).numpy()
print(f"held-out log likelihood per digit: {held_out:.2f}")
print(
    f"ARI {adjusted_rand_score(test_labels, assignments):.3f}, "
    f"NMI {normalized_mutual_info_score(test_labels, assignments):.3f}"
)""",
    ),
    (
        "markdown",
        """## Creating memories

In the Chinese restaurant view a digit `x` joins memory `k` with weight `(n_k - d) N(x; m_k, s^2 I)`
or opens a new memory with weight `(alpha + d K) N(x; m0, (s^2 + s0^2) I)`. The new-memory
Gaussian is wider, so its normalizer is smaller, and both normalizers matter.
`energy(new_memory=True)` is the energy of this rule; its last component is the new-memory
attractor. Held-out digits mostly join an existing memory, while uniform noise images open a new
one.""",
    ),
    (
        "code",
        """energy = memory.energy(new_memory=True)
with torch.no_grad():
    test_choice = energy.responsibilities(test).argmax(-1)
    noise = torch.rand(20, 64, dtype=torch.float64)
    noise_choice = energy.responsibilities(noise).argmax(-1)
new_index = memory.num_memories
test_new = (test_choice == new_index).double().mean().item()
noise_new = (noise_choice == new_index).double().mean().item()
print(f"held-out digits that would open a new memory: {test_new:.3f}")
print(f"noise images that would open a new memory:    {noise_new:.3f}")""",
    ),
    (
        "markdown",
        """`partial_fit` applies the rule one digit at a time, starting from an empty memory and
keeping the noise scale learned above. Most memories open within the first few hundred digits,
and new ones then become rare: the join weights `n_k - d` grow with every digit, while the
new-memory weight stays at `alpha + d K`. Streaming makes one greedy pass and never revisits an
assignment, so it keeps more memories than the batch fit.""",
    ),
    (
        "code",
        """stream = DPMemory(
    dim=64,
    truncation=1,
    concentration=1.0,
    prior_mean=train.mean(0),
    prior_scale=float(train.std()),
    scale=float(memory.scale),
)
seen, counts = [], []
for start in range(0, len(train), 50):
    stream.partial_fit(train[start : start + 50])
    seen.append(min(start + 50, len(train)))
    counts.append(stream.num_memories)
figure, axis = plt.subplots(figsize=(5, 3))
axis.plot(seen, counts, marker="o")
axis.set_xlabel("digits seen")
axis.set_ylabel("memories")
figure.tight_layout()""",
    ),
    (
        "markdown",
        """## Completing digits

The fitted memory is an energy, `-log sum_k E[w_k] N(x; m_k, s^2 I)`, and `retrieve` descends it.
With half of the pixels hidden, the observed half stays clamped and the hidden half moves to the
responsibility-weighted mean of the memories.""",
    ),
    (
        "code",
        """generator = torch.Generator().manual_seed(1)
queries = test[:8]
observed = torch.rand(queries.shape, generator=generator, dtype=torch.float64) > 0.5
corrupted = torch.where(observed, queries, train.mean(0).expand_as(queries))
completed = memory.retrieve(corrupted, mask=observed, max_steps=50).states
hidden = torch.where(observed, queries, torch.nan)
figure, axes = plt.subplots(3, 8, figsize=(8, 3.2))
for column in range(8):
    for row, images in enumerate((queries, hidden, completed)):
        image = images[column].reshape(8, 8).numpy()
        axes[row, column].imshow(image, cmap="gray_r", vmin=0, vmax=1)
        axes[row, column].axis("off")
for row, name in enumerate(("original", "half hidden", "completed")):
    axes[row, 0].set_title(name, loc="left", fontsize=9)
figure.tight_layout()""",
    ),
    (
        "markdown",
        """## Reading the posterior with ArviZ

`to_inference_data` draws from the variational posterior and stores the draws of `weights` and
`locs` (the memories) with named dims `memory` and `dim`, the log likelihood of each training digit
at each draw, and the ELBO trace in group `vi_trace`. The draws are independent, so the
effective sample size is close to the number of draws. `r_hat` compares chains, so it is not
meaningful for one chain.""",
    ),
    (
        "code",
        """idata = to_inference_data(
    memory,
    train,
    num_samples=100 if SMALL else 400,
    fit_result=result,
    posterior_predictive=False,
    seed=0,
)
print(idata)
az.summary(idata, var_names=["weights"], coords={"memory": ranked[:5].tolist()})""",
    ),
    (
        "markdown",
        """PSIS-LOO estimates the expected log density of a new digit from the pointwise log
likelihood. Many Pareto `k` values above 0.7 indicate that single digits move the posterior too
much for importance sampling. A memory that few digits support moves a lot when one of them is
left out. Read `elpd_loo` as a rough number here, and compare models by held-out log likelihood
as well.""",
    ),
    (
        "code",
        """print(az.loo(idata))
az.plot_trace(idata, var_names=["weights"], coords={"memory": ranked[:3].tolist()});""",
    ),
    (
        "markdown",
        """## The same model in your own Pyro code

`memory.model` and `memory.guide` are ordinary Pyro callables, so SVI (here with minibatches of
the `data` plate) fits the same parameters by stochastic gradients. The truncation stays fixed
under SVI.""",
    ),
    (
        "code",
        """from pyro.infer import SVI, Trace_ELBO

pyro.clear_param_store()
svi_memory = DPMemory(
    dim=64,
    truncation=memory.num_memories,
    prior_mean=train.mean(0),
    prior_scale=float(train.std()),
)
svi_memory.initialize(train, seed=0)
svi = SVI(svi_memory.model, svi_memory.guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
losses = [svi.step(train, subsample_size=200) for _ in range(100 if SMALL else 1000)]
with torch.no_grad():
    svi_held_out = svi_memory.log_predictive(test).mean().item()
print(f"SVI held-out log likelihood per digit: {svi_held_out:.2f} (CAVI: {held_out:.2f})")""",
    ),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).resolve().with_name("02_dp_memory.ipynb"))
