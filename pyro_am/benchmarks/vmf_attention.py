"""``pyro-am bench vmf-attention``: does iterated self-attention cluster tokens on the sphere?

Tokens ``u_1 .. u_N`` are drawn from a mixture of K von Mises-Fisher components on S^{D-1} with
equal weights, random mean directions and a common concentration kappa. They then pass through L
layers of pre-norm self-attention without MLP, with tied weights ``W_Q = W_K = W_V = I`` and the
normalization taken as the projection onto the unit sphere (RMSNorm without gain, its factor
``sqrt(D)`` absorbed into the inverse temperature beta)::

    a_i = sum_j softmax_j(beta u_i.u_j) u_j
    u_i <- normalize(u_i + a_i)      (residual, the default)   or   normalize(a_i)   (--no-residual)

Each layer is one step of blurring mean shift with a vMF kernel of concentration beta. Every
token moves towards the posterior mean of the vMF mixture centred on the current tokens, so the
tokens of a component contract towards a common point. After every layer a readout that is not
given K clusters the tokens: single-linkage clusters of tokens closer than ``--merge-angle``
radians (connected components of that graph).

The inverse temperature matters. A token's logit with itself is beta, and with another token of
its component about ``beta A_D(kappa)^2`` (A_D the mean resultant length), so if beta is too large
each token attends only to itself and never moves. The default ``--beta auto`` balances the two,
``exp(beta (1 - A_D^2)) = N / K``, so ``beta = log(N / K) / (1 - A_D(kappa)^2)``. It uses the true
kappa and K, as an oracle. ``--beta kappa`` uses the concentration itself, and a number fixes beta.

Reported per (D, kappa): the adjusted Rand index (ARI) of that readout against the true components
after every layer, the number of clusters it finds, and the ARI of spherical k-means with the true
K on the final tokens. Two baselines see the raw tokens and the true K: spherical k-means and the
vMF mixture fitted by EM (:class:`~pyro_am.models.vmf_mixture.VMFMixture`). Numbers are means over
seeds.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from pyro_am._files import write_json
from pyro_am.benchmarks.retrieval import machine_info
from pyro_am.distributions import VonMisesFisher
from pyro_am.distributions.von_mises_fisher import mean_resultant_length
from pyro_am.models.vmf_mixture import VMFMixture, spherical_kmeans

logger = logging.getLogger(__name__)

DEFAULT_DIMS = (3, 16, 64)
DEFAULT_KAPPAS = (10.0, 30.0, 100.0)


def balanced_beta(dim: int, kappa: float, num_tokens: int, num_components: int) -> float:
    """Return ``log(N / K) / (1 - A_D(kappa)^2)``, the ``--beta auto`` rule of the module."""
    length = float(mean_resultant_length(dim, torch.tensor(kappa, dtype=torch.float64)))
    return math.log(max(num_tokens / num_components, 2.0)) / max(1 - length**2, 1e-12)


def resolve_beta(beta, dim, kappa, num_tokens, num_components) -> float:
    """Turn the ``--beta`` value ("auto", "kappa" or a number) into the cell's beta."""
    if beta == "auto":
        return balanced_beta(dim, kappa, num_tokens, num_components)
    if beta == "kappa":
        return float(kappa)
    return float(beta)


