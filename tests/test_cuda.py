"""The CUDA path (issue 14): run by ``bench/gpu_check.sh`` on a GPU (``pytest -m cuda``); skipped elsewhere.

Tolerances, stated once:

* float32 on CUDA against float64 references: ``rtol 1e-5`` (values), ``2e-5`` (gradients) -- TF32 is
  off in these tests (``torch.backends.cuda.matmul.allow_tf32 = False``);
* bf16 autocast, chunked against unchunked (the student's head in bf16 both ways; the fp32 teacher
  computes in fp32 both ways, autocast being off for teachers): loss within ``1e-2`` relative,
  gradients within ``3e-2`` of the largest gradient entry -- bf16 has an 8-bit mantissa (relative
  rounding 4e-3), and the chunks change the order of the float32 sums;
* a teacher on another device than the student: the same validation loss within ``1e-4`` relative;
* resume on CUDA with ``torch.use_deterministic_algorithms(True)``: bit-identical weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QUICK, train
from test_chunking import OBJECTIVES, grads, make_batch, tiny_lm, trainer_like
from test_losses import REFS, random_logits, ref_rank, with_peaked_teacher

from rlkd_cli import losses as L
from rlkd_cli.engine import batch_objective
from rlkd_cli.runtime import Runtime

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _on_cuda(batch):
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
def test_chunked_equals_unchunked_in_bf16_on_cuda(objective_name):
    runtime = Runtime.create({"device": "cuda", "precision": "bf16"})
    assert runtime.precision == "bf16"
    objective = L.Objective.from_config(OBJECTIVES[objective_name])
    teacher = tiny_lm(1, 48).eval().cuda()
    batch = _on_cuda(make_batch())
    out = {}
    for chunk, split in ((10_000, False), (5, True)):
        student = tiny_lm(0, 32).cuda()
        res = batch_objective(trainer_like(runtime, student, teacher, objective, split_head=split, chunk=chunk),
                              batch, split="train")
        (res.total / res.count).backward()
        out[(chunk, split)] = (float(res.total) / res.count, grads(student))
    (a, ga), (b, gb) = out.values()
    assert a == pytest.approx(b, rel=1e-2)
    for name in ga:
        scale = float(ga[name].abs().max()) + 1e-12
        assert float((ga[name] - gb[name]).abs().max()) <= 3e-2 * scale, name


def test_fused_kl_cross_entropy_and_ranking_loss_against_float64_references_on_cuda():
    s = random_logits((2, 4, 11), seed=1)
    t = with_peaked_teacher(random_logits((2, 4, 11), seed=2))
    labels = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(3))
    for temperature in (1.0, 2.0):
        got = L.forward_kl(s.float().cuda(), t.float().cuda(), temperature=temperature, reduction="none").cpu()
        ref = np.array([[REFS["forward_kl"](s[b, i].numpy(), t[b, i].numpy(), temperature) for i in range(4)] for b in range(2)])
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    ce = L.cross_entropy(s.float().cuda(), None, labels=labels.cuda(), reduction="none").cpu().double()
    ref_ce = torch.logsumexp(s, -1) - s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    rank = L.ranking_loss(s.float().cuda(), t.float().cuda(), k=5, reduction="none").cpu().double()
    ref = torch.tensor([[ref_rank(s[b, i].numpy(), t[b, i].numpy(), k=5) for i in range(4)] for b in range(2)],
                       dtype=torch.float64)
    torch.testing.assert_close(rank, ref, rtol=1e-5, atol=1e-6)
    # gradients: float32 on CUDA against float64 on the CPU through the same fused backward
    sc = s.float().cuda().requires_grad_()
    g32, = torch.autograd.grad(L.forward_kl(sc, t.float().cuda(), reduction="sum")
                               + L.ranking_loss(sc, t.float().cuda(), k=5, reduction="sum"), sc)
    s64 = s.clone().requires_grad_()
    g64, = torch.autograd.grad(L.forward_kl(s64, t, reduction="sum") + L.ranking_loss(s64, t, k=5, reduction="sum"),
                               s64)
    torch.testing.assert_close(g32.cpu().double(), g64, rtol=2e-5, atol=2e-6)


def test_resume_on_cuda_is_bit_identical(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        args = QUICK + ["trainer.device=cuda", "trainer.max_steps=6", "trainer.eval_every=0", "trainer.save_every=0"]
        straight = train("distill", args, tmp_path / "straight")
        train("distill", args + ["trainer.stop_after=3"], tmp_path / "resumed")
        resumed = train("distill", args + ["trainer.resume=auto"], tmp_path / "resumed")
    finally:
        torch.use_deterministic_algorithms(False)
    assert straight["precision"] == "bf16" and straight["device"] == "cuda"
    a = load_file(str(Path(straight["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["checkpoint"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_with_gradient_checkpointing_on_cuda_logs_cuda_peak_memory(tmp_path):
    summary = train("distill", QUICK + ["trainer.device=cuda", "student.peft.r=4", "trainer.gradient_checkpointing=true",
                                        "trainer.max_steps=2", "trainer.eval_every=0"], tmp_path / "run")
    assert summary["device"] == "cuda" and summary["precision"] == "bf16"
    assert 0 < summary["mem/peak_cuda_mb"] < torch.cuda.get_device_properties(0).total_memory / 2**20
    assert (Path(summary["checkpoint"]) / "adapter_model.safetensors").is_file()


def test_a_teacher_on_another_device_gives_the_same_run(tmp_path):
    """teacher.device=cuda with the student on the CPU (each chunk's logits copied back) == both on the CPU."""
    common = QUICK + ["trainer.device=cpu", "trainer.max_steps=3", "trainer.eval_every=0"]
    apart = train("distill", common + ["teacher.device=cuda"], tmp_path / "apart")
    together = train("distill", common, tmp_path / "together")
    assert apart["val_loss"] == pytest.approx(together["val_loss"], rel=1e-4)
