"""Tests of rlkd_cli.losses against independent float64 implementations (numpy and explicit loops)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rlkd_cli import losses as L
from rlkd_cli.losses.core import _kl_rows
from rlkd_cli.errors import RlkdError

CONF_LOSS = Path(__file__).resolve().parents[1] / "conf" / "loss"


# --------------------------------------------------------------------------------------------
# Independent references (numpy, float64, one position at a time)
# --------------------------------------------------------------------------------------------


def np_softmax(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def np_kl(p, q):
    """sum_v p log(p/q), with 0 log 0 = 0."""
    total = 0.0
    for pv, qv in zip(p, q):
        if pv > 0:
            total += pv * (math.log(pv) - math.log(qv))
    return total


def ref_fkl(s, t, temperature=1.0):
    return np_kl(np_softmax(t, temperature), np_softmax(s, temperature))


def ref_rkl(s, t, temperature=1.0):
    return np_kl(np_softmax(s, temperature), np_softmax(t, temperature))


def ref_gjsd(s, t, temperature=1.0, beta=0.5):
    ps, pt = np_softmax(s, temperature), np_softmax(t, temperature)
    m = beta * pt + (1 - beta) * ps
    return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)


def ref_tvd(s, t, temperature=1.0):
    return 0.5 * np.abs(np_softmax(t, temperature) - np_softmax(s, temperature)).sum()


def ref_skl(s, t, temperature=1.0, alpha=0.1):
    ps, pt = np_softmax(s, temperature), np_softmax(t, temperature)
    return np_kl(pt, alpha * pt + (1 - alpha) * ps)


def ref_srkl(s, t, temperature=1.0, alpha=0.1):
    ps, pt = np_softmax(s, temperature), np_softmax(t, temperature)
    return np_kl(ps, alpha * ps + (1 - alpha) * pt)


def akl_weights(s, t, temperature=1.0, mu=0.5):
    ps, pt = np_softmax(s, temperature), np_softmax(t, temperature)
    order = sorted(range(len(pt)), key=lambda v: -pt[v])
    g_head = g_tail = 0.0
    cumulative = 0.0
    in_head = True
    for v in order:
        gap = abs(pt[v] - ps[v])
        if in_head:
            g_head += gap
            cumulative += pt[v]
            if cumulative >= mu:
                in_head = False
        else:
            g_tail += gap
    total = g_head + g_tail
    return (g_head / total, g_tail / total) if total > 0 else (0.5, 0.5)


def ref_akl(s, t, temperature=1.0, mu=0.5):
    wh, wt = akl_weights(s, t, temperature, mu)
    return wh * ref_fkl(s, t, temperature) + wt * ref_rkl(s, t, temperature)


def ref_union(s, t, k, index_set="union"):
    t_top = [int(v) for v in np.argsort(-np.asarray(t), kind="stable")[:k]]
    ids = list(t_top)
    if index_set == "union":
        for v in np.argsort(-np.asarray(s), kind="stable")[:k]:
            if int(v) not in ids:
                ids.append(int(v))
    return ids


def ref_soft_rank(x, tau):
    n = len(x)
    return np.array([1.0 + sum(1.0 / (1.0 + math.exp(-(x[i] - x[j]) / tau)) for j in range(n) if j != i) for i in range(n)])


def ref_rank(s, t, k=5, index_set="union", tau=1.0, temperature=1.0):
    ids = ref_union(s, t, k, index_set)
    xs = np.array([s[v] for v in ids], dtype=np.float64) / temperature
    xt = np.array([t[v] for v in ids], dtype=np.float64) / temperature
    if len(ids) == 1:
        return 0.0
    rs, rt = ref_soft_rank(xs, tau), ref_soft_rank(xt, tau)
    cs, ct = rs - rs.mean(), rt - rt.mean()
    if np.allclose(ct, 0):
        return 0.0
    return 1.0 - (cs @ ct) / math.sqrt((cs @ cs) * (ct @ ct))


REFS = {
    "forward_kl": ref_fkl,
    "reverse_kl": ref_rkl,
    "js": ref_gjsd,
    "generalized_jsd": ref_gjsd,
    "tvd": ref_tvd,
    "skew_kl": ref_skl,
    "skew_reverse_kl": ref_srkl,
    "adaptive_kl": ref_akl,
}

# (function name, options) covering every divergence and some non-default options.
DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("js", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.2}),
    ("tvd", {}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.4}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("adaptive_kl", {"mu": 0.5}),
    ("adaptive_kl", {"mu": 0.9}),
]
ALL_DIVERGENCES = ["forward_kl", "reverse_kl", "js", "generalized_jsd", "tvd", "skew_kl", "skew_reverse_kl", "adaptive_kl"]
ALL_LOSSES = [*ALL_DIVERGENCES, "ranking_loss", "cross_entropy"]


def call(name, s, t, mask=None, labels=None, **kw):
    fn = L.get_loss(name)
    if fn is L.cross_entropy:
        return fn(s, t, mask, labels=labels, **kw)
    return fn(s, t, mask, **kw)


def random_logits(shape, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def with_peaked_teacher(t):
    """Make some teacher positions near-one-hot (one logit 25 above the rest)."""
    t = t.clone()
    t[0, 0, 3] += 25.0
    t[1, 2, 0] += 40.0
    return t


# --------------------------------------------------------------------------------------------
# Values against references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,options", DIVERGENCE_CASES)
def test_divergence_matches_reference(name, options, temperature):
    s = random_logits((2, 4, 11), seed=1)
    t = with_peaked_teacher(random_logits((2, 4, 11), seed=2))
    got = call(name, s, t, temperature=temperature, reduction="none", **options)
    assert got.shape == (2, 4) and got.dtype == torch.float64
    ref = np.array(
        [[REFS[name](s[b, i].numpy(), t[b, i].numpy(), temperature, **options) for i in range(4)] for b in range(2)]
    )
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-13)
    mean = call(name, s, t, temperature=temperature, **options)
    np.testing.assert_allclose(mean.item(), ref.mean(), rtol=1e-6)
    total = call(name, s, t, temperature=temperature, reduction="sum", **options)
    np.testing.assert_allclose(total.item(), ref.sum(), rtol=1e-6)


def test_cross_entropy_matches_reference():
    s = random_logits((3, 5, 9), seed=3)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 9, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 1] = False
    got = L.cross_entropy(s, None, mask, labels=labels, reduction="none", temperature=1.5)
    vals, n = [], 0
    for b in range(3):
        for i in range(5):
            counted = labels[b, i] != -100 and mask[b, i]
            expected = -math.log(np_softmax(s[b, i].numpy(), 1.5)[labels[b, i]]) if counted else 0.0
            assert got[b, i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
            if counted:
                vals.append(expected)
    mean = L.cross_entropy(s, None, mask, labels=labels, temperature=1.5)
    assert mean.item() == pytest.approx(sum(vals) / len(vals), rel=1e-9)
    # Matches torch's own cross-entropy at temperature 1 (another independent implementation).
    flat = torch.nn.functional.cross_entropy(s.reshape(-1, 9), labels.reshape(-1), ignore_index=-100)
    assert L.cross_entropy(s, None, labels=labels).item() == pytest.approx(flat.item(), rel=1e-9)


def test_cross_entropy_validation():
    s = random_logits((2, 3, 5), seed=5)
    with pytest.raises(RlkdError, match="outside the vocabulary"):
        L.cross_entropy(s, None, labels=torch.full((2, 3), 7))
    with pytest.raises(RlkdError, match="labels have shape"):
        L.cross_entropy(s, None, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(RlkdError, match="needs labels"):
        L.cross_entropy(s, None, labels=None)
    # a custom ignore index
    labels = torch.tensor([[0, -1, 2], [-1, -1, 4]])
    got = L.cross_entropy(s, None, labels=labels, ignore_index=-1, reduction="none")
    assert (got[labels == -1] == 0).all() and (got[labels != -1] > 0).all()


def test_js_is_generalized_jsd_at_half():
    s, t = random_logits((3, 4, 17), seed=6), random_logits((3, 4, 17), seed=7)
    a = L.js(s, t, reduction="none")
    b = L.generalized_jsd(s, t, reduction="none", beta=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a <= math.log(2) + 1e-12).all()


def test_generalized_jsd_limits_are_scaled_kl():
    """As documented: JSD_beta / beta -> KL(p_T||p_S) at beta -> 0, JSD_beta / (1-beta) -> KL(p_S||p_T) at beta -> 1."""
    s, t = random_logits((2, 3, 13), seed=8, scale=1.0), random_logits((2, 3, 13), seed=9, scale=1.0)
    fkl = L.forward_kl(s, t, reduction="none")
    rkl = L.reverse_kl(s, t, reduction="none")
    errors_0, errors_1 = [], []
    for eps in (1e-3, 1e-5, 1e-7):
        near_0 = L.generalized_jsd(s, t, reduction="none", beta=eps) / eps
        near_1 = L.generalized_jsd(s, t, reduction="none", beta=1.0 - eps) / eps
        errors_0.append(((near_0 - fkl).abs() / fkl).max().item())
        errors_1.append(((near_1 - rkl).abs() / rkl).max().item())
    # The error is O(beta): it shrinks ~100x per step and is tiny at the end.
    assert errors_0[-1] < 1e-5 and errors_1[-1] < 1e-5
    assert errors_0[0] > 10 * errors_0[1] > 100 * errors_0[2]
    assert errors_1[0] > 10 * errors_1[1]
    # And the divergence itself vanishes at both ends.
    assert L.generalized_jsd(s, t, beta=1e-9).item() < 1e-8
    assert L.generalized_jsd(s, t, beta=1 - 1e-9).item() < 1e-8


def test_skew_kl_at_alpha_zero_is_kl():
    s, t = random_logits((2, 3, 7), seed=10), random_logits((2, 3, 7), seed=11)
    torch.testing.assert_close(L.skew_kl(s, t, alpha=0.0), L.forward_kl(s, t), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(L.skew_reverse_kl(s, t, alpha=0.0), L.reverse_kl(s, t), rtol=1e-12, atol=1e-14)


def test_identical_distributions_give_zero():
    t = random_logits((2, 3, 7), seed=12)
    for name in ALL_DIVERGENCES:
        assert abs(call(name, t.clone(), t).item()) < 1e-12, name
    assert L.ranking_loss(t.clone(), t, k=3).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", [c for c in DIVERGENCE_CASES if c[0] != "adaptive_kl"])
def test_gradcheck_divergences(name, options):
    s = random_logits((2, 2, 5), seed=13, scale=1.0).requires_grad_()
    t = random_logits((2, 2, 5), seed=14, scale=1.0).requires_grad_()
    mask = torch.tensor([[True, False], [True, True]])
    fn = L.get_loss(name)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask, temperature=1.3, **options), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, reduction="none", **options), (s, t))


def test_gradcheck_cross_entropy():
    s = random_logits((2, 3, 5), seed=15, scale=1.0).requires_grad_()
    labels = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert torch.autograd.gradcheck(lambda a: L.cross_entropy(a, None, labels=labels, temperature=0.7), (s,))


def test_adaptive_kl_gradient_treats_weights_as_constants():
    """AKL's weights are detached: its gradient is that of w_head*FKL + w_tail*RKL with fixed weights."""
    s = random_logits((2, 3, 9), seed=16).requires_grad_()
    t = random_logits((2, 3, 9), seed=17)
    weights = torch.tensor(
        [[akl_weights(s[b, i].detach().numpy(), t[b, i].numpy(), 1.0, 0.6) for i in range(3)] for b in range(2)],
        dtype=torch.float64,
    )
    (g_akl,) = torch.autograd.grad(L.adaptive_kl(s, t, mu=0.6), s)
    fixed = weights[..., 0] * L.forward_kl(s, t, reduction="none") + weights[..., 1] * L.reverse_kl(s, t, reduction="none")
    (g_ref,) = torch.autograd.grad(fixed.mean(), s)
    torch.testing.assert_close(g_akl, g_ref, rtol=1e-9, atol=1e-12)
    # ... and the pieces with fixed weights pass gradcheck.
    w = weights.detach()
    assert torch.autograd.gradcheck(
        lambda a: (w[..., 0] * L.forward_kl(a, t, reduction="none") + w[..., 1] * L.reverse_kl(a, t, reduction="none")).sum(),
        (s.detach().clone().requires_grad_(),),
    )


