"""The divergences and the cross-entropy: pure functions on logits, each with its equation and paper.

Each public function validates its inputs, selects the counted positions and reduces; its row
kernel (``_<name>_rows``, registered with it) does the arithmetic on rows that are already
validated, and is what :class:`~rlkd_cli.losses.Objective` runs inside the training engine.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from rlkd_cli.errors import RlkdError
from rlkd_cli.losses.core import (LOGP_FLOOR, _check_logits, _check_options, _check_reduction, _compute_dtype,
                                  _kl_rows, _log_mix, _log_probs, _positions, _reduce, _rows, _scaled)
from rlkd_cli.losses.fused import _CrossEntropyRows, _ForwardKLRows, _LumpedForwardKLRows
from rlkd_cli.losses.registry import register_loss
from rlkd_cli.losses.topk import TopKLogits, _lumped, _prepare


def divergence_rows(core: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: torch.Tensor, t: Any,
                    temperature: float) -> torch.Tensor:
    """``core(log_p_student, log_p_teacher)`` on validated rows: dense ``[N, V]`` log-probabilities, or the
    two distributions lumped onto a :class:`TopKLogits` teacher's K ids plus a tail bin (``[N, K+1]``)."""
    if isinstance(t, TopKLogits):
        return core(*_lumped(s, t, temperature))
    dtype = _compute_dtype(s)
    return core(_log_probs(s, temperature, dtype), _log_probs(t, temperature, dtype))


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
    return _reduce(divergence_rows(core, s, t, temperature), pos, reduction)


def _public(rows: Callable[..., torch.Tensor], student_logits, teacher_logits, mask, reduction: str,
            **options: Any) -> torch.Tensor:
    """A registered divergence called by a user: check, select the counted rows, run the kernel, reduce."""
    _check_reduction(reduction)
    _check_options(**options)
    s, t, pos = _prepare(student_logits, teacher_logits, mask)
    return _reduce(rows(s, t, **options), pos, reduction)


# --------------------------------------------------------------------------------------------
# Forward and reverse KL
# --------------------------------------------------------------------------------------------


def _forward_kl_rows(s: torch.Tensor, t: Any, *, temperature: float = 1.0) -> torch.Tensor:
    """Fused (:mod:`rlkd_cli.losses.fused`) when the teacher is a target and every value is finite."""
    if isinstance(t, TopKLogits) or not t.requires_grad:
        dtype = _compute_dtype(s)
        zs = _scaled(s, temperature, dtype)
        if isinstance(t, TopKLogits):
            t = t.to(zs.device)
            if t.k < zs.shape[-1]:  # (a cache of the whole vocabulary has no tail bin)
                lt_top, lt_tail = t.log_probs(temperature, dtype)
                values, unfloored = _LumpedForwardKLRows.apply(zs, t.ids.long(), lt_top, lt_tail)
                if bool(unfloored & torch.isfinite(values).all()):
                    return values
        else:
            values = _ForwardKLRows.apply(zs, _scaled(t, temperature, dtype))
            if bool(torch.isfinite(values).all()):
                return values
    return divergence_rows(lambda ls, lt: _kl_rows(lt, ls), s, t, temperature)


@register_loss("kl", "fkl", rows=_forward_kl_rows)
def forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Forward KL divergence :math:`\mathrm{KL}(p_T \| p_S) = \sum_v p_T(v) \log \frac{p_T(v)}{p_S(v)}`.

    The classic distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network"): mean-seeking, the student must cover every token the teacher supports.
    :math:`p = \mathrm{softmax}(z/\tau)` for both models, no :math:`\tau^2` factor. Options: none
    besides ``temperature``.
    """
    return _public(_forward_kl_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature)


def _reverse_kl_rows(s, t, *, temperature=1.0):
    return divergence_rows(lambda ls, lt: _kl_rows(ls, lt), s, t, temperature)


@register_loss("rkl", rows=_reverse_kl_rows)
def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Reverse KL divergence :math:`\mathrm{KL}(p_S \| p_T) = \sum_v p_S(v) \log \frac{p_S(v)}{p_T(v)}`.

    Mode-seeking: the student concentrates on the teacher's major modes (MiniLLM, Gu et al. 2024,
    "MiniLLM: Knowledge Distillation of Large Language Models"; here evaluated token-wise on the
    given positions). Options: none besides ``temperature``.
    """
    return _public(_reverse_kl_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature)


# --------------------------------------------------------------------------------------------
# Jensen-Shannon, total variation, skew KL
# --------------------------------------------------------------------------------------------


