"""The scale rows of the benchmark (``bench/run.py`` calls these; each measurement is a fresh process).

* **on-policy** (issue 13): one on-policy step, the student generating ``new_tokens`` tokens for each
  of the batch's prompts and then trained on them with forward KL, rlkd (``rollout=student``: the
  engine's :class:`~rlkd_cli.rollout.Rollouts` and ``train_step``) against TRL's
  ``DistillationTrainer`` (on-policy, ``beta=0``: forward KL) on the same models, prompts and
  generation length. Reported: generated tokens/s, step time, peak memory.
* **memory controls** (issue 14): the engine's kl step with a full-fine-tuned student, a LoRA student
  (``student.peft.r=8``), a frozen LM head (what LoRA's frozen head saves on its own) and gradient
  checkpointing: step time, peak memory, and the first step's loss (gradient checkpointing must not
  change it).
* **large models** (GPU only, ``--only large``): a Llama student of about 1.1 B parameters and a teacher
  of about 3.2 B at sequence length 1024, initialised directly on the GPU (the teacher in bf16, the
  student in fp32, teacher first), full fine-tuning
  and LoRA, rlkd's step against TRL's ``GKDTrainer`` on the same models (TRL with ``peft_config`` for
  LoRA).

The models are random-initialised (their speed does not depend on their weights); generation from
such a student rarely meets its EOS, so both systems generate the full ``new_tokens``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
#: The large-model row (GPU): a TinyLlama-1.1B-shaped student and a Llama-3.2-3B-shaped teacher.
LARGE = {
    "vocab": 32000,
    "teacher": {"hidden": 3072, "layers": 28, "heads": 24, "intermediate": 8192},
    "student": {"hidden": 2048, "layers": 22, "heads": 32, "intermediate": 5632},
    "batch": 4, "seq": 1024, "prompt": 256, "trl_steps": 4,
}
MEMORY_VARIANTS = ("full", "lora", "frozen_head", "gradient_checkpointing")
#: The memory rows' CPU setting: glibc maps every allocation of 64 KiB or more on its own and unmaps it
#: when freed (and rlkd's allocator tuning, ``runtime.tune_cpu_allocator``, stays off), so the resident
#: set follows the live tensors -- the CPU's counterpart of ``torch.cuda.max_memory_allocated``. With
#: the tuned allocator a process keeps freed activation memory for reuse, and its peak RSS (about 25 %
#: above the live peak at the default size) hides savings such as LoRA's optimizer state.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def word_tokenizer(vocab: int):
    """A word-level tokenizer with one word ``w<i>`` per id (ids 0-2: pad, bos, eos): prompts as text for TRL."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def prompts(spec: dict, n: int, seed: int = 1) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, spec["vocab"], (spec["prompt"],), generator=g).tolist() for _ in range(n)]


def _student(spec: dict, device: str, variant: str):
    """The bench student for a memory variant, on ``device``."""
    from common import make_model
    from rlkd_cli import models

    student = make_model(spec["student"], spec["vocab"], 2, device=device)
    if variant == "lora":
        student = models.apply_peft(student, LORA, seed=0)
    elif variant == "frozen_head":
        student.get_output_embeddings().weight.requires_grad_(False)
    elif variant == "gradient_checkpointing":
        models.enable_gradient_checkpointing(student)
    return student


# ----------------------------------------------------------------------------------------------
# Workers (each runs in its own process: bench/run.py --worker NAME --spec JSON)
# ----------------------------------------------------------------------------------------------

def worker_rlkd_onpolicy(spec: dict, device: str) -> dict:
    """rlkd's on-policy step: ``Rollouts`` (rollout=student) generates, then ``train_step`` trains on it."""
    from common import Memory, RlkdRunner, _preload, objective, sync
    from rlkd_cli import rollout
    from rlkd_cli.data.loader import Collator
    from rlkd_cli.engine import train_step

    _preload()
    memory = Memory(device)
    memory.reset()
    runner = RlkdRunner(spec, device)
    tokenizer = word_tokenizer(spec["vocab"])
    steps = spec["trl_steps"] + 1
    collate = Collator(0)
    rows = prompts(spec, spec["batch"] * steps)

    class PromptBatches:  # the dataset's side: each step's prompts (one response token, which generation replaces)
        def __init__(self):
            self.i = 0

        def next(self, state):
            part = rows[self.i * spec["batch"]:(self.i + 1) * spec["batch"]]
            self.i += 1
            return [collate([{"input_ids": p + [3], "labels": [-100] * len(p) + [3], "example_id": j}
                             for j, p in enumerate(part)])]

    rc = {"name": "student", "lmbda": 1.0, "max_new_tokens": spec["new_tokens"], "do_sample": True,
          "temperature": 1.0, "top_p": 1.0, "top_k": 0, "every": 1, "buffer_size": 0, "replay_ratio": 0.0,
          "increase": 0.0, "max_share": 1.0, "loss_eps": 0.0, "generator": "hf"}
    runner.trainer.objective = objective("kl")
    source = rollout.make_source(rc, PromptBatches(), trainer=runner.trainer, tokenizer=tokenizer, seed=0,
                                 max_length=spec["prompt"] + spec["new_tokens"])
    state = type("State", (), {"step": 0})()
    times, generated = [], []
    for s in range(steps):
        sync(device)
        t0 = time.perf_counter()
        before = source.total["tokens"]
        train_step(runner.trainer, source.next(state))
        sync(device)
        state.step += 1
        if s > 0:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t0)
            generated.append(source.total["tokens"] - before)
    return {"step_s": times, "generated_tokens": generated, "peak_bytes": memory.peak()}