@pytest.mark.parametrize("index_set", ["union", "teacher"])
def test_gradcheck_ranking_loss(index_set):
    s = random_logits((2, 3, 8), seed=18, scale=1.0).requires_grad_()
    t = random_logits((2, 3, 8), seed=19, scale=1.0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda a: L.ranking_loss(a, t, mask, k=3, index_set=index_set, tau=0.7, reduction="none"), (s,)
    )


def test_ranking_gradient_goes_to_student_only():
    s = random_logits((3, 4, 20), seed=20).float().requires_grad_()
    t = random_logits((3, 4, 20), seed=21).float().requires_grad_()
    loss = L.ranking_loss(s, t, k=5)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None or (t.grad == 0).all()
    # Only gathered (candidate) ids receive gradient: at most 2k per position.
    assert ((s.grad != 0).sum(-1) <= 10).all()


# --------------------------------------------------------------------------------------------
# The ranking loss against exact Spearman
# --------------------------------------------------------------------------------------------


def separated_logits(shape, seed):
    """Each position: a random permutation of 0, 1, ..., V-1 (gaps of 1 >> tau)."""
    g = torch.Generator().manual_seed(seed)
    *batch, vocab = shape
    rows = [torch.randperm(vocab, generator=g).double() for _ in range(math.prod(batch))]
    return torch.stack(rows).reshape(shape)


