r"""Distillation losses on next-token logits: divergences, the RLKD ranking loss, and weighted mixes.

Every function here is a pure function of tensors that can be imported into any trainer. The
divergences share one signature::

    name(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", **options)

Conventions (all functions):

* ``student_logits`` and ``teacher_logits`` have shape ``[..., V]`` (typically ``[B, T, V]``) and
  are already aligned: position ``t`` of both predicts the same token. Use :func:`align_vocab`
  first when the two vocabularies differ by padding rows.
* Any floating dtype is accepted (fp32, bf16, fp16); everything is computed in float32 (float64
  when the student logits are float64). Inputs are never modified. Outputs are in that compute
  dtype.
* ``mask`` has shape ``[...]`` (the logits' shape without the vocabulary axis), bool or 0/1;
  ``True`` marks a position that counts. ``None`` counts every position. Masked positions are
  never read, so they may hold anything (even NaN) without affecting values or gradients.
* ``reduction``:

  - ``"mean"``: the sum over counted positions divided by their number (an explicit count, not a
    mean over the padded batch). With no counted position the result is a zero that is still
    connected to the autograd graph.
  - ``"sum"``: the sum over counted positions. An engine that evaluates positions in chunks adds
    the chunk sums and divides by the total count itself; the result equals ``"mean"`` on the
    whole batch up to floating-point summation order.
  - ``"none"``: per-position values of shape ``[...]``, with masked positions set to 0.

* ``temperature`` :math:`\tau`: both distributions are :math:`\mathrm{softmax}(z/\tau)`. **No**
  :math:`\tau^2` factor is applied (Hinton et al. multiply the soft loss by :math:`\tau^2` to keep
  gradient magnitudes comparable across temperatures; do that with the term's weight if wanted).
* Numerics: vocabulary entries whose logit is ``-inf`` (a masked vocabulary) and logits of
  magnitude 1e4 give finite values and finite gradients. Log-probabilities are taken with
  ``log_softmax`` and floored at :data:`LOGP_FLOOR` (``-1e6``); an entry with probability exactly
  0 contributes exactly 0 to :math:`\sum p \log(p/q)` (the convention :math:`0 \log 0 = 0`), and
  where the exact divergence would be :math:`+\infty` (the other distribution puts mass on an entry
  this one forbids) the floor makes it large but finite.
* Gradients flow into both logits tensors when they require grad (pass the teacher's logits
  detached, or computed under ``torch.no_grad()``, to treat them as a target). Exceptions,
  stated where they apply: the adaptive weights of :func:`adaptive_kl` and the teacher's ranks in
  :func:`ranking_loss` are never differentiated.

Losses are chosen by name from the ``loss`` config group through the registry :data:`LOSSES`
(canonical names plus short aliases), and mixed by :class:`Objective`. Adding a divergence is one
function decorated with :func:`register_loss` plus one yaml file in ``conf/loss/``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from rlkd_cli.errors import RlkdError

__all__ = [
    "LOGP_FLOOR",
    "LOSSES",
    "Objective",
    "TopKLogits",
    "adaptive_kl",
    "align_vocab",
    "apply_divergence",
    "available_losses",
    "canonical_name",
    "cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "get_loss",
    "js",
    "loss_options",
    "lumped_log_probs",
    "ranking_loss",
    "register_loss",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "top_k",
    "tvd",
]

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


def _check_teacher(student_logits: torch.Tensor, teacher_logits: Any) -> None:
    """The teacher is dense logits of the student's shape, or a :class:`TopKLogits` of its positions."""
    if isinstance(teacher_logits, TopKLogits):
        teacher_logits.check_against(student_logits)
        return
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise RlkdError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; cut both to the tokenizer's vocabulary with rlkd_cli.losses.align_vocab"
        )


def _teacher_rows(teacher_logits: Any, pos: _Positions) -> Any:
    return teacher_logits.select(pos.index) if isinstance(teacher_logits, TopKLogits) else _rows(teacher_logits, pos)


def _prepare(student_logits: torch.Tensor, teacher_logits: Any, mask: torch.Tensor | None):
    _check_logits("student_logits", student_logits)
    _check_teacher(student_logits, teacher_logits)
    pos = _positions(student_logits.shape, mask, student_logits.device)
    return _rows(student_logits, pos), _teacher_rows(teacher_logits, pos), pos


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


# Fused row kernels. Plain autograd over the expressions above makes about twenty passes over
# [N, V] (log_softmax, floor, exp, products, and their backward), each allocating a tensor. The
# forward KL and the cross-entropy -- the terms of most mixes -- have short closed-form gradients,
# so they get autograd functions that make a handful of passes and save only the softmaxes. They
# are used when the teacher is not differentiated and every row's value comes out finite; rows
# with infinite or NaN logits (a masked vocabulary) make the call fall back to the general path,
# whose LOGP_FLOOR convention covers them. (For finite logits the floor never changes a value
# that matters: it only acts below log p = -1e6.)


def _softmax_and_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(z), logsumexp(z))`` over the last axis of finite ``[N, V]`` logits, in 4 passes."""
    m = z.amax(-1, keepdim=True)
    p = torch.sub(z, m).exp_()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    return p, (m + total.log()).squeeze(-1)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of ``[N, V]`` tensors without a temporary (a batched matmul, never autocast)."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


class _ForwardKLRows(torch.autograd.Function):
    """Row-wise KL(softmax(zt) || softmax(zs)); gradient ``softmax(zs) - softmax(zt)`` w.r.t. ``zs``."""

    @staticmethod
    def forward(ctx, zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        ps, lse_s = _softmax_and_lse(zs)
        pt, lse_t = _softmax_and_lse(zt)
        # sum_v pt (zt - lse_t - zs + lse_s), using sum_v pt = 1
        values = (_row_dot(pt, zt) - _row_dot(pt, zs)) - (lse_t - lse_s)
        ctx.save_for_backward(ps.sub_(pt))  # the gradient for a unit upstream gradient; pt is freed
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        diff, = ctx.saved_tensors
        return diff * grad.unsqueeze(-1), None


class _CrossEntropyRows(torch.autograd.Function):
    """Row-wise ``logsumexp(z) - z[y]``; gradient ``softmax(z) - onehot(y)``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p, lse = _softmax_and_lse(z)
        ctx.save_for_backward(p, y)
        return lse - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, y = ctx.saved_tensors
        g = p * grad.unsqueeze(-1)
        return g.scatter_add_(-1, y.unsqueeze(-1), -grad.unsqueeze(-1).to(g.dtype)), None


