"""Real-scale controls (issue 14): LoRA students, gradient checkpointing, teacher dtype/device, vocabulary padding."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import QUICK, REPO, TEACHER_ONLY, compose, run_cli, teacher_path, tokenizer_of, train
from test_chunking import VOCAB, make_batch, tiny_lm

from rlkd_cli import models
from rlkd_cli.engine import Trainer, train_step
from rlkd_cli.losses import Objective
from rlkd_cli.runtime import Runtime
from rlkd_cli.teachers.live import LiveTeacher

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
TC = {"lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0,
      "max_steps": 100, "max_grad_norm": 1.0, "split_head": True, "chunk_size": 7}


class _ShapeProbe(TorchDispatchMode):
    """Records every op output of a given shape that is new memory (not a view of the watched tensor)."""

    def __init__(self, shapes: set[tuple[int, ...]], watched: torch.Tensor):
        super().__init__()
        self.shapes, self.storage, self.hits = shapes, watched.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes \
                    and t.untyped_storage().data_ptr() != self.storage:
                self.hits.append(str(func))
        return out


def _trainer(student, split_head: bool = True) -> Trainer:
    runtime = Runtime.create({"device": "cpu"})
    teacher = LiveTeacher(tiny_lm(2, 48).requires_grad_(False).eval(), VOCAB)
    objective = Objective.from_config({"terms": {"kl": {"weight": 1.0}, "rank": {"weight": 1.0, "k": 3}}})
    return Trainer.create(runtime, student, objective=objective, teacher=teacher, vocab=VOCAB,
                          tc={**TC, "split_head": split_head})


def test_a_frozen_head_is_cast_to_the_autocast_dtype_once_a_trainable_one_every_time():
    from rlkd_cli.engine.chunking import split_lm

    frozen = split_lm(_lora_student(), VOCAB)
    w1, _ = frozen.cast(VOCAB, torch.bfloat16)
    w2, _ = frozen.cast(VOCAB, torch.bfloat16)
    assert w1 is w2 and w1.dtype == torch.bfloat16 and w1.shape[0] == VOCAB
    with torch.no_grad():  # frozen weights written in place (a load_state_dict, say): cast anew, never stale
        frozen.weight.mul_(2)
    w3, _ = frozen.cast(VOCAB, torch.bfloat16)
    assert w3 is not w1 and torch.equal(w3, (frozen.weight[:VOCAB]).to(torch.bfloat16))
    trainable = split_lm(tiny_lm(1, 32), VOCAB)
    a, _ = trainable.cast(VOCAB, torch.bfloat16)
    b, _ = trainable.cast(VOCAB, torch.bfloat16)
    assert a is not b and torch.equal(a, b)  # its weights change every step: never a stale copy


def _lora_student():
    return models.apply_peft(tiny_lm(1, 32), LORA, seed=0)


def test_frozen_lm_head_gets_no_gradient_buffer_and_lora_grads_match_full_logits():
    student = _lora_student()
    head = student.get_output_embeddings().weight
    assert not head.requires_grad and student.get_input_embeddings().weight is head  # tied and frozen
    trainer = _trainer(student)
    assert trainer.head is not None  # the chunked head path, not full logits
    probe = _ShapeProbe({tuple(head.shape), (VOCAB, head.shape[1])}, head)
    batch = make_batch()
    with probe:
        train_step(trainer, [batch])
    assert probe.hits == [] and head.grad is None
    assert all(p is not head for group in trainer.optimizer.param_groups for p in group["params"])

    # positive control: a fully trained student gets its [V, H] head gradient through the same probe
    full = tiny_lm(1, 32)
    w = full.get_output_embeddings().weight
    probe = _ShapeProbe({tuple(w.shape), (VOCAB, w.shape[1])}, w)
    with probe:
        train_step(_trainer(full), [batch])
    assert probe.hits, "the probe must see the head gradient of a trainable head"

    # the chunked head with a frozen head gives the LoRA weights the gradients of the plain full-logits path
    grads = {}
    for split in (True, False):
        t = _trainer(_lora_student(), split_head=split)
        from rlkd_cli.engine import batch_objective

        out = batch_objective(t, batch, split="train")
        out.total.backward()
        grads[split] = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora-run")
    summary = train("distill", QUICK + ["student.peft.r=4", "trainer.merge_adapter=true", "trainer.max_steps=4",
                                        "trainer.eval_every=0", "trainer.log_every=2", "trainer.device=cpu"], run)
    return run, summary


PLAIN_PEFT = textwrap.dedent("""
    import json, sys, torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM
    ckpt, out = sys.argv[1], sys.argv[2]
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    logits = {
        "auto": AutoPeftModelForCausalLM.from_pretrained(ckpt)(ids).logits,
        "base+adapter": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt + "/base"), ckpt)(ids).logits,
        "merged": AutoModelForCausalLM.from_pretrained(ckpt + "/merged")(ids).logits,
    }
    torch.save({k: v.detach() for k, v in logits.items()}, out)
    print(json.dumps({"rlkd_cli_imported": any(m.startswith("rlkd_cli") for m in sys.modules)}))