@pytest.mark.parametrize("index_set", ["union", "teacher"])
def test_ranking_loss_is_one_minus_spearman_for_separated_logits(index_set):
    vocab, k = 12, 4
    t = separated_logits((3, 5, vocab), seed=22)
    s = t.clone()
    s[:, :2] = separated_logits((3, 2, vocab), seed=23)  # unrelated student at some positions
    s[:, 2] = t[:, 2] + 0.0
    s[:, 2, :] = torch.where(t[:, 2] >= vocab - k, 2 * vocab - k - 1 - t[:, 2], t[:, 2])  # reversed top-k order
    s[:, 3] = separated_logits((3, 1, vocab), seed=24)[:, 0]
    got = L.ranking_loss(s, t, k=k, index_set=index_set, tau=0.01, reduction="none")
    sizes = set()
    for b in range(3):
        for i in range(5):
            ids = ref_union(s[b, i].numpy(), t[b, i].numpy(), k, index_set)
            sizes.add(len(ids))
            rho = spearmanr(s[b, i, ids].numpy(), t[b, i, ids].numpy()).statistic
            assert got[b, i].item() == pytest.approx(1.0 - rho, rel=1e-6, abs=1e-9), (b, i, ids)
    if index_set == "union":
        assert len(sizes) > 1, "the batch must mix unions of different sizes"
    # reversed order of the teacher's top-k, teacher index set: rho = -1
    if index_set == "teacher":
        assert torch.allclose(got[:, 2], torch.full((3,), 2.0, dtype=torch.float64))


def test_ranking_loss_matches_soft_reference():
    s = random_logits((2, 4, 15), seed=25)
    t = random_logits((2, 4, 15), seed=26)
    for kw in ({"k": 5, "tau": 1.0}, {"k": 3, "tau": 0.3, "temperature": 2.0}, {"k": 6, "index_set": "teacher", "tau": 0.5}):
        got = L.ranking_loss(s, t, reduction="none", **kw)
        for b in range(2):
            for i in range(4):
                ref = ref_rank(s[b, i].numpy(), t[b, i].numpy(), **kw)
                assert got[b, i].item() == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_ranking_loss_with_ties_uses_average_ranks():
    # Teacher ties inside the union: the hard limit is Spearman with average ranks (scipy's convention).
    t = torch.tensor([[5.0, 5.0, 3.0, 1.0, 0.0, -2.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 4.0, 3.0, 6.0, 0.0, -3.0]], dtype=torch.float64)
    got = L.ranking_loss(s, t, k=3, tau=1e-3, reduction="none")
    ids = [0, 1, 2, 3]
    rho = spearmanr(s[0, ids].numpy(), t[0, ids].numpy()).statistic
    assert got[0].item() == pytest.approx(1 - rho, rel=1e-6)


