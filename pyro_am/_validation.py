"""Argument checks shared by the public functions.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong type) with one sentence that names
the argument, the value it received and the valid range, so that a caller can fix the call without
reading the source.
"""

from __future__ import annotations

import math
import numbers

import torch


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return repr(value.item())
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def check_positive(name: str, value, *, allow_zero: bool = False):
    """Check that a scalar or every entry of a tensor is finite and positive."""
    if isinstance(value, torch.Tensor):
        bad = ~torch.isfinite(value) | ((value < 0) if allow_zero else (value <= 0))
        if bool(bad.any()):
            first = value[bad].flatten()[0].item()
            bound = "non-negative" if allow_zero else "positive"
            raise ValueError(
                f"{name} must be finite and {bound}, but it contains {first!r}; "
                f"pass values in {'[0, inf)' if allow_zero else '(0, inf)'}."
            )
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, but got {value!r} of type {type(value)}.")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        interval = "[0, inf)" if allow_zero else "(0, inf)"
        raise ValueError(f"{name} must be finite and in {interval}, but got {value!r}.")
    return value


def check_int(name: str, value, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Check that ``value`` is an integer in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, but got {value!r} of type {type(value)}.")
    value = int(value)
    upper = "inf" if maximum is None else str(maximum)
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer in [{minimum}, {upper}], but got {value}.")
    return value


def check_interval(name: str, value, low: float, high: float, *, closed_high: bool = False):
    """Check that a real scalar lies in ``[low, high)`` (or ``[low, high]``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, but got {value!r} of type {type(value)}.")
    inside = low <= value <= high if closed_high else low <= value < high
    if not (math.isfinite(value) and inside):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, but got {value!r}.")
    return value


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Check that a tensor holds no NaN or infinite entry."""
    if not torch.is_floating_point(tensor) or tensor.numel() == 0:
        return tensor
    # aminmax propagates NaN and reduces without a temporary the size of the tensor, which
    # torch.isfinite would allocate (several times over) for a large memory bank.
    low, high = torch.aminmax(tensor.detach())
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        count = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} contains {count} NaN or infinite value(s) out of {tensor.numel()}; "
            "remove or impute them first."
        )
    return tensor


def as_float_tensor(name: str, value, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Convert ``value`` to a floating tensor, following ``like``'s dtype and device if given."""
    if isinstance(value, torch.Tensor):
        if not (torch.is_floating_point(value) or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, but has dtype {value.dtype}.")
        if like is not None:
            return value.to(dtype=like.dtype, device=like.device)
        return value if torch.is_floating_point(value) else value.to(torch.get_default_dtype())
    try:
        if like is not None:
            return torch.as_tensor(value, dtype=like.dtype, device=like.device)
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be array-like of real numbers, but got {value!r}.") from error
    if not torch.is_floating_point(tensor):
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def check_memories(name: str, memories) -> torch.Tensor:
    """Check a memory bank: a finite, non-empty floating tensor of shape (N, D)."""
    memories = as_float_tensor(name, memories)
    if memories.dim() != 2:
        raise ValueError(
            f"{name} must have shape (num_memories, dim), but has shape {tuple(memories.shape)}."
        )
    if memories.shape[0] < 1 or memories.shape[1] < 1:
        raise ValueError(
            f"{name} must hold at least one memory of dimension >= 1, "
            f"but has shape {tuple(memories.shape)}."
        )
    return check_finite(name, memories)


def check_query(name: str, x: torch.Tensor, dim: int, reference: torch.Tensor) -> torch.Tensor:
    """Check a query batch of shape (..., dim) against the dtype and device of ``reference``."""
    if not isinstance(x, torch.Tensor):
        x = as_float_tensor(name, x, like=reference)
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(
            f"{name} must have shape (..., {dim}) to match the memories, "
            f"but has shape {tuple(x.shape)}."
        )
    if x.dtype != reference.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the memories have dtype {reference.dtype}; "
            f"convert one of them, for example x.to({reference.dtype})."
        )
    if x.device != reference.device:
        raise ValueError(
            f"{name} is on device {x.device} but the memories are on {reference.device}; "
            "move both to the same device."
        )
    return x


__all__ = [
    "as_float_tensor",
    "check_finite",
    "check_int",
    "check_interval",
    "check_memories",
    "check_positive",
    "check_query",
]