""")


def test_lora_checkpoint_loads_with_plain_peft_in_a_python_without_rlkd(lora_run, tmp_path):
    run, summary = lora_run
    ckpt = Path(summary["checkpoint"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.json", "base/model.safetensors",
                 "merged/model.safetensors"):
        assert (ckpt / name).is_file(), name
    assert not (ckpt / "model.safetensors").exists()  # the frozen base is not written as if it were trained
    assert 0 < summary["params/trainable"] < summary["params/total"] / 5
    res = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(ckpt), str(tmp_path / "logits.pt")], cwd=tmp_path,
                         capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"rlkd_cli_imported": False}
    theirs = torch.load(tmp_path / "logits.pt")
    ours = models.load_pretrained(str(ckpt), role="student")(torch.tensor([[1, 5, 9, 14, 3, 7]])).logits.detach()
    for name, logits in theirs.items():
        torch.testing.assert_close(logits, ours, rtol=1e-4, atol=1e-4, msg=name)
    # the adapter trained (B is zero at initialisation): merged weights differ from the base's
    base = load_file(str(ckpt / "base" / "model.safetensors"))
    merged = load_file(str(ckpt / "merged" / "model.safetensors"))
    assert any(not torch.equal(base[k], merged[k]) for k in base if "proj" in k)
    # memory per log step
    train_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["split"] == "train"]
    assert train_rows and all(r["mem/peak_rss_mb"] > 50 for r in train_rows)
    # the run's peak is its training's: the highest of its log windows (set-up's memory is not in it)
    assert summary["mem/peak_rss_mb"] == max(r["mem/peak_rss_mb"] for r in train_rows)


def test_measure_alignment_evaluate_and_generate_take_an_adapter_checkpoint(lora_run, tmp_path):
    run, summary = lora_run
    ckpt = summary["checkpoint"]
    res = run_cli(["measure-alignment", *TEACHER_ONLY, f"checkpoints=[{ckpt}]", "limit=16",  # trainer=debug validates 16
                   f"hydra.run.dir={tmp_path}/ma"])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "ma" / "alignment.json").read_text())["checkpoints"][0]
    for key in ("cr@2", "or@5"):  # the final validation of the run, measured again from the adapter checkpoint
        assert row[key] == pytest.approx(summary[key], abs=1e-6), key
    res = run_cli(["generate", *QUICK, "model=student", f"model.name_or_path={ckpt}", "dataset.limit=4",
                   "generation.max_new_tokens=8", f"hydra.run.dir={tmp_path}/gen"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "gen" / "generations.jsonl").read_text().splitlines()) == 4
    res = run_cli(["evaluate", *TEACHER_ONLY, f"model.name_or_path={ckpt}", "eval.limit=4",
                   "eval.max_new_tokens=8", f"hydra.run.dir={tmp_path}/ev"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["models"][0]["examples"] == 4


def test_lora_resume_refuses_an_adapter_trained_on_other_base_weights(tmp_path):
    from rlkd_cli.errors import RlkdError

    model = _lora_student()
    models.save_adapter_model(model, tmp_path / "ckpt", merge=False, base_source=None)  # writes base/
    models.load_adapter_weights(_lora_student(), tmp_path / "ckpt")  # the same base: loads
    other = _lora_student()
    with torch.no_grad():
        other.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.add_(1e-3)
    with pytest.raises(RlkdError, match="trained on other base weights"):
        models.load_adapter_weights(other, tmp_path / "ckpt")


def test_lora_resume_is_bit_identical(tmp_path):
    args = QUICK + ["student.peft.r=4", "student.peft.dropout=0.1", "trainer.max_steps=6", "trainer.eval_every=0",
                    "trainer.save_every=0"]
    straight = train("distill", args, tmp_path / "straight")
    train("distill", args + ["trainer.stop_after=3"], tmp_path / "resumed")
    resumed = train("distill", args + ["trainer.resume=auto"], tmp_path / "resumed")
    a = load_file(str(Path(straight["checkpoint"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["checkpoint"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["val_loss"] == resumed["val_loss"]


GRADIENT_CHECKPOINTING = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from transformers import AutoConfig, AutoModelForCausalLM
    from rlkd_cli import models
    from rlkd_cli.engine import Trainer, train_step
    from rlkd_cli.losses import Objective
    from rlkd_cli.runtime import Runtime, peak_rss_mb
    torch.set_num_threads(1)
    runtime = Runtime.create({"device": "cpu"})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (8, 256), generator=g)
    labels = ids.clone(); labels[:, :64] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tc = {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0,
          "max_steps": 10, "max_grad_norm": None, "split_head": True, "chunk_size": 512}
    out, before = {}, None
    # checkpointed first; both peaks are measured from the RSS before the first step, so memory the allocator
    # kept from the first run (rlkd keeps freed memory for reuse) is counted once, not twice
    for gc in (True, False):
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=256, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=4, intermediate_size=1024,
                                   max_position_embeddings=512)
        model = AutoModelForCausalLM.from_config(cfg)
        if gc:
            models.enable_gradient_checkpointing(model)
        trainer = Trainer.create(runtime, model, objective=Objective.from_config({"terms": {"ce": {"weight": 1.0}}}),
                                 teacher=None, vocab=512, tc=tc)
        peak_rss_mb(reset=True)
        before = peak_rss_mb() if before is None else before
        result = train_step(trainer, [batch])
        out[str(gc)] = {"loss": result.sums["loss"] / result.positions, "grad_norm": result.grad_norm,
                        "peak_mb": peak_rss_mb() - before}
    print(json.dumps(out))
""")