def test_ranking_loss_degenerate_positions():
    # Union of size 1 (k=1, same top-1): rho := 1, loss 0, zero gradient.
    t = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 3.0, 1.0]]])
    s = torch.tensor([[[2.0, 0.0, 1.0], [3.0, 0.0, 1.0]]], requires_grad=True)
    got = L.ranking_loss(s, t, k=1, tau=0.01, reduction="none")
    assert got[0, 0].item() == 0.0
    # k=1 with different top-1s: union of 2 in opposite orders, rho = -1.
    assert got[0, 1].item() == pytest.approx(2.0, abs=1e-6)
    # Teacher constant over the union: rho := 1 (nothing to learn), finite zero gradient.
    s2 = torch.randn(2, 3, 6, requires_grad=True)
    t2 = torch.zeros(2, 3, 6)
    loss = L.ranking_loss(s2, t2, k=2)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s2.grad).all() and (s2.grad == 0).all()
    # Student constant, teacher not: rho = 0 (loss 1) with a finite, non-zero gradient.
    s3 = torch.zeros(1, 6, requires_grad=True)
    t3 = torch.arange(6.0).unsqueeze(0)
    loss = L.ranking_loss(s3, t3, k=3)
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(s3.grad).all() and s3.grad.abs().sum() > 0


def test_ranking_loss_bf16_gathers_in_float32():
    s = random_logits((2, 3, 40), seed=27, dtype=torch.float32)
    t = random_logits((2, 3, 40), seed=28, dtype=torch.float32)
    sb, tb = s.bfloat16().requires_grad_(), t.bfloat16()
    got = L.ranking_loss(sb, tb, k=5, reduction="none")
    assert got.dtype == torch.float32
    # Identical to fp32 on the same (bf16-rounded) values: the computation itself is float32.
    ref = L.ranking_loss(sb.detach().float(), tb.float(), k=5, reduction="none")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    got.sum().backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()


def test_ranking_loss_validation():
    s, t = random_logits((2, 7), seed=29), random_logits((2, 7), seed=30)
    for bad in (0, -1, 8, 2.0, True):
        with pytest.raises(RlkdError, match="k"):
            L.ranking_loss(s, t, k=bad)
    with pytest.raises(RlkdError, match="index_set"):
        L.ranking_loss(s, t, index_set="student")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(RlkdError, match="tau"):
            L.ranking_loss(s, t, tau=bad)
    L.ranking_loss(s, t, k=7)  # k == V is allowed


# --------------------------------------------------------------------------------------------
# Masks, extreme values, chunking, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_masked_positions_are_ignored(name):
    s = random_logits((2, 5, 9), seed=31)
    t = random_logits((2, 5, 9), seed=32)
    labels = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(33))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]])
    s2, t2, labels2 = s.clone(), t.clone(), labels.clone()
    off = mask == 0
    s2[off] = float("nan")
    t2[off] = random_logits((int(off.sum()), 9), seed=34) * 100
    labels2[off] = 10_000  # not even a valid id: it must never be read
    results = []
    for a, b, y in ((s, t, labels), (s2, t2, labels2)):
        a = a.clone().requires_grad_()
        value = call(name, a, b, mask, labels=y, reduction="mean")
        value.backward()
        none = call(name, a.detach(), b, mask, labels=y, reduction="none")
        results.append((value.detach(), a.grad, none))
    (v1, g1, n1), (v2, g2, n2) = results
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    torch.testing.assert_close(g1[~off], g2[~off], rtol=0, atol=0)
    assert (g2[off] == 0).all()
    torch.testing.assert_close(n1, n2, rtol=0, atol=0)
    assert (n1[off] == 0).all()
    # The mean is over the counted positions only.
    assert v1.item() == pytest.approx(n1[~off].mean().item(), rel=1e-12)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_no_counted_position_gives_connected_zero(name):
    s = random_logits((2, 3, 6), seed=35).requires_grad_()
    t = random_logits((2, 3, 6), seed=36)
    labels = torch.zeros(2, 3, dtype=torch.long)
    value = call(name, s, t, torch.zeros(2, 3, dtype=torch.bool), labels=labels)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert (s.grad == 0).all()
    # An empty batch too.
    e = torch.zeros(0, 6, requires_grad=True)
    value = call(name, e, torch.zeros(0, 6), labels=torch.zeros(0, dtype=torch.long))
    assert value.item() == 0.0 and value.requires_grad