class _LumpedForwardKLRows(torch.autograd.Function):
    """Row-wise forward KL on the K cached ids plus the tail bin (:func:`lumped_log_probs`), fused.

    With ``p = softmax(zs)``, ``r_S`` its mass off the cached ids and ``r_T`` the teacher's, the
    gradient w.r.t. ``zs`` is ``p_j - p_T,j`` on a cached id and ``p_j (1 - r_T / r_S)`` elsewhere.
    """

    @staticmethod
    def forward(ctx, zs: torch.Tensor, ids: torch.Tensor, lt_top: torch.Tensor, lt_tail: torch.Tensor):
        p, lse = _softmax_and_lse(zs)
        p_top = p.gather(-1, ids)
        p.scatter_(-1, ids, 0.0)  # p now holds the tail only: its exact sum, no 1 - sum cancellation
        r_s = p.sum(-1)
        ls_top = (zs.gather(-1, ids) - lse.unsqueeze(-1)).clamp_min(LOGP_FLOOR)
        ls_tail = r_s.log().clamp_min(LOGP_FLOOR)
        pt_top, r_t = lt_top.exp(), lt_tail.exp()
        values = (pt_top * (lt_top - ls_top)).sum(-1) + r_t * (lt_tail - ls_tail)
        # False if a floor is active in some row (a vanishing student tail or cached id): the caller
        # then takes the general path, whose gradient follows the floor convention
        unfloored = ((ls_top > LOGP_FLOOR).all(-1) & ((ls_tail > LOGP_FLOOR) | (r_t == 0))).all()
        ctx.mark_non_differentiable(unfloored)
        ctx.save_for_backward(p, ids, p_top - pt_top, torch.where(r_s > 0, r_t / r_s, torch.zeros_like(r_s)))
        return values, unfloored

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _unused):
        p_tail, ids, g_top, ratio = ctx.saved_tensors
        g = p_tail * (1.0 - ratio).unsqueeze(-1)
        g.scatter_(-1, ids, g_top)
        return g.mul_(grad.unsqueeze(-1)), None, None, None


