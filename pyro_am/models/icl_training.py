"""Pretraining in-context energies by contrastive divergence with Langevin negatives.

Each step draws B data sets from a family, draws negatives ``x-`` by Langevin dynamics on the
current ``E(. | D)`` (detached, so no gradient flows through the sampler), and minimizes::

    L = mean E(x+ | D) - mean E(x- | D) + lambda (mean E(x+ | D)^2 + mean E(x- | D)^2)

The first two terms are the contrastive-divergence estimate of the negative log-likelihood gradient
of ``p(x | D) = exp(-E(x | D)) / Z(D)``. The last keeps the energies near zero, since L is otherwise
unchanged by adding a constant to E.

In causal mode the positives are ``x_p`` scored against the prefix ``x_<p`` for p = 0 .. N - 1,
and the negatives are M chains per prefix, all in one pass, so one step trains every context size.
In set mode each step draws one context size n in [1, N - 1]; the first n points are the context
and the other N - n points are the positives.

Negative chains start from a uniform box, a Gaussian, or a replay buffer of past negatives
(:mod:`pyro_am.models.icl_negatives`).

Optimization is Adam with gradient-norm clipping. Checkpoints contain the parameters, the optimizer
state, the random generators and the replay buffer, and are written atomically, so resuming from a
checkpoint gives the same parameters as training without interruption.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from pyro_am._validation import check_int, check_interval, check_positive
from pyro_am.models.icl_negatives import ReplayBuffer, initial_chains, start_negatives
from pyro_am.models.in_context import InContextEnergy, NonFiniteEnergyError

logger = logging.getLogger(__name__)

INITS = ("uniform", "gaussian")


@dataclass
class CDConfig:
    """Settings of contrastive-divergence pretraining.

    :ivar steps: total optimizer steps (a resumed run continues up to this number).
    :ivar batch_size: data sets per step.
    :ivar num_points: points per data set, N; causal mode trains context sizes 0 .. N - 1.
    :ivar num_negatives: Langevin chains per data set and prefix, M.
    :ivar langevin_steps: Langevin steps per negative.
    :ivar step_size: Langevin step size eta.
    :ivar noise_std: standard deviation sigma of the Gaussian noise added per Langevin step;
        the chains sample ``exp(-E / T)`` at temperature ``T = sigma^2 / (2 eta)``.
    :ivar grad_clamp: clamp of each gradient coordinate in Langevin, or None.
    :ivar init: initial law of the chains, ``"uniform"`` or ``"gaussian"``.
    :ivar init_scale: half-width of the uniform box or std of the Gaussian.
    :ivar regularization: lambda, the weight of the squared energies.
    :ivar replay_fraction: probability that a chain starts from the replay buffer (0: off).
    :ivar replay_capacity: points kept in the replay buffer.
    :ivar learning_rate: Adam learning rate.
    :ivar clip_norm: maximum gradient norm of the parameters.
    :ivar seed: seed of the data sets, the chains and the replay choices.
    :ivar checkpoint_every: steps between checkpoints when a path is given.
    :ivar log_every: steps between log records.
    :ivar progress: show a tqdm progress bar.
    """

    steps: int = 2000
    batch_size: int = 32
    num_points: int = 24
    num_negatives: int = 4
    langevin_steps: int = 15
    step_size: float = 1.0
    noise_std: float = 0.01
    grad_clamp: float | None = 1.0
    init: str = "gaussian"
    init_scale: float = 6.0
    regularization: float = 0.1
    replay_fraction: float = 0.0
    replay_capacity: int = 10000
    learning_rate: float = 1e-3
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 50
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_negatives", "replay_capacity"):
            check_int(name, getattr(self, name))
        check_int("num_points", self.num_points, minimum=2)
        check_int("langevin_steps", self.langevin_steps, minimum=0)
        check_int("checkpoint_every", self.checkpoint_every)
        check_int("log_every", self.log_every)
        check_int("seed", self.seed, minimum=0)
        for name in ("step_size", "init_scale", "learning_rate", "clip_norm"):
            check_positive(name, getattr(self, name))
        check_positive("noise_std", self.noise_std, allow_zero=True)
        check_positive("regularization", self.regularization, allow_zero=True)
        if self.grad_clamp is not None:
            check_positive("grad_clamp", self.grad_clamp)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, but got {self.init!r}.")
        check_interval("replay_fraction", self.replay_fraction, 0.0, 1.0, closed_high=True)

    @property
    def temperature(self) -> float:
        """The Langevin temperature ``T = noise_std^2 / (2 step_size)``."""
        return self.noise_std**2 / (2.0 * self.step_size)


@dataclass
class TrainingResult:
    """Outcome of :func:`train_in_context_energy`.

    :ivar model: the trained model (the same object that was passed in).
    :ivar history: per-step lists ``loss``, ``positive_energy`` and ``negative_energy``.
    :ivar steps: the number of steps taken in total, counting those before a resume.
    :ivar start_step: the step this call started from: 0, or the checkpoint's step on resume.
    """

    model: InContextEnergy
    history: dict = field(default_factory=dict)
    steps: int = 0
    start_step: int = 0


def contrastive_divergence_loss(positive: torch.Tensor, negative: torch.Tensor, regularization):
    """Return ``mean E+ - mean E- + lambda (mean E+^2 + mean E-^2)``."""
    penalty = positive.square().mean() + negative.square().mean()
    return positive.mean() - negative.mean() + regularization * penalty


def _causal_energies(model, points, config, buffer, generator):
    batch, num_points, dim = points.shape
    cache = model.encode_context(points)
    detached = cache.detach()
    shape = (batch, num_points, config.num_negatives, dim)
    start = start_negatives(shape, config, buffer, generator, points.dtype, points.device)
    negatives = model.langevin(
        detached,
        start,
        steps=config.langevin_steps,
        step_size=config.step_size,
        temperature=config.temperature,
        grad_clamp=config.grad_clamp,
        generator=generator,
    )
    queries = torch.cat([points.unsqueeze(2), negatives], dim=2)
    energies = model.query_energy(cache, queries)
    return energies[..., 0], energies[..., 1:], negatives


def _set_energies(model, points, config, buffer, generator):
    batch, num_points, dim = points.shape
    size = int(torch.randint(1, num_points, (1,), generator=generator, device=generator.device))
    context, positives = points[:, :size], points[:, size:]
    cache = model.encode_context(context)
    detached = cache.detach()
    shape = (batch, config.num_negatives, dim)
    start = start_negatives(shape, config, buffer, generator, points.dtype, points.device)
    negatives = model.langevin(
        detached,
        start,
        steps=config.langevin_steps,
        step_size=config.step_size,
        temperature=config.temperature,
        grad_clamp=config.grad_clamp,
        generator=generator,
    )
    energies = model.query_energy(cache, torch.cat([positives, negatives], dim=1))
    return energies[:, : positives.shape[1]], energies[:, positives.shape[1] :], negatives


def write_atomically(path, state: dict) -> None:
    """Write ``state`` with :func:`torch.save` to a temporary file, then ``os.replace`` it to
    ``path``, so that a reader never sees a partly written checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_checkpoint(
    path, model, optimizer, generators, buffer, step, history, config, metadata=None
) -> None:
    """Write the training state to ``path`` atomically (temporary file, then ``os.replace``)."""
    state = {
        "model_config": model.config,
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "generators": {name: g.get_state() for name, g in generators.items()},
        "buffer": None if buffer is None else buffer.state_dict(),
        "step": step,
        "history": history,
        "config": asdict(config),
        "metadata": metadata,
    }
    write_atomically(path, state)