def extreme_logits(dtype=torch.float32):
    g = torch.Generator().manual_seed(37)
    s = torch.randn(2, 4, 10, generator=g, dtype=dtype)
    t = torch.randn(2, 4, 10, generator=g, dtype=dtype)
    # masked vocabulary shared by both models
    s[..., 7:] = -math.inf
    t[..., 7:] = -math.inf
    # a vocabulary entry only the teacher masks, and one only the student masks
    t[0, 0, 2] = -math.inf
    s[0, 1, 4] = -math.inf
    # huge magnitudes, of both signs, and near-one-hot rows
    s[1, 0, :7] = torch.tensor([1e4, -1e4, 0.0, 1e4, 5e3, -5e3, 1.0])
    t[1, 0, :7] = torch.tensor([-1e4, 1e4, 1e4, 0.0, -1e4, 3.0, 2.0])
    s[1, 1, :7] *= 1e4
    t[1, 2, :7] *= 1e4
    return s, t


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_infinite_and_huge_logits_give_finite_values_and_gradients(name, temperature):
    s, t = extreme_logits()
    labels = torch.tensor([[0, 1, 2, 3], [6, 0, 4, 5]])
    s = s.requires_grad_()
    t = t.requires_grad_()
    for reduction in ("mean", "none"):
        value = call(name, s, t, labels=labels, temperature=temperature, reduction=reduction)
        assert torch.isfinite(value).all(), (name, reduction, value)
        s.grad = t.grad = None
        value.sum().backward()
        assert torch.isfinite(s.grad).all(), name
        assert t.grad is None or torch.isfinite(t.grad).all(), name
        # -inf vocabulary entries (shared mask) get exactly zero gradient
        assert (s.grad[..., 7:] == 0).all()


def test_shared_masked_vocabulary_equals_cut_vocabulary():
    s, t = random_logits((2, 3, 9), seed=38), random_logits((2, 3, 9), seed=39)
    s_pad, t_pad = torch.cat([s, torch.full((2, 3, 4), -math.inf, dtype=s.dtype)], -1), torch.cat(
        [t, torch.full((2, 3, 4), -math.inf, dtype=t.dtype)], -1
    )
    for name in ALL_DIVERGENCES:
        torch.testing.assert_close(call(name, s_pad, t_pad), call(name, s, t), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(L.ranking_loss(s_pad, t_pad, k=3), L.ranking_loss(s, t, k=3), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_chunked_sum_equals_unchunked_mean(name):
    s = random_logits((3, 10, 16), seed=40, dtype=torch.float32)
    t = random_logits((3, 10, 16), seed=41, dtype=torch.float32)
    labels = torch.randint(0, 16, (3, 10), generator=torch.Generator().manual_seed(42))
    labels[:, :3] = -100
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(43)) > 0.3
    full = call(name, s, t, mask, labels=labels)
    total, count = 0.0, 0
    for lo in range(0, 10, 3):
        sl = slice(lo, lo + 3)
        total = total + call(name, s[:, sl], t[:, sl], mask[:, sl], labels=labels[:, sl], reduction="sum")
        keep = mask[:, sl] & (labels[:, sl] != -100) if name == "cross_entropy" else mask[:, sl]
        count += int(keep.sum())
    assert (total / count).item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_low_precision_inputs(name):
    s = random_logits((2, 6, 32), seed=44, dtype=torch.float32)
    t = random_logits((2, 6, 32), seed=45, dtype=torch.float32)
    labels = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(46))
    ref = call(name, s, t, labels=labels)
    for dtype in (torch.bfloat16, torch.float16):
        sl, tl = s.to(dtype), t.to(dtype)
        s_before, t_before = sl.clone(), tl.clone()
        got = call(name, sl, tl, labels=labels)
        assert got.dtype == torch.float32
        # bf16 has 8 bits of mantissa: logits of magnitude ~5 are off by up to ~0.02
        assert got.item() == pytest.approx(ref.item(), rel=0.05, abs=0.02), (dtype, got.item(), ref.item())
        # the same values in float32 give exactly the same result (computation is float32)
        assert got.item() == call(name, sl.float(), tl.float(), labels=labels).item()
        assert torch.equal(sl, s_before) and torch.equal(tl, t_before)  # inputs not mutated


def test_inputs_are_not_mutated_and_dtype_follows_float64():
    s, t = random_logits((2, 3, 8), seed=47), random_logits((2, 3, 8), seed=48)
    s0, t0 = s.clone(), t.clone()
    for name in ALL_LOSSES:
        out = call(name, s, t, labels=torch.zeros(2, 3, dtype=torch.long))
        assert out.dtype == torch.float64
    assert torch.equal(s, s0) and torch.equal(t, t0)


def test_common_validation_errors():
    s, t = random_logits((2, 3, 8), seed=49), random_logits((2, 3, 8), seed=50)
    with pytest.raises(RlkdError, match="align_vocab"):
        L.forward_kl(s, t[..., :7])
    with pytest.raises(RlkdError, match="mask has shape"):
        L.forward_kl(s, t, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(RlkdError, match="reduction"):
        L.forward_kl(s, t, reduction="avg")
    with pytest.raises(RlkdError, match="temperature"):
        L.forward_kl(s, t, temperature=0.0)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(RlkdError, match="beta"):
            L.generalized_jsd(s, t, beta=bad)
    with pytest.raises(RlkdError, match="alpha"):
        L.skew_kl(s, t, alpha=1.0)
    with pytest.raises(RlkdError, match="mu"):
        L.adaptive_kl(s, t, mu=0.0)
    with pytest.raises(RlkdError, match="floating"):
        L.forward_kl(s.long(), t)


def test_align_vocab():
    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 12)
    a, b = L.align_vocab(s, t)
    assert a.shape[-1] == b.shape[-1] == 10 and torch.equal(b, t[..., :10])
    a, b = L.align_vocab(s, t, vocab_size=9)
    assert a.shape[-1] == b.shape[-1] == 9 and a.data_ptr() == s.data_ptr()  # a view
    with pytest.raises(RlkdError, match="tokenizer has 11 tokens"):
        L.align_vocab(s, t, vocab_size=11)


