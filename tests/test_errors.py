"""The bad-input catalogue (docs/errors.md): every entry is one case here.

Each case runs the real CLI in-process (``rlkd <command> ...``) and checks what a user sees:
a non-zero exit code, exactly one line starting with ``error:`` that contains the documented text,
and no traceback. ``test_catalogue_matches_docs`` keeps docs/errors.md and this list in step.
"""

from __future__ import annotations

import errno
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK, REPO, TEACHER_ONLY, run_cli, train

DOCS = REPO / "docs" / "errors.md"
QUICK_NO_DATA = QUICK


# ----------------------------------------------------------------------------------------------
# Artefacts some cases need: one tiny distilled checkpoint for the session, and data files.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A finished 2-step distill run's final checkpoint (a complete rlkd checkpoint folder)."""
    run = tmp_path_factory.mktemp("ckpt-run")
    return Path(train("distill", QUICK + ["trainer.max_steps=2", "trainer.eval_every=0"], run)["checkpoint"])


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    out: dict[str, Path] = {}

    out["empty"] = root / "empty.jsonl"
    out["empty"].write_text("")
    out["malformed"] = root / "malformed.jsonl"
    out["malformed"].write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    out["columns"] = root / "columns.jsonl"
    out["columns"].write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(50)))

    # a checkpoint whose model.safetensors was cut short (a copy killed mid-write)
    out["truncated"] = root / "truncated"
    shutil.copytree(checkpoint, out["truncated"])
    weights = out["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # a model folder without weights (config only)
    out["no_weights"] = root / "no-weights"
    out["no_weights"].mkdir()
    shutil.copy(checkpoint / "config.json", out["no_weights"] / "config.json")

    # an old-style folder with pickled weights only (pytorch_model.bin)
    out["bin_only"] = root / "bin-only"
    out["bin_only"].mkdir()
    shutil.copy(checkpoint / "config.json", out["bin_only"] / "config.json")
    torch.save({"x": torch.zeros(1)}, out["bin_only"] / "pytorch_model.bin")

    # a checkpoint whose optimizer state holds a pickled Python object (not just tensors)
    out["pickled"] = root / "pickled"
    shutil.copytree(checkpoint, out["pickled"])
    torch.save({"state": {}, "param_groups": [], "payload": Path("/tmp")},
               out["pickled"] / "accelerate_state" / "optimizer.bin")

    # a folder that is not a checkpoint at all
    out["not_ckpt"] = root / "not-a-checkpoint"
    out["not_ckpt"].mkdir()

    # a checkpoint with another tokenizer (a different embedded BPE vocabulary)
    from rlkd_cli import models
    from rlkd_cli.data import tokenizer as tok_mod

    other_tok = tok_mod.embedded_tokenizer(root / "other-tok-cache", 600)
    out["other_tok"] = root / "other-tokenizer"
    model = models.build_from_arch({"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 1100},
                                   other_tok, seed=0)
    model.save_pretrained(out["other_tok"])
    other_tok.save_pretrained(out["other_tok"])

    # a run dir whose checkpoint was written with trainer.lr=3e-3 (for the changed-config case)
    out["changed"] = root / "changed-run"
    shutil.copytree(checkpoint.parent.parent / "checkpoints", out["changed"] / "checkpoints")

    # a small teacher cache (K=3) of the QUICK data, and a copy a kill left unfinished
    out["small_cache"] = root / "small-cache"
    train("cache-teacher", QUICK + ["cache.top_k=3", "metrics.ks=[1,2,3]", "loss=kl", "cache.shard_examples=256",
                                    f"cache.out={out['small_cache']}"], root / "cache-run")
    out["incomplete_cache"] = root / "incomplete-cache"
    shutil.copytree(out["small_cache"], out["incomplete_cache"])
    meta = json.loads((out["incomplete_cache"] / "cache.json").read_text())
    meta["status"] = "incomplete"
    meta["splits"]["train"]["shards_done"] = []  # killed in its first split: only the shards on disk tell
    meta["splits"]["validation"]["shards_done"] = []
    (out["incomplete_cache"] / "cache.json").write_text(json.dumps(meta))
    for shard in ("train/shard-000001", "train/shard-000002", "validation/shard-000000"):
        (out["incomplete_cache"] / f"{shard}.safetensors").unlink()

    # a cache folder with one shard of another teacher (its identity in the shard's metadata differs)
    from safetensors.torch import load_file, save_file

    out["mixed_cache"] = root / "mixed-cache"
    shutil.copytree(out["small_cache"], out["mixed_cache"])
    shard = out["mixed_cache"] / "train" / "shard-000001.safetensors"
    save_file(load_file(str(shard)), str(shard), metadata={"identity": "another-teachers"})

    # data files whose responses are all empty or null, or hold a list
    rows = [{"prompt": f"q{i}", "response": ["a", "list"] if i == 3 else f"a{i}"} for i in range(40)]
    out["list_response"] = root / "list-response.jsonl"
    out["list_response"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["nan_response"] = root / "nan-response.jsonl"  # JSON Lines' NaN literal, which Python's json reads as a float
    out["nan_response"].write_text("".join(('{"prompt": "q%d", "response": NaN}' if i == 3 else
                                            json.dumps({"prompt": f"q{i}", "response": f"a{i}"})) + "\n"
                                           for i in range(40)))
    rows = [{"prompt": f"q{i}", "response": "" if i % 2 else None} for i in range(40)]
    out["empty_responses"] = root / "empty-responses.jsonl"
    out["empty_responses"].write_text("".join(json.dumps(r) + "\n" for r in rows))

    # a tokenizer without an eos token (generation could never stop)
    from transformers import PreTrainedTokenizerFast

    no_eos = PreTrainedTokenizerFast(tokenizer_object=other_tok.backend_tokenizer, pad_token="<|pad|>")
    out["no_eos"] = root / "no-eos-tokenizer"
    no_eos.save_pretrained(out["no_eos"])

    # a finished run dir (reusing it without resume must be refused), and its last checkpoint (a model folder with
    # the embedded tokenizer)
    out["finished"] = checkpoint.parent.parent
    out["checkpoint"] = checkpoint
    # a copy of it whose trainer_state.json holds a step that is not a number
    out["bad_state"] = root / "bad-state-run"
    shutil.copytree(out["finished"], out["bad_state"], ignore=shutil.ignore_patterns(".rlkd*"))
    state_file = out["bad_state"] / "checkpoints" / checkpoint.name / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"step": 2', '"step": "two"'))

    # a checkpoint with one NaN weight (a diverged run's last save)
    from safetensors.torch import load_file, save_file

    out["nan_weights"] = root / "nan-weights"
    shutil.copytree(checkpoint, out["nan_weights"])
    weights = load_file(str(out["nan_weights"] / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(out["nan_weights"] / "model.safetensors"), metadata={"format": "pt"})

    # a LoRA run's checkpoint (rank 4), and a copy without its base/ folder
    lora = train("distill", QUICK + ["student.peft.r=4", "trainer.max_steps=2", "trainer.eval_every=0"],
                 root / "lora-run")
    out["lora"] = Path(lora["checkpoint"])
    out["lora_no_base"] = root / "lora-no-base"
    shutil.copytree(out["lora"], out["lora_no_base"])
    shutil.rmtree(out["lora_no_base"] / "base")  # as if this were the run's own folder, its base/ deleted
    adapter = json.loads((out["lora_no_base"] / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = str(out["lora_no_base"] / "base")
    (out["lora_no_base"] / "adapter_config.json").write_text(json.dumps(adapter))

    # a user's experiment presets (hydra.searchpath) that set a group / a key the evaluate command lacks
    out["presets"] = root / "presets"
    (out["presets"] / "experiment").mkdir(parents=True)
    (out["presets"] / "experiment" / "with_rollout.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /rollout: mixed\n")
    (out["presets"] / "experiment" / "with_key.yaml").write_text("# @package _global_\nfoo: {bar: 1}\n")
    return out


def _enospc(monkeypatch):
    """Every checkpoint write fails as on a full disk."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoints/optimizer.bin")

    monkeypatch.setattr(torch, "save", full)


def _unwritable(tmp_path: Path) -> str:
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: use a path under a file instead
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        return str(blocker / "run")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return str(locked / "run")


# (id, command, overrides, expected text in the error line). {name} fields are filled from `files`;
# {unwritable} from _unwritable; ENOSPC cases patch the writes.
CASES = [
    # unknown group options and keys
    ("unknown-loss", "distill", ["loss=foo"], "unknown loss 'foo'; available:"),
    ("unknown-trainer", "distill", ["trainer=fast"], "unknown trainer 'fast'; available: debug, default"),
    ("unknown-dataset", "distill", ["dataset=imagenet"], "unknown dataset 'imagenet'; available:"),
    ("unknown-student", "distill", ["student=huge"], "unknown student 'huge'; available: tiny"),
    ("unknown-key", "distill", ["trainer.maxsteps=3"], "unknown key trainer.maxsteps; did you mean trainer.max_steps?"),
    ("unknown-loss-term", "distill", ["+loss.terms.foo.weight=1"], "loss term 'foo' is not a registered loss"),
    ("unknown-loss-option", "distill", ["+loss.terms.kl.k=3"], "loss term 'kl' (forward_kl) has no option 'k'"),
    # wrong types
    ("lr-not-number", "distill", ["trainer.lr=abc"], "trainer.lr must be a finite number > 0, got 'abc'"),
    ("steps-not-int", "distill", ["trainer.max_steps=ten"], "trainer.max_steps must be an integer >= 1, got 'ten'"),
    ("ks-not-int", "distill", ["metrics.ks=[1,two]"], "metrics.ks must be a list of positive integers, got 'two'"),
    # out-of-range values
    ("steps-zero", "distill", ["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
    ("batch-negative", "distill", ["trainer.batch_size=-4"], "trainer.batch_size must be >= 1"),
    ("batch-vs-accum", "distill", ["trainer.grad_accum=3"], "must be a multiple of trainer.grad_accum"),
    ("keep-last-zero", "distill", ["trainer.keep_last=0"], "trainer.keep_last must be >= 1"),
    ("rank-k-zero", "distill", ["loss.terms.rank.k=0"], "k must be an integer >= 1"),
    ("rank-k-over-vocab", "distill", ["loss.terms.rank.k=5000"], "exceeds the vocabulary size"),
    ("weight-negative", "distill", ["loss.terms.kl.weight=-1"], "weight must be a finite number >= 0"),
    ("all-weights-zero", "distill", ["loss.terms.kl.weight=0", "loss.terms.rank.weight=0"],
     "all loss weights are zero"),
    ("temperature-zero", "distill", ["loss.temperature=0"], "loss.temperature must be a finite number > 0"),
    ("rank-tau-negative", "distill", ["loss.terms.rank.tau=-1"], "tau must be a finite number > 0"),
    ("max-length-too-small", "distill", ["dataset.max_length=1"], "dataset.max_length must be >= 2, got 1"),
    ("ks-zero", "distill", ["metrics.ks=[0,1]"], "metrics.ks must be a list of positive integers, got 0"),
    ("scheduler-unknown", "distill", ["trainer.scheduler=zigzag"], "is not a transformers schedule"),
    ("stop-after-zero", "distill", ["trainer.stop_after=0"], "trainer.stop_after must be >= 1"),
    # hardware that is not there
    ("cuda-missing", "distill", ["trainer.device=cuda"], "no CUDA device is visible"),
    ("bf16-on-cpu", "distill", ["trainer.device=cpu", "trainer.precision=bf16"],
     "trainer.precision=bf16 is for CUDA"),
    ("device-unknown", "distill", ["trainer.device=tpu"], "trainer.device must be one of auto, cpu, cuda, got 'tpu'"),
    # models, checkpoints and tokenizers
    ("teacher-missing-folder", "distill", ["teacher.name_or_path=/nonexistent/teacher"],
     "teacher.name_or_path '/nonexistent/teacher' does not exist"),
    ("teacher-hub-offline", "distill", ["teacher.name_or_path=some-org/some-model"],
     "cannot load tokenizer 'some-org/some-model'"),
    ("teacher-bin-only", "distill", ["teacher.name_or_path={bin_only}", "tokenizer.name_or_path={other_tok}"],
     "has no safetensors weights"),
    ("student-smaller-than-tokenizer", "distill", ["+student.arch.vocab_size=100"],
     "arch vocab_size 100 is smaller than the tokenizer"),
    ("resume-not-checkpoint", "distill", ["trainer.resume={not_ckpt}"], "not a complete rlkd checkpoint"),
    ("resume-truncated", "distill", ["trainer.resume={truncated}"], "is corrupt"),
    ("resume-pickled-state", "distill", ["trainer.resume={pickled}"], "not plain tensors"),
    ("resume-changed-config", "distill", ["trainer.resume=auto", "trainer.lr=0.1", "hydra.run.dir={changed}"],
     "the config differs in trainer.lr"),
    ("align-no-checkpoints", "measure-alignment", [],
     "no checkpoints to measure; pass checkpoints=[PATH,...] (e.g. checkpoints=[outputs/"),
    ("align-no-weights", "measure-alignment", ["checkpoints=[{no_weights}]"], "has no safetensors weights"),
    ("align-truncated", "measure-alignment", ["checkpoints=[{truncated}]"], "is corrupt"),
    ("align-other-tokenizer", "measure-alignment", ["checkpoints=[{other_tok}]"], "has a different tokenizer"),
    # data
    ("data-empty", "distill", ["dataset=jsonl", "dataset.path={empty}"], "is empty (no rows)"),
    ("data-malformed", "distill", ["dataset=jsonl", "dataset.path={malformed}"], "malformed JSON line"),
    ("data-missing-column", "distill", ["dataset=jsonl", "dataset.path={columns}"],
     "columns 'prompt', 'response' not found"),
    ("data-missing-file", "distill", ["dataset=jsonl", "dataset.path=/nonexistent/data.jsonl"],
     "no such file or folder '/nonexistent/data.jsonl'"),
    ("data-no-path", "distill", ["dataset=jsonl"], "dataset=jsonl needs dataset.path"),
    ("data-hub-offline", "distill", ["dataset=gsm8k"], "cannot load dataset 'openai/gsm8k' from the hub"),
    # the file system
    ("output-unwritable", "distill", ["hydra.run.dir={unwritable}"], "choose a writable location with hydra.run.dir="),
    ("disk-full", "distill", ["trainer.max_steps=2", "trainer.eval_every=0"], "the disk is full"),
    # scale-out: chunking, the teacher cache, several processes
    ("chunk-size-zero", "distill", ["trainer.chunk_size=0"], "trainer.chunk_size must be auto or an integer >= 1"),
    ("cache-missing", "distill", ["teacher.cache=/nonexistent/cache"], "teacher.cache '/nonexistent/cache' is not a folder"),
    ("cache-not-a-cache", "distill", ["teacher.cache={not_ckpt}"], "is not a teacher cache (no cache.json)"),
    ("cache-incomplete", "distill", ["teacher.cache={incomplete_cache}"], "is incomplete (1/4 shards)"),
    ("cache-k-too-small", "distill", ["teacher.cache={small_cache}"], "has k=5 but teacher cache"),
    ("cache-other-data", "distill", ["teacher.cache={small_cache}", "loss=kl", "metrics.ks=[1,2,3]",
                                     "dataset.num_train=500"], "was built from another 'train' split"),
    ("cache-top-k-zero", "cache-teacher", ["cache.top_k=0"], "cache.top_k must be >= 1, got 0"),
    ("cache-dtype-unknown", "cache-teacher", ["cache.dtype=int8"], "cache.dtype must be one of float32, bfloat16, float16"),
    ("cache-k-below-rank-k", "cache-teacher", ["cache.top_k=3"], "ranks the top-5 but cache.top_k=3"),
    ("multiprocess-no-store", "distill", [], "has no torchrun store to agree on a run dir"),
    # misuse that used to be silent (issue 12)
    ("student-other-tokenizer", "distill", ["teacher.name_or_path={checkpoint}", "student.name_or_path={other_tok}"],
     "student '{other_tok}' has a different tokenizer from the run's"),
    ("sft-other-tokenizer", "sft", ["teacher.name_or_path={other_tok}", "tokenizer.name_or_path={checkpoint}"],
     "teacher '{other_tok}' has a different tokenizer from the run's"),
    ("cache-teacher-other-tokenizer", "cache-teacher", ["teacher.name_or_path={other_tok}",
                                                         "tokenizer.name_or_path={checkpoint}"],
     "teacher '{other_tok}' has a different tokenizer from the run's"),
    ("evaluate-other-tokenizer", "evaluate", ["model.name_or_path={other_tok}", "tokenizer.name_or_path={checkpoint}"],
     "model '{other_tok}' has a different tokenizer from the run's"),
    ("unknown-trainer-key", "distill", ["+trainer.max_step=3"],
     "unknown key trainer.max_step; did you mean trainer.max_steps?"),
    ("unknown-dataset-key", "distill", ["+dataset.max_lenght=32"],
     "unknown key dataset.max_lenght; did you mean dataset.max_length?"),
    ("align-limit-negative", "measure-alignment", ["checkpoints=[{checkpoint}]", "limit=-250"],
     "limit must be >= 1, got -250"),
    ("eval-examples-negative", "distill", ["trainer.eval_examples=-1"], "trainer.eval_examples must be >= 1, got -1"),
    ("eval-examples-zero", "distill", ["trainer.eval_examples=0"], "trainer.eval_examples must be >= 1, got 0"),
    ("data-all-empty-responses", "distill", ["dataset=jsonl", "dataset.path={empty_responses}",
                                             "dataset.validation_size=5"], "has a missing, null or empty response"),
    ("data-list-response", "distill", ["dataset=jsonl", "dataset.path={list_response}", "dataset.validation_size=5"],
     "holds a list in column 'response'"),
    ("cache-other-teacher", "distill", ["teacher.cache={small_cache}", "loss=kl", "metrics.ks=[1,2,3]",
                                        "teacher.name_or_path={checkpoint}"], "not teacher.name_or_path="),
    ("rundir-reused", "distill", ["hydra.run.dir={finished}"], "already holds a run"),
    # run dirs, resume (more in tests/test_rundir.py)
    ("resume-max-steps-changed", "distill", ["hydra.run.dir={finished}", "trainer.resume=auto", "trainer.eval_every=0",
                                             "trainer.max_steps=5"],
     "trainer.max_steps changed from 2 to 5, which changes the learning-rate schedule"),
    ("resume-state-not-a-number", "distill", ["hydra.run.dir={bad_state}", "trainer.resume=auto",
                                              "trainer.eval_every=0", "trainer.max_steps=2"],
     "holds no complete checkpoint (step-000002 lacks a readable trainer_state.json)"),
    ("resume-state-path-not-a-number", "distill", ["trainer.resume={bad_state}/checkpoints/step-000002",
                                                   "trainer.eval_every=0", "trainer.max_steps=2"],
     "not a complete rlkd checkpoint (missing a readable trainer_state.json)"),
    ("cache-temperature-inf", "cache-teacher", ["cache.temperatures=[inf]"],
     "cache.temperatures must be a list of numbers (each > 0), got inf"),
    ("disk-full-torch", "distill", ["trainer.max_steps=2", "trainer.eval_every=0"], "the disk is full"),
    ("eval-examples-not-int", "distill", ["trainer.eval_examples=abc"],
     "trainer.eval_examples must be null or an integer >= 1, got 'abc'"),
    ("ks-not-a-list", "distill", ["metrics.ks=5"], "metrics.ks must be a list of positive integers"),
    ("seed-not-int", "distill", ["seed=abc"], "seed must be an integer, got 'abc'"),
    ("betas-out-of-range", "distill", ["trainer.betas=[1.5,0.9]"],
     "trainer.betas must be a list of numbers (each >= 0 and < 1), got 1.5"),
    ("rundir-with-spaces", "distill", ["hydra.run.dir={tmp}/my runs/ä"], "quote a value with spaces"),
    ("rundir-empty", "distill", ["hydra.run.dir="], "hydra.run.dir is empty"),
    # on-policy distillation (issue 13)
    ("rollout-lmbda", "distill", ["rollout=mixed", "rollout.lmbda=1.5"],
     "rollout.lmbda must be a finite number >= 0 and <= 1, got 1.5"),
    ("rollout-max-new-tokens", "distill", ["rollout=student", "rollout.max_new_tokens=0"],
     "rollout.max_new_tokens must be >= 1, got 0"),
    ("rollout-temperature", "distill", ["rollout=student", "rollout.temperature=0"],
     "rollout.temperature must be > 0 when sampling"),
    ("rollout-top-p", "distill", ["rollout=student", "rollout.top_p=1.5"],
     "rollout.top_p must be a finite number > 0 and <= 1, got 1.5"),
    ("rollout-no-eos", "distill", ["rollout=student", "tokenizer.name_or_path={no_eos}"], "has no eos token"),
    ("rollout-with-cache", "distill", ["rollout=student", "teacher.cache={small_cache}"],
     "rollout=student trains on generated responses, but teacher.cache"),
    ("generate-untrained-student", "generate", ["model=student"], "the student config is an untrained arch spec"),
    # real-scale controls (issue 14)
    ("lora-rank", "distill", ["student.peft.r=0"], "student.peft.r must be >= 1, got 0"),
    ("lora-targets", "distill", ["student.peft.r=4", "student.peft.target_modules=[nope]"],
     "cannot apply LoRA to the student"),
    ("teacher-device", "distill", ["teacher.device=cuda:7"], "teacher.device=cuda:7, but this machine has"),
    ("teacher-device-name", "distill", ["teacher.device=tpu"], "teacher.device 'tpu' is not a device name"),
    ("teacher-dtype", "distill", ["teacher.dtype=fp8"], "teacher.dtype must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("bool-value", "distill", ["trainer.gradient_checkpointing=maybe"],
     "trainer.gradient_checkpointing must be true or false, got 'maybe'"),
    # models, numerics, checks before loading (issues 18, 23)
    ("nan-teacher", "distill", ["teacher.name_or_path={nan_weights}"],
     "has non-finite weights: tensor 'model.layers.0.mlp.down_proj.weight' holds 1 NaN or Inf value(s)"),
    ("align-nan-weights", "measure-alignment", ["checkpoints=[{nan_weights}]"],
     "has non-finite weights: tensor 'model.layers.0.mlp.down_proj.weight'"),
    ("resume-nan-weights", "distill", ["trainer.resume={nan_weights}"],
     "has non-finite weights: tensor 'model.layers.0.mlp.down_proj.weight'"),
    ("ks-over-vocab", "distill", ["metrics.ks=[1,5000]"],
     "metrics.ks holds 5000, more than the vocabulary's 931 tokens"),
    ("context-too-short", "distill", ["dataset.max_length=1024"],
     "the teacher takes at most 512 positions (max_position_embeddings in its config) but dataset.max_length=1024"),
    ("student-context-too-short", "distill", ["student.arch.max_position_embeddings=64", "dataset.max_length=100"],
     "the student takes at most 64 positions (max_position_embeddings in its config) but dataset.max_length=100; "
     "set dataset.max_length<=64, or use student.arch.max_position_embeddings"),
    ("student-missing-folder", "distill", ["student.name_or_path=/nonexistent/student"],
     "student.name_or_path '/nonexistent/student' does not exist"),
    ("lora-other-rank", "distill", ["student.peft.r=8", "trainer.resume={lora}", "trainer.force_resume=true"],
     "adapter does not fit this run's LoRA student (r=4, target_modules="),
    ("lora-no-base", "measure-alignment", ["checkpoints=[{lora_no_base}]"],
     "has no complete base/ folder and the base model its adapter names does not exist (base_model_name_or_path in"),
    # reports, evaluation and CLI messages (issues 18, 23)
    ("preset-group-missing", "evaluate", ["experiment=with_rollout", "hydra.searchpath=[file://{presets}]"],
     "experiment=with_rollout sets the config group 'rollout', which rlkd evaluate does not have"),
    ("preset-key-missing", "evaluate", ["experiment=with_key", "hydra.searchpath=[file://{presets}]"],
     "experiment=with_key sets the key 'foo', which rlkd evaluate does not have"),
    ("dash-option", "distill", ["--max_steps", "10"],
     "'--max_steps' is not an option of rlkd distill: settings are key=value overrides, e.g. trainer.max_steps=10"),
    # data, teachers, teacher cache, generate (issues 18 and 23)
    ("data-nan-text", "distill", ["dataset=jsonl", "dataset.path={nan_response}", "dataset.validation_size=5"],
     "{nan_response}:4 holds NaN (a number) in column 'response', where rlkd reads text"),
    ("tiny-teacher-on-real-data", "distill", ["dataset=gsm8k", "dataset.path={columns}", "dataset.validation_size=5",
                                              "teacher.allow_tiny_on_real_data=false"],
     "dataset 'gsm8k' needs a teacher: without teacher.name_or_path the embedded tiny teacher"),
    ("generate-limit-zero", "generate", ["limit=0"], "limit must be >= 1, got 0"),
    ("cache-mixed-shards", "distill", ["teacher.cache={mixed_cache}", "loss=kl", "metrics.ks=[1,2,3]"],
     "shard-000001.safetensors was written by another teacher, tokenizer, data set or cache settings"),
]


def _values(files: dict[str, Path], tmp_path: Path, args: list[str]) -> dict[str, str]:
    values = {k: str(v) for k, v in files.items()}
    values["unwritable"] = _unwritable(tmp_path) if any("{unwritable}" in a for a in args) else ""
    values["tmp"] = str(tmp_path)
    return values


def _expand(args: list[str], files: dict[str, Path], tmp_path: Path) -> list[str]:
    values = _values(files, tmp_path, args)
    return [a.format(**values) for a in args]


def _torch_disk_full(monkeypatch):
    """torch.save on a full disk: a RuntimeError with no errno (the disk then has no room left)."""
    from rlkd_cli import io

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(io, "low_space", lambda path: True)


@pytest.mark.parametrize("case_id, command, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(case_id, command, args, expected, files, tmp_path, monkeypatch):
    expected = expected.format(**_values(files, tmp_path, args))
    args = _expand(args, files, tmp_path)
    if case_id == "disk-full":
        _enospc(monkeypatch)
    if case_id == "disk-full-torch":
        _torch_disk_full(monkeypatch)
    if command in ("distill", "cache-teacher", "sft", "generate"):
        base = QUICK_NO_DATA if any(a.startswith("dataset=") for a in args) else QUICK
    else:
        base = TEACHER_ONLY
    if case_id == "multiprocess-no-store":  # as if launched as 1 of 2 processes by a launcher without a store
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        monkeypatch.chdir(tmp_path)
    elif not any(a.startswith("hydra.run.dir") for a in args):
        args = [*args, f"hydra.run.dir={tmp_path}/run"]
    res = run_cli([command, *base, *args])
    text = res.output.strip()
    assert res.exit_code == 2, text
    assert "Traceback" not in text
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, text
    assert expected in error_lines[0], error_lines[0]


def test_catalogue_matches_docs():
    """docs/errors.md has one table row per case, quoting the text each case checks."""
    doc = DOCS.read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and "<!-- " in line]
    assert len(rows) == len(CASES) >= 25
    for case_id, _, _, expected in CASES:
        hits = [r for r in rows if f"<!-- {case_id} -->" in r]
        assert len(hits) == 1, case_id
        for part in re.split(r"'?\{\w+\}'?", expected):  # paths filled in at run time are "…" in the docs
            assert part.replace("|", "\\|") in hits[0], (case_id, part)


def test_misuse_table_names_tests_that_exist():
    """The second table of docs/errors.md names, for each misuse, the test that covers it."""
    import ast as ast_mod

    doc = DOCS.read_text()
    named = re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?`", doc.split("## Misuse that is handled")[1])
    assert len(named) >= 20
    for path, name in named:
        source = (REPO / path).read_text()
        if name:
            defined = {n.name for n in ast_mod.walk(ast_mod.parse(source)) if isinstance(n, ast_mod.FunctionDef)}
            assert name in defined, (path, name)


def test_debug_flag_shows_the_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    plain = subprocess.run([sys.executable, "-m", "rlkd_cli", "distill", "trainer.max_steps=0",
                            f"hydra.run.dir={tmp_path}/a"],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    debug = subprocess.run([sys.executable, "-m", "rlkd_cli", "distill", "trainer.max_steps=0",
                            f"hydra.run.dir={tmp_path}/b", "--debug"],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == "error: trainer.max_steps must be >= 1, got 0; e.g. trainer.max_steps=1"
    assert debug.returncode == 2  # a user error is exit 2 with --debug too, after the traceback
    assert "Traceback" in debug.stderr and "RlkdError: trainer.max_steps must be >= 1" in debug.stderr


def test_a_missing_data_set_is_refused_before_a_teacher_trains_on_it(tmp_path, monkeypatch):
    from rlkd_cli.teachers import tiny

    def no_training(*args, **kwargs):
        raise AssertionError("the tiny teacher started training on a data set that cannot be found")

    monkeypatch.setattr(tiny, "train", no_training)
    res = run_cli(["distill", *QUICK_NO_DATA, "dataset=jsonl", "dataset.path=/nonexistent/data.jsonl",
                   f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"])  # no cached teacher
    assert res.exit_code == 2 and "no such file or folder '/nonexistent/data.jsonl'" in res.output, res.output


@pytest.mark.parametrize("data", ["empty", "columns"])
def test_bad_data_is_refused_before_any_tokenizer_teacher_or_model_work(data, files, tmp_path, monkeypatch):
    """An empty file, or one without the columns, is one line before the run builds a tokenizer, trains a
    tiny teacher (no cached one here) or loads a model, and before any "training it now" warning."""
    from rlkd_cli import models
    from rlkd_cli.data import tokenizer as tok_mod
    from rlkd_cli.teachers import tiny

    def too_early(*args, **kwargs):
        raise AssertionError("tokenizer, teacher or model work before the data set was checked")

    for module, name in ((tiny, "train"), (tok_mod, "for_run"), (models, "load_pretrained"), (models, "load_model")):
        monkeypatch.setattr(module, name, too_early)
    res = run_cli(["distill", *QUICK, "dataset=jsonl", f"dataset.path={files[data]}", f"cache_dir={tmp_path}/cache",
                   f"hydra.run.dir={tmp_path}/run"])
    assert res.exit_code == 2, res.output
    # nothing but the run dir's line (every run prints it first) and the error
    assert [line for line in res.output.splitlines() if line.strip() and ": run dir " not in line] == \
        [next(line for line in res.output.splitlines() if line.startswith("error:"))], res.output
    assert ("is empty (no rows)" if data == "empty" else "columns 'prompt', 'response' not found") in res.output


def test_an_unreachable_hub_is_one_line_without_retry_warnings(tmp_path):
    """Not offline, but the hub cannot be reached: no "Retrying in 1s [Retry 1/5]" lines on either stream, at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # a port nobody listens on
    res = subprocess.run([sys.executable, "-m", "rlkd_cli", "distill", *QUICK, "dataset=gsm8k",
                          f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    # nothing but every run's first line (its run dir) on stdout, and the error on stderr
    assert [line for line in res.stdout.splitlines() if line.strip() and ": run dir " not in line] == []
    assert "Retry" not in res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: cannot load dataset 'openai/gsm8k' from the hub (offline or unreachable")
