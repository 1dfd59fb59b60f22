"""Write notebooks/05_attention_vmf.ipynb (stored without outputs; the tests execute it)."""

from pathlib import Path

from _notebook import write_notebook

CELLS = [
    (
        "markdown",
        """# Attention as clustering on the sphere

Softmax attention after a LayerNorm or RMSNorm is the posterior of a von Mises-Fisher (vMF)
mixture whose components sit at the keys. This notebook samples the vMF distribution, checks the
identity against torch's own LayerNorm, fits a vMF mixture memory by EM, and watches iterated
self-attention cluster tokens. The derivation is in `docs/attention_vmf.md`.""",
    ),
    (
        "code",
        """import math
import os

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from pyro_am.attention import VMFAttention, attention_vmf_mixture, normalize_queries
from pyro_am.benchmarks.vmf_attention import (
    attention_layer,
    balanced_beta,
    sample_tokens,
    threshold_clusters,
)
from pyro_am.distributions import VonMisesFisher
from pyro_am.distributions.von_mises_fisher import mean_resultant_length
from pyro_am.models.vmf_mixture import VMFMixture, retrieve_on_sphere, spherical_kmeans

SMALL = os.environ.get("PYRO_AM_NOTEBOOK_SMALL") == "1"
num_draws = 2000 if SMALL else 20000
num_tokens = 128 if SMALL else 512
num_layers = 8 if SMALL else 16
torch.manual_seed(0)""",
    ),
    (
        "markdown",
        """## The vMF distribution in any dimension

`VonMisesFisher(loc, concentration)` has density `C_D(kappa) exp(kappa mu.x)` on the unit sphere.
The mean of `mu.x` is `A_D(kappa) = I_{D/2}(kappa) / I_{D/2-1}(kappa)`; the same kappa
concentrates less in higher dimension.""",
    ),
    (
        "code",
        """figure, axis = plt.subplots(figsize=(6, 3.5))
for dim in (3, 10, 100):
    loc = torch.zeros(dim, dtype=torch.float64)
    loc[0] = 1
    for kappa in (10.0, 100.0):
        draws = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).sample((num_draws,))
        cosine = draws @ loc
        expected = mean_resultant_length(dim, torch.tensor(kappa, dtype=torch.float64)).item()
        print(f"D={dim:>3} kappa={kappa:>5g}: mean mu.x {cosine.mean():.4f}, A_D {expected:.4f}")
        axis.hist(
            cosine.numpy(),
            bins=60,
            range=(-1, 1),
            histtype="step",
            density=True,
            label=f"D={dim}, kappa={kappa:g}",
        )
axis.set_xlabel("mu . x")
axis.set_yscale("log")
axis.legend(fontsize=7)""",
    ),
    (
        "markdown",
        """## Attention weights are vMF responsibilities

With `q = W_Q LN(x)`, the logit `s q.k_j` is `e_j.u + b_j` for the unit vector
`u = (x - mean) / |x - mean|`, effective key `e_j = s sqrt(D) P (g * W_Q^T k_j)` and offset
`b_j = s delta.W_Q^T k_j`. The vMF mixture with `mu_j = e_j / |e_j|`, `kappa_j = |e_j|` and
`pi_j ~ exp(b_j) / C_{D-1}(kappa_j)` has exactly these responsibilities.""",
    ),
    (
        "code",
        """dim, key_dim, num_keys = 8, 4, 6
x = torch.randn(5, dim, dtype=torch.float64)
keys = torch.randn(num_keys, key_dim, dtype=torch.float64)
values = torch.randn(num_keys, 3, dtype=torch.float64)
query_weight = torch.randn(key_dim, dim, dtype=torch.float64)
gain = 0.5 + torch.rand(dim, dtype=torch.float64)
bias = torch.randn(dim, dtype=torch.float64)
scale = 1 / math.sqrt(key_dim)

queries = F.layer_norm(x, (dim,), gain, bias, eps=0.0) @ query_weight.T
attention = torch.softmax(scale * queries @ keys.T, dim=-1)
mixture = attention_vmf_mixture(
    keys, scale, norm="layer", gain=gain, bias=bias, query_weight=query_weight
)
unit = normalize_queries(x, "layer")
print(
    "max |softmax - responsibilities|:",
    (attention - mixture.responsibilities(unit)).abs().max().item(),
)
print(
    "max |output - posterior mean|:",
    (attention @ values - mixture.posterior_mean(unit, values)).abs().max().item(),
)
print("concentrations:", mixture.concentrations.numpy().round(2))
print("mixing weights:", mixture.log_weights.exp().numpy().round(3))""",
    ),
    (
        "markdown",
        """`VMFAttention` learns concentrations and mixing weights apart from the key directions;
with `tied=True` it is standard pre-norm attention.""",
    ),
    (
        "code",
        """layer = VMFAttention(8, num_heads=2, norm="layer", tied=True, dtype=torch.float64)
tokens = torch.randn(2, 5, 8, dtype=torch.float64)
normalized = F.layer_norm(tokens, (8,), eps=0.0)
projections = (layer.query, layer.key, layer.value)
q, k, v = (layer._split(projection(normalized)) for projection in projections)
reference = layer.output(F.scaled_dot_product_attention(q, k, v).transpose(-3, -2).flatten(-2))
print(
    "tied VMFAttention vs scaled_dot_product_attention:",
    (layer(tokens) - reference).abs().max().item(),
)""",
    ),
    (
        "markdown",
        """## A vMF mixture memory fitted by EM

`VMFMixture` runs EM with Newton steps on `A_D(kappa) = rbar`. Its `energy()` is the memory:
retrieval on the sphere moves a noisy cue to the attractor of its component.""",
    ),
    (
        "code",
        """dim, num_components = 10, 4
tokens, labels = sample_tokens(dim, num_tokens, num_components, 40.0, generator_seed=1)
model = VMFMixture(num_components, seed=0).fit(tokens)
print(
    "EM iterations:",
    model.n_iter_,
    " ARI:",
    adjusted_rand_score(labels.numpy(), model.predict(tokens).numpy()),
)
print("fitted concentrations:", model.concentrations_.numpy().round(1), "(true 40)")

cues = tokens[:8] + 0.3 * torch.randn(8, dim, dtype=torch.float64)
result = retrieve_on_sphere(model.energy(), cues)
directions = model.mean_directions_[model.predict(tokens[:8])]
cosine = (result.states * directions).sum(-1)
print("cosine to the cue's component direction after retrieval:", cosine.numpy().round(3))""",
    ),
    (
        "markdown",
        """## Iterated self-attention clusters the tokens

Tied pre-norm self-attention on the sphere, `u <- normalize(u + sum_j softmax_j(beta u.u_j) u_j)`,
is blurring mean shift with a vMF kernel. With `beta = log(N / K) / (1 - A_D(kappa)^2)` the tokens
of a component collapse together. A readout that is not given K (tokens closer than 0.05 rad are
joined) then recovers the components.""",
    ),
    (
        "code",
        """figure, axis = plt.subplots(figsize=(6, 3.5))
for dim, kappa in ((3, 30.0), (16, 30.0), (64, 100.0)):
    tokens, labels = sample_tokens(dim, num_tokens, 4, kappa, generator_seed=2)
    beta = balanced_beta(dim, kappa, num_tokens, 4)
    state, scores = tokens, []
    for layer_index in range(num_layers + 1):
        if layer_index:
            state = attention_layer(state, beta)
        scores.append(adjusted_rand_score(labels.numpy(), threshold_clusters(state, 0.05)))
    _, kmeans_labels = spherical_kmeans(tokens, 4, generator=torch.Generator().manual_seed(0))
    (line,) = axis.plot(scores, marker="o", markersize=3, label=f"D={dim}, kappa={kappa:g}")
    axis.axhline(
        adjusted_rand_score(labels.numpy(), kmeans_labels.numpy()),
        color=line.get_color(),
        linestyle=":",
    )
axis.set_xlabel("layer")
axis.set_ylabel("ARI (dotted: spherical k-means, true K)")
axis.legend(fontsize=7)""",
    ),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).resolve().with_name("05_attention_vmf.ipynb"))