def _read_checkpoint(path) -> dict:
    """Read a checkpoint with ``weights_only=True``, so that a file cannot run code when loaded.

    :raises ValueError: naming the file, when it is empty, truncated or not a checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        message = str(error).strip()
        if message.startswith("Weights only load failed"):
            reason = "it contains objects other than tensors and plain containers"
        elif message:
            reason = message.splitlines()[0]
        else:
            reason = type(error).__name__
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} cannot be read ({reason}); write it again with "
            "train_in_context_energy or `pyro-am icl train`."
        ) from error
    if not isinstance(state, dict) or "model_config" not in state or "model" not in state:
        raise ValueError(f"{os.fspath(path)!r} is not an in-context energy checkpoint.")
    return state


def load_checkpoint(path, device="cpu") -> tuple[InContextEnergy, CDConfig, dict]:
    """Rebuild the model, the training settings and the metadata stored in a checkpoint.

    :param path: a file written by :func:`train_in_context_energy`.
    :param device: device to put the model on; its dtype is the stored one.
    :returns: ``(model, config, metadata)``, the model in eval mode.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found.")
    state = _read_checkpoint(path)
    model = InContextEnergy(**state["model_config"])
    model.load_state_dict(state["model"])
    dtype = next(iter(state["model"].values())).dtype
    model = model.to(dtype=dtype, device=device).eval()
    return model, CDConfig(**state["config"]), state.get("metadata") or {}


def load_model(path, device="cpu") -> InContextEnergy:
    """Rebuild the :class:`InContextEnergy` stored in a checkpoint."""
    return load_checkpoint(path, device)[0]