def _gjsd_core(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    lm = _log_mix(lt, ls, beta)
    return beta * _kl_rows(lt, lm) + (1.0 - beta) * _kl_rows(ls, lm)


def _generalized_jsd_rows(s, t, *, temperature=1.0, beta=0.5):
    return divergence_rows(lambda ls, lt: _gjsd_core(ls, lt, beta), s, t, temperature)


@register_loss("gjsd", rows=_generalized_jsd_rows)
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
    return _public(_generalized_jsd_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature,
                   beta=beta)


def _js_rows(s, t, *, temperature=1.0):
    return divergence_rows(lambda ls, lt: _gjsd_core(ls, lt, 0.5), s, t, temperature)


@register_loss(rows=_js_rows)
def js(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Jensen–Shannon divergence, :func:`generalized_jsd` with :math:`\beta = 1/2`:
    :math:`\tfrac12\mathrm{KL}(p_T\|m) + \tfrac12\mathrm{KL}(p_S\|m)`, :math:`m = (p_T+p_S)/2`.

    Symmetric and bounded by :math:`\log 2` (Lin 1991; used for distillation e.g. by GKD,
    Agarwal et al. 2024). Options: none besides ``temperature``.
    """
    return _public(_js_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature)


def _tvd_rows(s, t, *, temperature=1.0):
    return divergence_rows(lambda ls, lt: 0.5 * (lt.exp() - ls.exp()).abs().sum(-1), s, t, temperature)


@register_loss(rows=_tvd_rows)
def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Total variation distance :math:`\tfrac12 \sum_v |p_T(v) - p_S(v)|`, in [0, 1].

    Used as a distillation objective by Wen et al. 2023 ("f-Divergence Minimization for
    Sequence-Level Knowledge Distillation"). Options: none besides ``temperature``. (The gradient
    of :math:`|x|` at exactly 0 is taken as 0.)
    """
    return _public(_tvd_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature)


def _skew_kl_rows(s, t, *, temperature=1.0, alpha=0.1):
    return divergence_rows(lambda ls, lt: _kl_rows(lt, _log_mix(lt, ls, alpha)), s, t, temperature)


@register_loss("skl", rows=_skew_kl_rows)
def skew_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1):
    r"""Skew KL divergence :math:`\mathrm{KL}(p_T \,\|\, \alpha p_T + (1-\alpha) p_S)`.

    DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language
    Models"): mixing a share of the teacher into the reference keeps the divergence bounded
    (by :math:`-\log\alpha`) and its gradients stable. Options: ``alpha`` in [0, 1) (default 0.1;
    0 is the forward KL).
    """
    return _public(_skew_kl_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature,
                   alpha=alpha)


def _skew_reverse_kl_rows(s, t, *, temperature=1.0, alpha=0.1):
    return divergence_rows(lambda ls, lt: _kl_rows(ls, _log_mix(ls, lt, alpha)), s, t, temperature)


@register_loss("srkl", rows=_skew_reverse_kl_rows)
def skew_reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1):
    r"""Skew reverse KL divergence :math:`\mathrm{KL}(p_S \,\|\, \alpha p_S + (1-\alpha) p_T)`.

    DistiLLM (Ko et al. 2024). Options: ``alpha`` in [0, 1) (default 0.1; 0 is the reverse KL).
    """
    return _public(_skew_reverse_kl_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature,
                   alpha=alpha)


# --------------------------------------------------------------------------------------------
# Adaptive KL
# --------------------------------------------------------------------------------------------


def _akl_core(ls: torch.Tensor, lt: torch.Tensor, mu: float) -> torch.Tensor:
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



def _adaptive_kl_rows(s, t, *, temperature=1.0, mu=0.5):
    return divergence_rows(lambda ls, lt: _akl_core(ls, lt, mu), s, t, temperature)


@register_loss("akl", rows=_adaptive_kl_rows)
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
    return _public(_adaptive_kl_rows, student_logits, teacher_logits, mask, reduction, temperature=temperature, mu=mu)


# --------------------------------------------------------------------------------------------
# Cross-entropy to the ground truth
# --------------------------------------------------------------------------------------------


def _cross_entropy_rows(s: torch.Tensor, t: Any = None, *, labels: torch.Tensor, temperature: float = 1.0,
                        ignore_index: int = -100) -> torch.Tensor:
    """``logsumexp(z) - z[y]`` per row (fused); a label whose logit is ``-inf`` costs ``-LOGP_FLOOR``."""
    x = s.to(_compute_dtype(s))
    if temperature != 1.0:
        x = x / temperature
    y = labels.long()
    values = _CrossEntropyRows.apply(x, y)  # value and gradient in a few fused passes
    if bool(torch.isfinite(values).all()):
        return values
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (lse - target).clamp_max(-LOGP_FLOOR)


@register_loss("ce", rows=_cross_entropy_rows)
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
    x = _rows(student_logits, pos)
    y = labels.reshape(-1) if pos.index is None else labels.reshape(-1).index_select(0, pos.index)
    vocab = x.shape[-1]
    if y.numel() and bool(((y < 0) | (y >= vocab)).any()):
        bad = int(y[(y < 0) | (y >= vocab)][0])
        raise RlkdError(
            f"label id {bad} is outside the vocabulary [0, {vocab}); mark ignored positions with {ignore_index}"
        )
    return _reduce(_cross_entropy_rows(x, labels=y, temperature=temperature), pos, reduction)


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