# --------------------------------------------------------------------------------------------
# Registry and Objective
# --------------------------------------------------------------------------------------------


def test_registry_names_and_aliases():
    expected = {
        "kl": L.forward_kl,
        "fkl": L.forward_kl,
        "forward_kl": L.forward_kl,
        "rkl": L.reverse_kl,
        "reverse_kl": L.reverse_kl,
        "js": L.js,
        "gjsd": L.generalized_jsd,
        "generalized_jsd": L.generalized_jsd,
        "tvd": L.tvd,
        "skl": L.skew_kl,
        "srkl": L.skew_reverse_kl,
        "akl": L.adaptive_kl,
        "ce": L.cross_entropy,
        "rank": L.ranking_loss,
        "ranking_loss": L.ranking_loss,
    }
    for name, fn in expected.items():
        assert L.LOSSES[name] is fn and L.get_loss(name) is fn
    assert L.canonical_name("rank") == "ranking_loss"
    with pytest.raises(RlkdError, match="unknown loss 'klx'; available: .*akl.*rank"):
        L.get_loss("klx")
    assert L.loss_options(L.ranking_loss) == {"k": 5, "index_set": "union", "tau": 1.0, "temperature": 1.0}
    assert set(L.loss_options(L.cross_entropy)) == {"temperature", "ignore_index"}


def test_register_loss_adds_a_usable_divergence():
    @L.register_loss("sq_test")
    def squared_prob_distance(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", scale=1.0):
        return L.apply_divergence(
            lambda ls, lt: scale * ((lt.exp() - ls.exp()) ** 2).sum(-1),
            student_logits,
            teacher_logits,
            mask,
            temperature=temperature,
            reduction=reduction,
        )

    try:
        obj = L.Objective.from_config({"terms": {"sq_test": {"weight": 2.0, "scale": 3.0}}})
        s, t = random_logits((2, 3, 5), seed=51), random_logits((2, 3, 5), seed=52)
        total, parts = obj(s, t, None, None)
        ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
        expected = 3.0 * ((pt - ps) ** 2).sum(-1).mean()
        assert parts["sq_test"].item() == pytest.approx(expected.item(), rel=1e-12)
        assert total.item() == pytest.approx(2 * expected.item(), rel=1e-12)
        with pytest.raises(ValueError):
            L.register_loss("kl")(squared_prob_distance)
    finally:
        for name in ("sq_test", "squared_prob_distance"):
            L.LOSSES.pop(name, None)


def test_objective_from_config_combines_terms():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "name": "mix",
            "temperature": 2.0,
            "terms": {
                "kl": {"weight": 0.5},
                "rank": {"weight": 1.0, "k": 5, "tau": 0.5},
                "rank15": {"fn": "rank", "weight": 0.25, "k": 15},
                "rkl": {"weight": 0.3, "temperature": 1.0},
                "ce": {"weight": 0.1},
                "tvd": {"weight": 0.0},
            },
        }
    )
    obj = L.Objective.from_config(cfg)
    assert obj.name == "mix"
    assert obj.needs_teacher and obj.needs_labels
    assert [key for key, *_ in obj.active_terms] == ["kl", "rank", "rank15", "rkl", "ce"]
    assert [key for key, *_ in obj.terms] == ["kl", "rank", "rank15", "rkl", "ce", "tvd"]
    s = random_logits((2, 4, 20), seed=53).requires_grad_()
    t = random_logits((2, 4, 20), seed=54)
    labels = torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(55))
    total, parts = obj(s, t, labels, None)
    assert set(parts) == {"kl", "rank", "rank15", "rkl", "ce"}  # weight-0 terms are not computed
    expected = {
        "kl": L.forward_kl(s, t, temperature=2.0),
        "rank": L.ranking_loss(s, t, k=5, tau=0.5, temperature=2.0),
        "rank15": L.ranking_loss(s, t, k=15, temperature=2.0),
        "rkl": L.reverse_kl(s, t, temperature=1.0),  # its own temperature wins
        "ce": L.cross_entropy(s, None, labels=labels),  # ce does not inherit the temperature
    }
    for key, value in expected.items():
        assert parts[key].item() == pytest.approx(value.item(), rel=1e-12), key
        assert not parts[key].requires_grad
    weights = {"kl": 0.5, "rank": 1.0, "rank15": 0.25, "rkl": 0.3, "ce": 0.1}
    assert total.item() == pytest.approx(sum(weights[k] * v.item() for k, v in expected.items()), rel=1e-12)
    total.backward()
    assert torch.isfinite(s.grad).all()
    assert obj.describe() == (
        "0.5·kl(temperature=2.0) + 1.0·rank(k=5, tau=0.5, temperature=2.0) + "
        "0.25·rank15(fn=ranking_loss, k=15, temperature=2.0) + 0.3·rkl + 0.1·ce"
    )