def _scaled(x: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    z = x.to(dtype)
    return z / temperature if temperature != 1.0 else z


def apply_divergence(
    core: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Evaluate a per-position divergence with the module's conventions (the building block of every divergence).

    ``core(log_p_student, log_p_teacher)`` receives the floored log-probabilities
    ``log_softmax(z / temperature)`` of the counted positions only, as ``[N, V]`` tensors in the
    compute dtype, and returns the ``[N]`` per-position values. This function validates the
    inputs, selects the positions of ``mask``, and applies ``reduction``. A new divergence is::

        @register_loss("my")
        def my_divergence(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", c=1.0):
            return apply_divergence(lambda ls, lt: c * ..., student_logits, teacher_logits, mask,
                                    temperature=temperature, reduction=reduction)

    With a :class:`TopKLogits` teacher (a teacher cache) ``core`` receives the two
    distributions lumped onto the K cached ids plus one tail bin, ``[N, K+1]`` each (see
    :func:`lumped_log_probs`), so every divergence written this way works from a cache unchanged.
    """
    _check_reduction(reduction)
    _check_options(temperature=temperature)
    s, t, pos = _prepare(student_logits, teacher_logits, mask)
    dtype = _compute_dtype(student_logits)
    if isinstance(t, TopKLogits):
        values = core(*lumped_log_probs(s, t, temperature=temperature))
    else:
        values = core(_log_probs(s, temperature, dtype), _log_probs(t, temperature, dtype))
    return _reduce(values, pos, reduction)


# --------------------------------------------------------------------------------------------
# Top-k selection
# --------------------------------------------------------------------------------------------

#: :func:`top_k` cuts rows into blocks of this many entries on the CPU.
TOPK_BLOCK = 64


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries along the last axis, in decreasing order.

    The same as ``x.topk(k, dim=-1)``, faster on the CPU for a small ``k`` over a long last axis
    (a vocabulary): there ``torch.topk`` selects within a copy of each row, about 4x slower than
    this. Each row is cut into blocks of :data:`TOPK_BLOCK` entries; one vectorised max pass finds
    every block's maximum; the ``k`` blocks with the largest maxima hold every top-``k`` entry (a
    block whose maximum exceeds the ``k``-th largest value contains a top-``k`` entry itself, so
    at most ``k`` blocks qualify), and the top-``k`` is taken among their ``k * 64`` entries.
    Values are identical to ``torch.topk``; among entries tied at the ``k``-th value the choice of
    ids may differ (it is implementation-defined for ``torch.topk`` too). Elsewhere (CUDA, short
    rows) this is ``torch.topk``.
    """
    V = x.shape[-1]
    b = TOPK_BLOCK
    if x.device.type != "cpu" or V < 4 * k * b or x.numel() == 0:
        out = x.topk(k, dim=-1, sorted=True)
        return out.values, out.indices
    lead = x.shape[:-1]
    flat = x.reshape(-1, V)
    n, nb = flat.shape[0], V // b
    blocks = flat[:, :nb * b].reshape(n, nb, b)
    best = blocks.amax(-1).topk(k, dim=-1, sorted=False).indices  # [n, k] blocks
    cand = blocks.gather(1, best.unsqueeze(-1).expand(n, k, b)).reshape(n, k * b)
    cand_ids = (best.unsqueeze(-1) * b + torch.arange(b, device=x.device)).reshape(n, k * b)
    if nb * b < V:  # the ragged last block always takes part
        cand = torch.cat([cand, flat[:, nb * b:]], dim=1)
        cand_ids = torch.cat([cand_ids, torch.arange(nb * b, V, device=x.device).expand(n, -1)], dim=1)
    values, pos = cand.topk(k, dim=-1, sorted=True)
    return values.reshape(*lead, k), cand_ids.gather(1, pos).reshape(*lead, k)


# --------------------------------------------------------------------------------------------
# Top-K teachers: a teacher's distribution kept as its K largest logits (the teacher cache)
# --------------------------------------------------------------------------------------------


def _same_temperature(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


@dataclass(frozen=True)
class TopKLogits:
    r"""A teacher's next-token distributions kept as their top-K logits, as a teacher cache stores them.

    Fields, for positions of shape ``[...]`` (``[N]`` for rows):

    * ``ids`` ``[..., K]``: the K token ids of largest teacher logit, by decreasing logit;
    * ``logits`` ``[..., K]``: their raw logits :math:`z_v` (temperature 1), any float dtype;
    * ``log_normalizer`` ``[..., T]``: :math:`\log Z_\tau = \mathrm{logsumexp}_v\, z_v/\tau` over the
      whole vocabulary, one column per temperature in ``temperatures``;
    * ``tail_log_mass`` ``[..., T]``: :math:`\log r_\tau`, the log of the teacher probability *outside*
      the K ids at each temperature (``-inf`` when the K ids carry all of it);
    * ``temperatures``: the temperatures of those columns.

    The teacher's probability of a cached id is :math:`p_T(v) = \exp(z_v/\tau - \log Z_\tau)`
    exactly; how the tail mass :math:`r_\tau` spreads over the other ids is unknown. Divergences
    therefore compare the two distributions *lumped* onto K+1 bins (:func:`lumped_log_probs`), and
    :func:`ranking_loss` ranks student ids outside the cache below the K-th cached logit.

    Build one from dense logits with :meth:`from_logits` (what ``rlkd cache-teacher`` stores).
    """

    ids: torch.Tensor
    logits: torch.Tensor
    log_normalizer: torch.Tensor
    tail_log_mass: torch.Tensor
    temperatures: tuple[float, ...] = (1.0,)

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The positions' shape (``ids.shape`` without the K axis)."""
        return self.ids.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: torch.Tensor, k: int, temperatures: Any = (1.0,)) -> "TopKLogits":
        """The exact top-``k`` summary of dense logits ``[..., V]`` at the given temperatures."""
        _check_logits("logits", logits)
        _check_k("k", k)
        temps = tuple(float(t) for t in temperatures)
        if not temps:
            raise RlkdError("temperatures must list at least one temperature, e.g. [1.0]")
        for t in temps:
            _check_positive("temperature", t)
        k = min(k, logits.shape[-1])
        z = logits.to(_compute_dtype(logits))
        values, ids = top_k(z, k)
        rest = z.scatter(-1, ids, -math.inf)
        norms, tails = [], []
        for t in temps:
            norm = torch.logsumexp(z / t, dim=-1)
            norms.append(norm)
            tails.append(torch.logsumexp(rest / t, dim=-1) - norm)
        return cls(ids=ids, logits=values.to(logits.dtype), log_normalizer=torch.stack(norms, -1),
                   tail_log_mass=torch.stack(tails, -1), temperatures=temps)

    def check_against(self, student_logits: torch.Tensor) -> None:
        """Shapes and ids must fit ``student_logits`` ``[..., V]``; one line naming the mismatch otherwise."""
        for name in ("ids", "logits", "log_normalizer", "tail_log_mass"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise RlkdError(f"TopKLogits.{name} must be a tensor")
        if self.ids.is_floating_point() or self.ids.dtype == torch.bool:
            raise RlkdError(f"TopKLogits.ids must be an integer tensor, got dtype {self.ids.dtype}")
        if tuple(self.logits.shape) != tuple(self.ids.shape):
            raise RlkdError(f"TopKLogits.logits {tuple(self.logits.shape)} and ids {tuple(self.ids.shape)} differ in shape")
        n_t = len(self.temperatures)
        for name in ("log_normalizer", "tail_log_mass"):
            shape = tuple(getattr(self, name).shape)
            if shape != (*self.shape, n_t):
                raise RlkdError(f"TopKLogits.{name} has shape {shape}, expected {(*self.shape, n_t)} "
                                f"(positions x {n_t} temperature(s))")
        if tuple(self.shape) != tuple(student_logits.shape[:-1]):
            raise RlkdError(f"the cached teacher has positions of shape {tuple(self.shape)} but the student logits "
                            f"{tuple(student_logits.shape)}; both must cover the same positions")
        vocab = student_logits.shape[-1]
        if self.ids.numel() and (int(self.ids.min()) < 0 or int(self.ids.max()) >= vocab):
            raise RlkdError(f"the cached teacher has token ids outside the student's vocabulary [0, {vocab}); "
                            "teacher cache and student must share the tokenizer")

    def select(self, index: torch.Tensor | None) -> "TopKLogits":
        """The positions ``index`` of the flattened positions as rows (all of them for ``None``)."""
        def rows(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            return flat if index is None else flat.index_select(0, index.to(flat.device))

        return TopKLogits(rows(self.ids), rows(self.logits), rows(self.log_normalizer), rows(self.tail_log_mass),
                          self.temperatures)

    def __getitem__(self, rows: slice) -> "TopKLogits":
        """A slice of rows (the leading axis)."""
        return TopKLogits(self.ids[rows], self.logits[rows], self.log_normalizer[rows], self.tail_log_mass[rows],
                          self.temperatures)

    def to(self, device: torch.device | str) -> "TopKLogits":
        return TopKLogits(self.ids.to(device), self.logits.to(device), self.log_normalizer.to(device),
                          self.tail_log_mass.to(device), self.temperatures)

    def column(self, temperature: float) -> int:
        """The index of ``temperature`` among :attr:`temperatures`; a clear error if it was not cached."""
        for i, t in enumerate(self.temperatures):
            if _same_temperature(t, temperature):
                return i
        raise RlkdError(f"the cached teacher has log-normalisers for temperature(s) "
                        f"{', '.join(f'{t:g}' for t in self.temperatures)} but a loss term uses temperature "
                        f"{temperature:g}; rebuild the cache with that temperature (rlkd cache-teacher "
                        f"cache.temperatures=[{temperature:g}])")

    def log_probs(self, temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p_T of the K ids [..., K], log tail mass [...])`` at ``temperature``, floored at LOGP_FLOOR.

        The K log-probabilities are renormalised so that, with the tail mass, they sum to one: a
        no-op up to float rounding for float32 logits; for bfloat16/float16 logits it absorbs their
        rounding (about 0.4 % resp. 0.05 % of each probability near logit 20), so divergences and
        their closed-form gradients stay those of a proper distribution.
        """
        c = self.column(temperature)
        z = self.logits.to(dtype)
        if temperature != 1.0:
            z = z / temperature
        tail = self.tail_log_mass[..., c].to(dtype)
        lp = z - self.log_normalizer[..., c:c + 1].to(dtype)
        if self.logits.dtype not in (torch.float32, torch.float64):
            head_mass = torch.log1p(-tail.exp().clamp_max(1.0 - 1e-7))  # log(1 - r_T)
            lp = lp + (head_mass - torch.logsumexp(lp, dim=-1)).unsqueeze(-1)
        return lp.clamp_min(LOGP_FLOOR), tail.clamp_min(LOGP_FLOOR)


def lumped_log_probs(student_logits: torch.Tensor, teacher: TopKLogits, *, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Student and teacher distributions lumped onto the teacher's K cached ids plus one tail bin.

    Returns ``(log_q, log_p)``, each ``[..., K+1]`` and floored at :data:`LOGP_FLOOR`: entries
    ``0..K-1`` are the log-probabilities of the cached ids, entry ``K`` the log of the mass of every
    other id. For the teacher, :math:`z_v/	au - \log Z_	au` and :math:`\log r_	au` from the cache;
    for the student, :math:`\log\mathrm{softmax}(s/	au)` at the ids and the exact log-sum-exp of the
    rest (no ``1 - sum`` cancellation). Gradients flow into ``student_logits``.

    Any divergence :math:`D` evaluated on these two (K+1)-bin distributions is the divergence of
    the two distributions *coarse-grained* by the partition {each cached id} ∪ {the rest}. For every
    f-divergence (forward and reverse KL, JS and generalized JSD, TVD, skew KL and skew reverse KL)
    the data-processing inequality gives :math:`D_\mathrm{lumped} \le D_\mathrm{exact}`, with
    equality when, outside the cache, the student's distribution is proportional to the teacher's;
    e.g. the forward KL misses exactly :math:`r_T\,\mathrm{KL}(p_T^\mathrm{tail} \| p_S^\mathrm{tail})`
    (tail-normalised distributions). The error is at most of the order of the tail mass.
    """
    _check_logits("student_logits", student_logits)
    teacher.check_against(student_logits)
    dtype = _compute_dtype(student_logits)
    ls_full = _log_probs(student_logits, temperature, dtype)
    ids = teacher.ids.long().to(ls_full.device)
    ls_top = ls_full.gather(-1, ids)
    in_cache = torch.zeros_like(ls_full, dtype=torch.bool).scatter_(-1, ids, True)
    # exact log of the student's mass outside the cached ids; cached entries are pushed to the floor
    # (a finite value, so an empty tail gives a floored value and finite gradients, not NaN)
    ls_tail = torch.logsumexp(ls_full.masked_fill(in_cache, LOGP_FLOOR), dim=-1).clamp_min(LOGP_FLOOR)
    lt_top, lt_tail = teacher.to(ls_full.device).log_probs(temperature, dtype)
    return (torch.cat([ls_top, ls_tail.unsqueeze(-1)], dim=-1),
            torch.cat([lt_top, lt_tail.unsqueeze(-1)], dim=-1))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

#: Every loss by name: canonical names (the function's ``__name__``) and aliases.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {}

# Options the Objective does not pass as keyword options (they come from its own arguments).
_NOT_OPTIONS = {"reduction", "labels"}


def register_loss(*names: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a loss under its ``__name__`` and the given aliases.

    The function must follow the common signature
    ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", **options)``
    where every option is keyword-only with a default; the ``loss`` config group can then use it
    by any of its names, and every keyword option becomes a config key of its term.
    """

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        all_names = (fn.__name__, *names)
        for name in all_names:
            existing = LOSSES.get(name)
            if existing is not None and existing is not fn:
                raise ValueError(f"loss name {name!r} is already registered for {existing.__name__}")
        for name in all_names:
            LOSSES[name] = fn
        fn.loss_names = tuple(dict.fromkeys(all_names))  # type: ignore[attr-defined]
        return fn

    return decorator


def available_losses() -> list[str]:
    """All registered names (canonical names and aliases), sorted."""
    return sorted(LOSSES)


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss registered under ``name``; :class:`RlkdError` listing the available names otherwise."""
    fn = LOSSES.get(name) if isinstance(name, str) else None
    if fn is None:
        raise RlkdError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    return fn


def canonical_name(name: str) -> str:
    """The canonical name (function name) of a registered loss or alias."""
    return get_loss(name).__name__


def loss_options(fn: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """The keyword options a loss accepts in a config term, with their defaults."""
    out: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_OPTIONS:
            out[p.name] = p.default
    return out


# --------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------


@register_loss("kl", "fkl")
def forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Forward KL divergence :math:`\mathrm{KL}(p_T \| p_S) = \sum_v p_T(v) \log \frac{p_T(v)}{p_S(v)}`.

    The classic distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network"): mean-seeking, the student must cover every token the teacher supports.
    :math:`p = \mathrm{softmax}(z/\tau)` for both models, no :math:`\tau^2` factor. Options: none
    besides ``temperature``.
    """
    if isinstance(teacher_logits, TopKLogits) or (isinstance(teacher_logits, torch.Tensor)
                                                  and not teacher_logits.requires_grad):
        # the same value and gradient in a few fused passes (_ForwardKLRows, _LumpedForwardKLRows)
        _check_reduction(reduction)
        _check_options(temperature=temperature)
        st, tt, pos = _prepare(student_logits, teacher_logits, mask)
        dtype = _compute_dtype(student_logits)
        zs = _scaled(st, temperature, dtype)
        if isinstance(tt, TopKLogits):
            tt = tt.to(zs.device)
            ids = tt.ids.long()
            if tt.k < zs.shape[-1]:  # (a cache of the whole vocabulary has no tail bin)
                lt_top, lt_tail = tt.log_probs(temperature, dtype)
                values, unfloored = _LumpedForwardKLRows.apply(zs, ids, lt_top, lt_tail)
                if bool(unfloored & torch.isfinite(values).all()):
                    return _reduce(values, pos, reduction)
        else:
            values = _ForwardKLRows.apply(zs, _scaled(tt, temperature, dtype))
            if bool(torch.isfinite(values).all()):
                return _reduce(values, pos, reduction)
    return apply_divergence(
        lambda ls, lt: _kl_rows(lt, ls),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


@register_loss("rkl")
def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Reverse KL divergence :math:`\mathrm{KL}(p_S \| p_T) = \sum_v p_S(v) \log \frac{p_S(v)}{p_T(v)}`.

    Mode-seeking: the student concentrates on the teacher's major modes (MiniLLM, Gu et al. 2024,
    "MiniLLM: Knowledge Distillation of Large Language Models"; here evaluated token-wise on the
    given positions). Options: none besides ``temperature``.
    """
    return apply_divergence(
        lambda ls, lt: _kl_rows(ls, lt),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


def _gjsd_rows(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    lm = _log_mix(lt, ls, beta)
    return beta * _kl_rows(lt, lm) + (1.0 - beta) * _kl_rows(ls, lm)


@register_loss("gjsd")
def generalized_jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", beta=0.5):
    r"""Generalized Jensen–Shannon divergence (GKD, Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes").

    .. math::
        \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p_T \| m) + (1-\beta)\,\mathrm{KL}(p_S \| m),
        \qquad m = \beta\,p_T + (1-\beta)\,p_S .

    Options: ``beta`` in the open interval (0, 1) (default 0.5, which is :func:`js`).

    Limits. With this convention :math:`\mathrm{JSD}_\beta \to 0` at both ends (the mixture
    collapses onto one of the two distributions), so the endpoints are rejected. Near the ends it
    is a scaled KL: expanding :math:`\log(1-\beta+\beta r)` with :math:`r = p_T/p_S` gives
    :math:`\mathrm{KL}(p_T\|m) = \mathrm{KL}(p_T\|p_S) + O(\beta)` and
    :math:`\mathrm{KL}(p_S\|m) = \tfrac{\beta^2}{2}\chi^2(p_T\|p_S) + O(\beta^3)`, hence

    .. math::
        \lim_{\beta\to 0} \frac{\mathrm{JSD}_\beta}{\beta} = \mathrm{KL}(p_T \| p_S)\ \text{(forward KL)},
        \qquad
        \lim_{\beta\to 1} \frac{\mathrm{JSD}_\beta}{1-\beta} = \mathrm{KL}(p_S \| p_T)\ \text{(reverse KL)},

    with errors of order :math:`\beta` (resp. :math:`1-\beta`); these need the other
    distribution's support to contain the limiting KL's reference support (finite KL). Swapping
    the roles of teacher and student corresponds to :math:`\beta \leftrightarrow 1-\beta`.
    """
    _check_options(beta=beta)
    return apply_divergence(
        lambda ls, lt: _gjsd_rows(ls, lt, beta),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


@register_loss()
def js(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Jensen–Shannon divergence, :func:`generalized_jsd` with :math:`\beta = 1/2`:
    :math:`\tfrac12\mathrm{KL}(p_T\|m) + \tfrac12\mathrm{KL}(p_S\|m)`, :math:`m = (p_T+p_S)/2`.

    Symmetric and bounded by :math:`\log 2` (Lin 1991; used for distillation e.g. by GKD,
    Agarwal et al. 2024). Options: none besides ``temperature``.
    """
    return apply_divergence(
        lambda ls, lt: _gjsd_rows(ls, lt, 0.5),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


@register_loss()
def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Total variation distance :math:`\tfrac12 \sum_v |p_T(v) - p_S(v)|`, in [0, 1].

    Used as a distillation objective by Wen et al. 2023 ("f-Divergence Minimization for
    Sequence-Level Knowledge Distillation"). Options: none besides ``temperature``. (The gradient
    of :math:`|x|` at exactly 0 is taken as 0.)
    """
    return apply_divergence(
        lambda ls, lt: 0.5 * (lt.exp() - ls.exp()).abs().sum(-1),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


@register_loss("skl")
def skew_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1):
    r"""Skew KL divergence :math:`\mathrm{KL}(p_T \,\|\, \alpha p_T + (1-\alpha) p_S)`.

    DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language
    Models"): mixing a share of the teacher into the reference keeps the divergence bounded
    (by :math:`-\log\alpha`) and its gradients stable. Options: ``alpha`` in [0, 1) (default 0.1;
    0 is the forward KL).
    """
    _check_options(alpha=alpha)
    return apply_divergence(
        lambda ls, lt: _kl_rows(lt, _log_mix(lt, ls, alpha)),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


@register_loss("srkl")
def skew_reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1):
    r"""Skew reverse KL divergence :math:`\mathrm{KL}(p_S \,\|\, \alpha p_S + (1-\alpha) p_T)`.

    DistiLLM (Ko et al. 2024). Options: ``alpha`` in [0, 1) (default 0.1; 0 is the reverse KL).
    """
    _check_options(alpha=alpha)
    return apply_divergence(
        lambda ls, lt: _kl_rows(ls, _log_mix(ls, lt, alpha)),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


def _akl_rows(ls: torch.Tensor, lt: torch.Tensor, mu: float) -> torch.Tensor:
    with torch.no_grad():
        pt = lt.exp()
        gap = (pt - ls.exp()).abs()
        sorted_pt, order = pt.sort(dim=-1, descending=True)
        # Exclusive cumulative sum: the teacher mass of all strictly better-ranked tokens.
        before = torch.cumsum(sorted_pt, dim=-1)
        before = torch.cat([torch.zeros_like(before[..., :1]), before[..., :-1]], dim=-1)
        head = before < mu  # smallest prefix whose cumulative teacher probability reaches mu
        gap_sorted = gap.gather(-1, order)
        g_head = (gap_sorted * head).sum(-1)
        g_tail = (gap_sorted * ~head).sum(-1)
        g_all = g_head + g_tail
        w_head = torch.where(g_all > 0, g_head / torch.where(g_all > 0, g_all, 1.0), 0.5)
        w_tail = 1.0 - w_head
    return w_head * _kl_rows(lt, ls) + w_tail * _kl_rows(ls, lt)


@register_loss("akl")
def adaptive_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", mu=0.5):
    r"""Adaptive KL (AKL; Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models").

    Per position, sort the vocabulary by teacher probability; the *head* is the smallest prefix
    whose cumulative teacher probability is :math:`\ge \mu`, the *tail* the rest. With
    :math:`g_\mathrm{head} = \sum_{v\in\mathrm{head}} |p_T(v)-p_S(v)|` and
    :math:`g_\mathrm{tail} = \sum_{v\in\mathrm{tail}} |p_T(v)-p_S(v)|`:

    .. math::
        \mathrm{AKL} = \frac{g_\mathrm{head}}{g_\mathrm{head}+g_\mathrm{tail}}\,\mathrm{KL}(p_T\|p_S)
                     + \frac{g_\mathrm{tail}}{g_\mathrm{head}+g_\mathrm{tail}}\,\mathrm{KL}(p_S\|p_T).

    The weights are detached (not differentiated). When the two distributions are identical
    (:math:`g_\mathrm{head}+g_\mathrm{tail}=0`) both weights are 1/2 (and both KLs are 0). Ties in
    teacher probability at the head boundary are split by sort order. Options: ``mu`` in (0, 1]
    (default 0.5).
    """
    _check_options(mu=mu)
    return apply_divergence(
        lambda ls, lt: _akl_rows(ls, lt, mu),
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        reduction=reduction,
    )


@register_loss("ce")
def cross_entropy(
    student_logits,
    teacher_logits=None,
    mask=None,
    *,
    labels,
    temperature=1.0,
    reduction="mean",
    ignore_index=-100,
):
    r"""Cross-entropy to ground-truth token ids, :math:`-\log p_S(y_t)` (the SFT term).

    ``labels`` has the positions' shape ``[...]`` with integer ids in ``[0, V)``; positions whose
    label is ``ignore_index`` are excluded in addition to ``mask`` (and the ``"mean"`` count only
    includes positions that are counted by both). ``teacher_logits`` is ignored (it is accepted so
    every registered loss has the same call shape). :math:`p_S = \mathrm{softmax}(z/\tau)`; in an
    :class:`Objective` this term does not inherit the config's top-level temperature (ground-truth
    cross-entropy is taken at :math:`\tau=1`, as in Hinton et al. 2015) unless the term sets its
    own. A label whose logit is ``-inf`` costs ``-LOGP_FLOOR`` (1e6) instead of ``inf``.
    """
    _check_reduction(reduction)
    _check_options(temperature=temperature, ignore_index=ignore_index)
    _check_logits("student_logits", student_logits)
    if not isinstance(labels, torch.Tensor):
        raise RlkdError(
            "cross_entropy needs labels: a tensor of token ids with the logits' shape without the vocabulary axis"
        )
    batch_shape = student_logits.shape[:-1]
    if tuple(labels.shape) != tuple(batch_shape):
        raise RlkdError(
            f"labels have shape {tuple(labels.shape)} but the logits have positions of shape {tuple(batch_shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise RlkdError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}")
    labels = labels.to(student_logits.device)
    keep = labels != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(batch_shape):
            raise RlkdError(
                f"mask has shape {tuple(mask.shape)} but the logits have positions of shape {tuple(batch_shape)}"
            )
        keep = keep & (mask.to(student_logits.device) != 0)
    pos = _positions(student_logits.shape, keep, student_logits.device)
    x = _rows(student_logits, pos).to(_compute_dtype(student_logits))
    y = labels.reshape(-1) if pos.index is None else labels.reshape(-1).index_select(0, pos.index)
    vocab = x.shape[-1]
    if y.numel() and bool(((y < 0) | (y >= vocab)).any()):
        bad = int(y[(y < 0) | (y >= vocab)][0])
        raise RlkdError(
            f"label id {bad} is outside the vocabulary [0, {vocab}); mark ignored positions with {ignore_index}"
        )
    if temperature != 1.0:
        x = x / temperature
    values = _CrossEntropyRows.apply(x, y.long())  # value and gradient in a few fused passes
    if bool(torch.isfinite(values).all()):
        return _reduce(values, pos, reduction)
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    values = (lse - target).clamp_max(-LOGP_FLOOR)
    return _reduce(values, pos, reduction)


# --------------------------------------------------------------------------------------------
# The RLKD ranking loss
# --------------------------------------------------------------------------------------------


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Replace ``+inf`` by ``RANK_BIG`` and ``-inf``/``NaN`` by ``-RANK_BIG`` (no gradient to those)."""
    big = torch.full_like(x, RANK_BIG)
    return torch.where(torch.isfinite(x), x, torch.where(x == math.inf, big, -big))


def _cached_values(teacher: TopKLogits, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Teacher logits at ``ids`` ``[N, m]`` from a top-K cache; ids outside it: K-th value - margin."""
    all_ids = teacher.ids.long()
    values = _finite(teacher.logits.to(dtype))
    eq = ids.unsqueeze(-1) == all_ids.unsqueeze(-2)  # [N, m, K]
    found = eq.any(-1)
    picked = torch.where(eq, values.unsqueeze(-2), torch.zeros((), dtype=dtype, device=values.device)).sum(-1)
    below = (values[..., -1:] - RANK_CACHE_MARGIN).expand_as(picked)
    return torch.where(found, picked, below)


def _soft_rank(x: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Soft ascending ranks :math:`r_i = \tfrac12 + \sum_{j\,\mathrm{valid}} \sigma((x_i-x_j)/\tau)`.

    ``x``: ``[N, K]``, ``valid``: bool ``[N, K]``. Ranks of invalid entries are computed but
    meaningless (they are masked out by the caller).
    """
    pair = torch.sigmoid((x.unsqueeze(-1) - x.unsqueeze(-2)) / tau)  # [N, K, K]: sigma((x_i - x_j)/tau)
    return 0.5 + (pair * valid.unsqueeze(-2).to(x.dtype)).sum(-1)


@register_loss("rank")
def ranking_loss(
    student_logits,
    teacher_logits,
    mask=None,
    *,
    k=5,
    index_set="union",
    tau=1.0,
    temperature=1.0,
    reduction="mean",
):
    r"""The RLKD word-level ranking loss (Peng & Zhang, COLING 2025, "Enhancing Knowledge
    Distillation of Large Language Models through Efficient Multi-Modal Distribution Alignment",
    arXiv 2409.12545): :math:`1 - \rho`, with :math:`\rho` the (soft) Spearman correlation of the
    two models' rankings of a small candidate set of tokens.

    Per position:

    1. Candidate ids: the teacher's top-``k`` ids, plus (``index_set="union"``) the student's
       top-``k`` ids that are not already among the teacher's, deduplicated exactly per position.
       Unions of different sizes in one batch are handled with a per-position validity mask.
       ``index_set="teacher"`` uses the teacher's top-``k`` only. The top-k selection itself is not
       differentiated.
    2. Both models' logits are gathered at those ids, cast to float32 (float64 for float64 input),
       divided by ``temperature``, and non-finite values are replaced by :math:`\pm`:data:`RANK_BIG`.
    3. Soft ranks by pairwise sigmoids over the valid candidates,

       .. math:: r_i = \tfrac12 + \sum_{j\ \mathrm{valid}} \sigma\!\left(\frac{x_i - x_j}{\tau}\right)
                     = 1 + \sum_{j \ne i} \sigma\!\left(\frac{x_i - x_j}{\tau}\right),

       which as :math:`\tau \to 0` is the standard ascending rank, ties getting their average rank.
       The teacher's ranks are computed the same way without gradient (the teacher is a target).
    4. :math:`\rho` = Pearson correlation of the two rank vectors over the valid entries (masked
       means): :math:`\rho = \mathrm{cov}/\sqrt{\max(\mathrm{var}_S\,\mathrm{var}_T, \epsilon)}` with
       :math:`\epsilon` = :data:`RANK_EPS` (1e-10, in rank units to the fourth power), so
       :math:`\rho` is the exact Pearson correlation unless the ranks are almost constant. The
       loss is :math:`1-\rho \in [0, 2]`.

    Degenerate positions: when the candidate set has a single entry or the teacher's ranks have
    zero variance (all candidates tied for the teacher, so there is no order to learn),
    :math:`\rho := 1` (loss 0, no gradient). When only the student's ranks are constant,
    :math:`\rho = 0` (loss 1) and the gradient pushes the student towards the teacher's order.
    Gradients are finite in all cases.

    Options: ``k`` (integer, 1 <= k <= V, default 5), ``index_set`` (``"union"`` or
    ``"teacher"``), ``tau`` (> 0, softness of the soft rank, in logit units; smaller is closer to
    hard ranks), ``temperature`` (divides the logits before ranking, so only ``tau*temperature``
    matters). Gradient flows to the student logits only. Fully vectorised; memory is
    :math:`O(N (2k)^2)` for :math:`N` counted positions.

    With a :class:`TopKLogits` teacher (a teacher cache holding K >= ``k`` logits per position)
    the teacher's top-``k`` ids and values are the first ``k`` cached ones; a student candidate
    that is among the K cached ids gets its cached teacher logit, one outside the cache gets the
    K-th cached logit minus :data:`RANK_CACHE_MARGIN` (it ranks below every cached id, and such
    ids tie with each other, as their order is unknown). With every candidate inside the cache
    the loss equals the one from dense teacher logits.
    """
    _check_reduction(reduction)
    _check_options(k=k, index_set=index_set, tau=tau, temperature=temperature)
    s, t, pos = _prepare(student_logits, teacher_logits, mask)
    vocab = s.shape[-1]
    if k > vocab:
        raise RlkdError(f"ranking loss k={k} exceeds the vocabulary size {vocab}; use 1 <= k <= {vocab}")
    dtype = _compute_dtype(student_logits)
    cached = isinstance(t, TopKLogits)
    if cached and k > t.k:
        raise RlkdError(f"ranking loss k={k} needs the teacher's top-{k}, but the cached teacher keeps only "
                        f"K={t.k} logits per position; use k <= {t.k} or rebuild the cache with cache.top_k >= {k}")
    with torch.no_grad():
        if cached:
            t = t.to(s.device)
            t_ids, t_top = t.ids[..., :k].long(), _finite(t.logits[..., :k].to(dtype))
        else:
            t = t.detach()
            t_ids = top_k(t, k)[1]  # [N, k]
        if index_set == "union":
            s_ids = top_k(s.detach(), k)[1]  # [N, k]
            seen = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1)  # student id already a teacher id
            ids = torch.cat([t_ids, s_ids], dim=-1)
            valid = torch.cat([torch.ones_like(seen), ~seen], dim=-1)
        else:
            s_ids = None
            ids = t_ids
            valid = torch.ones_like(t_ids, dtype=torch.bool)
        if cached:
            xt = t_top if s_ids is None else torch.cat([t_top, _cached_values(t, s_ids, dtype)], dim=-1)
        else:
            xt = _finite(t.gather(-1, ids).to(dtype))
        if temperature != 1.0:
            xt = xt / temperature
        rank_t = _soft_rank(xt, valid, tau)
    xs = _finite(s.gather(-1, ids).to(dtype))
    if temperature != 1.0:
        xs = xs / temperature
    rank_s = _soft_rank(xs, valid, tau)

    vf = valid.to(dtype)
    n = vf.sum(-1)
    n_safe = n.clamp_min(1.0)
    cs = (rank_s - (rank_s * vf).sum(-1, keepdim=True) / n_safe.unsqueeze(-1)) * vf
    ct = (rank_t - (rank_t * vf).sum(-1, keepdim=True) / n_safe.unsqueeze(-1)) * vf
    cov = (cs * ct).sum(-1)
    var_s = (cs * cs).sum(-1)
    var_t = (ct * ct).sum(-1)
    rho = cov / torch.sqrt((var_s * var_t).clamp_min(RANK_EPS))
    degenerate = (n <= 1) | (var_t <= torch.finfo(dtype).tiny)
    rho = torch.where(degenerate, torch.ones_like(rho), rho)
    return _reduce(1.0 - rho, pos, reduction)


# --------------------------------------------------------------------------------------------
# Vocabulary alignment
# --------------------------------------------------------------------------------------------


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut both logits tensors to a common vocabulary size (views, no copy).

    Models often pad their output embedding beyond the tokenizer's vocabulary (to a multiple of 64
    or 128); those padding rows never correspond to a token. With ``vocab_size`` (the tokenizer's
    ``len(tokenizer)``) both are cut to it, and a model with fewer logits than that is an error;
    without it both are cut to the smaller of the two last dimensions.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        size = min(vs, vt)
    else:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise RlkdError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if vs < vocab_size or vt < vocab_size:
            raise RlkdError(
                f"the tokenizer has {vocab_size} tokens but the student has {vs} logits and the teacher {vt}; "
                "both models must cover the tokenizer's vocabulary (use the same tokenizer for both)"
            )
        size = vocab_size
    return student_logits[..., :size], teacher_logits[..., :size]


# --------------------------------------------------------------------------------------------
# Weighted mixes of terms
# --------------------------------------------------------------------------------------------

_CONFIG_KEYS = ("name", "terms", "temperature", "description")
_TERM_KEYS = ("weight", "fn")


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _format_value(value: Any) -> str:
    return str(value) if not isinstance(value, str) else value


class Objective:
    """A weighted sum of registered losses, built from the ``loss`` config group.

    Config shape (an OmegaConf ``DictConfig`` or a plain dict)::

        name: kl+rank
        temperature: 1.0          # optional; used by every term that does not set its own
        terms:
          kl:   {weight: 0.5}
          rank: {weight: 1.0, k: 5, index_set: union, tau: 1.0}
          rank15: {fn: rank, weight: 0.5, k: 15}   # `fn` reuses a loss under another key

    Each key of ``terms`` is a registered loss name or alias, or any key with ``fn: <name>``.
    ``weight`` defaults to 1.0; every other key is a keyword option of that loss, validated
    against its signature. The top-level ``temperature`` applies to every term without its own,
    except cross-entropy (ground-truth CE stays at temperature 1 unless its term sets one).
    Terms with weight 0 are not computed and are not part of the total.

    One set of positions is scored for every term: ``mask`` (all positions if ``None``) and, when
    ``labels`` are given, only positions whose label is not an ignore index (-100 and the
    ``ignore_index`` of any cross-entropy term). :meth:`position_mask` returns that set, so an
    engine that uses ``reduction="sum"`` over chunks divides by ``position_mask(...).sum()``.
    """

    def __init__(
        self,
        terms: list[tuple[str, Callable[..., torch.Tensor], float, dict[str, Any]]],
        name: str | None = None,
    ):
        self.name = name
        #: Every configured term, as (key, function, weight, keyword options passed to it).
        self.terms = list(terms)
        if not any(w > 0 for _, _, w, _ in self.terms):
            raise RlkdError(
                "all loss weights are zero: give at least one term a weight > 0 "
                f"(terms: {', '.join(k for k, *_ in self.terms) or 'none'})"
            )

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any) -> "Objective":
        """Build and validate an objective from a ``loss`` config (see the class docstring)."""
        cfg = _to_plain(cfg)
        if not isinstance(cfg, Mapping):
            raise RlkdError(f"the loss config must be a mapping with a 'terms' key, got {type(cfg).__name__}")
        unknown = [key for key in cfg if key not in _CONFIG_KEYS]
        if unknown:
            raise RlkdError(
                f"unknown key(s) {', '.join(map(str, unknown))} in the loss config; "
                f"valid keys: {', '.join(_CONFIG_KEYS)}"
            )
        temperature = cfg.get("temperature", None)
        if temperature is not None:
            _check_positive("loss.temperature", temperature)
        terms_cfg = cfg.get("terms")
        if not isinstance(terms_cfg, Mapping) or not terms_cfg:
            raise RlkdError(
                "the loss config needs a non-empty 'terms' mapping, "
                "e.g. terms: {kl: {weight: 0.5}, rank: {weight: 1.0, k: 5}}"
            )
        terms = []
        for key, term in terms_cfg.items():
            key = str(key)
            if term is None:
                term = {}
            if not isinstance(term, Mapping):
                raise RlkdError(f"loss term {key!r} must be a mapping like {{weight: 1.0}}, got {term!r}")
            term = dict(term)
            fn_name = term.pop("fn", key)
            fn = LOSSES.get(fn_name) if isinstance(fn_name, str) else None
            if fn is None:
                where = f"loss term {key!r}" + (f" (fn: {fn_name!r})" if fn_name != key else "")
                raise RlkdError(
                    f"{where} is not a registered loss; available: {', '.join(available_losses())} "
                    "(or give the term fn: <name>)"
                )
            weight = term.pop("weight", 1.0)
            if not _is_real(weight) or not math.isfinite(weight) or weight < 0:
                raise RlkdError(f"loss term {key!r}: weight must be a finite number >= 0, got {weight!r}")
            valid = loss_options(fn)
            for opt in term:
                if opt not in valid:
                    raise RlkdError(
                        f"loss term {key!r} ({fn.__name__}) has no option {opt!r}; valid options: "
                        f"{', '.join([*_TERM_KEYS, *valid])}"
                    )
            for opt, value in term.items():
                check = _OPTION_CHECKS.get(opt)
                if check is not None:
                    check(f"loss term {key!r}: {opt}", value)
            options = dict(term)
            inherits = "temperature" in valid and fn is not cross_entropy
            if inherits and "temperature" not in options and temperature is not None:
                options["temperature"] = temperature
            terms.append((key, fn, float(weight), options))
        return cls(terms, name=cfg.get("name"))

    # -- properties ------------------------------------------------------------------------

    @property
    def active_terms(self) -> list[tuple[str, Callable[..., torch.Tensor], float, dict[str, Any]]]:
        """The terms with weight > 0 (the ones that are computed)."""
        return [term for term in self.terms if term[2] > 0]

    @property
    def needs_teacher(self) -> bool:
        """Whether any active term reads the teacher's logits (False for pure cross-entropy)."""
        return any(fn is not cross_entropy for _, fn, _, _ in self.active_terms)

    @property
    def needs_labels(self) -> bool:
        """Whether any active term reads ground-truth labels (cross-entropy)."""
        return any(fn is cross_entropy for _, fn, _, _ in self.active_terms)

    def _ignore_indices(self) -> list[int]:
        ids = {-100}
        for _, fn, _, options in self.terms:
            if fn is cross_entropy:
                ids.add(int(options.get("ignore_index", -100)))
        return sorted(ids)

    def position_mask(
        self, mask: torch.Tensor | None, labels: torch.Tensor | None, shape: torch.Size | tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        """The bool mask of positions every term scores: ``mask`` and ``labels`` not ignored.

        ``shape`` (the positions' shape) is only needed when both ``mask`` and ``labels`` are
        ``None``, in which case the result is ``None`` (every position).
        """
        keep = None if mask is None else (torch.as_tensor(mask) != 0)
        if labels is not None:
            lab_keep = torch.ones_like(labels, dtype=torch.bool)
            for ignore in self._ignore_indices():
                lab_keep &= labels != ignore
            keep = lab_keep if keep is None else (keep.to(lab_keep.device) & lab_keep)
        return keep

    # -- evaluation ------------------------------------------------------------------------

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: "torch.Tensor | TopKLogits | None" = None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and each active term's unweighted, detached value keyed by term key.

        With ``reduction="mean"`` every value is the mean over the scored positions (see
        :meth:`position_mask`); with ``"sum"`` the total and every term are sums over them (the
        caller divides by the count); with ``"none"`` they are per-position tensors.
        ``teacher_logits`` may be dense logits or a :class:`TopKLogits` (a teacher cache).
        """
        _check_reduction(reduction)
        _check_logits("student_logits", student_logits)
        if self.needs_teacher:
            if teacher_logits is None:
                raise RlkdError(f"the loss {self.describe()} needs teacher logits")
            _check_teacher(student_logits, teacher_logits)
        if self.needs_labels and labels is None:
            raise RlkdError(f"the loss {self.describe()} needs labels (ground-truth token ids)")
        batch_shape = student_logits.shape[:-1]
        if labels is not None and tuple(labels.shape) != tuple(batch_shape):
            raise RlkdError(
                f"labels have shape {tuple(labels.shape)} but the logits have positions of shape {tuple(batch_shape)}"
            )
        keep = self.position_mask(mask, labels)
        pos = _positions(student_logits.shape, keep, student_logits.device)
        s_rows = _rows(student_logits, pos)
        t_rows = _teacher_rows(teacher_logits, pos) if (self.needs_teacher and teacher_logits is not None) else None
        y_rows = None
        if labels is not None:
            y = labels.to(student_logits.device).reshape(-1)
            y_rows = y if pos.index is None else y.index_select(0, pos.index)
        inner = "none" if reduction == "none" else reduction
        total = None
        parts: dict[str, torch.Tensor] = {}
        for key, fn, weight, options in self.active_terms:
            if fn is cross_entropy:
                value = fn(s_rows, None, None, labels=y_rows, reduction=inner, **options)
            else:
                value = fn(s_rows, t_rows, None, reduction=inner, **options)
            if reduction == "none":
                value = _reduce(value, pos, "none")
            parts[key] = value.detach()
            total = weight * value if total is None else total + weight * value
        assert total is not None  # at least one active term (checked in __init__)
        return total, parts

    # -- display ---------------------------------------------------------------------------

    def describe(self) -> str:
        """A one-line formula of the active terms, e.g. ``1.0·rank(k=5) + 0.5·kl``."""
        pieces = []
        for key, fn, weight, options in self.active_terms:
            shown = {k: v for k, v in options.items() if not (k == "temperature" and v == 1.0)}
            opts = []
            if key not in getattr(fn, "loss_names", (fn.__name__,)):
                opts.append(f"fn={fn.__name__}")
            opts += [f"{k}={_format_value(v)}" for k, v in shown.items()]
            pieces.append(f"{weight}·{key}" + (f"({', '.join(opts)})" if opts else ""))
        return " + ".join(pieces)

    def __repr__(self) -> str:
        return f"Objective({self.describe()})"
