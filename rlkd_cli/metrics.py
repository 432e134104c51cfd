r"""Alignment metrics between a student's and a teacher's next-token rankings.

* **CR@k** (consistency rate): the share of positions whose ordered top-``k`` id lists are
  identical (same ids in the same order). CR@1 is top-1 agreement.
* **OR@k** (overlap rate): :math:`|\mathrm{top}_k(T) \cap \mathrm{top}_k(S)| / k`, averaged over
  positions (order ignored).

The teacher may be dense logits ``[..., V]`` or a :class:`~rlkd_cli.losses.TopKLogits` (a teacher
cache); with a cache, ``k`` may not exceed its K.

Both follow the reduction semantics of :mod:`rlkd_cli.losses`: ``mask`` (shape ``[...]``, True =
counted) selects positions; ``reduction="mean"`` divides the sum over counted positions by their
number (0 when there are none), ``"sum"`` returns that sum, ``"none"`` per-position values with
masked positions set to 0. The metrics are not differentiable: they run under ``torch.no_grad()``
and return float tensors.

For evaluation over many batches, :func:`alignment_sums` returns plain sums and a count for every
``k`` at once, :func:`add_sums` accumulates them and :func:`finalize` divides by the count.

Ties. Top-k lists come from :func:`rlkd_cli.losses.top_k` (``torch.topk``'s values, descending). Sums for several ``k`` are computed
from one top-``K`` selection with ``K = max(ks)``, taking prefixes for smaller ``k``; the prefix
equals a direct top-``k`` as a set and in order except when logits tie exactly at the boundary,
where the choice among tied ids is implementation-defined either way.

Non-finite logits. A counted row holding NaN or +Inf has no top-k list (``torch.topk`` ranks NaN first,
so two NaN models would "agree"): the per-position values of such rows are NaN, and the sums of any
batch holding one are NaN, so every rate computed from it is NaN (``null`` in rlkd's JSON), never a number.

Multi-modality. :func:`teacher_modes` counts, per position, the tokens whose teacher probability
is at least ``ratio`` times the top probability (1 = a unimodal position, where one token clearly
dominates; 2 or more = several near-equal candidates). :func:`alignment_sums_by_modes` splits the
sums by that count into buckets ``modes=1``, ``modes=2``, ``modes>=3`` (default ``bins``), which
shows whether a student matches the teacher's order where the teacher is multi-modal, the case
the RLKD ranking loss targets.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from rlkd_cli.errors import RlkdError
from rlkd_cli.losses.core import _check_reduction, _positions, _reduce, _rows
from rlkd_cli.losses.topk import TopKLogits, _teacher_rows, top_k

__all__ = [
    "add_sums",
    "shift_for_next_token",
    "alignment_sums",
    "alignment_sums_by_modes",
    "consistency_rate",
    "finalize",
    "overlap_rate",
    "teacher_modes",
    "topk_ids",
]


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Align position t's logits with token t+1; cut vocabulary padding rows; mask = response positions."""
    logits = logits[:, :-1, :vocab_size]
    targets = labels[:, 1:]
    return logits, targets, targets.ne(-100)


def _check_k(k, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > vocab:
        raise RlkdError(f"k must be an integer with 1 <= k <= {vocab} (the vocabulary size), got {k!r}")


def _check_ks(ks, vocab: int) -> list[int]:
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = [ks]
    try:
        ks = list(ks)
    except TypeError:
        raise RlkdError(f"ks must be a list of integers like [1, 2, 3, 5], got {ks!r}") from None
    if not ks:
        raise RlkdError("ks must list at least one k, e.g. [1, 2, 3, 5]")
    for k in ks:
        _check_k(k, vocab)
    return sorted(set(ks))


def _check_pair(student_logits: torch.Tensor, teacher_logits) -> None:
    if isinstance(teacher_logits, TopKLogits):
        if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 1:
            raise RlkdError("student_logits must be a tensor of shape [..., V]")
        teacher_logits.check_against(student_logits)
        return
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise RlkdError(f"{name} must be a tensor of shape [..., V]")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise RlkdError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "have different positions; they must share every dimension but the vocabulary"
        )


