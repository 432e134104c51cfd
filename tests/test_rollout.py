"""On-policy and sequence-level distillation: generated batches, their masks, every mode, exact resume, `rlkd generate`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, compose, run_cli, train
from rlkd_cli import rollout
from rlkd_cli.errors import RlkdError
from rlkd_cli.data.loader import Collator
from rlkd_cli.engine import chunking
from rlkd_cli.generation import HFGenerator, Sampling
from rlkd_cli.runtime import Runtime

PAD, EOS = 0, 9
RC = {"name": "student", "lmbda": 0.0, "max_new_tokens": 6, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
      "top_k": 0, "every": 1, "buffer_size": 0, "replay_ratio": 0.5, "increase": 0.1, "max_share": 1.0,
      "loss_eps": 0.0, "generator": "hf"}


class FixedGenerator:
    """Continuations chosen by the test: what the masks of a generated batch must be built from."""

    def __init__(self, outs):
        self.outs, self.prompts = outs, []

    def continuations(self, model, prompts, *, pad, stops, sampling):
        self.prompts.append([list(p) for p in prompts])
        return self.outs


def _rollouts(rc=RC, generator=None, model=None, prompts=None):
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    model = model or SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    src = rollout.Rollouts(dict(rc), base=None, model=model, runtime=Runtime.create({"device": "cpu"}),
                           tokenizer=tok, seed=0, max_length=20, prompts=prompts)
    if generator is not None:
        src.generator = generator
    return src


def test_generated_batch_masks_prompt_pad_and_eos_exactly():
    """Two prompts (lengths 3 and 2, right-padded as the loader makes them); one continuation stops at EOS."""
    batch = Collator(PAD)([{"input_ids": [5, 6, 7, 11, 12], "labels": [-100, -100, -100, 11, 12], "example_id": 4},
                           {"input_ids": [8, 3, 13], "labels": [-100, -100, 13], "example_id": 7}])
    gen = FixedGenerator([([21, 22, EOS], True), ([31, 32, 33, 34, 35], False)])
    src = _rollouts(generator=gen)
    out = src._generate(batch)
    assert gen.prompts == [[[5, 6, 7], [8, 3]]]  # the prompts only: the dataset's responses never reach generation
    assert out["input_ids"].tolist() == [[5, 6, 7, 21, 22, EOS, PAD], [8, 3, 31, 32, 33, 34, 35]]
    assert out["labels"].tolist() == [[-100, -100, -100, 21, 22, EOS, -100], [-100, -100, 31, 32, 33, 34, 35]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert out["example_ids"].tolist() == [4, 7]
    # the scored positions: the last prompt token predicts the first generated token, the token before EOS
    # predicts EOS (trained), no prompt token and no pad is a target; both models are read at these positions
    idx, targets = chunking.response_index(out["labels"])
    assert idx.tolist() == [2, 3, 4, 7 + 1, 7 + 2, 7 + 3, 7 + 4, 7 + 5]
    assert targets.tolist() == [21, 22, EOS, 31, 32, 33, 34, 35]
    flat = out["input_ids"].reshape(-1)
    assert (flat[idx + 1] == targets).all()  # no off-by-one: position t's target is token t+1
    stats = src.stats(1.0)
    assert stats["rollout/generated_tokens"] == 8 and stats["rollout/eos_share"] == 0.5
    assert stats["rollout/mean_length"] == 4.0


def test_rollout_prompts_are_cut_only_for_the_generated_length(tmp_path):
    """A long reference response made training cut the prompt to its last token; generation, which never uses
    that response, gets the whole prompt, cut from the left only to max_length - max_new_tokens (20 - 6)."""
    import datasets

    from rlkd_cli.data import dataset as D
    from rlkd_cli.data.tokenizer import embedded_tokenizer

    long_prompt = list(range(100, 116))  # 16 tokens
    prompts = datasets.Dataset.from_dict({"prompt_ids": [[1, 2, 3], long_prompt]})
    batch = Collator(PAD)([{"input_ids": [1, 2, 3, 11], "labels": [-100, -100, -100, 11], "example_id": 0},
                           {"input_ids": [115] + [12] * 19, "labels": [-100] + [12] * 19, "example_id": 1}])
    gen = FixedGenerator([([21, EOS], True), ([31, EOS], True)])
    src = _rollouts(generator=gen, prompts=prompts)
    out = src._generate(batch)
    assert gen.prompts == [[[1, 2, 3], long_prompt[-14:]]]
    assert out["input_ids"][1].tolist()[:16] == long_prompt[-14:] + [31, EOS]
    # the tokenized split keeps each example's whole prompt (up to max_length - 1) beside its cut training row
    tok = embedded_tokenizer(tmp_path / "cache", vocab_size=512, num_rows=1500)
    rows = [{"prompt": "one two three four five six seven eight", "response": " nine" * 40}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = D.build_split({**D.DEFAULTS, "name": "jsonl", "path": str(path), "validation_size": 0,
                           "max_length": 30}, tok, "test")
    whole = tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    row = split.dataset[0]
    assert row["prompt_ids"] == whole and row["labels"].count(-100) == 1  # training kept one prompt token


def test_hf_generator_stops_each_row_at_eos_and_restores_train_mode():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=PAD, eos_token_id=EOS, attention_dropout=0.5))
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    prompts = [[5, 6, 7], [8]]
    outs = HFGenerator().continuations(model, prompts, pad=PAD, stops=[EOS], sampling=Sampling(max_new_tokens=8))
    assert model.training and seen and not any(seen)  # eval (no dropout) while generating, train mode after
    for prompt, (tokens, ended) in zip(prompts, outs):
        assert 1 <= len(tokens) <= 8 and (tokens[-1] == EOS) == ended and EOS not in tokens[:-1]
        # greedy and left-padded in a batch == alone
        alone = HFGenerator().continuations(model, [prompt], pad=PAD, stops=[EOS], sampling=Sampling(max_new_tokens=8))
        assert alone[0] == (tokens, ended)


def test_modes_decide_steps_with_their_own_rng_and_adaptive_rises_when_validation_stalls():
    state = SimpleNamespace(step=0)
    mixed = _rollouts({**RC, "name": "mixed", "lmbda": 0.3}, generator=FixedGenerator([]))
    mixed.base = SimpleNamespace(next=lambda st: [])
    torch_state = torch.get_rng_state()
    for _ in range(400):
        mixed.next(state)
    assert torch.equal(torch.get_rng_state(), torch_state)  # decisions never touch torch's RNG
    share = mixed.stats()["rollout/generated_step_share"]
    assert 0.22 < share < 0.38, share
    adaptive = _rollouts({**RC, "name": "adaptive", "lmbda": 0.0, "increase": 0.25, "max_share": 0.6,
                          "loss_eps": 0.01})
    for loss in (2.0, 1.5, 1.495, 1.6, 1.2, 1.3, 1.25):
        adaptive.on_validation({"loss": loss})
    assert adaptive.share == pytest.approx(0.6)  # rose at 1.495 (< eps better), 1.6 and 1.3, capped at 0.6
    assert adaptive.best_val == 1.2


def test_rollout_state_round_trips_through_a_checkpoint_file(tmp_path):
    src = _rollouts({**RC, "name": "adaptive", "buffer_size": 3, "every": 2},
                    generator=FixedGenerator([([21, EOS], True), ([31, 32], False)]))
    batch = Collator(PAD)([{"input_ids": [5, 6, 11], "labels": [-100, -100, 11], "example_id": 1},
                           {"input_ids": [8, 13], "labels": [-100, 13], "example_id": 2}])
    src.current = [src._generate(batch)]
    src.rng.random()
    src.share, src.best_val = 0.4, 1.25
    src.save(tmp_path, 0)
    again = _rollouts({**RC, "name": "adaptive", "buffer_size": 3, "every": 2})
    again.load(tmp_path, 0)
    assert again.rng.random() == src.rng.random() and again.share == 0.4 and again.best_val == 1.25
    assert list(again.buffer) == list(src.buffer) and len(again.buffer) == 2
    for key in ("input_ids", "labels", "attention_mask", "example_ids"):
        assert torch.equal(again.current[0][key], src.current[0][key])
    assert again.total == src.total


def _weights(path: str) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
def test_mixed_with_lmbda_zero_is_bit_identical_to_off(tmp_path):
    over = QUICK + ["trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0"]
    off = train("distill", over + ["rollout=off"], tmp_path / "off")
    mixed = train("distill", over + ["rollout=mixed", "rollout.lmbda=0"], tmp_path / "mixed")
    a, b = _weights(off["checkpoint"]), _weights(mixed["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert mixed["rollout/generated_step_share"] == 0.0 and off["rollout"] == "off"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["student", "adaptive"])
def test_resume_with_generation_is_exact(mode, tmp_path):
    """SIGKILL-equivalent (stop_after, then resume=auto) == uninterrupted, with sampling, replay and reuse."""
    over = QUICK + [f"rollout={mode}", "trainer.max_steps=6", "trainer.eval_every=2", "trainer.save_every=0",
                    "rollout.max_new_tokens=12", "rollout.every=2", "trainer.log_every=1"]
    if mode == "adaptive":
        over += ["rollout.lmbda=0.5", "rollout.buffer_size=16", "rollout.increase=0.5"]
    full = train("distill", over, tmp_path / "full")
    half = train("distill", over + ["trainer.stop_after=3"], tmp_path / "split")
    assert half["status"] == "stopped"
    assert (Path(half["checkpoint"]) / "rollout_state_0.safetensors").is_file()
    done = train("distill", over + ["trainer.resume=auto"], tmp_path / "split")
    a, b = _weights(full["checkpoint"]), _weights(done["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("rollout/generated_tokens", "rollout/student_share"):
        assert full[key] == done[key], key


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [("student", []), ("mixed", ["rollout.lmbda=0.5"]),
                                         ("adaptive", ["rollout.buffer_size=8"]), ("teacher", [])])
def test_every_mode_distils_and_logs_what_it_generated(mode, extra, tmp_path):
    summary = train("distill", QUICK + [f"rollout={mode}", "trainer.max_steps=4", "trainer.eval_every=2",
                                        "trainer.log_every=2", "rollout.max_new_tokens=16", *extra], tmp_path)
    assert summary["status"] == "completed" and summary["rollout"] == mode
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["split"] == "train"]
    for key in ("rollout/generated_tokens", "rollout/mean_length", "rollout/eos_share", "rollout/student_share",
                "rollout/generated_step_share", "rollout/generation_time_share"):
        assert key in train_recs[-1] and key in summary, key
    if mode in ("student", "teacher"):
        assert summary["rollout/generated_step_share"] == 1.0 and summary["rollout/generated_tokens"] > 0
        assert 0 < summary["rollout/generation_time_share"] < 1 and 1 <= summary["rollout/mean_length"] <= 16


@pytest.mark.slow
def test_generate_writes_jsonl_that_dataset_jsonl_reads_back_and_resumes(tmp_path):
    from rlkd_cli.data import dataset as D

    over = ["dataset.num_train=600", "dataset.num_validation=32", "dataset.num_test=32",
            "teacher.arch.hidden_size=64", "teacher.arch.num_hidden_layers=1", "teacher.arch.intermediate_size=128",
            "teacher.train_if_missing.max_steps=30", "teacher.train_if_missing.batch_size=16",
            "teacher.train_if_missing.eval_every=0", "trainer.progress=false", "split=test", "dataset.limit=12",
            "generation.max_new_tokens=24", "generation.batch_size=5"]
    run = tmp_path / "gen"
    res = run_cli(["generate", *over, f"hydra.run.dir={run}"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(l) for l in (run / "generations.jsonl").read_text().splitlines()]
    examples = D.load_examples(compose("generate", over).dataset, "test")
    assert [l["id"] for l in lines] == [e["id"] for e in examples] and len(lines) == 12
    assert all(l["prompt"] == e["prompt"] and l["reference"] == e["reference"] for l, e in zip(lines, examples))
    assert all(1 <= l["generated_tokens"] <= 24 for l in lines)
    # read back as training data
    back = D.load_examples({**D.DEFAULTS, "name": "jsonl", "path": str(run / "generations.jsonl"),
                            "validation_size": 0}, "test")
    assert [b["prompt"] for b in back] == [l["prompt"] for l in lines if l["response"].strip()]
    # resumable: cut the file after 5 lines (and a torn one), rerun with resume=true: the same 12 lines
    text = (run / "generations.jsonl").read_text().splitlines()
    (run / "generations.jsonl").write_text("\n".join(text[:5]) + "\n" + text[5][:20])
    res = run_cli(["generate", *over, f"hydra.run.dir={run}", "resume=true"])
    assert res.exit_code == 0, res.output
    assert (run / "generations.jsonl").read_text().splitlines() == text
    res = run_cli(["generate", *over, f"hydra.run.dir={run}", "resume=true", "generation.max_new_tokens=8"])
    assert res.exit_code == 2 and "written with other settings (generation differ)" in res.output


@pytest.mark.slow
def test_generate_defaults_to_a_limited_number_of_test_prompts(tmp_path):
    """By default a few hundred test prompts, not the 20,000 train prompts (over an hour on a CPU)."""
    from conftest import TEACHER_ONLY
    from rlkd_cli.data import dataset as D

    cfg = compose("generate", [])
    assert cfg.split == "test" and cfg.limit == 256
    over = TEACHER_ONLY + ["trainer.progress=false", "limit=3", "generation.max_new_tokens=4"]
    res = run_cli(["generate", *over, f"hydra.run.dir={tmp_path}"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(l) for l in (tmp_path / "generations.jsonl").read_text().splitlines()]
    test = D.load_examples(compose("generate", over).dataset, "test")
    assert [l["prompt"] for l in lines] == [e["prompt"] for e in test[:3]]


@pytest.mark.slow
def test_offline_seqkd_distils_from_the_teacher_that_wrote_the_file(tmp_path, monkeypatch):
    """The documented recipe: rlkd generate, then rlkd distill dataset=jsonl on its output, with no teacher path.
    The teacher is the model named in the file (the cached tiny teacher), never a fresh one trained on it."""
    from conftest import TEACHER_ONLY, teacher_path
    from rlkd_cli.teachers import tiny

    gen = tmp_path / "gen"
    over = TEACHER_ONLY + ["trainer.progress=false", "split=test", "generation.max_new_tokens=16"]
    res = run_cli(["generate", *over, f"hydra.run.dir={gen}"])
    assert res.exit_code == 0, res.output
    writer = str(teacher_path(compose("generate", over)))
    lines = [json.loads(l) for l in (gen / "generations.jsonl").read_text().splitlines()]
    assert {(l["model"], l["role"]) for l in lines} == {(writer, "teacher")}

    def no_training(*args, **kwargs):
        raise AssertionError("a new tiny teacher was trained on the generated file")

    monkeypatch.setattr(tiny, "train", no_training)
    run = tmp_path / "distill"
    data = ["dataset=jsonl", f"dataset.path={gen / 'generations.jsonl'}", "dataset.validation_size=8"]
    summary = train("distill", QUICK + data + ["trainer.max_steps=2", "trainer.eval_every=0"], run)
    assert summary["status"] == "completed"
    assert yaml_load(run / "config.yaml")["teacher"]["name_or_path"] == writer
    # a file whose writer is gone is one line naming it, not a new teacher
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(json.dumps({**l, "model": str(tmp_path / "gone")}) + "\n" for l in lines))
    with pytest.raises(RlkdError, match=r"was generated by model .*gone \(its rows' \"model\"\), which is not here"):
        train("distill", QUICK + ["dataset=jsonl", f"dataset.path={moved}", "dataset.validation_size=8"],
              tmp_path / "d2")


def yaml_load(path):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))
