"""The variational parameters of :class:`~pyro_am.models.DPMemory` and the checks of its inputs.

:class:`DPMemoryParameters` is the base class of ``DPMemory``. It stores the sticks
``q(v_k) = Beta(a_k, b_k)``, the memory posteriors ``q(mu_k) = N(m_k, diag(t_k^2))`` and, when it
is learned, the noise scale ``s`` as Pyro parameters under the module's name, and reads them back
as a :class:`~pyro_am.models._dp_cavi.Posterior`. The noise variance has a public shape, (), (D,),
(K,) or (K, D), and an internal one, (), (1, D), (K, 1) or (K, D), that broadcasts to (K, D).
The methods read the attributes that ``DPMemory.__init__`` sets: ``dim``, ``covariance``,
``per_memory_scale``, ``learn_scale``, ``fixed_scale``, ``scale_prior``, ``concentration``,
``discount`` and the ``prior_mean`` and ``prior_scale`` buffers.
"""

from __future__ import annotations

import numpy as np
import pyro
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from pyro_am._validation import as_float_tensor, check_finite
from pyro_am.models import _dp_cavi as cavi


class DPMemoryParameters(PyroModule):
    """Storage, shapes and read-only views of a DP memory's variational parameters."""

    # -- construction helpers --------------------------------------------------------------------
    def _vector(self, name, value) -> torch.Tensor:
        tensor = as_float_tensor(name, value).to(torch.float64)
        if tensor.numel() == 1:
            tensor = tensor.reshape(1).expand(self.dim).clone()
        if tensor.shape != (self.dim,):
            raise ValueError(
                f"{name} must be a float or have shape ({self.dim},), "
                f"but has shape {tuple(tensor.shape)}."
            )
        return check_finite(name, tensor)

    def _fixed_scale(self, scale) -> torch.Tensor:
        fixed = as_float_tensor("scale", scale).to(torch.float64)
        check_finite("scale", fixed)
        if not bool((fixed > 0).all()):
            raise ValueError(f"scale must be positive, but got {fixed.tolist()}.")
        if fixed.numel() == 1:
            fixed = fixed.reshape(())
            return fixed if self.covariance == "isotropic" else fixed.expand(self.dim).clone()
        if self.covariance == "isotropic" or fixed.shape != (self.dim,):
            raise ValueError(
                f"scale must be a float (isotropic) or a tensor of shape ({self.dim},) (diagonal), "
                f"but has shape {tuple(fixed.shape)} with covariance={self.covariance!r}."
            )
        return fixed

    def _prior_draw(self, truncation, dtype) -> cavi.Posterior:
        """Return a posterior whose memories are draws from the prior, before any data is seen."""
        prior = self._prior(torch.empty(0, dtype=dtype, device=self.prior_mean.device))
        counts = torch.zeros(truncation, dtype=dtype, device=prior.prior_mean.device)
        concentration1, concentration0 = cavi.update_sticks(counts, prior)
        std = prior.prior_variance.sqrt()
        loc = prior.prior_mean + std * torch.randn(
            truncation, self.dim, dtype=dtype, device=std.device
        )
        variance = self._initial_variance(prior, truncation)
        return cavi.Posterior(
            concentration1, concentration0, loc, std.expand(truncation, -1).clone(), variance
        )

    def _initial_variance(self, prior: cavi.Prior, truncation: int) -> torch.Tensor:
        like = prior.prior_mean
        if not self.learn_scale:
            return self._to_internal(self.fixed_scale.to(like).square())
        rows = truncation if self.per_memory_scale else 1
        width = 1 if self.covariance == "isotropic" else self.dim
        variance = torch.full(
            (rows, width), prior.variance_prior, dtype=like.dtype, device=like.device
        )
        return (
            variance.reshape(()) if rows == width == 1 and not self.per_memory_scale else variance
        )

    def _to_internal(self, public: torch.Tensor) -> torch.Tensor:
        """Reshape a variance from its public shape, (), (D,), (K,) or (K, D), to one that
        broadcasts to (K, D): (), (1, D), (K, 1) or (K, D)."""
        if self.per_memory_scale and self.covariance == "isotropic":
            return public.unsqueeze(-1)
        if not self.per_memory_scale and self.covariance == "diagonal":
            return public.reshape(1, self.dim)
        return public

    def _to_public(self, internal: torch.Tensor) -> torch.Tensor:
        if self.per_memory_scale and self.covariance == "isotropic":
            return internal.squeeze(-1)
        if not self.per_memory_scale and self.covariance == "diagonal":
            return internal.reshape(self.dim)
        return internal

    def _prior(self, like: torch.Tensor) -> cavi.Prior:
        return cavi.Prior(
            concentration=self.concentration,
            discount=self.discount,
            prior_mean=self.prior_mean.to(like),
            prior_variance=self.prior_scale.to(like).square(),
            learn_variance=self.learn_scale,
            isotropic=self.covariance == "isotropic",
            per_memory=self.per_memory_scale,
            variance_pseudo_count=self.scale_prior[0] if self.learn_scale else 0.0,
            variance_prior=self.scale_prior[1] ** 2,
        )

    # -- parameters ------------------------------------------------------------------------------
    def _replace_param(self, name: str, value: torch.Tensor, constraint) -> None:
        fullname = f"{self._pyro_name}.{name}" if self._pyro_name else name
        store = pyro.get_param_store()
        if fullname in store:
            del store[fullname]
        setattr(self, name, PyroParam(value.detach().clone(), constraint))

    def _write_posterior(self, posterior: cavi.Posterior) -> None:
        """Write ``posterior`` into the parameters that the guide (and model) read."""
        self._replace_param(
            "stick_concentration1", posterior.stick_concentration1, constraints.positive
        )
        self._replace_param(
            "stick_concentration0", posterior.stick_concentration0, constraints.positive
        )
        self._replace_param("memory_loc", posterior.memory_loc, constraints.real)
        self._replace_param("memory_scale", posterior.memory_scale, constraints.positive)
        if self.learn_scale:
            public = self._to_public(posterior.variance.sqrt())
            self._replace_param("noise_scale", public, constraints.positive)

    def _posterior(self) -> cavi.Posterior:
        """Read the current variational parameters as detached tensors."""
        with torch.no_grad():
            return cavi.Posterior(
                self.stick_concentration1.detach().clone(),
                self.stick_concentration0.detach().clone(),
                self.memory_loc.detach().clone(),
                self.memory_scale.detach().clone(),
                self._to_internal(self._noise_scale().detach().square()),
            )

    def _noise_scale(self) -> torch.Tensor:
        """Return the differentiable noise standard deviation.

        Its shape is () or (D,) when shared by the memories and (K,) or (K, D) per memory.
        """
        if self.learn_scale:
            return self.noise_scale
        return self.fixed_scale.to(self.memory_loc.detach())

    def variational_parameters(self) -> dict[str, torch.Tensor]:
        """Return the tensors the guide reads (and the learned noise scale), detached."""
        posterior = self._posterior()
        parameters = {
            "stick_concentration1": posterior.stick_concentration1,
            "stick_concentration0": posterior.stick_concentration0,
            "memory_loc": posterior.memory_loc,
            "memory_scale": posterior.memory_scale,
        }
        if self.learn_scale:
            parameters["noise_scale"] = self._to_public(posterior.variance.sqrt())
        return parameters

    @property
    def _diagonal_shared(self) -> bool:
        return self.covariance == "diagonal" and not self.per_memory_scale

    @property
    def truncation(self) -> int:
        return self.memory_loc.shape[0]

    @property
    def num_memories(self) -> int:
        return self.truncation

    @property
    def dtype(self) -> torch.dtype:
        return self.memory_loc.dtype

    @property
    def memories(self) -> torch.Tensor:
        """Posterior means of the memories, shape (K, D)."""
        return self._posterior().memory_loc

    @property
    def weights(self) -> torch.Tensor:
        """Expected stick-breaking weights ``E_q[w_k]``, shape (K,)."""
        return self._posterior().sticks().mean

    @property
    def scale(self) -> torch.Tensor:
        """The current noise standard deviation, shape () or (D,) (shared), (K,) or (K, D)."""
        return self._to_public(self._posterior().variance.sqrt())

    # -- data checks -----------------------------------------------------------------------------
    def _check_data(self, name: str, data, like: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(data, np.ndarray):
            data = torch.as_tensor(data, dtype=torch.float64)
        data = as_float_tensor(name, data)
        if data.dim() != 2 or data.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have shape (num_data, {self.dim}), but has shape {tuple(data.shape)}."
            )
        if data.shape[0] < 1:
            raise ValueError(f"{name} must contain at least one datum, but is empty.")
        check_finite(name, data)
        if like is not None:
            data = data.to(like)
        return data

    def _check_query(self, x) -> torch.Tensor:
        like = self.memory_loc.detach()
        x = as_float_tensor("x", x, like=like) if not isinstance(x, torch.Tensor) else x
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape (..., {self.dim}), but has shape {tuple(x.shape)}."
            )
        return check_finite("x", x.to(like))

    def _match_dtype(self, data: torch.Tensor) -> None:
        """Convert the variational parameters to ``data``'s dtype and device if they differ."""
        like = self.memory_loc.detach()
        if data.dtype != like.dtype or data.device != like.device:
            posterior = self._posterior()
            self._write_posterior(cavi.Posterior(*(t.to(data) for t in vars(posterior).values())))
