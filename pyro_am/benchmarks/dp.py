"""``pyro-am bench dp``: the DP memory against scikit-learn's variational Dirichlet process mixture.

Data. ``num_blobs`` Gaussian blobs in ``R^D``: centres ~ N(0, 3^2 I), points = centre + N(0, I),
with equal blob probabilities. ``num_train`` points are fitted and ``num_held_out`` points from the
same blobs are scored. Both models see the same arrays.

Fits. :class:`~pyro_am.models.DPMemory` by coordinate ascent (CAVI) and
:class:`sklearn.mixture.BayesianGaussianMixture` with
``weight_concentration_prior_type="dirichlet_process"``, both with the same truncation, stick
concentration, ``max_iter`` and ``tol`` and the closest covariance type (``isotropic`` with
``spherical``, ``diagonal`` with ``diag``). Both learn one noise scale per memory with a
conjugate prior worth D pseudo-data at the data's variance, which is scikit-learn's default. The
DP memory takes the mean variance over coordinates, where scikit-learn's ``diag`` prior takes each
coordinate's own. ``--shared-scale`` gives the DP memory one scale shared by all memories instead.
The DP memory's prior on the memories is the distribution of the centres, N(0, 3^2 I), while
scikit-learn's is its default, centred on the data mean with the component's own covariance. The
DP memory stops on the relative change of the ELBO, and scikit-learn on the absolute change of
the per-sample lower bound.

Reported per model: the wall time of the fit (the median over ``repeats``), the held-out log
likelihood per point, the adjusted Rand index of the held-out assignments against the blob labels,
and the number of memories whose weight exceeds ``weight_threshold``. scikit-learn's held-out
score is ``score(X)``, the mixture density at the variational point estimates. The DP memory's is
``log_predictive``, the posterior predictive density under its variational posterior.

SVI step. One ``SVI.step`` (model and guide, ``Trace_ELBO``, ``Adam``) of a truncated
stick-breaking mixture on the ``num_train`` points, timed with the likelihood written as
:class:`~pyro_am.distributions.GaussianMixture` (GEMM distances, streamed log-sum-exp) and as
``MixtureSameFamily(Categorical, Independent(Normal))`` (an (N, K, D) broadcast). Both use the same
model, guide, data and seed.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pyro_am._files import write_json

logger = logging.getLogger(__name__)

COVARIANCES = {"isotropic": "spherical", "diagonal": "diag"}
LIKELIHOODS = ("GaussianMixture", "MixtureSameFamily")
CENTRE_SCALE = 3.0


# -- data ----------------------------------------------------------------------------------------
def make_blobs(num_train, num_held_out, dim, num_blobs, seed=0):
    """Draw the training and held-out blobs; returns float64 arrays and integer labels."""
    generator = np.random.default_rng(seed)
    centres = CENTRE_SCALE * generator.standard_normal((num_blobs, dim))
    total = num_train + num_held_out
    labels = generator.integers(num_blobs, size=total)
    points = centres[labels] + generator.standard_normal((total, dim))
    return (
        points[:num_train],
        labels[:num_train],
        points[num_train:],
        labels[num_train:],
    )


def _timed(function, repeats: int, device: torch.device | None = None):
    """Call ``function`` ``repeats`` times; returns (median seconds, last result)."""
    seconds = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


# -- the two fits --------------------------------------------------------------------------------
def run_dp_memory(train, held_out, held_out_labels, config, device, dtype):
    """Fit :class:`DPMemory` by CAVI and score it; returns a result dict."""
    from sklearn.metrics import adjusted_rand_score

    from pyro_am.models import DPMemory

    x = torch.as_tensor(train, dtype=dtype, device=device)
    y = torch.as_tensor(held_out, dtype=dtype, device=device)
    per_memory = not config["shared_scale"]
    # scikit-learn's default covariance prior: D pseudo-data at the data's mean variance.
    scale_prior = (config["dim"], float(np.sqrt(train.var(axis=0).mean()))) if per_memory else None

    def fit():
        pyro.set_rng_seed(config["seed"])
        model = DPMemory(
            config["dim"],
            truncation=config["truncation"],
            concentration=config["concentration"],
            prior_scale=CENTRE_SCALE,
            covariance=config["covariance"],
            per_memory_scale=per_memory,
            scale_prior=scale_prior,
        )
        result = model.fit(
            x, method="cavi", max_iter=config["max_iter"], tol=config["tol"], progress=False
        )
        return model, result

    seconds, (model, result) = _timed(fit, config["repeats"], device)
    with torch.no_grad():
        log_likelihood = float(model.log_predictive(y).mean())
        assignments = model.assign(y).argmax(-1).cpu().numpy()
        weights = model.weights.detach().cpu().numpy()
    return {
        "model": "pyro_am DPMemory (CAVI)",
        "seconds": seconds,
        "iterations": int(result.iterations),
        "converged": bool(result.converged),
        "held_out_log_likelihood": log_likelihood,
        "ari": float(adjusted_rand_score(held_out_labels, assignments)),
        "num_memories": int((weights > config["weight_threshold"]).sum()),
    }


def run_sklearn(train, held_out, held_out_labels, config):
    """Fit scikit-learn's DP mixture and score it; returns a result dict."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import BayesianGaussianMixture

    def fit():
        mixture = BayesianGaussianMixture(
            n_components=config["truncation"],
            covariance_type=COVARIANCES[config["covariance"]],
            weight_concentration_prior_type="dirichlet_process",
            weight_concentration_prior=config["concentration"],
            max_iter=config["max_iter"],
            tol=config["tol"],
            random_state=config["seed"],
        )
        # converged_ is reported in the table, so scikit-learn's warning would only repeat it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return mixture.fit(train)

    seconds, mixture = _timed(fit, config["repeats"])
    if not mixture.converged_:
        logger.warning("BayesianGaussianMixture did not converge in %d iterations", mixture.n_iter_)
    return {
        "model": "scikit-learn BayesianGaussianMixture",
        "seconds": seconds,
        "iterations": int(mixture.n_iter_),
        "converged": bool(mixture.converged_),
        "held_out_log_likelihood": float(mixture.score(held_out)),
        "ari": float(adjusted_rand_score(held_out_labels, mixture.predict(held_out))),
        "num_memories": int((mixture.weights_ > config["weight_threshold"]).sum()),
    }