def test_objective_positions_follow_mask_and_labels():
    obj = L.Objective.from_config({"terms": {"kl": {"weight": 1.0}, "ce": {"weight": 0.5}}})
    s, t = random_logits((2, 5, 7), seed=56), random_logits((2, 5, 7), seed=57)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(58))
    labels[:, :2] = -100  # prompt
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False  # padding
    keep = obj.position_mask(mask, labels)
    assert keep.sum().item() == 5
    total, parts = obj(s, t, labels, mask)
    assert parts["kl"].item() == pytest.approx(L.forward_kl(s, t, keep).item(), rel=1e-12)
    assert parts["ce"].item() == pytest.approx(L.cross_entropy(s, t, mask, labels=labels).item(), rel=1e-12)
    per_position, parts_none = obj(s, t, labels, mask, reduction="none")
    assert per_position.shape == (2, 5) and (per_position[~keep] == 0).all()
    assert per_position.sum().item() / 5 == pytest.approx(total.item(), rel=1e-12)
    # ce-only objectives need no teacher
    ce_only = L.Objective.from_config({"terms": {"ce": {}}})
    assert not ce_only.needs_teacher and ce_only.needs_labels
    total, parts = ce_only(s, None, labels, mask)
    assert set(parts) == {"ce"}
    with pytest.raises(RlkdError, match="needs labels"):
        ce_only(s, None, None, mask)
    with pytest.raises(RlkdError, match="needs teacher logits"):
        obj(s, None, labels, mask)


def test_objective_chunked_sum_equals_mean():
    obj = L.Objective.from_config(
        {"terms": {"rank": {"weight": 1.0, "k": 4}, "kl": {"weight": 0.5}, "akl": {"weight": 0.2}, "ce": {"weight": 0.1}}}
    )
    s = random_logits((2, 12, 16), seed=59, dtype=torch.float32)
    t = random_logits((2, 12, 16), seed=60, dtype=torch.float32)
    labels = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(61))
    labels[0, :4] = -100
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    full, full_parts = obj(s, t, labels, mask)
    total, parts, count = 0.0, {}, 0
    for lo in range(0, 12, 5):
        sl = slice(lo, lo + 5)
        chunk_total, chunk_parts = obj(s[:, sl], t[:, sl], labels[:, sl], mask[:, sl], reduction="sum")
        total = total + chunk_total
        for key, value in chunk_parts.items():
            parts[key] = parts.get(key, 0.0) + value
        count += int(obj.position_mask(mask[:, sl], labels[:, sl]).sum())
    assert (total / count).item() == pytest.approx(full.item(), rel=1e-6)
    for key in full_parts:
        assert (parts[key] / count).item() == pytest.approx(full_parts[key].item(), rel=1e-6), key


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"terms": {"klx": {"weight": 1.0}}}, r"loss term 'klx' is not a registered loss; available: .*rank"),
        ({"terms": {"r2": {"fn": "nope"}}}, r"'r2' \(fn: 'nope'\) is not a registered loss"),
        ({"terms": {"rank": {"weight": 1.0, "kk": 5}}}, r"no option 'kk'; valid options: weight, fn, k, index_set, tau, temperature"),
        ({"terms": {"kl": {"weight": 1.0, "beta": 0.5}}}, r"'kl' \(forward_kl\) has no option 'beta'"),
        ({"terms": {"kl": {"weight": 0.0}, "rank": {"weight": 0}}}, r"all loss weights are zero"),
        ({"terms": {"kl": {"weight": -0.5}}}, r"weight must be a finite number >= 0"),
        ({"terms": {"kl": {"weight": float("nan")}}}, r"weight must be a finite number >= 0"),
        ({"terms": {"kl": {"weight": "high"}}}, r"weight must be a finite number >= 0"),
        ({"terms": {"rank": {"weight": 1.0, "k": 0}}}, r"loss term 'rank': k must be an integer >= 1"),
        ({"terms": {"rank": {"weight": 1.0, "k": -3}}}, r"k must be an integer >= 1"),
        ({"terms": {"rank": {"weight": 1.0, "tau": 0}}}, r"tau must be a finite number > 0"),
        ({"terms": {"gjsd": {"beta": 1.0}}}, r"beta must be a number strictly between 0 and 1"),
        ({"terms": {}}, r"non-empty 'terms'"),
        ({"name": "x"}, r"non-empty 'terms'"),
        ({"terms": {"kl": 0.5}}, r"must be a mapping"),
        ({"terms": {"kl": {}}, "temprature": 2}, r"unknown key\(s\) temprature"),
        ({"terms": {"kl": {}}, "temperature": -1}, r"loss.temperature must be a finite number > 0"),
    ],
)
def test_objective_config_errors(cfg, message):
    with pytest.raises(RlkdError, match=message) as info:
        L.Objective.from_config(cfg)
    assert "\n" not in str(info.value)


