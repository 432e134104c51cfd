"""What every benchmark measurement shares: the bench models and data, memory probes, the engine's step.

``bench/run.py`` and ``bench/scale.py`` import this; each worker process does too.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_model(arch: dict, vocab: int, seed: int, device: str = "cpu", dtype=None):
    """A random-initialised Llama of ``arch``'s size, built directly on ``device`` in ``dtype`` (no CPU copy,
    no float32 copy of a bf16 teacher)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=arch["hidden"],
                               num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                               num_key_value_heads=arch["heads"], intermediate_size=arch["intermediate"],
                               max_position_embeddings=4096, tie_word_embeddings=False,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype) if dtype is not None \
            else AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # peaked next-token distributions, like a trained LM's, not a flat random init
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def make_examples(spec: dict, n: int, seed: int = 0) -> list[dict]:
    """``n`` sequences of ``seq`` random tokens; the first ``prompt`` positions carry no loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, spec["vocab"], (spec["seq"],), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * spec["prompt"] + ids[spec["prompt"]:]})
    return out


def collate(examples: list[dict]):
    import torch

    ids = torch.tensor([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([e["labels"] for e in examples])}


def response_tokens(spec: dict) -> int:
    return spec["batch"] * (spec["seq"] - spec["prompt"] - 1)


class Memory:
    """Peak memory from a reset point: CUDA allocator stats, or the process's resident-set high-water mark."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key} in /proc/self/status")

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return self._status("VmHWM") - self.base


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class RlkdRunner:
    """The engine's own step (``rlkd_cli.engine.train_step``) on the bench models, with any objective and teacher."""

    def __init__(self, spec: dict, device: str, *, teacher=None, student=None):
        import torch

        from rlkd_cli.engine import Trainer
        from rlkd_cli.runtime import Runtime
        from rlkd_cli.teachers.live import LiveTeacher

        self.spec, self.device = spec, device
        self.runtime = Runtime.create({"device": device})  # what a command does: CPU allocator, denormals, ...
        self.dev = self.runtime.device
        bf16 = torch.bfloat16 if self.runtime.precision == "bf16" else None  # the teacher as rlkd loads it
        self.teacher = teacher if teacher is not None else teacher_model(spec, str(self.dev))
        self.teacher.requires_grad_(False).eval().to(self.dev)
        if bf16 is not None:
            self.teacher.to(bf16)
        self.student = student if student is not None else make_model(spec["student"], spec["vocab"], 2,
                                                                       device=str(self.dev))
        self.live = LiveTeacher(self.teacher, spec["vocab"])
        tc = {"lr": 1e-5, "betas": [0.9, 0.999], "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0,
              "max_steps": 10**9, "max_grad_norm": 1.0, "split_head": True, "chunk_size": "auto"}
        self.trainer = Trainer.create(self.runtime, self.student, objective=objective("kl"), teacher=self.live,
                                      vocab=spec["vocab"], tc=tc, micro_batch=spec["batch"])
        assert self.trainer.head is not None and self.live.head is not None
        self.chunk = self.trainer.chunk

    def step(self, objective, batch: dict, teacher) -> None:
        """One optimizer step of the engine (forward, backward, clip, AdamW) with this objective and teacher."""
        import dataclasses

        from rlkd_cli.engine import train_step

        train_step(dataclasses.replace(self.trainer, objective=objective, teacher=teacher), [batch])

    def teacher_forward(self, batch: dict) -> None:
        """What the teacher costs in a distillation step: its trunk, and its head at every response position."""
        import torch

        from rlkd_cli.engine import chunking

        idx, _ = chunking.response_index(batch["labels"])
        with torch.no_grad(), self.runtime.autocast():
            rows = self.live.rows(batch, idx)
            for sl in chunking.chunk_slices(len(rows), self.chunk):
                rows[sl]


def objective(name: str):
    from rlkd_cli.config import load_group_option
    from rlkd_cli.losses import Objective

    return Objective.from_config(load_group_option("loss", name))


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _preload() -> None:
    """Import what both systems use before the memory baseline, so import costs count for neither."""
    import datasets  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401


def trl_models(spec: dict, device: str):
    """For a TRL worker: the memory probe (started after the imports) and the bench teacher and student on
    ``device``, the teacher in bf16 on a GPU as rlkd runs it."""
    _preload()
    memory = Memory(device)
    memory.reset()
    teacher = teacher_model(spec, device)
    student = make_model(spec["student"], spec["vocab"], 2, device=device)
    return memory, teacher, student


def teacher_model(spec: dict, device: str):
    """The bench teacher (seed 1), built first everywhere: bf16 on a GPU (as rlkd and TRL run it), else fp32."""
    import torch

    return make_model(spec["teacher"], spec["vocab"], 1, device=device,
                      dtype=torch.bfloat16 if device == "cuda" else None)
