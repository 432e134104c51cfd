"""The RLKD word-level ranking loss: 1 - soft Spearman correlation on the teacher/student top-k union."""

from __future__ import annotations

import math
from typing import Any

import torch

from rlkd_cli.errors import RlkdError
from rlkd_cli.losses.core import (RANK_BIG, RANK_CACHE_MARGIN, RANK_EPS, _check_options, _check_reduction,
                                  _compute_dtype, _reduce)
from rlkd_cli.losses.registry import register_loss
from rlkd_cli.losses.topk import TopKLogits, _prepare, top_k


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


@torch.no_grad()
def _candidates(s: torch.Tensor, t: Any, k: int, index_set: str, dtype: torch.dtype):
    """``(ids, valid, teacher values)`` of the candidate set per row (see :func:`ranking_loss`, step 1-2)."""
    cached = isinstance(t, TopKLogits)
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
    return ids, valid, xt


def _one_minus_pearson(rank_s: torch.Tensor, rank_t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``1 - rho`` of the two rank vectors over the valid entries (masked means), per row."""
    dtype = rank_s.dtype
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
    return 1.0 - rho


def _ranking_rows(s: torch.Tensor, t: Any, *, k: int = 5, index_set: str = "union", tau: float = 1.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """The ranking loss per validated row (``k`` within the vocabulary and a cached teacher's K)."""
    dtype = _compute_dtype(s)
    ids, valid, xt = _candidates(s, t, k, index_set, dtype)
    with torch.no_grad():
        if temperature != 1.0:
            xt = xt / temperature
        rank_t = _soft_rank(xt, valid, tau)
    xs = _finite(s.gather(-1, ids).to(dtype))
    if temperature != 1.0:
        xs = xs / temperature
    return _one_minus_pearson(_soft_rank(xs, valid, tau), rank_t, valid)


def check_k(k: int, vocab: int, teacher: Any = None) -> None:
    """``k`` must fit the vocabulary and, for a cached teacher, its K."""
    if k > vocab:
        raise RlkdError(f"ranking loss k={k} exceeds the vocabulary size {vocab}; use 1 <= k <= {vocab}")
    if isinstance(teacher, TopKLogits) and k > teacher.k:
        raise RlkdError(f"ranking loss k={k} needs the teacher's top-{k}, but the cached teacher keeps only "
                        f"K={teacher.k} logits per position; use k <= {teacher.k} or rebuild the cache with "
                        f"cache.top_k >= {k}")


@register_loss("rank", rows=_ranking_rows)
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
    check_k(k, s.shape[-1], t)
    return _reduce(_ranking_rows(s, t, k=k, index_set=index_set, tau=tau, temperature=temperature), pos, reduction)