def _vocab(student_logits: torch.Tensor, teacher_logits) -> int:
    """The largest k the pair supports: the vocabulary, or a cached teacher's K."""
    if isinstance(teacher_logits, TopKLogits):
        return min(student_logits.shape[-1], teacher_logits.k)
    return min(student_logits.shape[-1], teacher_logits.shape[-1])


def _teacher_topk(t_rows, k: int) -> torch.Tensor:
    """The teacher's top-``k`` ids of rows: ``topk`` of dense logits, the first ``k`` of a cache."""
    if isinstance(t_rows, TopKLogits):
        return t_rows.ids[..., :k].long()
    return top_k(t_rows, k)[1]


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the ``k`` largest logits along the last axis, ordered by decreasing logit."""
    _check_k(k, logits.shape[-1])
    with torch.no_grad():
        return top_k(logits, k)[1]


def _nonfinite(rows) -> torch.Tensor:
    """``[N]``: rows holding NaN or +Inf (``-inf`` is a masked-out token, a valid logit): their top-k lists
    are meaningless (``topk`` ranks NaN first), so any such row makes the rates NaN, never a number."""
    x = rows.logits if isinstance(rows, TopKLogits) else rows
    return ~(x < math.inf).all(-1)


def _poisoned(s_rows, t_rows) -> bool:
    return bool(_nonfinite(s_rows).any()) or bool(_nonfinite(t_rows).any())


def _overlap_counts(s_ids: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """``[N, K]``: entry ``[n, k-1]`` is ``|top_k(S) ∩ top_k(T)|`` at row ``n`` for every prefix ``k``.

    Ids within one top-K list are distinct, so the intersection of the two length-``k`` prefixes
    counts the pairs ``(i, j)`` with ``i, j < k`` and ``s_ids[i] == t_ids[j]``; a match at
    ``(i, j)`` first counts at prefix ``max(i, j) + 1``.
    """
    K = s_ids.shape[-1]
    eq = s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)  # [N, K, K]
    idx = torch.arange(K, device=s_ids.device)
    first = torch.maximum(idx.unsqueeze(-1), idx.unsqueeze(-2))  # prefix index at which (i, j) enters
    n = s_ids.shape[0]
    hits = torch.zeros(n, K, dtype=torch.long, device=s_ids.device)
    hits.scatter_add_(1, first.reshape(1, -1).expand(n, -1), eq.reshape(n, -1).long())
    return hits.cumsum(-1)


def _per_position(student_logits, teacher_logits, k, mask, reduction, kind: str) -> torch.Tensor:
    _check_reduction(reduction)
    _check_pair(student_logits, teacher_logits)
    _check_k(k, _vocab(student_logits, teacher_logits))
    with torch.no_grad():
        pos = _positions(student_logits.shape, mask, student_logits.device)
        s_rows, t_rows = _rows(student_logits, pos), _teacher_rows(teacher_logits, pos)
        s_ids = top_k(s_rows, k)[1]
        t_ids = _teacher_topk(t_rows, k).to(s_ids.device)
        if kind == "cr":
            values = (s_ids == t_ids).all(-1).float()
        else:
            values = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1).sum(-1).float() / k
        bad = _nonfinite(s_rows) | _nonfinite(t_rows).to(s_ids.device)
        values = values.masked_fill(bad, math.nan)  # a non-finite row has no top-k: NaN, never 0 or 1
        return _reduce(values, pos, reduction)


def consistency_rate(student_logits, teacher_logits, k, mask=None, reduction="mean") -> torch.Tensor:
    """CR@k: 1 at a position where the two ordered top-``k`` id lists are identical, else 0, reduced."""
    return _per_position(student_logits, teacher_logits, k, mask, reduction, "cr")


def overlap_rate(student_logits, teacher_logits, k, mask=None, reduction="mean") -> torch.Tensor:
    """OR@k: ``|top_k(T) ∩ top_k(S)| / k`` per position (order ignored), reduced."""
    return _per_position(student_logits, teacher_logits, k, mask, reduction, "or")


def _sums_from_ids(s_ids: torch.Tensor, t_ids: torch.Tensor, ks: Sequence[int], suffix: str = "",
                   poisoned: bool = False) -> dict[str, float]:
    n = int(s_ids.shape[0])
    out: dict[str, float] = {}
    if poisoned:  # non-finite logits among the rows: every rate is NaN (sums stay NaN when added up)
        out.update({f"{m}@{k}{suffix}": math.nan for m in ("cr", "or") for k in ks})
        out[f"top1{suffix}"] = math.nan
        out[f"count{suffix}"] = n
        return out
    if n == 0:
        for k in ks:
            out[f"cr@{k}{suffix}"] = 0.0
        for k in ks:
            out[f"or@{k}{suffix}"] = 0.0
        out[f"top1{suffix}"] = 0.0
        out[f"count{suffix}"] = 0
        return out
    same = (s_ids == t_ids).long().cumprod(-1)  # [N, K]: 1 while the prefixes agree position by position
    overlap = _overlap_counts(s_ids, t_ids)  # [N, K]
    for k in ks:
        out[f"cr@{k}{suffix}"] = float(same[:, k - 1].sum())
    for k in ks:
        out[f"or@{k}{suffix}"] = float(overlap[:, k - 1].sum()) / k
    out[f"top1{suffix}"] = float(same[:, 0].sum())
    out[f"count{suffix}"] = n
    return out


def alignment_sums(student_logits, teacher_logits, ks: Iterable[int], mask=None) -> dict[str, float]:
    """Sums of CR@k and OR@k over the counted positions, for every ``k`` in ``ks``, plus the count.

    Returns ``{"cr@1": sum, "cr@2": ..., "or@1": ..., ..., "top1": sum (== cr@1), "count": n}``
    (keys for the sorted distinct ``ks``). Add these over batches with :func:`add_sums` and divide
    with :func:`finalize`. The top-k ids are computed once for ``max(ks)`` (see the module
    docstring on ties).
    """
    _check_pair(student_logits, teacher_logits)
    ks = _check_ks(ks, _vocab(student_logits, teacher_logits))
    with torch.no_grad():
        pos = _positions(student_logits.shape, mask, student_logits.device)
        K = max(ks)
        s_rows, t_rows = _rows(student_logits, pos), _teacher_rows(teacher_logits, pos)
        s_ids = top_k(s_rows, K)[1]
        t_ids = _teacher_topk(t_rows, K).to(s_ids.device)
        return _sums_from_ids(s_ids, t_ids, ks, poisoned=_poisoned(s_rows, t_rows))


def _check_ratio(ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < ratio <= 1.0):
        raise RlkdError(f"ratio must be a number in (0, 1], got {ratio!r}")


def teacher_modes(teacher_logits: torch.Tensor, ratio: float = 0.5, *, temperature: float = 1.0) -> torch.Tensor:
    r"""Per position, the number of tokens with :math:`p_T(v) \ge \text{ratio}\cdot\max_u p_T(u)`.

    :math:`p_T = \mathrm{softmax}(z/\text{temperature})`. Computed on logits (the condition is
    :math:`z_v/\tau \ge \max_u z_u/\tau + \log\text{ratio}`), so no softmax is materialised.
    Returns a long tensor of shape ``[...]``; the value is at least 1 (the top token itself).
    A :class:`~rlkd_cli.losses.TopKLogits` teacher is counted on its K cached logits (exact unless
    all K qualify).
    """
    _check_ratio(ratio)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise RlkdError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(teacher_logits, TopKLogits):
        teacher_logits = teacher_logits.logits
    with torch.no_grad():
        x = teacher_logits.to(torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32)
        if temperature != 1.0:
            x = x / temperature
        top = x.max(dim=-1, keepdim=True).values
        return (x >= top + math.log(ratio)).sum(-1)


def _bucket_labels(bins) -> list[tuple[int, int | None, str]]:
    try:
        bins = [b for b in bins]
    except TypeError:
        raise RlkdError(f"bins must be an increasing list of integers >= 1 like [1, 2, 3], got {bins!r}") from None
    if not bins or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bins) or any(
        b2 <= b1 for b1, b2 in zip(bins, bins[1:])
    ):
        raise RlkdError(f"bins must be an increasing list of integers >= 1 like [1, 2, 3], got {bins!r}")
    out = []
    for i, lo in enumerate(bins):
        if i + 1 < len(bins):
            hi = bins[i + 1]
            label = f"modes={lo}" if hi == lo + 1 else f"modes={lo}..{hi - 1}"
            out.append((lo, hi, label))
        else:
            out.append((lo, None, f"modes>={lo}"))
    return out


def alignment_sums_by_modes(
    student_logits,
    teacher_logits,
    ks: Iterable[int],
    mask=None,
    bins: Sequence[int] = (1, 2, 3),
    *,
    ratio: float = 0.5,
) -> dict[str, float]:
    """:func:`alignment_sums` split by the teacher's number of modes (:func:`teacher_modes`).

    ``bins`` are increasing lower bounds: bucket ``i`` holds positions with
    ``bins[i] <= modes < bins[i+1]`` and the last bucket ``modes >= bins[-1]``. Buckets are named
    ``modes=b`` when they hold one value, ``modes=a..b`` for a range and ``modes>=b`` for the last;
    the default ``(1, 2, 3)`` gives ``modes=1``, ``modes=2``, ``modes>=3``. Keys are the
    :func:`alignment_sums` keys with ``|<bucket>`` appended (``"cr@2|modes=1"``,
    ``"count|modes>=3"``); every bucket is present, with zeros when empty. Positions with fewer
    modes than ``bins[0]`` are in no bucket.
    """
    _check_pair(student_logits, teacher_logits)
    ks = _check_ks(ks, _vocab(student_logits, teacher_logits))
    buckets = _bucket_labels(bins)
    with torch.no_grad():
        pos = _positions(student_logits.shape, mask, student_logits.device)
        K = max(ks)
        t_rows = _teacher_rows(teacher_logits, pos)
        s_rows = _rows(student_logits, pos)
        s_ids = top_k(s_rows, K)[1]
        t_ids = _teacher_topk(t_rows, K).to(s_ids.device)
        modes = teacher_modes(t_rows, ratio).to(s_ids.device)
        poisoned = _poisoned(s_rows, t_rows)
        out: dict[str, float] = {}
        for lo, hi, label in buckets:
            sel = modes >= lo
            if hi is not None:
                sel &= modes < hi
            out.update(_sums_from_ids(s_ids[sel], t_ids[sel], ks, suffix=f"|{label}", poisoned=poisoned))
        return out


def add_sums(total: dict[str, float], sums: Mapping[str, float]) -> dict[str, float]:
    """Add ``sums`` into ``total`` key by key (in place) and return ``total``."""
    for key, value in sums.items():
        total[key] = total.get(key, 0) + value
    return total


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """Divide every sum by its count: ``"x"`` by ``"count"``, ``"x|bucket"`` by ``"count|bucket"``.

    Count keys are kept as they are. A rate over zero positions is ``nan``, and so is one over positions with
    non-finite logits (their sums are NaN; JSON output writes ``null``).
    """
    out: dict[str, float] = {}
    for key, value in sums.items():
        name, sep, bucket = key.partition("|")
        if name == "count":
            out[key] = value
            continue
        count_key = f"count{sep}{bucket}"
        if count_key not in sums:
            raise RlkdError(f"cannot finalize {key!r}: the sums have no {count_key!r}")
        count = sums[count_key]
        out[key] = float(value) / count if count else math.nan
    return out