def worker_trl_distill(spec: dict, device: str) -> dict:
    """TRL's on-policy ``DistillationTrainer`` (forward KL) on the same models, prompts and generation length."""
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from common import trl_models

    memory, teacher, student = trl_models(spec, device)
    tokenizer = word_tokenizer(spec["vocab"])
    tokenizer.padding_side = "left"
    steps = spec["trl_steps"] + 1
    ds = datasets.Dataset.from_list([{"prompt": " ".join(f"w{t}" for t in p)}
                                     for p in prompts(spec, spec["batch"] * steps)])
    counts = _count_generated(student, pad=0)
    timer = _Times(device, TrainerCallback)
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(
            output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=steps, learning_rate=1e-5,
            beta=0.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=spec["new_tokens"],
            logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=device == "cpu", bf16=device == "cuda",
            dataloader_num_workers=0, max_grad_norm=1.0, seed=0, lr_scheduler_type="constant", disable_tqdm=True,
            shuffle_dataset=False, gradient_checkpointing=False)  # TRL defaults to True; rlkd's step runs without
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                      processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return {"step_s": timer.times[1:], "generated_tokens": counts[1:], "peak_bytes": memory.peak()}


def _count_generated(model, *, pad: int) -> list[int]:
    """Wrap ``model.generate`` to count the tokens each call generates (non-pad tokens after the prompt)."""
    counts: list[int] = []
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        prompt = kwargs.get("input_ids", args[0] if args else None)
        seqs = getattr(out, "sequences", out)
        counts.append(int((seqs[:, prompt.shape[1]:] != pad).sum()))
        return out

    model.generate = generate
    return counts


def worker_rlkd_memory(spec: dict, device: str) -> dict:
    """The engine's kl step with the student of ``spec["variant"]`` (see :data:`MEMORY_VARIANTS`)."""
    from common import Memory, RlkdRunner, _preload, collate, make_examples, objective, sync, teacher_model
    from rlkd_cli import models

    _preload()
    if spec.get("live_memory"):  # see LIVE_MEMORY_ENV: glibc's default mapping, not rlkd's reuse of freed memory
        import rlkd_cli.runtime

        rlkd_cli.runtime.tune_cpu_allocator = lambda: False
    memory = Memory(device)
    memory.reset()
    teacher = teacher_model(spec, device)  # teacher first, then the student: the order TRL's workers use
    runner = RlkdRunner(spec, device, teacher=teacher, student=_student(spec, device, spec["variant"]))
    examples = make_examples(spec, spec["batch"] * (spec["trl_steps"] + 1), seed=1)
    kl = objective("kl")
    times, first_loss = [], None
    for s in range(spec["trl_steps"] + 1):
        batch = {k: v.to(runner.dev) for k, v in collate(examples[s * spec["batch"]:(s + 1) * spec["batch"]]).items()}
        sync(device)
        t0 = time.perf_counter()
        result = _step(runner, kl, batch)
        sync(device)
        if s == 0:
            first_loss = result.sums["loss"] / max(result.positions, 1)
        else:
            times.append(time.perf_counter() - t0)
    trainable, total = models.parameter_counts(runner.student)
    return {"step_s": times, "peak_bytes": memory.peak(), "first_loss": first_loss, "trainable": trainable,
            "total": total}


def worker_trl_large(spec: dict, device: str) -> dict:
    """TRL's GKDTrainer (off-policy, forward KL) on the large models, full fine-tuning or LoRA (peft_config)."""
    from peft import LoraConfig

    from run import worker_trl

    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM") if spec.get("variant") == "lora" else None
    return worker_trl(spec, device, peft_config=peft)