def train_in_context_energy(
    model: InContextEnergy,
    family,
    config: CDConfig | None = None,
    checkpoint=None,
    resume: bool = False,
    metadata: dict | None = None,
) -> TrainingResult:
    """Pretrain ``model`` by contrastive divergence on data sets drawn from ``family``.

    :param InContextEnergy model: the energy to train, already on the device and dtype to use.
    :param family: a family from :mod:`pyro_am.families` with ``dim`` equal to ``model.dim`` and a
        ``sample_points(num_datasets, num_points, generator)`` method.
    :param CDConfig config: the settings; the defaults when None.
    :param checkpoint: optional path written atomically every ``config.checkpoint_every`` steps and
        at the end.
    :param bool resume: continue from ``checkpoint`` if that file exists.
    :param dict metadata: stored in the checkpoint as is, for example the family's settings.
    :returns: a :class:`TrainingResult`.
    :raises RuntimeError: if the loss or the gradient norm is NaN or infinite. The message names the
        step, and the parameters stay those after the last finite step.
    """
    config = CDConfig() if config is None else config
    if not isinstance(model, InContextEnergy):
        raise TypeError(f"model must be an InContextEnergy, but got {type(model).__name__}.")
    if getattr(family, "dim", None) != model.dim:
        raise ValueError(
            f"family has dimension {getattr(family, 'dim', None)}, but the model has dimension "
            f"{model.dim}; build them with the same dim."
        )
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    generators = {
        "data": torch.Generator().manual_seed(config.seed),
        "langevin": torch.Generator(device=device).manual_seed(config.seed + 1),
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    buffer = None
    if config.replay_fraction > 0.0:
        buffer = ReplayBuffer(config.replay_capacity, model.dim, dtype, device)
    history = {"loss": [], "positive_energy": [], "negative_energy": []}
    start = 0

    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = _read_checkpoint(checkpoint)
        if state["model_config"] != model.config:
            raise ValueError(
                f"checkpoint {checkpoint} contains a model with {state['model_config']}, which "
                f"does not match {model.config}; build the same model or start without resume."
            )
        stored_family = (state.get("metadata") or {}).get("family")
        requested_family = (metadata or {}).get("family")
        if None not in (stored_family, requested_family) and stored_family != requested_family:
            raise ValueError(
                f"checkpoint {checkpoint} was trained on the family {stored_family}, which does "
                f"not match {requested_family}; use the same family or start without resume."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
        if buffer is not None and state["buffer"] is not None:
            buffer.load_state_dict(state["buffer"])
        start, history = state["step"], state["history"]
        logger.info("resumed in-context training from %s at step %d", checkpoint, start)

    energies_of = _causal_energies if model.mode == "causal" else _set_energies
    model.train()
    bar = tqdm(range(start, config.steps), disable=not config.progress, desc="CD training")
    step = start
    for step in bar:
        points = family.sample_points(config.batch_size, config.num_points, generators["data"])
        points = points.to(dtype=dtype, device=device)
        try:
            positive, negative, negatives = energies_of(
                model, points, config, buffer, generators["langevin"]
            )
        except NonFiniteEnergyError as error:
            _stop_on_nan(step, f"Langevin sampler failed ({error})")
        loss = contrastive_divergence_loss(positive, negative, config.regularization)
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            _stop_on_nan(step, f"the loss is {value}")
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm))
        if not math.isfinite(norm):
            _stop_on_nan(step, f"the gradient norm is {norm}")
        optimizer.step()

        if buffer is not None:
            buffer.push(negatives.detach())
        history["loss"].append(value)
        history["positive_energy"].append(float(positive.detach().mean()))
        history["negative_energy"].append(float(negative.detach().mean()))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            logger.info(
                "step %d: loss %.4g, mean E+ %.4g, mean E- %.4g",
                step + 1,
                value,
                history["positive_energy"][-1],
                history["negative_energy"][-1],
            )
            bar.set_postfix(loss=f"{value:.3g}")
        if checkpoint is not None and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint,
                model,
                optimizer,
                generators,
                buffer,
                step + 1,
                history,
                config,
                metadata,
            )
    total = max(start, config.steps)
    if checkpoint is not None:
        save_checkpoint(
            checkpoint, model, optimizer, generators, buffer, total, history, config, metadata
        )
    model.eval()
    return TrainingResult(model=model, history=history, steps=total, start_step=start)


def _stop_on_nan(step: int, what: str):
    raise RuntimeError(
        f"in-context training stopped at step {step}: {what}; the parameters after the previous "
        "step were kept. Lower the learning rate or the Langevin step size."
    )


__all__ = [
    "INITS",
    "CDConfig",
    "ReplayBuffer",
    "TrainingResult",
    "contrastive_divergence_loss",
    "initial_chains",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "train_in_context_energy",
    "write_atomically",
]