def test_gradient_checkpointing_gives_the_same_loss_at_a_lower_peak_memory():
    res = subprocess.run([sys.executable, "-c", GRADIENT_CHECKPOINTING, str(REPO)], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    on, off = out["True"], out["False"]
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)
    assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-4)
    # activations of 3 layers x 8 x 256 positions: ~150 MiB saved; checkpointing keeps about one layer's
    # (measured here: about 170 MiB against 300 MiB; the optimizer state and gradients are in both)
    assert on["peak_mb"] < 0.75 * off["peak_mb"] and off["peak_mb"] - on["peak_mb"] > 64, out


def test_bf16_teacher_on_cpu_and_the_teacher_device(tmp_path):
    from rlkd_cli.teachers import live

    cfg = compose("distill", QUICK + ["teacher.dtype=bf16", "teacher.device=cpu", "trainer.device=cpu"])
    tok = tokenizer_of(cfg)
    runtime = Runtime.create(cfg.trainer)
    model, _ = live.load(cfg, tok, runtime)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32, _ = live.load(compose("distill", QUICK + ["trainer.device=cpu"]), tok, runtime)
    ids = torch.tensor([tok.encode("12 + 7 = 19")])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    idx = torch.arange(ids.numel())
    lo = LiveTeacher(model, len(tok)).rows(batch, idx)[0:ids.numel()].float()
    hi = LiveTeacher(fp32, len(tok)).rows(batch, idx)[0:ids.numel()]
    assert (lo - hi).abs().max() < 0.05 * (1 + hi.abs().max())
    summary = train("distill", QUICK + ["teacher.dtype=bf16", "trainer.max_steps=3", "trainer.eval_every=0"],
                    tmp_path / "bf16")
    reference = train("distill", QUICK + ["trainer.max_steps=3", "trainer.eval_every=0"], tmp_path / "fp32")
    assert summary["val_loss"] == pytest.approx(reference["val_loss"], rel=0.02)


def test_teacher_and_student_vocabularies_differing_only_by_padding_rows(tmp_path):
    cfg = compose("distill", QUICK)
    tok = tokenizer_of(cfg)
    teacher = models.load_pretrained(str(teacher_path(cfg)), role="teacher")
    teacher.resize_token_embeddings(len(tok) + 64)  # the padding rows a hub teacher often has (151936 vs 152064)
    with torch.no_grad():  # large rows: read by mistake, they would change every softmax's normaliser
        teacher.get_output_embeddings().weight[len(tok):] = 10.0
    teacher.save_pretrained(tmp_path / "padded-teacher")
    tok.save_pretrained(tmp_path / "padded-teacher")
    common = QUICK + ["trainer.max_steps=3", "trainer.eval_every=0"]
    padded = train("distill", common + [f"teacher.name_or_path={tmp_path / 'padded-teacher'}",
                                        f"+student.arch.vocab_size={len(tok) + 128}"], tmp_path / "padded")
    plain = train("distill", common + [f"teacher.name_or_path={teacher_path(cfg)}"], tmp_path / "plain")
    # a student with padding rows of its own trains too (its init differs with its shape: no loss to compare)
    assert padded["status"] == plain["status"] == "completed"
    # the teacher's padding rows never enter a softmax: with the same student, the same losses
    same_student = train("distill", common + [f"teacher.name_or_path={tmp_path / 'padded-teacher'}"],
                         tmp_path / "padded-teacher-only")
    assert same_student["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-6)


def test_a_new_memory_window_forgets_the_set_up_peak():
    """What train() does before its first step: set-up's memory (a teacher's training, loading) is not the run's."""
    runtime = Runtime.create({"device": "cpu"})
    x = torch.ones(100 * 2**20)  # 400 MiB, mapped on its own and returned when freed
    high = runtime.peak_memory(reset=False)["mem/peak_rss_mb"]
    assert runtime.peaks["mem/peak_rss_mb"] == high
    del x
    runtime.new_memory_window()
    assert runtime.peaks == {}
    now = runtime.peak_memory()["mem/peak_rss_mb"]
    assert now < high - 300 and runtime.peaks == {"mem/peak_rss_mb": now}
