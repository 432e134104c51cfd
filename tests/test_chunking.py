"""Chunked loss == unchunked loss: values and gradients, for every path the engine can take."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from types import SimpleNamespace

from rlkd_cli.config import group_options
from rlkd_cli.engine import batch_objective, chunking
from rlkd_cli.losses import Objective, TopKLogits
from rlkd_cli.metrics import shift_for_next_token
from rlkd_cli.runtime import Runtime
from rlkd_cli.teachers.live import LiveTeacher

VOCAB = 97  # the tokenizer's size; the models pad their vocabulary to 104 rows


def tiny_lm(seed: int, hidden: int, *, tie: bool = True, model_type: str = "llama") -> torch.nn.Module:
    torch.manual_seed(seed)
    if model_type == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=104, n_embd=hidden, n_layer=1, n_head=2, n_positions=64,
                                   tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    else:
        cfg = AutoConfig.for_model("llama", vocab_size=104, hidden_size=hidden, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * hidden,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # spread the logits so top-k orders are distinct and the losses non-trivial
        model.get_output_embeddings().weight.mul_(8.0)
    return model.float()


def make_batch(seed: int = 0, B: int = 3, T: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100                 # prompt
    labels[1, 9:] = -100                 # a shorter example (right padding)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference(student, teacher_logits_fn, objective, batch):
    """The plain computation: full logits, shift, one Objective call over the mask, mean over positions."""
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s, targets, mask = shift_for_next_token(s_logits, batch["labels"], VOCAB)
    t = teacher_logits_fn(batch)
    total, terms = objective(s, t, targets, mask, reduction="sum")
    return total, {k: float(v) for k, v in terms.items()}, int(mask.sum())


@pytest.fixture(scope="module")
def runtime():
    return Runtime.create({"device": "cpu"})


def trainer_like(runtime, student, teacher, objective, *, split_head: bool, chunk: int):
    """What batch_objective reads of a Trainer: the module (a Trunk when the head is split), head, teacher, objective."""
    head = chunking.split_lm(student, VOCAB) if split_head else None
    module = chunking.Trunk(student) if head is not None else student
    return SimpleNamespace(runtime=runtime, module=module, head=head, objective=objective, vocab=VOCAB, chunk=chunk,
                           teacher=LiveTeacher(teacher, VOCAB, split_head=split_head) if teacher is not None else None)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


OBJECTIVES = {
    "kl+rank": {"terms": {"rank": {"weight": 1.0, "k": 5}, "kl": {"weight": 0.5}}},
    "js+ce": {"temperature": 2.0, "terms": {"js": {"weight": 1.0}, "ce": {"weight": 0.3}}},
    "akl+tvd": {"terms": {"akl": {"weight": 1.0}, "tvd": {"weight": 1.0}, "rank": {"weight": 0.5, "k": 3}}},
}


@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
@pytest.mark.parametrize("split_head", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_equals_unchunked_values_and_gradients(objective_name, split_head, chunk, runtime):
    objective = Objective.from_config(OBJECTIVES[objective_name])
    teacher = tiny_lm(1, 48).eval()
    batch = make_batch()

    def t_full(b):
        with torch.no_grad():
            return shift_for_next_token(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                        b["labels"], VOCAB)[0]

    ref_model = tiny_lm(0, 32)
    ref_total, ref_terms, count = reference(ref_model, t_full, objective, batch)
    (ref_total / count).backward()
    ref_grads = grads(ref_model)

    student = tiny_lm(0, 32)
    trainer = trainer_like(runtime, student, teacher, objective, split_head=split_head, chunk=chunk)
    assert (trainer.head is not None) == split_head
    out = batch_objective(trainer, batch, split="train")
    assert out.count == count
    torch.testing.assert_close(out.total.detach(), ref_total.detach(), rtol=1e-5, atol=1e-5)
    assert out.terms.keys() == ref_terms.keys()
    for key in ref_terms:
        assert out.terms[key] == pytest.approx(ref_terms[key], rel=1e-5, abs=1e-5), key
    (out.total / count).backward()
    got = grads(student)
    assert got.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_untied_head_with_bias_and_gpt2_is_split_exactly():
    untied = tiny_lm(3, 32, tie=False)
    untied.lm_head = torch.nn.Linear(32, 104, bias=True)  # a head with a bias
    for model in (untied, tiny_lm(4, 32, model_type="gpt2")):
        model.eval()  # no dropout
        head = chunking.split_lm(model, VOCAB)
        assert head is not None
        batch = make_batch(1)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :VOCAB]
        split = head(chunking.trunk_forward(model, batch["input_ids"], batch["attention_mask"]), VOCAB)
        torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)


def test_softcapped_and_scaled_heads_match_the_model():
    """Post-processing after the linear head (Gemma-2 softcap, Cohere scale) is reproduced, else refused."""
    model = tiny_lm(5, 32)
    model.config.final_logit_softcapping = 3.0  # Llama ignores it: the check must catch the mismatch
    assert chunking.split_lm(model, VOCAB) is None
    head = chunking.LMHead(model.get_output_embeddings().weight, None, scale=0.5, softcap=3.0)
    h = torch.randn(4, 32)
    expected = torch.tanh((h @ model.get_output_embeddings().weight[:VOCAB].T) * 0.5 / 3.0) * 3.0
    torch.testing.assert_close(head(h, VOCAB), expected)


def test_response_index_matches_the_shifted_mask():
    batch = make_batch(2, B=4, T=9)
    idx, targets = chunking.response_index(batch["labels"])
    _, t_ref, mask = shift_for_next_token(torch.zeros(4, 9, 3), batch["labels"], 3)
    flat = [b * 9 + t for b in range(4) for t in range(8) if mask[b, t]]
    assert idx.tolist() == flat
    assert targets.tolist() == t_ref[mask].tolist()


def test_cached_teacher_rows_give_the_same_loss_as_dense_when_k_covers_the_vocabulary():
    objective = Objective.from_config(OBJECTIVES["kl+rank"])
    teacher = tiny_lm(1, 48).eval()
    batch = make_batch()
    idx, targets = chunking.response_index(batch["labels"])
    dense = LiveTeacher(teacher, VOCAB).rows(batch, idx)
    cached = TopKLogits.from_logits(dense[0:len(dense)], VOCAB)
    student = tiny_lm(0, 32)
    head = chunking.split_lm(student, VOCAB)
    rows = chunking.gather_rows(chunking.trunk_forward(student, batch["input_ids"], batch["attention_mask"]), idx)
    a = chunking.objective_over_chunks(objective, chunking.StudentRows(rows, head, VOCAB), dense, targets, chunk_size=4)
    b = chunking.objective_over_chunks(objective, chunking.StudentRows(rows, head, VOCAB), cached, targets,
                                       chunk_size=7)
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-5)


def test_resolve_chunk_size():
    assert chunking.resolve_chunk_size("auto", 32000, "cuda") == 1048
    assert chunking.resolve_chunk_size("auto", 32000, torch.device("cpu")) == 131
    assert chunking.resolve_chunk_size("auto", 10**7, "cpu") == 16  # a floor for huge vocabularies
    assert chunking.resolve_chunk_size(300, 32000, "cpu") == 300


@pytest.mark.slow
def test_engine_trains_the_same_whatever_the_chunking(tmp_path):
    """Chunk size and head splitting change how the loss is computed, not what is trained."""
    import json

    from safetensors.torch import load_file

    from conftest import QUICK, train

    over = QUICK + ["loss=kl+rank", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.log_every=1",
                    "trainer.save_every=0", "trainer.eval_examples=8"]
    runs = {name: train("distill", over + extra, tmp_path / name)
            for name, extra in {"default": [], "chunk7": ["trainer.chunk_size=7"],
                                "full_logits": ["trainer.split_head=false"]}.items()}
    ref = load_file(str(tmp_path / "default" / "checkpoints" / "step-000003" / "model.safetensors"))
    ref_losses = [json.loads(l)["loss"] for l in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(l)["split"] == "train"]
    for name in ("chunk7", "full_logits"):
        got = load_file(str(tmp_path / name / "checkpoints" / "step-000003" / "model.safetensors"))
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        losses = [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                  if json.loads(l)["split"] == "train"]
        assert losses == pytest.approx(ref_losses, rel=1e-5), name
        assert runs[name]["cr@1"] == pytest.approx(runs["default"]["cr@1"], abs=1e-6)


@pytest.mark.parametrize("preset", [p for p in group_options("loss") if p != "ce"])
def test_every_loss_preset_builds_and_backpropagates(preset, runtime):
    """Every ``loss=<preset>`` composes, builds its objective, and gives finite terms and gradients on a batch."""
    from conftest import compose

    cfg = compose("distill", [f"loss={preset}"])
    objective = Objective.from_config(cfg.loss)
    expected = set(cfg.loss.terms)
    assert {key for key, *_ in objective.active_terms} == expected
    assert ("rank" in expected) == preset.endswith("rank")
    student = tiny_lm(0, 32)
    trainer = trainer_like(runtime, student, tiny_lm(1, 48).eval(), objective, split_head=True, chunk=5)
    out = batch_objective(trainer, make_batch(), split="train")
    assert set(out.terms) == expected and all(math.isfinite(v) for v in out.terms.values()), out.terms
    out.total.backward()
    g = grads(student)
    assert g and all(torch.isfinite(v).all() for v in g.values())
    assert any(v.abs().sum() > 0 for v in g.values())
