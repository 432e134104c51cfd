"""Tests of rlkd_cli.metrics against brute-force Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlkd_cli import metrics as M
from rlkd_cli.errors import RlkdError


def distinct_logits(shape, seed):
    """Random logits without ties (a random permutation of 0..V-1 per position, plus noise < 0.5)."""
    g = torch.Generator().manual_seed(seed)
    *batch, vocab = shape
    n = math.prod(batch)
    rows = torch.stack([torch.randperm(vocab, generator=g).float() for _ in range(n)])
    rows = rows + 0.4 * torch.rand(n, vocab, generator=g)
    return rows.reshape(shape)


def related_pair(shape, seed):
    """A teacher and a student that agree on the order at many positions (so CR@k is not all 0)."""
    t = distinct_logits(shape, seed)
    s = distinct_logits(shape, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    copy = torch.rand(shape[:-1], generator=g) < 0.5
    s = torch.where(copy.unsqueeze(-1), t + 0.01 * torch.rand(shape, generator=g), s)
    # swap the 2nd and 3rd best of the student at some copied positions: same top-3 set, different order
    swap = copy & (torch.rand(shape[:-1], generator=g) < 0.5)
    order = t.argsort(-1, descending=True)
    for idx in swap.nonzero().tolist():
        a, b = order[tuple(idx)][1].item(), order[tuple(idx)][2].item()
        row = s[tuple(idx)]
        row[a], row[b] = row[b].item(), row[a].item()
    return s, t


def brute_topk(row, k):
    values = row.tolist()
    return sorted(range(len(values)), key=lambda v: -values[v])[:k]


def brute_cr_or(s, t, k, mask=None):
    """Per-position CR and OR with explicit loops; returns (cr, or) lists over counted positions and nested arrays."""
    batch = s.shape[:-1]
    cr = np.zeros(batch)
    ov = np.zeros(batch)
    counted = []
    for idx in np.ndindex(*batch):
        if mask is not None and not bool(mask[idx]):
            continue
        ts, tt = brute_topk(s[idx], k), brute_topk(t[idx], k)
        cr[idx] = 1.0 if ts == tt else 0.0
        ov[idx] = len(set(ts) & set(tt)) / k
        counted.append(idx)
    return cr, ov, counted


def test_topk_ids_ordered():
    x = distinct_logits((2, 3, 9), seed=1)
    ids = M.topk_ids(x, 4)
    assert ids.shape == (2, 3, 4)
    for idx in np.ndindex(2, 3):
        assert ids[idx].tolist() == brute_topk(x[idx], 4)
    with pytest.raises(RlkdError, match="1 <= k <= 9"):
        M.topk_ids(x, 10)
    with pytest.raises(RlkdError, match="k must be"):
        M.topk_ids(x, 0)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_cr_or_match_brute_force(k):
    s, t = related_pair((3, 8, 12), seed=2)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(3)) > 0.25
    cr_ref, or_ref, counted = brute_cr_or(s, t, k, mask)
    cr_none = M.consistency_rate(s, t, k, mask, reduction="none")
    or_none = M.overlap_rate(s, t, k, mask, reduction="none")
    assert cr_none.dtype == torch.float32 and cr_none.shape == (3, 8)
    np.testing.assert_allclose(cr_none.numpy(), cr_ref, atol=1e-7)
    np.testing.assert_allclose(or_none.numpy(), or_ref, atol=1e-7)
    n = len(counted)
    cr_mean = sum(cr_ref[i] for i in counted) / n
    or_mean = sum(or_ref[i] for i in counted) / n
    assert M.consistency_rate(s, t, k, mask).item() == pytest.approx(cr_mean, abs=1e-6)
    assert M.overlap_rate(s, t, k, mask).item() == pytest.approx(or_mean, abs=1e-6)
    assert M.consistency_rate(s, t, k, mask, reduction="sum").item() == pytest.approx(cr_mean * n, abs=1e-5)
    assert M.overlap_rate(s, t, k, mask, reduction="sum").item() == pytest.approx(or_mean * n, abs=1e-5)
    if k >= 3:
        assert 0 < cr_mean < or_mean < 1  # the fixture exercises same-set-different-order positions


def test_masked_positions_are_ignored_and_no_grad():
    s, t = related_pair((2, 6, 10), seed=4)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), 10)
    t2[~mask] = torch.randn(int((~mask).sum()), 10)
    for fn in (M.consistency_rate, M.overlap_rate):
        assert fn(s, t, 3, mask).item() == fn(s2, t2, 3, mask).item()
        assert (fn(s2, t2, 3, mask, reduction="none")[~mask] == 0).all()
    assert M.alignment_sums(s, t, [1, 3], mask) == M.alignment_sums(s2, t2, [1, 3], mask)
    sg = s.clone().requires_grad_()
    out = M.consistency_rate(sg, t, 2)
    assert not out.requires_grad and out.is_floating_point()
    # no counted position: a zero, like the losses
    assert M.overlap_rate(s, t, 2, torch.zeros(2, 6, dtype=torch.bool)).item() == 0.0


def test_metric_validation():
    s, t = related_pair((2, 3, 6), seed=5)
    for bad in (0, -2, 7, 1.5):
        with pytest.raises(RlkdError):
            M.consistency_rate(s, t, bad)
        with pytest.raises(RlkdError):
            M.overlap_rate(s, t, bad)
    with pytest.raises(RlkdError, match="reduction"):
        M.overlap_rate(s, t, 2, reduction="avg")
    with pytest.raises(RlkdError, match="different positions"):
        M.overlap_rate(s, t[:, :2], 2)
    with pytest.raises(RlkdError):
        M.alignment_sums(s, t, [])
    with pytest.raises(RlkdError):
        M.alignment_sums(s, t, [1, 7])


def test_alignment_sums_and_finalize_match_brute_force():
    s, t = related_pair((4, 7, 15), seed=6)
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(7)) > 0.2
    ks = [5, 1, 2, 3]
    sums = M.alignment_sums(s, t, ks, mask)
    assert list(sums) == ["cr@1", "cr@2", "cr@3", "cr@5", "or@1", "or@2", "or@3", "or@5", "top1", "count"]
    n = int(mask.sum())
    assert sums["count"] == n
    for k in ks:
        cr_ref, or_ref, counted = brute_cr_or(s, t, k, mask)
        assert sums[f"cr@{k}"] == pytest.approx(sum(cr_ref[i] for i in counted), abs=1e-9)
        assert sums[f"or@{k}"] == pytest.approx(sum(or_ref[i] for i in counted), abs=1e-9)
    assert sums["top1"] == sums["cr@1"]
    rates = M.finalize(sums)
    assert rates["count"] == n
    for k in ks:
        assert rates[f"cr@{k}"] == pytest.approx(M.consistency_rate(s, t, k, mask).item(), abs=1e-6)
        assert rates[f"or@{k}"] == pytest.approx(M.overlap_rate(s, t, k, mask).item(), abs=1e-6)
    # accumulation over batches == one big batch
    total: dict = {}
    for b in range(4):
        M.add_sums(total, M.alignment_sums(s[b], t[b], ks, mask[b]))
    assert total == pytest.approx(sums)
    assert M.finalize(total) == pytest.approx(rates)
    # zero positions: rates are nan
    empty = M.finalize(M.alignment_sums(s, t, [2], torch.zeros(4, 7, dtype=torch.bool)))
    assert empty["count"] == 0 and math.isnan(empty["cr@2"])


def test_teacher_modes_brute_force():
    t = torch.randn(3, 5, 9, generator=torch.Generator().manual_seed(8)) * 2
    t[0, 0] = torch.tensor([2.0, 2.0 - math.log(2) + 1e-3, 2.0 - math.log(2) - 1e-3, -5, -5, -5, -5, -5, -5])
    for ratio in (0.5, 0.2, 1.0):
        modes = M.teacher_modes(t, ratio)
        assert modes.dtype == torch.long
        for idx in np.ndindex(3, 5):
            p = torch.softmax(t[idx].double(), -1)
            expected = int(sum(1 for v in p if v >= ratio * p.max() * (1 - 1e-12)))
            assert modes[idx].item() == expected, (idx, ratio)
    assert M.teacher_modes(t, 0.5)[0, 0].item() == 2
    assert (M.teacher_modes(t, 1.0) == 1).all()
    # temperature flattens the distribution: at least as many modes
    assert (M.teacher_modes(t, 0.5, temperature=3.0) >= M.teacher_modes(t, 0.5)).all()
    with pytest.raises(RlkdError, match="ratio"):
        M.teacher_modes(t, 0.0)


def test_alignment_sums_by_modes():
    s, t = related_pair((3, 10, 12), seed=9)
    # make a few positions clearly multi-modal for the teacher
    t[0, :4, :3] = 50.0 + torch.tensor([0.0, 0.1, 0.2])
    t[1, :3, :2] = 50.0 + torch.tensor([0.0, 0.3])
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(10)) > 0.2
    ks = [1, 2, 3]
    got = M.alignment_sums_by_modes(s, t, ks, mask)
    modes = M.teacher_modes(t, 0.5)
    buckets = {"modes=1": modes == 1, "modes=2": modes == 2, "modes>=3": modes >= 3}
    assert all(got[f"count|{b}"] > 0 for b in buckets)
    for name, sel in buckets.items():
        expected = M.alignment_sums(s, t, ks, mask & sel)
        for key, value in expected.items():
            assert got[f"{key}|{name}"] == pytest.approx(value), (key, name)
    assert sum(got[f"count|{b}"] for b in buckets) == int(mask.sum())
    # buckets add up to the overall sums
    overall = M.alignment_sums(s, t, ks, mask)
    for key in overall:
        assert sum(got[f"{key}|{b}"] for b in buckets) == pytest.approx(overall[key])
    rates = M.finalize(got)
    assert rates["cr@2|modes=1"] == pytest.approx(got["cr@2|modes=1"] / got["count|modes=1"])
    # custom bins with a range bucket
    custom = M.alignment_sums_by_modes(s, t, [2], mask, bins=(1, 3))
    assert custom["count|modes=1..2"] == int((mask & (modes < 3)).sum())
    assert custom["count|modes>=3"] == int((mask & (modes >= 3)).sum())
    with pytest.raises(RlkdError, match="bins"):
        M.alignment_sums_by_modes(s, t, [2], mask, bins=(2, 1))
    with pytest.raises(RlkdError, match="bins"):
        M.alignment_sums_by_modes(s, t, [2], mask, bins=(0, 1))
