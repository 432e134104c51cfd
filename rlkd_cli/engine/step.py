"""One optimizer step: :class:`Trainer` (everything a step touches) and :func:`train_step` (the step itself).

``bench/run.py`` times :func:`train_step`, the function the loop calls.

A step is ``trainer.grad_accum`` micro-batches, each run forward and backward through the chunked
objective (:func:`batch_objective`, see :mod:`rlkd_cli.engine.chunking`), then gradient clipping and
one AdamW + schedule step. Losses are means over the response positions of the whole step: each
micro-batch's term sums are divided by the step's total count of positions (summed over processes),
so gradient accumulation and multi-process training give the same update as one big batch. A step
whose loss or gradient is not finite on any process is skipped on every process.

The teacher is any *teacher source*: an object with ``rows(batch, idx, split)`` returning the
teacher's logits at the batch's scored positions (:class:`~rlkd_cli.engine.chunking.TeacherRows`,
or :class:`~rlkd_cli.losses.TopKLogits` from a cache), ``describe()``, and ``check(objective, ks,
splits)`` (``rlkd_cli/teachers/`` has the live teacher and the cache); ``None`` for sft.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import torch

from rlkd_cli import metrics as metrics_mod
from rlkd_cli.engine import chunking
from rlkd_cli.errors import require
from rlkd_cli.losses import Objective
from rlkd_cli.runtime import Runtime


class TeacherSource(Protocol):
    """What the engine needs of a teacher (see the module docstring)."""

    def rows(self, batch: dict[str, torch.Tensor], idx: torch.Tensor, split: str) -> Any: ...

    def describe(self) -> str: ...

    def check(self, objective: Objective, ks: Sequence[int], splits: Mapping[str, Any]) -> None: ...


@dataclass
class Trainer:
    """The student, its optimizer and schedule, the teacher and the objective, as one step uses them.

    ``module`` is what the step calls (prepared by Accelerate: DDP / FSDP / DeepSpeed): a
    :class:`~rlkd_cli.engine.chunking.Trunk` returning final hidden states when ``head`` is the
    student's split-off LM head, else the causal LM itself (full logits). ``model`` is the plain
    causal LM (what checkpoints save).
    """

    runtime: Runtime
    module: Any
    model: Any
    head: chunking.LMHead | None
    teacher: TeacherSource | None
    objective: Objective
    optimizer: Any
    scheduler: Any
    vocab: int
    chunk: int
    max_grad_norm: float | None = None
    params: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def create(cls, runtime: Runtime, model, *, objective: Objective, teacher: TeacherSource | None, vocab: int,
               tc: Mapping[str, Any], micro_batch: int = 1) -> "Trainer":
        """Optimizer (AdamW, no decay on vectors), schedule, split head, and Accelerate's ``prepare``.

        ``tc``: the trainer config (``lr``, ``betas``, ``weight_decay``, ``scheduler``, ``warmup_steps``,
        ``max_steps``, ``max_grad_norm``, ``split_head``, ``chunk_size``); ``micro_batch``: examples per
        process and micro-batch (DeepSpeed asks for it).
        """
        from transformers import get_scheduler

        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(tc["weight_decay"])},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=float(tc["lr"]), betas=tuple(tc["betas"]))
        scheduler = get_scheduler(str(tc["scheduler"]), optimizer, num_warmup_steps=int(tc["warmup_steps"]),
                                  num_training_steps=int(tc["max_steps"]))
        model.to(runtime.device)
        head = chunking.split_lm(model, vocab) if tc.get("split_head", True) and not runtime.sharded else None
        module = chunking.Trunk(model) if head is not None else model
        if runtime.distributed_type == "DEEPSPEED":
            _configure_deepspeed(runtime, micro_batch, int(tc.get("grad_accum", 1)))
        module, optimizer, scheduler = runtime.accelerator.prepare(module, optimizer, scheduler)
        module.train()
        norm = tc.get("max_grad_norm")
        return cls(runtime=runtime, module=module, model=model, head=head, teacher=teacher, objective=objective,
                   optimizer=optimizer, scheduler=scheduler, vocab=vocab,
                   chunk=chunking.resolve_chunk_size(tc.get("chunk_size", "auto"), vocab, runtime.device),
                   max_grad_norm=float(norm) if norm is not None else None,
                   params=[p for p in model.parameters() if p.requires_grad])

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


@dataclass
class StepResult:
    """What one optimizer step did (sums over every process)."""

    finite: bool                                          # the update was applied
    sums: dict[str, float]                                # "loss" and "loss/<term>": sums over positions
    align: dict[str, float]                               # CR/OR sums and counts (when asked for)
    positions: int                                        # scored (response) positions
    tokens: int                                           # input tokens, padding excluded
    grad_norm: float | None
    seconds: float


def batch_objective(trainer: Trainer, batch: dict[str, torch.Tensor], *, split: str,
                    align_ks: Sequence[int] | None = None, by_modes: bool = False,
                    nll: bool = False) -> chunking.ChunkResult:
    """The objective's sums over one micro-batch's response positions (chunked)."""
    idx, targets = chunking.response_index(batch["labels"])
    with trainer.runtime.autocast():
        if trainer.head is not None:
            hidden = trainer.module(batch["input_ids"], batch["attention_mask"])
        else:
            hidden = trainer.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = chunking.StudentRows(chunking.gather_rows(hidden, idx), trainer.head, trainer.vocab)
        teacher = trainer.teacher.rows(batch, idx, split=split) if trainer.teacher is not None else None
        return chunking.objective_over_chunks(trainer.objective, student, teacher, targets, chunk_size=trainer.chunk,
                                              align_ks=align_ks, by_modes=by_modes, nll=nll)


def _configure_deepspeed(runtime: Runtime, micro_batch: int, grad_accum: int) -> None:
    """rlkd steps the optimizer once per ``trainer.batch_size``: DeepSpeed must not accumulate on its own."""
    ds = runtime.accelerator.state.deepspeed_plugin.deepspeed_config
    require(grad_accum == 1, "with DeepSpeed, accumulate gradients in the DeepSpeed config (gradient_accumulation_steps), "
                             "and keep trainer.grad_accum=1")
    require(ds.get("gradient_accumulation_steps", 1) in (1, "1", "auto", None),
            "rlkd steps the optimizer once per trainer.batch_size: set gradient_accumulation_steps: 1 in the "
            "DeepSpeed config (and keep trainer.grad_accum=1)")
    ds["gradient_accumulation_steps"] = 1
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # accelerate takes it from a dataloader
        ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.pop("train_batch_size", None)


def _clip(trainer: Trainer) -> torch.Tensor | None:
    """Clip to ``max_grad_norm`` (or only measure the norm); ``None`` where DeepSpeed keeps it to itself."""
    acc = trainer.runtime.accelerator
    if trainer.max_grad_norm is not None:
        return acc.clip_grad_norm_(trainer.module.parameters(), trainer.max_grad_norm)
    if trainer.runtime.sharded:
        return None
    grads = [p.grad.detach().norm() for p in trainer.params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())


def train_step(trainer: Trainer, batches: Sequence[dict[str, torch.Tensor]], *,
               align_ks: Sequence[int] | None = None) -> StepResult:
    """One optimizer step over the micro-batches ``batches`` (see the module docstring)."""
    require(len(batches) > 0, "a step needs at least one micro-batch")
    t0 = time.perf_counter()
    rt = trainer.runtime
    counts = torch.tensor([[float(b["labels"][:, 1:].ne(-100).sum()), float(b["attention_mask"].sum())]
                           for b in batches]).sum(0).to(rt.device)
    positions, tokens = rt.reduce_sum(counts).tolist()
    denom = max(positions, 1.0) / rt.world  # DDP averages gradients over processes
    sums: dict[str, float] = {}
    align: dict[str, float] = {}
    finite = True
    for i, batch in enumerate(batches):
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        last = i == len(batches) - 1  # gradients are all-reduced on the last micro-batch only
        with contextlib.nullcontext() if last else rt.accelerator.no_sync(trainer.module):
            out = batch_objective(trainer, batch, split="train", align_ks=align_ks)
            finite = finite and bool(torch.isfinite(out.total))
            rt.accelerator.backward(out.total / denom)  # every process runs every backward (DDP needs that)
        metrics_mod.add_sums(sums, {"loss": float(out.total.detach()),
                                    **{f"loss/{k}": v for k, v in out.terms.items()}})
        metrics_mod.add_sums(align, out.align)
    finite = not rt.any(not finite)
    grad_norm = _clip(trainer) if finite else None
    if grad_norm is not None:
        finite = not rt.any(not bool(torch.isfinite(torch.as_tensor(grad_norm))))
    if finite:
        trainer.optimizer.step()
        trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if rt.distributed:  # every process has the same keys (the same objective)
        keys = sorted(sums)
        summed = rt.reduce_sum(torch.tensor([sums[k] for k in keys], device=rt.device, dtype=torch.float64))
        sums = dict(zip(keys, summed.tolist()))
        align = rt.sum_dicts(align)
    return StepResult(finite=finite, sums=sums, align=align, positions=int(positions), tokens=int(tokens),
                      grad_norm=float(grad_norm) if grad_norm is not None else None,
                      seconds=time.perf_counter() - t0)
