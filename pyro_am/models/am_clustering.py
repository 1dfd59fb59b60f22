"""Clustering with associative memories whose memories are learned by masked reconstruction.

The clustering energy of K memories mu_k at inverse temperature beta is::

    E(x) = -(1 / beta) log sum_k exp(-beta |x - mu_k|^2)
    grad E(x) = 2 sum_k r_k(x) (x - mu_k),     r(x) = softmax_k(-beta |x - mu_k|^2)

which is ``(1 / beta)`` times the negative log likelihood of a uniform Gaussian mixture with
variance ``1 / (2 beta)``, up to a constant. The retrieval dynamics ``x <- x - eta grad E(x)`` are
unrolled for T steps. Training hides a random fraction of each datum's coordinates and lets only
those coordinates move under the dynamics, while the observed ones stay clamped. Adam then minimizes
the mean squared error between the completed coordinates after T steps and the hidden values. A
datum's cluster is the memory nearest to its state after T steps of the unmasked dynamics.

This follows ClAM (B. Saha, D. Krotov, M. J. Zaki and P. Ram, "End-to-end differentiable clustering
with associative memories", ICML 2023), which relaxes the discrete cluster assignment through AM
dynamics and trains with a self-supervised pattern-completion loss. The step form, the defaults and
the k-means++ initialization (best of ``init_restarts`` seedings) here are this library's choices,
not taken from that paper.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_am._validation import check_finite, check_int, check_interval, check_positive
from pyro_am.energies import GaussianMixtureEnergy
from pyro_am.models._kmeans import best_kmeans_plus_plus, squared_distances

logger = logging.getLogger(__name__)


def _as_data(name: str, value) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if not torch.is_floating_point(tensor):
        tensor = tensor.to(torch.float64)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), but has shape {tuple(tensor.shape)}.")
    return check_finite(name, tensor)


def clustering_dynamics(
    x: torch.Tensor,
    memories: torch.Tensor,
    beta: float,
    steps: int,
    step_size: float,
    observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unroll ``steps`` gradient steps on the clustering energy; differentiable in ``memories``.

    :param torch.Tensor x: initial states (N, D).
    :param torch.Tensor memories: memories (K, D).
    :param float beta: inverse temperature.
    :param int steps: number of steps T.
    :param float step_size: eta; ``eta = 1/2`` makes each step the fixed-point map
        ``x <- sum_k r_k(x) mu_k``.
    :param torch.Tensor observed: optional boolean mask (N, D), True where a coordinate is clamped.
    :returns: the states after T steps, (N, D).
    """
    for _ in range(steps):
        weights = torch.softmax(-beta * squared_distances(x, memories), dim=-1)
        grad = 2.0 * (x - weights @ memories)
        updated = x - step_size * grad
        x = updated if observed is None else torch.where(observed, x, updated)
    return x


