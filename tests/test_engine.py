"""The shared engine: distill/sft end to end, exact resume, checkpoints loadable without rlkd."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, REPO, compose
from rlkd_cli import engine
from rlkd_cli.errors import RlkdError


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def test_distill_writes_metrics_summary_and_checkpoint(tmp_path):
    cfg = compose("distill", QUICK + ["loss=kl+rank"])
    summary = engine.train(cfg, tmp_path, mode="distill")
    assert summary["status"] == "completed" and summary["step"] == 8
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("cr@1", "cr@2", "cr@3", "cr@5", "or@1", "or@2", "or@3", "or@5", "val_loss"):
        assert key in saved and 0.0 <= saved[key] <= (1.0 if "@" in key else 1e9), key
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    val = [l for l in lines if l["split"] == "validation"]
    assert [l["step"] for l in train] == [2, 4, 6, 8]
    assert {"loss", "loss/kl", "loss/rank", "cr@1", "or@5", "lr"} <= set(train[0])
    assert [l["step"] for l in val] == [4, 8]
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "step-000008"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000008"
    # keep_last=2 with save_every=4: step 4 and step 8 kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000004", "step-000008"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pt", "trainer_state.json", "rlkd_config.yaml"):
        assert (ckpt / name).exists(), name
    # trainer state loads with weights_only=True (no pickled code)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        torch.load(ckpt / name, weights_only=True)


def test_checkpoint_loads_with_plain_transformers(tmp_path):
    cfg = compose("distill", QUICK + ["loss=kl"])
    ckpt = engine.train(cfg, tmp_path, mode="distill")["checkpoint"]
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({ckpt!r})\n"
        f"t = AutoTokenizer.from_pretrained({ckpt!r})\n"
        "ids = t('Question: Tom has 3 apples.', return_tensors='pt')\n"
        "out = m(**ids).logits\n"
        "assert out.shape[-1] >= len(t)\n"
        "assert 'rlkd_cli' not in sys.modules\n"
        "print('OK', len(t))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK")


def test_resume_is_exact(tmp_path):
    """N steps == N/2 steps, stop, resume=auto, N/2 steps: identical weights on CPU."""
    over = QUICK + ["loss=kl+rank", "trainer.max_steps=6", "trainer.save_every=0", "trainer.eval_every=0",
                    "trainer.log_every=1"]
    full = engine.train(compose("distill", over), tmp_path / "full", mode="distill")
    half = engine.train(compose("distill", over + ["trainer.stop_after=3"]), tmp_path / "split", mode="distill")
    assert half["status"] == "stopped" and half["step"] == 3
    done = engine.train(compose("distill", over + ["trainer.resume=auto"]), tmp_path / "split", mode="distill")
    assert done["step"] == 6
    a, b = _weights(Path(full["checkpoint"])), _weights(Path(done["checkpoint"]))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics.jsonl of the resumed run has each step once, like the uninterrupted run's
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_changed_config_is_refused(tmp_path):
    over = QUICK + ["loss=kl", "trainer.max_steps=4", "trainer.stop_after=2"]
    engine.train(compose("distill", over), tmp_path, mode="distill")
    with pytest.raises(RlkdError, match="config differs in trainer.lr"):
        engine.train(compose("distill", over + ["trainer.resume=auto", "trainer.lr=0.1"]), tmp_path, mode="distill")


def test_sft_trains_the_student_baseline(tmp_path):
    cfg = compose("sft", QUICK + ["model=student"])
    summary = engine.train(cfg, tmp_path, mode="sft")
    assert summary["status"] == "completed" and summary["teacher"] is None
    first, last = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
                   if json.loads(l)["split"] == "train"][::3][:2]
    assert "loss/ce" in first
    cfg_saved = (Path(summary["checkpoint"]) / "config.json").read_text()
    assert '"hidden_size": 32' in cfg_saved  # the student config was trained


def test_nonfinite_loss_stops_after_max_bad_steps(tmp_path):
    cfg = compose("distill", QUICK + ["loss=kl", "trainer.lr=1e30", "trainer.max_grad_norm=null",
                                      "trainer.max_bad_steps=2", "trainer.max_steps=20"])
    with pytest.raises(RlkdError, match="consecutive steps had a non-finite"):
        engine.train(cfg, tmp_path, mode="distill")
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_steps"] >= 2


def test_batch_stream_is_deterministic_and_resumable():
    s = engine.BatchStream(10, 4, seed=3)
    st = engine.TrainState()
    seq = [s.next(st) for _ in range(5)]
    # 10 examples, batches of 4: two per epoch, the ragged end dropped
    assert sorted(seq[0] + seq[1]) == sorted(set(seq[0] + seq[1])) and st.epoch == 2
    st2 = engine.TrainState(epoch=1, position=4)
    assert engine.BatchStream(10, 4, seed=3).next(st2) == seq[3]
    # two ranks split each global batch
    r0, r1 = engine.BatchStream(10, 2, 3, 0, 2), engine.BatchStream(10, 2, 3, 1, 2)
    a, b = engine.TrainState(), engine.TrainState()
    assert r0.next(a) + r1.next(b) == seq[0]


@pytest.mark.parametrize("preset", [p for p in __import__("rlkd_cli.config", fromlist=["x"]).group_options("loss")
                                    if p != "ce"])
def test_every_loss_preset_distills(preset, tmp_path):
    """`rlkd distill loss=<preset> trainer=debug` for every preset (2 steps here to keep the suite short)."""
    cfg = compose("distill", QUICK + [f"loss={preset}", "trainer.max_steps=2", "trainer.eval_every=0",
                                      "trainer.log_every=1", "trainer.eval_examples=8"])
    summary = engine.train(cfg, tmp_path, mode="distill")
    assert summary["status"] == "completed"
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    terms = [k for k in rec if k.startswith("loss/")]
    assert terms and all(math.isfinite(rec[k]) for k in terms), rec
    assert ("loss/rank" in rec) == preset.endswith("rank")