def _step(runner, objective, batch):
    import dataclasses

    from rlkd_cli.engine import train_step

    return train_step(dataclasses.replace(runner.trainer, objective=objective, teacher=runner.live), [batch])


class _Times:
    """A TrainerCallback timing each optimizer step (built on the callback class passed in)."""

    def __new__(cls, device: str, base):
        class Times(base):
            def __init__(self):
                self.times, self.t0 = [], None

            def on_step_begin(self, args, state, control, **kw):
                from common import sync

                sync(device)
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                from common import sync

                sync(device)
                self.times.append(time.perf_counter() - self.t0)

        return Times()


WORKERS = {"rlkd-onpolicy": worker_rlkd_onpolicy, "trl-distill": worker_trl_distill,
           "rlkd-memory": worker_rlkd_memory, "trl-large": worker_trl_large}


# ----------------------------------------------------------------------------------------------
# Rows (run in the parent process)
# ----------------------------------------------------------------------------------------------

def _median(run_list: list[dict], key: str = "step_s") -> float:
    return statistics.median([t for run in run_list for t in run[key]])


def onpolicy(spec: dict, device: str, run_worker) -> dict:
    """rlkd rollout=student vs TRL DistillationTrainer: generated tokens/s and peak memory."""
    runs: dict[str, list[dict]] = {"rlkd": [], "trl": []}
    for r in range(spec["trl_rounds"]):
        for system, worker in (("rlkd", "rlkd-onpolicy"), ("trl", "trl-distill")):
            out = run_worker(worker, spec, device)
            runs[system].append(out)
            print(f"  on-policy round {r + 1}: {system:5s} median step {statistics.median(out['step_s']) * 1e3:8.1f} "
                  f"ms, peak {out['peak_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    step = {s: _median(runs[s]) for s in runs}
    tokens = {s: statistics.median([sum(r["generated_tokens"]) / sum(r["step_s"]) for r in runs[s]]) for s in runs}
    peak = {s: statistics.median([r["peak_bytes"] for r in runs[s]]) for s in runs}
    return {"median_step_s": step, "generated_tokens_per_s": tokens, "peak_bytes": peak, "runs": runs,
            "new_tokens": spec["new_tokens"], "onpolicy_vs_trl_speedup": tokens["rlkd"] / tokens["trl"],
            "onpolicy_vs_trl_memory_ratio": peak["rlkd"] / peak["trl"]}


def memory(spec: dict, device: str, run_worker, variants=MEMORY_VARIANTS) -> dict:
    """Step time, peak memory and first loss of each memory variant (fresh processes, taking turns).

    On the CPU the workers run with :data:`LIVE_MEMORY_ENV`, so that their peak RSS is their live
    tensors' peak (see there); their step times are measured under the same setting.
    """
    env = LIVE_MEMORY_ENV if device == "cpu" else None
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(spec["trl_rounds"]):
        for v in variants:
            out = run_worker("rlkd-memory", {**spec, "variant": v, "live_memory": env is not None}, device, env)
            runs[v].append(out)
            print(f"  memory round {r + 1}: {v:22s} median step {statistics.median(out['step_s']) * 1e3:8.1f} ms, "
                  f"peak {out['peak_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    rows = {v: {"median_step_s": _median(runs[v]), "peak_bytes": statistics.median(r["peak_bytes"] for r in runs[v]),
                "first_loss": runs[v][0]["first_loss"], "trainable": runs[v][0]["trainable"],
                "total": runs[v][0]["total"]} for v in variants}
    full = rows["full"]
    for row in rows.values():
        row["step_vs_full"] = row["median_step_s"] / full["median_step_s"]
        row["peak_vs_full"] = row["peak_bytes"] / full["peak_bytes"]
    return {"rows": rows, "runs": runs, "live_memory": env is not None}


def large(spec: dict, device: str, run_worker) -> dict:
    """The large-model rows: rlkd vs TRL GKD, full fine-tuning and LoRA (one process each)."""
    out: dict[str, dict] = {}
    for variant in ("full", "lora"):
        for system, worker in (("rlkd", "rlkd-memory"), ("trl", "trl-large")):
            res = run_worker(worker, {**spec, "variant": variant}, device)
            out[f"{system}-{variant}"] = {"median_step_s": statistics.median(res["step_s"]),
                                          "peak_bytes": res["peak_bytes"]}
            print(f"  large {system}-{variant}: {out[f'{system}-{variant}']['median_step_s'] * 1e3:.0f} ms/step, "
                  f"peak {res['peak_bytes'] / 2**30:.1f} GiB", file=sys.stderr)
    return out
