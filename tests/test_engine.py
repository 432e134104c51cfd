"""The shared engine: distill/sft end to end, exact resume, checkpoints loadable without rlkd, the sampler."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, compose, train
from rlkd_cli.data.loader import StepSampler
from rlkd_cli.errors import RlkdError

def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> tuple[dict, Path]:
    """One finished 8-step kl+rank distillation (several tests read it)."""
    run = tmp_path_factory.mktemp("distilled")
    return train("distill", QUICK + ["loss=kl+rank"], run), run


def test_distill_writes_metrics_summary_and_checkpoint(distilled):
    summary, run = distilled
    assert summary["status"] == "completed" and summary["step"] == 8
    saved = json.loads((run / "summary.json").read_text())
    for key in ("cr@1", "cr@2", "cr@3", "cr@5", "or@1", "or@2", "or@3", "or@5", "val_loss"):
        assert key in saved and 0.0 <= saved[key] <= (1.0 if "@" in key else 1e9), key
    assert saved["train_tokens"] > saved["train_positions"] > 0  # prompt tokens are input, not loss positions
    lines = _records(run)
    train_recs = [r for r in lines if r["split"] == "train"]
    val = [r for r in lines if r["split"] == "validation"]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
    assert {"loss", "loss/kl", "loss/rank", "cr@1", "or@5", "lr", "tokens_per_s", "positions_per_s"} <= set(train_recs[0])
    assert [r["step"] for r in val] == [0, 4, 8]  # step 0: the untrained student, where the curves start
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "step-000008"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000008"
    # keep_last=2 with save_every=4: step 4 and step 8 kept
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000004", "step-000008"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "rlkd_config.yaml",
                 "accelerate_state/optimizer.bin", "accelerate_state/scheduler.bin",
                 "accelerate_state/random_states_0.pkl"):
        assert (ckpt / name).exists(), name
    # trainer state loads with weights_only=True (no pickled code; Accelerate allows numpy arrays for the RNG
    # states), and the weights are stored once
    from accelerate.utils import load as accelerate_load

    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        accelerate_load(str(ckpt / "accelerate_state" / name))
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.load(ckpt / "accelerate_state" / name, weights_only=True)
    assert not list((ckpt / "accelerate_state").glob("*.safetensors"))


def test_checkpoint_loads_with_plain_transformers(distilled):
    ckpt = distilled[0]["checkpoint"]
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


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """N steps == N/2 steps, stop, resume=auto, N/2 steps: identical weights on CPU."""
    over = QUICK + ["loss=kl+rank", "trainer.max_steps=6", "trainer.save_every=0", "trainer.eval_every=0",
                    "trainer.log_every=1"]
    full = train("distill", over, tmp_path / "full")
    half = train("distill", over + ["trainer.stop_after=3"], tmp_path / "split")
    assert half["status"] == "stopped" and half["step"] == 3
    done = train("distill", over + ["trainer.resume=auto"], tmp_path / "split")
    assert done["step"] == 6
    a, b = _weights(Path(full["checkpoint"])), _weights(Path(done["checkpoint"]))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics.jsonl of the resumed run has each step once, like the uninterrupted run's
    steps = [r["step"] for r in _records(tmp_path / "split") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_resume_with_changed_config_is_refused(tmp_path):
    over = QUICK + ["loss=kl", "trainer.max_steps=4", "trainer.stop_after=2"]
    train("distill", over, tmp_path)
    with pytest.raises(RlkdError, match="config differs in trainer.lr"):
        train("distill", over + ["trainer.resume=auto", "trainer.lr=0.1"], tmp_path)


@pytest.mark.slow
def test_sft_trains_the_student_baseline_and_its_loss_falls(tmp_path):
    summary = train("sft", QUICK + ["model=student", "trainer.max_steps=16", "trainer.log_every=4"], tmp_path)
    assert summary["status"] == "completed" and summary["teacher"] is None
    losses = [r["loss/ce"] for r in _records(tmp_path) if r["split"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # 16 steps of lr 3e-3 on 600 examples: a clear drop
    cfg_saved = (Path(summary["checkpoint"]) / "config.json").read_text()
    assert '"hidden_size": 32' in cfg_saved  # the student config was trained


@pytest.mark.slow
def test_nonfinite_loss_stops_after_max_bad_steps(tmp_path):
    over = QUICK + ["loss=kl", "trainer.lr=1e30", "trainer.max_grad_norm=null", "trainer.max_bad_steps=2",
                    "trainer.max_steps=20"]
    with pytest.raises(RlkdError, match="consecutive steps had a non-finite"):
        train("distill", over, tmp_path)
    assert _records(tmp_path)[-1]["skipped_steps"] >= 2
    summary = json.loads((tmp_path / "summary.json").read_text())  # a failed run, not one that looks unfinished
    assert summary["status"] == "failed" and "consecutive steps had a non-finite" in summary["error"]


def test_sampler_is_deterministic_and_resumable():
    s = StepSampler(10, 4, seed=3)
    seq = [s.next_indices() for _ in range(5)]
    # 10 examples, batches of 4: two per epoch, the ragged end dropped
    assert len(set(seq[0] + seq[1])) == 8 and s.epoch == 2
    again = StepSampler(10, 4, seed=3)
    again.load_state_dict({"epoch": 1, "position": 4})
    assert again.next_indices() == seq[3]
    # two ranks split each global batch
    r0, r1 = StepSampler(10, 2, 3, 0, 2), StepSampler(10, 2, 3, 1, 2)
    assert r0.next_indices() + r1.next_indices() == seq[0]
    with pytest.raises(RlkdError, match="fewer than one batch"):
        StepSampler(3, 4, seed=0)


@pytest.mark.slow
def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path):
    """A run whose stdout is redirected (a SLURM log, ``> run.log``) shows one plain line per log step."""
    from conftest import run_cli

    res = run_cli(["distill", *QUICK, "trainer.progress=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert res.exit_code == 0, res.output[-3000:]
    lines = [line for line in res.output.splitlines() if "[distill] step " in line]
    assert [line.split("step ")[1].split(" ")[0] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    for line in lines:
        assert "loss " in line and "cr@1 " in line and "cr@2 " in line and "or@5 " in line
        assert "tok/s" in line and "elapsed" in line and "ETA" in line
    assert "validation at step 4/8" in res.output
    log = (tmp_path / "run" / "distill.log").read_text()  # and the run's log file has them too
    assert sum("[distill] step " in line for line in log.splitlines()) == 4