def sample_tokens(dim, num_tokens, num_components, kappa, generator_seed):
    """Draw tokens from an equal-weight vMF mixture; returns (tokens, labels), float64."""
    torch.manual_seed(generator_seed)
    directions = torch.randn(num_components, dim, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    labels = torch.arange(num_tokens) % num_components
    concentration = torch.tensor(kappa, dtype=torch.float64)
    tokens = VonMisesFisher(directions[labels], concentration).sample()
    return tokens, labels


def attention_layer(tokens: torch.Tensor, beta: float, residual: bool = True) -> torch.Tensor:
    """Apply one tied pre-norm self-attention layer on the sphere (see the module docstring)."""
    weights = torch.softmax(beta * tokens @ tokens.T, dim=-1)
    update = weights @ tokens
    if residual:
        update = tokens + update
    return update / update.norm(dim=-1, keepdim=True)


def threshold_clusters(tokens: torch.Tensor, merge_angle: float) -> np.ndarray:
    """Label connected components of the graph joining tokens closer than ``merge_angle``."""
    if tokens.shape[0] < 2:
        return np.zeros(tokens.shape[0], dtype=np.int64)
    readout = AgglomerativeClustering(
        n_clusters=None,
        distance_threshold=1 - math.cos(merge_angle),
        metric="cosine",
        linkage="single",
    )
    return readout.fit_predict(tokens.cpu().numpy())


def run_cell(dim, kappa, beta, num_tokens, num_components, num_layers, residual, merge_angle, seed):
    """Run the experiment for one (D, kappa, seed); returns ARIs per layer and of the baselines."""
    tokens, labels = sample_tokens(dim, num_tokens, num_components, kappa, seed)
    truth = labels.numpy()
    generator = torch.Generator().manual_seed(seed)
    _, kmeans_labels = spherical_kmeans(tokens, num_components, generator=generator)
    em_labels = VMFMixture(num_components, seed=seed).fit(tokens).predict(tokens)

    layer_ari, layer_clusters = [], []
    state = tokens
    for layer in range(num_layers + 1):
        if layer > 0:
            state = attention_layer(state, beta, residual)
        predicted = threshold_clusters(state, merge_angle)
        layer_ari.append(adjusted_rand_score(truth, predicted))
        layer_clusters.append(int(predicted.max()) + 1)
    _, final_kmeans = spherical_kmeans(state, num_components, generator=generator)
    return {
        "attention_ari": layer_ari,
        "attention_clusters": layer_clusters,
        "attention_kmeans_ari": adjusted_rand_score(truth, final_kmeans.numpy()),
        "kmeans_ari": adjusted_rand_score(truth, kmeans_labels.numpy()),
        "em_ari": adjusted_rand_score(truth, em_labels.numpy()),
    }


def run_grid(
    dims, kappas, beta, num_tokens, num_components, num_layers, residual, merge_angle, seeds
):
    """Run every (D, kappa) cell over ``seeds`` seeds; returns one averaged row per cell."""
    rows = []
    for dim in dims:
        for kappa in kappas:
            cell_beta = resolve_beta(beta, dim, kappa, num_tokens, num_components)
            runs = [
                run_cell(
                    dim,
                    kappa,
                    cell_beta,
                    num_tokens,
                    num_components,
                    num_layers,
                    residual,
                    merge_angle,
                    seed,
                )
                for seed in range(seeds)
            ]
            rows.append(
                {
                    "dim": dim,
                    "kappa": kappa,
                    "beta": cell_beta,
                    "attention_ari": np.mean([r["attention_ari"] for r in runs], axis=0).tolist(),
                    "attention_clusters": np.mean(
                        [r["attention_clusters"] for r in runs], axis=0
                    ).tolist(),
                    "attention_kmeans_ari": float(
                        np.mean([r["attention_kmeans_ari"] for r in runs])
                    ),
                    "kmeans_ari": float(np.mean([r["kmeans_ari"] for r in runs])),
                    "em_ari": float(np.mean([r["em_ari"] for r in runs])),
                }
            )
            logger.info("D=%d kappa=%g done", dim, kappa)
    return rows


def plot_report(report: dict, path: str) -> str:
    """Draw ARI against layer, one panel per D, with the baselines as dashed lines."""
    from pyro_am.plotting import new_figure, save_figure

    rows = report["rows"]
    dims = sorted({row["dim"] for row in rows})
    figure = new_figure(4.0 * len(dims), 3.4)
    axes = figure.subplots(1, len(dims), squeeze=False)[0]
    colours = {}
    for axis, dim in zip(axes, dims, strict=True):
        for row in (row for row in rows if row["dim"] == dim):
            layers = np.arange(len(row["attention_ari"]))
            (line,) = axis.plot(
                layers,
                row["attention_ari"],
                marker="o",
                markersize=3,
                label=f"attention, kappa={row['kappa']:g}",
            )
            colour = colours.setdefault(row["kappa"], line.get_color())
            axis.axhline(row["em_ari"], color=colour, linestyle="--", linewidth=1)
            axis.axhline(row["kmeans_ari"], color=colour, linestyle=":", linewidth=1)
        axis.set_title(f"D = {dim}")
        axis.set_xlabel("layer")
        axis.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("ARI vs true components")
    axes[-1].plot([], [], color="grey", linestyle="--", label="vMF EM (true K)")
    axes[-1].plot([], [], color="grey", linestyle=":", label="spherical k-means (true K)")
    axes[-1].legend(fontsize=7, loc="lower right")
    return save_figure(figure, path)


def format_report(report: dict) -> str:
    """Format the final-layer results as a plain-text table."""
    config = report["config"]
    lines = [
        f"pyro-am bench vmf-attention: N={config['num_tokens']} tokens, "
        f"K={config['num_components']}, {config['num_layers']} layers, "
        f"residual={config['residual']}, merge angle "
        f"{config['merge_angle']:g} rad, mean over {config['seeds']} seeds",
        f"{'D':>4} {'kappa':>7} {'beta':>7} {'ARI layer 0':>11} {'ARI last':>9} {'clusters':>9} "
        f"{'attn+kmeans':>11} {'kmeans':>7} {'vMF EM':>7}",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['dim']:>4} {row['kappa']:>7g} {row['beta']:>7.3g} "
            f"{row['attention_ari'][0]:>11.3f} {row['attention_ari'][-1]:>9.3f} "
            f"{row['attention_clusters'][-1]:>9.1f} "
            f"{row['attention_kmeans_ari']:>11.3f} {row['kmeans_ari']:>7.3f} {row['em_ari']:>7.3f}"
        )
    return "\n".join(lines)


