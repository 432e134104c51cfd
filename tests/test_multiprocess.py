"""Multi-process training: 2 processes (torchrun, gloo on the CPU) == 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, REPO, train


def _launch(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "rlkd_cli", *args]
    else:
        cmd = [sys.executable, "-m", "rlkd_cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _train_losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], l["loss"]) for l in lines if l["split"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    # teacher.seed=11: a tiny teacher no other test trains, so the 2-process launch must train it on first
    # use (in one process, under a file lock) before the distributed run starts
    over = QUICK + ["loss=kl+rank", "trainer.max_steps=4", "trainer.grad_accum=2", "trainer.log_every=1",
                    "trainer.eval_every=2", "trainer.save_every=0", "teacher.seed=11"]
    (tmp_path / "two").mkdir()
    two = _launch(["distill", *over], tmp_path / "two", nproc=2)  # no hydra.run.dir: one shared run dir
    assert two.returncode == 0, two.stderr[-3000:]
    outputs = tmp_path / "two" / "outputs" / "distill"
    runs = [p for p in outputs.iterdir() if not p.is_symlink()]
    assert len(runs) == 1, runs  # both processes wrote into the same run dir
    two_dir = runs[0]
    assert (outputs / "latest").resolve() == two_dir.resolve()  # written once, by process 0
    one_dir = tmp_path / "one"
    train("distill", over, one_dir)  # the reference, in this process (same cache: the teacher trained above)

    s2, s1 = (json.loads((d / "summary.json").read_text()) for d in (two_dir, one_dir))
    assert s2["processes"] == 2 and s1["processes"] == 1
    assert s2["train_tokens"] == s1["train_tokens"]
    # the same updates: weights after 4 steps agree to float32 round-off of the all-reduce
    w2 = load_file(str(two_dir / "checkpoints" / "step-000004" / "model.safetensors"))
    w1 = load_file(str(one_dir / "checkpoints" / "step-000004" / "model.safetensors"))
    assert w2.keys() == w1.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    # logged train losses (sums reduced over processes) and validation metrics (sharded, then reduced) agree
    for (a_step, a), (b_step, b) in zip(_train_losses(two_dir), _train_losses(one_dir), strict=True):
        assert a_step == b_step and a == pytest.approx(b, rel=1e-5)
    for key in ("val_loss", "cr@1", "cr@2", "or@5"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-6), key
    # one process wrote the checkpoint and the logs; the other stayed quiet
    assert sorted(p.name for p in (two_dir / "checkpoints").iterdir()) == ["latest", "step-000004"]
    done = [l for l in (two.stdout + two.stderr).splitlines() if "done:" in l and "[teacher]" not in l]
    assert len(done) == 1, done
