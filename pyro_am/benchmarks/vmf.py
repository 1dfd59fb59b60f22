"""``pyro-am bench vmf``: von Mises-Fisher draws per second, VonMisesFisher vs SciPy.

For each concentration kappa, both samplers draw ``num_draws`` unit vectors in ``R^D`` around the
same mean direction: :class:`pyro_am.distributions.VonMisesFisher` (Wood's rejection sampler,
vectorized over all pending draws, in torch on the chosen device) and
``scipy.stats.vonmises_fisher`` (SciPy >= 1.11, NumPy on the CPU). Each timing is the median of
``repeats`` calls after one untimed warm-up call. As a check that both draw the same law, the mean
of ``mu.x`` over the draws is reported next to ``A_D(kappa)``.

SciPy is the peer here, so it is imported only when this benchmark runs; the library does not
depend on it.
"""

from __future__ import annotations

import logging
import statistics

import numpy as np
import torch

from pyro_am._files import write_json
from pyro_am.benchmarks.retrieval import machine_info, time_call
from pyro_am.distributions import VonMisesFisher
from pyro_am.distributions.von_mises_fisher import mean_resultant_length

logger = logging.getLogger(__name__)

DEFAULT_KAPPAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def _import_scipy_sampler():
    from pyro_am.cli import UsageError

    try:
        from scipy.stats import vonmises_fisher
    except ImportError as error:
        raise UsageError(
            "the SciPy comparison needs scipy >= 1.11 (scipy.stats.vonmises_fisher); install it "
            "or pass --skip-scipy."
        ) from error
    return vonmises_fisher


def run_sampling(dim, num_draws, kappas, repeats, device, dtype, with_scipy=True, seed=0):
    """Time both samplers for every kappa; returns one result dict per kappa."""
    torch.manual_seed(seed)
    loc = torch.randn(dim, dtype=torch.float64)
    loc = loc / loc.norm()
    scipy_sampler = _import_scipy_sampler() if with_scipy else None
    results = []
    for kappa in kappas:
        distribution = VonMisesFisher(
            loc.to(device=device, dtype=dtype), torch.tensor(kappa, dtype=dtype, device=device)
        )
        draws = {}

        def ours(distribution=distribution, draws=draws):
            draws["ours"] = distribution.sample((num_draws,))

        ours_seconds = statistics.median(time_call(ours, device, repeats))
        expected = float(mean_resultant_length(dim, torch.tensor(kappa, dtype=torch.float64)))
        result = {
            "kappa": kappa,
            "ours_seconds": ours_seconds,
            "ours_draws_per_second": num_draws / ours_seconds,
            "ours_mean_cosine": float((draws["ours"].double().cpu() @ loc).mean()),
            "expected_mean_cosine": expected,
        }
        if scipy_sampler is not None:
            frozen = scipy_sampler(loc.numpy(), kappa)
            generator = np.random.default_rng(seed)

            def peer(frozen=frozen, generator=generator, draws=draws):
                draws["scipy"] = frozen.rvs(num_draws, random_state=generator)

            scipy_seconds = statistics.median(time_call(peer, torch.device("cpu"), repeats))
            result.update(
                {
                    "scipy_seconds": scipy_seconds,
                    "scipy_draws_per_second": num_draws / scipy_seconds,
                    "scipy_mean_cosine": float((draws["scipy"] @ loc.numpy()).mean()),
                    "speedup": scipy_seconds / ours_seconds,
                }
            )
        logger.info("kappa %g done", kappa)
        results.append(result)
    return results


def format_report(report: dict) -> str:
    """Format the benchmark report as a plain-text table."""
    config = report["config"]
    machine = report["machine"]
    lines = [
        f"pyro-am bench vmf on {machine['device']} ({machine['torch_threads']} threads), "
        f"D={config['dim']}, {config['num_draws']} draws, {config['dtype']}, median of "
        f"{config['repeats']}",
        f"{'kappa':>9} {'ours draws/s':>14} {'scipy draws/s':>14} {'speedup':>8} "
        f"{'mean mu.x ours':>15} {'scipy':>9} {'A_D(kappa)':>11}",
    ]
    for row in report["results"]:
        scipy_rate = row.get("scipy_draws_per_second")
        scipy_text = f"{scipy_rate:>14.4g}" if scipy_rate is not None else f"{'-':>14}"
        speedup = f"{row['speedup']:>7.2f}x" if "speedup" in row else f"{'-':>8}"
        scipy_cosine = row.get("scipy_mean_cosine")
        scipy_cosine_text = f"{scipy_cosine:>9.5f}" if scipy_cosine is not None else f"{'-':>9}"
        lines.append(
            f"{row['kappa']:>9g} {row['ours_draws_per_second']:>14.4g} {scipy_text} {speedup} "
            f"{row['ours_mean_cosine']:>15.5f} {scipy_cosine_text} "
            f"{row['expected_mean_cosine']:>11.5f}"
        )
    return "\n".join(lines)


def _parse_kappas(text: str) -> list[float]:
    from pyro_am.cli import UsageError

    try:
        kappas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise UsageError(f"--kappas must be comma-separated numbers, but got {text!r}.") from error
    if not kappas or any(not kappa > 0 for kappa in kappas):
        raise UsageError(f"--kappas must be positive numbers, but got {text!r}.")
    return kappas


def run(args) -> int:
    from pyro_am.cli import UsageError
    from pyro_am.commands.retrieve import resolve_device

    device = resolve_device(args.device)
    for name in ("dim", "num_draws", "repeats"):
        value = getattr(args, name)
        minimum = 2 if name == "dim" else 1
        if value < minimum:
            raise UsageError(
                f"--{name.replace('_', '-')} must be at least {minimum}, but got {value}."
            )
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, but got {args.threads}.")
        torch.set_num_threads(args.threads)
    kappas = _parse_kappas(args.kappas)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]

    report = {
        "benchmark": "vmf",
        "machine": machine_info(device),
        "config": {
            "dim": args.dim,
            "num_draws": args.num_draws,
            "kappas": kappas,
            "repeats": args.repeats,
            "dtype": args.dtype,
        },
        "results": run_sampling(
            args.dim,
            args.num_draws,
            kappas,
            args.repeats,
            device,
            dtype,
            with_scipy=not args.skip_scipy,
        ),
    }
    print(format_report(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vmf",
        help="von Mises-Fisher draws per second, VonMisesFisher vs scipy.stats.vonmises_fisher",
        description=(
            "Time VonMisesFisher.sample against scipy.stats.vonmises_fisher.rvs for several "
            "concentrations and report draws per second and the speedup."
        ),
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--dim", type=int, default=64, help="dimension D (default: 64)")
    parser.add_argument(
        "--num-draws", type=int, default=100_000, help="draws per call (default: 100000)"
    )
    parser.add_argument(
        "--kappas",
        default=",".join(f"{kappa:g}" for kappa in DEFAULT_KAPPAS),
        help="comma-separated concentrations (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed repeats, of which the median is used (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of our draws; SciPy always draws float64 (default: %(default)s)",
    )
    parser.add_argument("--skip-scipy", action="store_true", help="time only VonMisesFisher")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", metavar="JSON", help="write the report to this JSON file")
    parser.set_defaults(handler=run)