def _parse_list(name: str, text: str, kind):
    from pyro_am.cli import UsageError

    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise UsageError(f"--{name} must be comma-separated numbers, but got {text!r}.") from error
    if not values or any(not value > 0 for value in values):
        raise UsageError(f"--{name} must be positive numbers, but got {text!r}.")
    return values


def run(args) -> int:
    from pyro_am.cli import UsageError

    dims = _parse_list("dims", args.dims, int)
    if min(dims) < 2:
        raise UsageError(f"--dims must be at least 2, but got {args.dims!r}.")
    kappas = _parse_list("kappas", args.kappas, float)
    for name in ("num_tokens", "num_components", "num_layers", "seeds"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, but got {value}.")
    if args.num_components > args.num_tokens:
        raise UsageError(
            f"--num-components ({args.num_components}) must not exceed --num-tokens "
            f"({args.num_tokens})."
        )
    beta = args.beta
    if beta not in ("auto", "kappa"):
        try:
            beta = float(beta)
        except ValueError as error:
            raise UsageError(
                f"--beta must be auto, kappa or a positive number, but got {args.beta!r}."
            ) from error
        if not beta > 0:
            raise UsageError(f"--beta must be positive, but got {args.beta!r}.")
    if not 0 < args.merge_angle < math.pi:
        raise UsageError(f"--merge-angle must be in (0, pi) radians, but got {args.merge_angle}.")

    config = {
        "dims": dims,
        "kappas": kappas,
        "beta": beta,
        "num_tokens": args.num_tokens,
        "num_components": args.num_components,
        "num_layers": args.num_layers,
        "residual": not args.no_residual,
        "merge_angle": args.merge_angle,
        "seeds": args.seeds,
    }
    rows = run_grid(
        dims,
        kappas,
        beta,
        args.num_tokens,
        args.num_components,
        args.num_layers,
        not args.no_residual,
        args.merge_angle,
        args.seeds,
    )
    report = {
        "benchmark": "vmf-attention",
        "machine": machine_info(torch.device("cpu")),
        "config": config,
        "rows": rows,
    }
    print(format_report(report))
    if args.figure:
        print(f"wrote {plot_report(report, args.figure)}")
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vmf-attention",
        help="cluster vMF-mixture tokens by iterated self-attention, vs k-means and vMF EM",
        description=(
            "Draw tokens from a vMF mixture, iterate tied pre-norm self-attention on the sphere "
            "and report how well the tokens cluster (ARI against the true components), next to "
            "spherical k-means and the vMF mixture fitted by EM."
        ),
    )
    parser.add_argument("--dims", default="3,16,64", help="comma-separated D (default: 3,16,64)")
    parser.add_argument(
        "--kappas", default="10,30,100", help="comma-separated concentrations (default: 10,30,100)"
    )
    parser.add_argument(
        "--beta",
        default="auto",
        help="attention inverse temperature: auto (log(N/K) / (1 - A_D(kappa)^2)), kappa, or a "
        "number (default: auto)",
    )
    parser.add_argument("--num-tokens", type=int, default=256, help="tokens N (default: 256)")
    parser.add_argument("--num-components", type=int, default=4, help="components K (default: 4)")
    parser.add_argument("--num-layers", type=int, default=12, help="layers L (default: 12)")
    parser.add_argument(
        "--no-residual", action="store_true", help="drop the residual: u <- normalize(a)"
    )
    parser.add_argument(
        "--merge-angle",
        type=float,
        default=0.05,
        help="readout joins tokens closer than this angle, in radians (default: 0.05)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds averaged (default: 3)")
    parser.add_argument("--figure", metavar="PNG", help="write the ARI-per-layer figure here")
    parser.add_argument("--out", metavar="JSON", help="write the report to this JSON file")
    parser.set_defaults(handler=run)


__all__ = ["attention_layer", "run_cell", "run_grid", "sample_tokens", "threshold_clusters"]