class AMClustering:
    """Associative-memory clustering: memories trained by masked reconstruction through dynamics.

    Use it as the associative-memory baseline for :class:`~pyro_am.models.VariationalMemory`:
    both place K memories, but this one learns them from a self-supervised completion loss rather
    than from a likelihood, and has no weights or variances.

    :param int num_memories: number of memories (clusters) K >= 1.
    :param float beta: inverse temperature of the clustering energy, > 0. The default suits
        standardized data (unit variance per coordinate).
    :param int steps: number of unrolled dynamics steps T >= 1.
    :param float mask_fraction: fraction of each datum's coordinates hidden in training, in (0, 1).
        At least one coordinate is hidden per datum.
    :param float step_size: dynamics step size eta, in (0, 1/2].
    :param float learning_rate: Adam learning rate.
    :param int max_epochs: the maximum number of passes over the data.
    :param int batch_size: minibatch size; None uses the full batch.
    :param float tol: stop once the epoch's mean loss improves by less than ``tol`` (relative) over
        the best loss of the previous 10 epochs.
    :param int init_restarts: number of k-means++ seedings drawn for the initial memories. The one
        with the lowest sum of squared distances to the nearest memory is kept.
    :param int seed: seed of the initialization, the masks and the batch order.
    :param bool progress: show a progress bar.
    """

    def __init__(
        self,
        num_memories: int,
        beta: float = 1.0,
        steps: int = 5,
        mask_fraction: float = 0.2,
        step_size: float = 0.5,
        learning_rate: float = 0.1,
        max_epochs: int = 100,
        batch_size: int | None = None,
        tol: float = 1e-4,
        init_restarts: int = 5,
        seed: int = 0,
        progress: bool = False,
    ):
        self.num_memories = check_int("num_memories", num_memories, minimum=1)
        self.beta = float(check_positive("beta", beta))
        self.steps = check_int("steps", steps, minimum=1)
        check_interval("mask_fraction", mask_fraction, 0.0, 1.0)
        if mask_fraction <= 0:
            raise ValueError(f"mask_fraction must be in (0, 1), but got {mask_fraction}.")
        self.mask_fraction = float(mask_fraction)
        check_interval("step_size", step_size, 0.0, 0.5, closed_high=True)
        if step_size <= 0:
            raise ValueError(f"step_size must be in (0, 0.5], but got {step_size}.")
        self.step_size = float(step_size)
        self.learning_rate = float(check_positive("learning_rate", learning_rate))
        self.max_epochs = check_int("max_epochs", max_epochs, minimum=1)
        if batch_size is not None:
            batch_size = check_int("batch_size", batch_size, minimum=1)
        self.batch_size = batch_size
        self.tol = float(check_positive("tol", tol, allow_zero=True))
        self.init_restarts = check_int("init_restarts", init_restarts, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.progress = bool(progress)
        self.memories_: torch.Tensor | None = None
        self.loss_history_: list[float] = []

    def _mask(self, shape, generator, device) -> torch.Tensor:
        """Return a boolean mask of observed coordinates hiding ``mask_fraction`` of each row."""
        num_rows, dim = shape
        num_hidden = min(dim, max(1, round(self.mask_fraction * dim)))
        scores = torch.rand(num_rows, dim, generator=generator, device=device)
        hidden = scores.argsort(dim=-1)[:, :num_hidden]
        observed = torch.ones(num_rows, dim, dtype=torch.bool, device=device)
        return observed.scatter_(1, hidden, False)

    def reconstruction_loss(self, x, memories, observed) -> torch.Tensor:
        """Mean squared error on the hidden coordinates after T steps of masked dynamics."""
        start = torch.where(observed, x, torch.zeros_like(x))
        completed = clustering_dynamics(
            start, memories, self.beta, self.steps, self.step_size, observed
        )
        hidden = ~observed
        return (completed - x).square()[hidden].mean()

    def fit(self, X) -> AMClustering:
        """Learn the memories from ``X`` (N, D); standardize the data first.

        :raises RuntimeError: if the loss or the memories become NaN or infinite. The memories from
            before that Adam step are kept, and the message names the epoch.
        """
        data = _as_data("X", X)
        num_data = data.shape[0]
        if self.num_memories > num_data:
            raise ValueError(
                f"num_memories must be at most the number of data, {num_data}, "
                f"but is {self.num_memories}."
            )
        generator = torch.Generator(device=data.device).manual_seed(self.seed)
        memories = self._initial_memories(data, generator)
        memories.requires_grad_(True)
        optimizer = torch.optim.Adam([memories], lr=self.learning_rate)
        batch_size = self.batch_size or num_data
        self.loss_history_ = []
        for epoch in tqdm(range(self.max_epochs), disable=not self.progress, desc="AM clustering"):
            order = torch.randperm(num_data, generator=generator, device=data.device)
            total = 0.0
            for start in range(0, num_data, batch_size):
                batch = data[order[start : start + batch_size]]
                observed = self._mask(batch.shape, generator, data.device)
                loss = self.reconstruction_loss(batch, memories, observed)
                value = float(loss.detach())
                if not math.isfinite(value):
                    self._stop_on_nan(epoch, f"the loss is {value}", memories.detach())
                # The memories that gave a finite loss, kept if the step makes them non-finite.
                good = memories.detach().clone()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if not bool(torch.isfinite(memories).all()):
                    self._stop_on_nan(epoch, "the Adam step made the memories non-finite", good)
                total += value * len(batch)
            self.loss_history_.append(total / num_data)
            if self._stalled():
                break
        self.memories_ = memories.detach()
        self.n_iter_ = len(self.loss_history_)
        self.labels_ = self.predict(data)
        logger.info(
            "AM clustering: %d epochs, final loss %.6g", self.n_iter_, self.loss_history_[-1]
        )
        return self

    def _initial_memories(self, data, generator) -> torch.Tensor:
        return best_kmeans_plus_plus(data, self.num_memories, self.init_restarts, generator)

    def _stop_on_nan(self, epoch: int, reason: str, memories: torch.Tensor) -> None:
        self.memories_ = memories.clone()
        raise RuntimeError(
            f"AMClustering.fit stopped at epoch {epoch}: {reason}; the memories from before "
            "that step were kept."
        )

    def _stalled(self) -> bool:
        history = self.loss_history_
        if len(history) <= 10:
            return False
        best_before = min(history[-11:-1])
        return history[-1] > best_before * (1.0 - self.tol)

    def _check_fitted(self, X) -> torch.Tensor:
        if self.memories_ is None:
            raise ValueError("this AMClustering is not fitted yet; call fit(X) first.")
        data = _as_data("X", X).to(self.memories_.dtype)
        if data.shape[-1] != self.memories_.shape[-1]:
            raise ValueError(
                f"X must have shape (N, {self.memories_.shape[-1]}) to match the memories, "
                f"but has shape {tuple(data.shape)}."
            )
        return data

    def predict(self, X):
        """Return the nearest memory of each datum after T steps of the unmasked dynamics."""
        data = self._check_fitted(X)
        with torch.no_grad():
            final = clustering_dynamics(data, self.memories_, self.beta, self.steps, self.step_size)
            labels = squared_distances(final, self.memories_).argmin(-1)
        return labels if isinstance(X, torch.Tensor) else labels.cpu().numpy()

    def fit_predict(self, X):
        """Fit to ``X`` and return its labels; a numpy array for numpy input."""
        labels = self.fit(X).labels_
        return labels if isinstance(X, torch.Tensor) else labels.cpu().numpy()

    def energy(self) -> GaussianMixtureEnergy:
        """Return the clustering energy as a uniform mixture with variance ``1 / (2 beta)``.

        Its value is ``beta`` times the clustering energy plus a constant, so both have the same
        minimizers and the same retrieval fixed points.
        """
        if self.memories_ is None:
            raise ValueError("this AMClustering is not fitted yet; call fit(X) first.")
        return GaussianMixtureEnergy(self.memories_, math.sqrt(0.5 / self.beta))


__all__ = ["AMClustering", "clustering_dynamics"]
