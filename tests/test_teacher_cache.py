"""The teacher logit cache: round trip, resumption, distilling from it, its approximation error, its errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, compose, run_cli, teacher_path, tokenizer_of, train
from rlkd_cli import models
from rlkd_cli.data import dataset as data_mod
from rlkd_cli.data.loader import Collator, IndexedRows
from rlkd_cli.engine import chunking
from rlkd_cli.errors import RlkdError
from rlkd_cli.losses import TopKLogits, get_loss
from rlkd_cli.teachers import cache as teacher_cache
from rlkd_cli.teachers.live import LiveTeacher

CACHE = ["cache.top_k=16", "cache.shard_examples=256", "cache.batch_size=16", "trainer.eval_examples=16"]


def _build(tmp_path: Path, extra: list[str] = (), name: str = "cache") -> tuple[Path, dict]:
    summary = train("cache-teacher", QUICK + CACHE + [f"cache.out={tmp_path / name}", *extra], tmp_path / f"run-{name}")
    return tmp_path / name, summary


def _live(cfg):
    """The QUICK teacher, its tokenizer and the train split, loaded as distill does."""
    tok = tokenizer_of(cfg)
    teacher = models.load_pretrained(str(teacher_path(cfg)), role="teacher").eval()
    return tok, teacher, data_mod.build_split(cfg.dataset, tok, "train")


def _batch(split, examples: list[int], tok) -> dict:
    return Collator(tok.pad_token_id)(IndexedRows(split.dataset).__getitems__(examples))


def test_cache_round_trip_is_exact(tmp_path):
    root, summary = _build(tmp_path)
    meta = json.loads((root / "cache.json").read_text())
    assert meta["status"] == "complete" and meta["top_k"] == 16 and meta["temperatures"] == [1.0]
    assert summary["shards_written"] == 4 and summary["shards_reused"] == 0  # 600 train examples / 256 -> 3, + 1 val
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"shard-00000{i}.safetensors" for i in range(3)]
    cache = teacher_cache.TeacherCache.open(root)
    cfg = compose("distill", QUICK)
    tok, teacher, split = _live(cfg)
    examples = [3, 300, 599, 0]  # across shards, in any order
    batch = _batch(split, examples, tok)
    idx, _ = chunking.response_index(batch["labels"])
    got = cache.rows(batch, idx, split="train")
    with torch.no_grad():
        dense = LiveTeacher(teacher, len(tok)).rows(batch, idx)[0:idx.numel()]
    want = TopKLogits.from_logits(dense, 16)
    assert torch.equal(got.ids.long(), want.ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.log_normalizer, want.log_normalizer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.tail_log_mass, want.tail_log_mass, rtol=1e-4, atol=1e-4)
    # independent check of the stored tail: 1 - sum of the top-16 probabilities
    p = torch.softmax(dense.double(), -1)
    tail = 1.0 - p.gather(-1, want.ids).sum(-1)
    torch.testing.assert_close(got.tail_log_mass[:, 0].double().exp(), tail, rtol=1e-3, atol=1e-6)


def test_interrupted_cache_is_refused_then_resumed(tmp_path):
    root, _ = _build(tmp_path, ["cache.dtype=bfloat16"])
    before = {p.name: load_file(str(p)) for p in (root / "train").iterdir()}
    # what a kill leaves: a shard missing, a half-written temporary file, the status not complete
    (root / "train" / "shard-000001.safetensors").unlink()
    (root / "train" / ".tmp-shard-000001.safetensors-123").write_bytes(b"partial")
    meta = json.loads((root / "cache.json").read_text())
    meta["status"] = "incomplete"
    (root / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(RlkdError, match=r"incomplete .*run.* the\s+same rlkd cache-teacher command again"):
        teacher_cache.TeacherCache.open(root)
    _, summary = _build(tmp_path, ["cache.dtype=bfloat16"])
    assert summary["shards_written"] == 1 and summary["shards_reused"] == 3
    assert not list((root / "train").glob(".tmp-*"))  # the leftover of the killed write is gone
    after = {p.name: load_file(str(p)) for p in (root / "train").iterdir()}
    assert after.keys() == before.keys()
    for name in before:  # the rebuilt shard holds exactly what the first build wrote
        assert before[name].keys() == after[name].keys()
        for key in before[name]:
            assert torch.equal(before[name][key], after[name][key]), (name, key)
    assert teacher_cache.TeacherCache.open(root).meta["status"] == "complete"


@pytest.mark.slow
def test_a_shard_of_another_teacher_is_refused_and_a_killed_build_counts_the_shards_on_disk(tmp_path):
    root, _ = _build(tmp_path)
    other, _ = _build(tmp_path, ["teacher.train_if_missing.max_steps=5"], name="other")  # another tiny teacher
    cache = teacher_cache.TeacherCache.open(other)  # (opened before the swap: the read itself checks too)
    mine = other / "train" / "shard-000001.safetensors"
    saved = mine.read_bytes()
    shutil.copy(root / "train" / "shard-000001.safetensors", mine)
    assert cache.example_rows("train", [0]).ids.shape[0] > 0  # its own shards still read
    with pytest.raises(RlkdError, match=r"shard .*train/shard-000001\.safetensors was written by another teacher"):
        cache.example_rows("train", [300])
    with pytest.raises(RlkdError, match=r"shard .*train/shard-000001\.safetensors was written by another teacher"):
        teacher_cache.TeacherCache.open(other)  # refused when opened, before any training
    mine.write_bytes(saved)
    # a build killed in its first split: cache.json lists no finished shard, but three are on disk
    meta = json.loads((other / "cache.json").read_text())
    meta["status"] = "incomplete"
    for info in meta["splits"].values():
        info["shards_done"] = []
    (other / "cache.json").write_text(json.dumps(meta))
    (other / "train" / "shard-000002.safetensors").unlink()
    with pytest.raises(RlkdError, match=r"is incomplete \(3/4 shards\); finish it by running the same rlkd "
                                        r"cache-teacher command again with cache.out=.* \(it keeps the 3 finished"):
        teacher_cache.TeacherCache.open(other)


def test_cache_folder_with_other_settings_is_refused(tmp_path):
    root, _ = _build(tmp_path)
    with pytest.raises(RlkdError, match="built with other settings .*top_k"):
        _build(tmp_path, ["cache.top_k=8"])


def test_distill_from_cache_runs_no_teacher_forward(tmp_path, monkeypatch):
    root, _ = _build(tmp_path, ["loss=kl+rank"])

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher model was loaded although a cache was given")

    monkeypatch.setattr(models, "load_pretrained", no_teacher)
    summary = train("distill", QUICK + ["loss=kl+rank", f"teacher.cache={root}", "trainer.eval_examples=16"],
                    tmp_path / "run")
    assert summary["status"] == "completed" and summary["teacher"].startswith(f"cache:{root}")
    for key in ("cr@1", "or@5", "loss/kl", "loss/rank"):
        assert math.isfinite(summary[key]), key


def test_cache_mismatches_are_one_line_errors(tmp_path):
    root, _ = _build(tmp_path)
    base = QUICK + [f"teacher.cache={root}", "trainer.eval_examples=16"]
    cases = [
        (["dataset.num_train=500"], r"built from another 'train' split \(600 examples"),
        (["loss.terms.rank.k=20"], r"k=20 but teacher cache .* keeps K=16"),
        (["loss.temperature=2.0"], r"temperature 2 but teacher cache .* for 1 only"),
        (["metrics.ks=[1,32]"], r"CR/OR@32 but teacher cache .* K=16"),
        (["trainer.eval_examples=8"], r"another 'validation' split"),
    ]
    for extra, message in cases:
        with pytest.raises(RlkdError, match=message):
            train("distill", base + extra, tmp_path / "run")
    with pytest.raises(RlkdError, match="not a teacher cache"):
        teacher_cache.TeacherCache.open(tmp_path)
    with pytest.raises(RlkdError, match="is not a folder"):
        teacher_cache.TeacherCache.open(tmp_path / "nope")


def test_cli_cache_then_distill(tmp_path):
    out = tmp_path / "c"
    res = run_cli(["cache-teacher", *QUICK, *CACHE, f"cache.out={out}", f"hydra.run.dir={tmp_path / 'r1'}"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r1" / "summary.json").read_text())["cache"] == str(out)
    res = run_cli(["distill", *QUICK, "trainer.max_steps=2", "trainer.eval_examples=16", f"teacher.cache={out}",
                   f"hydra.run.dir={tmp_path / 'r2'}"])
    assert res.exit_code == 0, res.output
    res = run_cli(["distill", *QUICK, f"teacher.cache={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'r3'}"])
    assert res.exit_code == 2 and "error: teacher.cache" in res.output and "Traceback" not in res.output


F_DIVERGENCES = ["kl", "rkl", "js", "gjsd", "tvd", "skl", "srkl"]


def test_cached_divergences_against_the_live_teacher():
    """Divergences from a top-K cache vs the live teacher's dense logits, on the QUICK teacher's positions.

    * every f-divergence is a lower bound of the exact one at every position (data processing);
    * the missing part is exactly what lumping the tail hides: for the forward KL
      ``r_T * KL(p_T|tail || p_S|tail)``, for the TVD ``sum_tail |p_T - p_S| - |r_T - r_S|``
      (computed here independently from the dense logits, in float64);
    * the error shrinks as K grows and vanishes at K = V; the ranking loss is exact once K covers
      both top-k lists.
    The errors measured on the default teacher are in docs/losses.md.
    """
    cfg = compose("distill", QUICK)
    tok, teacher, split = _live(cfg)
    batch = _batch(split, list(range(24)), tok)
    idx, _ = chunking.response_index(batch["labels"])
    torch.manual_seed(0)
    with torch.no_grad():
        t = LiveTeacher(teacher, len(tok)).rows(batch, idx)[0:idx.numel()]
        s = t + 0.5 * torch.randn_like(t)  # a student near the teacher
    V = t.shape[-1]
    cached = TopKLogits.from_logits(t, 64, temperatures=(1.0, 2.0))
    for name in F_DIVERGENCES:
        for temperature in (1.0, 2.0):
            exact_rows = get_loss(name)(s, t, temperature=temperature, reduction="none")
            approx_rows = get_loss(name)(s, cached, temperature=temperature, reduction="none")
            assert bool((approx_rows <= exact_rows + 1e-5).all()), (name, temperature)

    # the exact size of the error, from the dense distributions (float64)
    pt, ps = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    in_cache = torch.zeros_like(pt, dtype=torch.bool).scatter_(-1, cached.ids, True)
    rt, rs = (pt * ~in_cache).sum(-1), (ps * ~in_cache).sum(-1)
    tail_t, tail_s = pt * ~in_cache / rt.unsqueeze(-1), ps * ~in_cache / rs.unsqueeze(-1)
    tail_kl = (tail_t * (tail_t.clamp_min(1e-300).log() - tail_s.clamp_min(1e-300).log())).sum(-1)
    gap = get_loss("kl")(s, t, reduction="none").double() - get_loss("kl")(s, cached, reduction="none").double()
    torch.testing.assert_close(gap, rt * tail_kl, rtol=2e-3, atol=2e-5)
    gap = get_loss("tvd")(s, t, reduction="none").double() - get_loss("tvd")(s, cached, reduction="none").double()
    torch.testing.assert_close(gap, 0.5 * ((pt - ps).abs() * ~in_cache).sum(-1) - 0.5 * (rt - rs).abs(),
                               rtol=2e-3, atol=2e-5)

    # more cached logits, smaller error; all of them, none
    errors = []
    for k in (16, 64, 256, V):
        approx = float(get_loss("kl")(s, TopKLogits.from_logits(t, k)))
        errors.append(float(get_loss("kl")(s, t)) - approx)
    assert errors[0] > errors[1] > errors[2] > 0 and abs(errors[3]) < 1e-5, errors
    for name in F_DIVERGENCES + ["akl", "rank"]:
        full = TopKLogits.from_logits(t, V, temperatures=(1.0, 2.0))
        for temperature in (1.0, 2.0):
            torch.testing.assert_close(get_loss(name)(s, full, temperature=temperature),
                                       get_loss(name)(s, t, temperature=temperature), rtol=1e-4, atol=1e-6)
    # the ranking loss reads only the top-k of both models: exact whenever the cache holds them
    assert float(get_loss("rank")(s, cached)) == pytest.approx(float(get_loss("rank")(s, t)), abs=1e-6)


def test_rerun_of_a_complete_cache_changes_nothing_and_keeps_other_splits(tmp_path):
    root, _ = _build(tmp_path)
    meta_before = json.loads((root / "cache.json").read_text())
    _, summary = _build(tmp_path, ["cache.splits=[train]"])  # a narrower rerun
    assert summary["shards_written"] == 0 and summary["shards_reused"] == 3
    meta = json.loads((root / "cache.json").read_text())
    assert meta["status"] == "complete" and set(meta["splits"]) == {"train", "validation"}
    assert meta["splits"] == meta_before["splits"]
    assert teacher_cache.TeacherCache.open(root).meta["splits"]["validation"]["num_shards"] == 1


def test_low_precision_cache_is_renormalised():
    """bfloat16 logits are rounded; with the tail mass the cached probabilities still sum to one."""
    torch.manual_seed(0)
    t = torch.randn(50, 300) * 6 + 20  # large logits: bf16 rounding of ~0.06
    exact = TopKLogits.from_logits(t, 16)
    rounded = TopKLogits(exact.ids, exact.logits.to(torch.bfloat16), exact.log_normalizer, exact.tail_log_mass)
    for cached in (exact, rounded):
        lp, tail = cached.log_probs()
        total = lp.exp().sum(-1) + tail.exp()
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=2e-6)
    s = torch.randn(50, 300, requires_grad=True)
    a = get_loss("kl")(s, rounded, reduction="sum")
    b = _general_lumped_kl(s, rounded)
    ga, = torch.autograd.grad(a, s)
    gb, = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)  # the fused gradient is the value's gradient


def _general_lumped_kl(s, cached):
    """The forward KL through the general (unfused) path of apply_divergence."""
    from rlkd_cli import losses as L
    from rlkd_cli.losses.core import _kl_rows

    return L.apply_divergence(lambda ls, lt: _kl_rows(lt, ls), s, cached, None, reduction="sum")