def test_every_preset_yaml_builds_an_objective():
    from omegaconf import OmegaConf

    presets = sorted(p.stem for p in CONF_LOSS.glob("*.yaml"))
    divergences = ["kl", "rkl", "js", "gjsd", "tvd", "skl", "srkl", "akl"]
    assert set(presets) == {"ce", "rank", *divergences, *(f"{d}+rank" for d in divergences)}
    s = random_logits((1, 3, 12), seed=62, dtype=torch.float32)
    t = random_logits((1, 3, 12), seed=63, dtype=torch.float32)
    labels = torch.tensor([[1, 2, 3]])
    from conftest import compose

    for preset in presets:
        text = (CONF_LOSS / f"{preset}.yaml").read_text()
        assert text.startswith("# "), preset
        if preset.endswith("+rank"):  # composed from the divergence's and the rank preset, nothing repeated
            assert "defaults:" in text and "k: 5" not in text, preset
        cfg = compose("distill", [f"loss={preset}"]).loss  # as Hydra composes it
        assert cfg.name == preset and cfg.temperature == 1.0
        obj = L.Objective.from_config(cfg)
        total, parts = obj(s, t, labels, None)
        assert torch.isfinite(total)
        if preset.endswith("+rank"):
            d = preset[: -len("+rank")]
            assert dict((k, w) for k, _, w, _ in obj.terms) == {"rank": 1.0, d: 0.5}
            assert obj.terms[0][3] == {"k": 5, "index_set": "union", "tau": 1.0, "temperature": 1.0}
    assert L.Objective.from_config(OmegaConf.load(CONF_LOSS / "gjsd.yaml")).terms[0][3]["beta"] == 0.5
    ce = L.Objective.from_config(OmegaConf.load(CONF_LOSS / "ce.yaml"))
    assert not ce.needs_teacher


def test_presets_accept_hydra_overrides():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_LOSS.parent), version_base=None):
        cfg = compose(
            overrides=["+loss=kl+rank", "loss.terms.rank.k=15", "loss.terms.rank.weight=2", "+loss.terms.ce.weight=0.1"]
        )
    obj = L.Objective.from_config(cfg.loss)
    assert obj.describe() == "2.0·rank(k=15, index_set=union, tau=1.0) + 0.5·kl + 0.1·ce"


# --------------------------------------------------------------------------------------------
# Fused fast paths == the general autograd path; top_k == torch.topk
# --------------------------------------------------------------------------------------------


def _general_kl(s, t, mask=None, **kw):
    return L.apply_divergence(lambda ls, lt: _kl_rows(lt, ls), s, t, mask, **kw)


def _general_ce(s, labels, temperature=1.0):
    x = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32) / temperature
    return (torch.logsumexp(x, -1) - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_kl_and_ce_equal_the_general_path(dtype, temperature):
    s = (random_logits((3, 4, 50), seed=71, scale=4.0).to(dtype)).requires_grad_()
    t = with_peaked_teacher(random_logits((3, 4, 50), seed=72, scale=4.0)).to(dtype)
    labels = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(73))
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(74)) > 0.3
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    for fused, general in (
        (lambda: L.forward_kl(s, t, mask, temperature=temperature, reduction="sum"),
         lambda: _general_kl(s, t, mask, temperature=temperature, reduction="sum")),
        (lambda: L.cross_entropy(s, None, None, labels=labels, temperature=temperature, reduction="sum"),
         lambda: _general_ce(s, labels, temperature)),
    ):
        a, b = fused(), general()
        ga, = torch.autograd.grad(a, s)
        gb, = torch.autograd.grad(b, s)
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(ga.float(), gb.float(), **tol)


@pytest.mark.parametrize("k", [3, 20, 49])
def test_fused_lumped_kl_equals_the_general_lumped_path(k):
    s = random_logits((2, 5, 50), seed=75, scale=4.0).requires_grad_()
    t = random_logits((2, 5, 50), seed=76, scale=4.0)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    cached = L.TopKLogits.from_logits(t, k, temperatures=(1.0, 2.0))
    for temperature in (1.0, 2.0):
        a = L.forward_kl(s, cached, mask, temperature=temperature, reduction="sum")
        b = _general_kl(s, cached, mask, temperature=temperature, reduction="sum")
        ga, = torch.autograd.grad(a, s)
        gb, = torch.autograd.grad(b, s)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_fused_paths_fall_back_on_infinite_logits():
    """-inf logits (a masked vocabulary) make the fused paths give way to the floor convention."""
    s = random_logits((4, 12), seed=77).requires_grad_()
    t = random_logits((4, 12), seed=78)
    s_inf = s.detach().clone()
    s_inf[0, 3] = -math.inf  # the student forbids a token the teacher allows: a huge, finite KL
    s_inf.requires_grad_()
    value = L.forward_kl(s_inf, t, reduction="sum")
    assert math.isfinite(value.item()) and value.item() > 1e4
    value.backward()
    assert torch.isfinite(s_inf.grad).all()
    labels = torch.tensor([3, 1, 2, 5])
    ce = L.cross_entropy(s_inf, None, labels=labels, reduction="none")
    assert ce[0].item() == pytest.approx(-L.LOGP_FLOOR) and torch.isfinite(ce).all()
    cached = L.TopKLogits.from_logits(t, 4)
    lumped = L.forward_kl(s_inf, cached, reduction="none")
    torch.testing.assert_close(lumped, _general_kl(s_inf, cached, reduction="none"))


@pytest.mark.parametrize("shape,k", [((7, 32000), 5), ((3, 2, 5000), 15), ((4, 4099), 64), ((5, 300), 5), ((0, 9000), 3)])
def test_top_k_matches_torch_topk(shape, k):
    x = random_logits(shape, seed=79, dtype=torch.float32)
    if x.numel():
        x[..., -1] = x.max() + 1  # the winner in the ragged last block
        x.view(-1, shape[-1])[0, 100:103] = float("-inf")
    values, ids = L.top_k(x, k)
    ref = x.topk(k, dim=-1)
    assert torch.equal(values, ref.values) and torch.equal(ids, ref.indices)