# -- one SVI step --------------------------------------------------------------------------------
def _likelihood(name, weights, memories, scale):
    if name == "GaussianMixture":
        from pyro_am.distributions import GaussianMixture

        return GaussianMixture(memories, scale, weights=weights)
    components = dist.Normal(memories, scale).to_event(1)
    return dist.MixtureSameFamily(dist.Categorical(probs=weights), components)


def stick_breaking_mixture(data, truncation, concentration, likelihood):
    """Truncated DP mixture: weights ~ SB(alpha, K), memories ~ N(0, 3^2 I), x ~ mixture."""
    from pyro_am.distributions import StickBreakingWeights

    dim = data.shape[-1]
    weights = pyro.sample(
        "weights", StickBreakingWeights(data.new_tensor(concentration), truncation)
    )
    with pyro.plate("memory", truncation):
        memories = pyro.sample(
            "memories", dist.Normal(data.new_zeros(dim), CENTRE_SCALE).to_event(1)
        )
    scale = pyro.param("scale", data.new_tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", _likelihood(likelihood, weights, memories, scale), obs=data)


def stick_breaking_guide(data, truncation, concentration, likelihood):
    """Mean-field guide: Beta sticks for the weights and a Normal for each memory."""
    from pyro_am.distributions import BetaStickBreaking

    dim = data.shape[-1]
    ones = data.new_ones(truncation - 1)
    a = pyro.param("stick_a", ones, constraint=constraints.positive)
    b = pyro.param("stick_b", concentration * ones, constraint=constraints.positive)
    pyro.sample("weights", BetaStickBreaking(a, b))
    loc = pyro.param("memory_loc", lambda: data[:truncation].clone())
    scale = pyro.param(
        "memory_scale", data.new_full((truncation, dim), 0.1), constraint=constraints.positive
    )
    with pyro.plate("memory", truncation):
        pyro.sample("memories", dist.Normal(loc, scale).to_event(1))


def time_svi_step(train, config, likelihood, device, dtype) -> float:
    """Time one SVI step with the named likelihood; returns the median seconds per step."""
    x = torch.as_tensor(train, dtype=dtype, device=device)
    pyro.clear_param_store()
    pyro.set_rng_seed(config["seed"])
    svi = pyro.infer.SVI(
        stick_breaking_mixture,
        stick_breaking_guide,
        pyro.optim.Adam({"lr": 0.01}),
        pyro.infer.Trace_ELBO(),
    )
    arguments = (x, config["truncation"], config["concentration"], likelihood)
    svi.step(*arguments)
    seconds, loss = _timed(lambda: svi.step(*arguments), config["repeats"], device)
    if not math.isfinite(loss):
        raise RuntimeError(f"the SVI loss with the {likelihood} likelihood is {loss}.")
    pyro.clear_param_store()
    return seconds


# -- the whole benchmark -------------------------------------------------------------------------
def run_benchmark(config: dict, device: torch.device, dtype=torch.float32) -> dict:
    """Run both fits and both SVI step timings on one data set; returns the report dict."""
    from pyro_am.benchmarks.retrieval import machine_info

    train, _, held_out, held_out_labels = make_blobs(
        config["num_train"],
        config["num_held_out"],
        config["dim"],
        config["num_blobs"],
        config["seed"],
    )
    fits = [
        run_dp_memory(train, held_out, held_out_labels, config, device, dtype),
        run_sklearn(train, held_out, held_out_labels, config),
    ]
    svi_steps = {
        likelihood: time_svi_step(train, config, likelihood, device, dtype)
        for likelihood in LIKELIHOODS
    }
    return {
        "benchmark": "dp",
        "config": config,
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine_info(device),
        "fits": fits,
        "svi_step_seconds": svi_steps,
    }


def format_report(report: dict) -> str:
    """Format the report as a plain-text table."""
    config = report["config"]
    lines = [
        f"DP mixture, N={config['num_train']} train + {config['num_held_out']} held-out, "
        f"D={config['dim']}, {config['num_blobs']} blobs, truncation {config['truncation']}, "
        f"{config['covariance']} covariance, {report['dtype']} on {report['machine']['device']} "
        f"({report['machine']['torch_threads']} threads)",
        f"{'model':<38} {'seconds':>8} {'iters':>6} {'held-out ll':>12} {'ARI':>6} {'memories':>9}",
    ]
    for row in report["fits"]:
        lines.append(
            f"{row['model']:<38} {row['seconds']:>8.3f} {row['iterations']:>6d} "
            f"{row['held_out_log_likelihood']:>12.4f} {row['ari']:>6.3f} {row['num_memories']:>9d}"
        )
    lines.append(
        f"memories: weight > {config['weight_threshold']:g}; held-out ll: mean log density per "
        "point"
    )
    steps = report["svi_step_seconds"]
    lines.append(f"one SVI step (Trace_ELBO, Adam), N={config['num_train']}:")
    for likelihood, seconds in steps.items():
        lines.append(f"  {likelihood:<20} {seconds * 1e3:>9.2f} ms")
    ratio = steps["MixtureSameFamily"] / steps["GaussianMixture"]
    lines.append(f"  MixtureSameFamily / GaussianMixture: {ratio:.2f}x")
    return "\n".join(lines)


def _check(args) -> None:
    from pyro_am.cli import UsageError

    for name in ("num_train", "num_held_out", "dim", "num_blobs", "truncation", "max_iter"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, but got {value}.")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, but got {args.repeats}.")
    if args.truncation < 2:
        raise UsageError(f"--truncation must be at least 2, but got {args.truncation}.")
    if not (math.isfinite(args.concentration) and args.concentration > 0):
        raise UsageError(
            f"--concentration must be a positive number, but got {args.concentration}."
        )
    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise UsageError(f"--tol must be a non-negative number, but got {args.tol}.")
    if not (0 < args.weight_threshold < 1):
        raise UsageError(f"--weight-threshold must be in (0, 1), but got {args.weight_threshold}.")


def run(args) -> int:
    from pyro_am.commands.retrieve import resolve_device

    _check(args)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = {
        "num_train": args.num_train,
        "num_held_out": args.num_held_out,
        "dim": args.dim,
        "num_blobs": args.num_blobs,
        "truncation": args.truncation,
        "concentration": args.concentration,
        "covariance": args.covariance,
        "shared_scale": args.shared_scale,
        "max_iter": args.max_iter,
        "tol": args.tol,
        "weight_threshold": args.weight_threshold,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    report = run_benchmark(config, device)
    print(format_report(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dp",
        help="DP memory (CAVI) vs scikit-learn BayesianGaussianMixture, and one SVI step",
        description=(
            "Fit a DP memory and scikit-learn's Dirichlet process mixture to the same Gaussian "
            "blobs; report fit time, held-out log likelihood, ARI and the number of memories, "
            "and time one SVI step with two mixture likelihoods."
        ),
    )

    parser.add_argument("--num-train", type=int, default=20000, help="training points")
    parser.add_argument("--num-held-out", type=int, default=4000, help="held-out points")
    parser.add_argument("--dim", type=int, default=16, help="dimension D")
    parser.add_argument("--num-blobs", type=int, default=10, help="number of Gaussian blobs")
    parser.add_argument("--truncation", type=int, default=30, help="stick-breaking truncation K")

    parser.add_argument("--concentration", type=float, default=1.0, help="DP concentration")
    parser.add_argument("--covariance", choices=tuple(COVARIANCES), default="isotropic")
    parser.add_argument(
        "--shared-scale",
        action="store_true",
        help="give the DP memory one noise scale shared by all memories (default: one each)",
    )
    parser.add_argument("--max-iter", type=int, default=200, help="iterations of each fit")
    parser.add_argument(
        "--tol", type=float, default=1e-6, help="convergence tolerance passed to both fits"
    )
    parser.add_argument(
        "--weight-threshold",
        type=float,
        default=1e-2,
        help="a memory counts when its weight exceeds this (default: %(default)s)",
    )

    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the fits")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", metavar="JSON", help="write the report to this JSON file")

    parser.set_defaults(handler=run)
