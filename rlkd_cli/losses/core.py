"""Shared plumbing of the loss functions: option checks, position selection, reduction, log-probabilities.

Nothing here is a loss; :mod:`rlkd_cli.losses` documents the conventions every loss follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rlkd_cli.errors import RlkdError

#: Log-probabilities are floored at this value, so a zero-probability entry (``-inf`` logit)
#: contributes a large finite amount instead of ``inf``/``NaN`` where the other side has mass.
LOGP_FLOOR = -1.0e6

#: Non-finite logits gathered by :func:`ranking_loss` are replaced by ``±`` this value before the
#: pairwise differences (``-inf``/``NaN`` rank lowest, ``+inf`` highest).
RANK_BIG = 1.0e30

#: With a cached (top-K) teacher, a student candidate outside the cache gets the K-th cached teacher
#: logit minus this margin (logit units): it ranks below every cached id, almost hard for tau ~ 1.
RANK_CACHE_MARGIN = 10.0

#: Lower bound of the product of the two rank variances under the square root in
#: :func:`ranking_loss` (exact Pearson above it; bounded gradients below it).
RANK_EPS = 1.0e-10

_REDUCTIONS = ("mean", "sum", "none")
_INDEX_SETS = ("union", "teacher")


# --------------------------------------------------------------------------------------------
# Option validation (shared by the loss functions and Objective.from_config)
# --------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise RlkdError(f"{name} must be a finite number > 0, got {value!r}")


def _check_open_unit(name: str, value: Any) -> None:
    if not _is_real(value) or not (0.0 < value < 1.0):
        raise RlkdError(f"{name} must be a number strictly between 0 and 1, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if not _is_real(value) or not (0.0 <= value < 1.0):
        raise RlkdError(f"{name} must be a number in [0, 1), got {value!r} (alpha = 1 makes the loss identically 0)")


def _check_mu(name: str, value: Any) -> None:
    if not _is_real(value) or not (0.0 < value <= 1.0):
        raise RlkdError(f"{name} must be a number in (0, 1], got {value!r}")


def _check_k(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RlkdError(f"{name} must be an integer >= 1, got {value!r}")


def _check_index_set(name: str, value: Any) -> None:
    if value not in _INDEX_SETS:
        raise RlkdError(f"{name} must be one of {', '.join(_INDEX_SETS)}, got {value!r}")


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RlkdError(f"{name} must be an integer, got {value!r}")


def _check_reduction(value: Any) -> None:
    if value not in _REDUCTIONS:
        raise RlkdError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {value!r}")


# Value checks per keyword option, by option name (the same names mean the same thing everywhere).
_OPTION_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "temperature": _check_positive,
    "tau": _check_positive,
    "beta": _check_open_unit,
    "alpha": _check_alpha,
    "mu": _check_mu,
    "k": _check_k,
    "index_set": _check_index_set,
    "ignore_index": _check_int,
}


def _check_options(**options: Any) -> None:
    for name, value in options.items():
        check = _OPTION_CHECKS.get(name)
        if check is not None:
            check(name, value)


# --------------------------------------------------------------------------------------------
# Shared plumbing: position selection, dtype, reduction
# --------------------------------------------------------------------------------------------


@dataclass
class _Positions:
    """Which rows of the flattened ``[P, V]`` logits are counted."""

    batch_shape: torch.Size
    index: torch.Tensor | None  # LongTensor [N] of counted rows, or None for all P rows
    total: int  # P

    @property
    def count(self) -> int:
        return self.total if self.index is None else int(self.index.numel())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_logits(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise RlkdError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise RlkdError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise RlkdError(f"{name} must have shape [..., V], got a scalar")


def _positions(shape: torch.Size, mask: torch.Tensor | None, device: torch.device) -> _Positions:
    batch_shape = shape[:-1]
    total = math.prod(batch_shape)
    if mask is None:
        return _Positions(batch_shape, None, total)
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(batch_shape):
        raise RlkdError(
            f"mask has shape {tuple(mask.shape)} but the logits have positions of shape "
            f"{tuple(batch_shape)}; pass a mask of the logits' shape without the vocabulary axis"
        )
    keep = mask.to(device=device).reshape(-1) != 0
    if bool(keep.all()):  # every position counts: no row selection (and no copy of the logits)
        return _Positions(batch_shape, None, total)
    return _Positions(batch_shape, keep.nonzero().squeeze(-1), total)


def _rows(x: torch.Tensor, pos: _Positions) -> torch.Tensor:
    """The counted rows of ``x`` as a ``[N, V]`` tensor (a differentiable selection)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if pos.index is None else flat.index_select(0, pos.index)




def _reduce(values: torch.Tensor, pos: _Positions, reduction: str) -> torch.Tensor:
    """Reduce per-row values ``[N]`` of the counted rows according to ``reduction``."""
    if reduction == "none":
        if pos.index is None:
            return values.reshape(pos.batch_shape)
        out = values.new_zeros(pos.total).index_copy(0, pos.index, values)
        return out.reshape(pos.batch_shape)
    total = values.sum()  # a zero connected to the graph when there are no rows
    if reduction == "sum":
        return total
    n = values.shape[0]
    return total / n if n > 0 else total


def _log_probs(x: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``log_softmax(x / temperature)`` in ``dtype``, floored at :data:`LOGP_FLOOR`."""
    z = x.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    return F.log_softmax(z, dim=-1).clamp_min(LOGP_FLOOR)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise :math:`\\sum_v p_v (\\log p_v - \\log q_v)` from floored log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """:math:`\\log(w p + (1-w) q)` computed stably from log-probabilities, ``0 <= w <= 1``."""
    if w <= 0.0:
        return log_q
    if w >= 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


def _scaled(x: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``x / temperature`` in ``dtype`` (no division at temperature 1)."""
    z = x.to(dtype)
    return z / temperature if temperature != 1.0 else z
