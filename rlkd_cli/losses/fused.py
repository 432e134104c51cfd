"""Fused row kernels: autograd functions with closed-form gradients for the forward KL and cross-entropy.

Plain autograd over the log-probability expressions of :mod:`rlkd_cli.losses.core` makes about twenty passes over
[N, V] (log_softmax, floor, exp, products, and their backward), each allocating a tensor. The
forward KL and the cross-entropy -- the terms of most mixes -- have short closed-form gradients,
so they get autograd functions that make a handful of passes and save only the softmaxes. They
are used when the teacher is not differentiated and every row's value comes out finite; rows
with infinite or NaN logits (a masked vocabulary) make the call fall back to the general path,
whose LOGP_FLOOR convention covers them. (For finite logits the floor never changes a value
that matters: it only acts below log p = -1e6.)
"""

from __future__ import annotations

import torch

from rlkd_cli.losses.core import LOGP_FLOOR


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

