"""The one training loop behind ``rlkd sft`` and ``rlkd distill`` (the ``trainer`` config group).

Read :func:`train` top to bottom: set up (device, tokenizer, data, models, objective, optimizer),
maybe resume, then ``for step``: fetch the step's micro-batches, run the student (and, when
distilling, the teacher under ``no_grad``, or read its rows from a teacher cache), compute the
configured loss mix on response positions in chunks (:func:`batch_objective`, see
``rlkd_cli/chunking.py``), step the optimizer, log, validate, checkpoint. ``sft`` is the same loop
with a cross-entropy-only objective and no teacher. Under a multi-process launch (torchrun /
accelerate launch) the same loop runs DDP (or FSDP / DeepSpeed): see docs/scale.md.

Losses are means over the response positions of the whole optimizer step: each micro-batch's term
sums are divided by the step's total count of positions (summed over processes), so gradient
accumulation and multi-process training give the same update as one big batch.

Output (in the run dir): ``metrics.jsonl`` (one JSON object per log step and per validation),
``summary.json`` (final validation metrics as flat keys ``cr@1``, ``or@5``, ...),
``checkpoints/step-NNNNNN/`` (a Hugging Face model folder plus tokenizer and trainer state) and
``checkpoints/latest`` (the newest complete checkpoint's name, written last).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlkd_cli import chunking
from rlkd_cli import dataset as data_mod
from rlkd_cli import metrics as metrics_mod
from rlkd_cli import models
from rlkd_cli.config import validate_ks, validate_trainer
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import atomic_dir, atomic_write_json, atomic_write_text, dumps, ensure_writable_dir, publish_dir
from rlkd_cli.losses import Objective

log = logging.getLogger("rlkd.engine")

STATE_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pt")
# Keys that may change between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {"trainer.resume", "trainer.force_resume", "trainer.progress", "trainer.max_steps",
                    "trainer.stop_after",
                    "trainer.eval_every", "trainer.save_every", "trainer.keep_last", "trainer.log_every",
                    "trainer.eval_examples", "checkpoints", "cache_dir"}


# ----------------------------------------------------------------------------------------------
# Small pieces the loop uses
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # data epoch of the next micro-batch
    position: int = 0        # index into that epoch's permutation of the next micro-batch
    bad_steps: int = 0       # consecutive non-finite steps
    skipped_steps: int = 0   # all non-finite steps skipped so far
    tokens: int = 0          # response positions trained on
    train_time_s: float = 0.0


class BatchStream:
    """Deterministic micro-batches: a seeded permutation per epoch, resumable from (epoch, position).

    With several processes each global micro-batch is split between them by rank, so N processes
    see exactly the examples one process would see with the same global batch.
    """

    def __init__(self, n: int, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        require(n >= micro_batch * world,
                f"the training split has {n} examples, fewer than one batch ({micro_batch * world}); "
                "lower trainer.batch_size or use more data")
        self.n, self.micro, self.seed, self.rank, self.world = n, micro_batch, seed, rank, world
        self._epoch_cached: int | None = None
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_cached != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._epoch_cached = epoch
        return self._perm

    def next(self, state: TrainState) -> list[int]:
        span = self.micro * self.world
        if state.position + span > self.n:  # drop the ragged end of an epoch
            state.epoch, state.position = state.epoch + 1, 0
        perm = self._permutation(state.epoch)
        ids = perm[state.position: state.position + span].tolist()
        state.position += span
        return ids[self.rank * self.micro: (self.rank + 1) * self.micro]


def choose_device_and_precision(tc: DictConfig) -> tuple[str, str]:
    """Resolve ``trainer.device``/``trainer.precision`` ('auto' included) or say why not."""
    cuda = torch.cuda.is_available()
    device = str(tc.device)
    if device == "cuda" and not cuda:
        raise RlkdError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    precision = str(tc.precision)
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise RlkdError("trainer.precision=bf16 but this GPU has no bf16 support; use trainer.precision=fp32")
    if precision == "bf16" and device == "cpu":
        raise RlkdError("trainer.precision=bf16 is for CUDA; on the CPU use trainer.precision=fp32 (or auto)")
    return device, precision


def make_accelerator(tc: DictConfig):
    """Accelerate handles processes and devices; mixed precision is the engine's own :func:`autocast`.

    (Accelerate's mixed precision would cast every model output to float32, i.e. upcast whole
    ``[B, T, V]`` logits, which the chunked loss exists to avoid.)
    """
    from accelerate import Accelerator

    device, _ = choose_device_and_precision(tc)
    return Accelerator(cpu=(device == "cpu"), mixed_precision="no")


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc only; returns whether it applied).

    glibc maps every allocation above its mmap threshold (adaptive, at most 32 MiB) afresh and
    returns it to the system when freed, and trims the heap top once 2x that is free. A training
    step allocates and frees the same large tensors again and again (activations, chunk-sized
    logits), so each one is page-faulted in anew: on 2 CPU cores that took 10-25 % of a step.
    Fixing the threshold at its maximum and not trimming makes the allocator reuse that memory.
    The peak footprint does not grow; memory is returned to the system when the process ends.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)
    return bool(ok)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA for ``precision == 'bf16'``; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_tokenizer(cfg: DictConfig, model_cfgs: list):
    """The tokenizer named in ``tokenizer.name_or_path``, else the first pretrained model's, else the embedded BPE.

    ``model_cfgs``: model configs, or ``(role, config)`` pairs so errors name the right key.
    """
    from rlkd_cli import tokenizer as tok_mod

    if cfg.tokenizer.get("name_or_path"):
        return tok_mod.load_tokenizer(str(cfg.tokenizer.name_or_path), config_key="tokenizer.name_or_path")
    for item in model_cfgs:
        role, mc = item if isinstance(item, tuple) else ("teacher", item)
        if mc is not None and mc.get("name_or_path"):
            return tok_mod.load_tokenizer(str(mc.name_or_path), config_key=f"{role}.name_or_path")
    return tok_mod.embedded_tokenizer(Path(os.path.expanduser(str(cfg.cache_dir))), int(cfg.tokenizer.vocab_size))


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Align position t's logits with token t+1; cut vocabulary padding rows; mask = response positions."""
    logits = logits[:, :-1, :vocab_size]
    targets = labels[:, 1:]
    return logits, targets, targets.ne(-100)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": np_state[2], "numpy_has_gauss": np_state[3], "numpy_cached_gaussian": np_state[4],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), None if py[-1] == -1 else py[-1]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def config_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    """Keys (dotted) whose values differ between two run configs, ignoring resume-free keys."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".")
                                                                 for f in RESUME_FREE_KEYS)]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def _write_model_files(folder: Path, *, model, tokenizer, cfg: DictConfig, state: TrainState,
                       state_dict: dict | None = None) -> None:
    """The Hugging Face model folder (one safetensors file), tokenizer, resolved config and trainer state."""
    model.save_pretrained(folder, state_dict=state_dict, max_shard_size="1000GB")
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder / "rlkd_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(folder / "trainer_state.json", asdict(state))


def _point_latest_and_prune(ckpt_root: Path, name: str, keep_last: int) -> None:
    atomic_write_text(ckpt_root / "latest", name + "\n")
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out_dir: Path, *, model, tokenizer, cfg: DictConfig, state: TrainState, optimizer,
                    scheduler, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically, then point ``checkpoints/latest`` at it, then prune."""
    ckpt_root = out_dir / "checkpoints"
    name = f"step-{state.step:06d}"
    target = ckpt_root / name
    with atomic_dir(target) as tmp:
        _write_model_files(tmp, model=model, tokenizer=tokenizer, cfg=cfg, state=state)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
    _point_latest_and_prune(ckpt_root, name, keep_last)
    return target


def save_sharded_checkpoint(out_dir: Path, *, accelerator, module, model, tokenizer, cfg: DictConfig,
                            state: TrainState, keep_last: int) -> Path | None:
    """A checkpoint of a sharded (FSDP / DeepSpeed) run; every process must call it.

    Each process writes its shard of the model, optimizer, scheduler and RNG state with
    ``accelerator.save_state`` into ``<checkpoint>/accelerate_state`` (resumed with
    ``accelerator.load_state``); process 0 adds the full weights gathered by
    ``accelerator.get_state_dict`` as a plain Hugging Face model folder, and publishes the folder
    with one rename. Returns the checkpoint path on process 0, ``None`` elsewhere.
    """
    ckpt_root = out_dir / "checkpoints"
    name = f"step-{state.step:06d}"
    tmp = ckpt_root / f".tmp-{name}-sharded"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / SHARDED_STATE))
    state_dict = accelerator.get_state_dict(module)  # a collective: full weights on process 0
    path = None
    if accelerator.is_main_process:
        _write_model_files(tmp, model=model, tokenizer=tokenizer, cfg=cfg, state=state, state_dict=state_dict)
        path = ckpt_root / name
        publish_dir(tmp, path)
        _point_latest_and_prune(ckpt_root, name, keep_last)
    accelerator.wait_for_everyone()
    return path


CHECKPOINT_FILES = ("config.json", "model.safetensors", "rlkd_config.yaml", *STATE_FILES)
#: A sharded run's checkpoint keeps its trainer state here (accelerate.save_state), not in STATE_FILES.
SHARDED_STATE = "accelerate_state"
SHARDED_CHECKPOINT_FILES = ("config.json", "model.safetensors", "rlkd_config.yaml", "trainer_state.json")


def missing_checkpoint_files(path: Path) -> list[str]:
    """The files of a complete rlkd checkpoint that ``path`` lacks (all of them if it is no folder)."""
    if not path.is_dir():
        return list(CHECKPOINT_FILES)
    required = SHARDED_CHECKPOINT_FILES if (path / SHARDED_STATE).is_dir() else CHECKPOINT_FILES
    return [f for f in required if not (path / f).is_file()]


def clean_checkpoint_leftovers(ckpt_root: Path) -> list[str]:
    """Tidy ``checkpoints/`` after a killed save; return the names removed.

    A save killed before its rename leaves a ``.tmp-*`` folder (or file): never complete, removed.
    A replacement killed between its two renames leaves ``.old-<name>-<pid>`` with ``<name>`` gone:
    that folder is the complete previous version and is renamed back; otherwise it is removed.
    """
    removed: list[str] = []
    if not ckpt_root.is_dir():
        return removed
    for item in sorted(ckpt_root.iterdir()):
        if item.name.startswith(".old-"):
            original = ckpt_root / item.name[len(".old-"):].rsplit("-", 1)[0]
            if item.is_dir() and not original.exists():
                os.replace(item, original)
                continue
        elif not item.name.startswith(".tmp-"):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item.name)
    return removed


def find_resume_checkpoint(out_dir: Path, resume: str, clean: bool = True) -> Path | None:
    """The checkpoint to resume from.

    ``auto``: the folder ``checkpoints/latest`` names if it is complete, else (a pointer lost or a
    folder damaged after the fact) the newest complete ``checkpoints/step-*``; ``None`` when the run
    dir has no checkpoint yet. Leftovers of a killed save are cleaned first. Any other value is a
    path that must be a complete checkpoint.
    """
    if resume == "auto":
        root = out_dir / "checkpoints"
        removed = clean_checkpoint_leftovers(root) if clean else []
        if removed:
            log.warning("trainer.resume=auto: removed leftovers of an interrupted save: %s", ", ".join(removed))
        candidates: list[Path] = []
        pointer = root / "latest"
        if pointer.is_file() and pointer.read_text().strip():
            candidates.append(root / pointer.read_text().strip())
        candidates += sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
        if not candidates:
            return None
        for path in candidates:
            if not missing_checkpoint_files(path):
                if path != candidates[0]:
                    log.warning("trainer.resume=auto: %s is missing or incomplete; using %s", candidates[0], path)
                return path
        raise RlkdError(f"cannot resume: {root} holds no complete checkpoint; start afresh in a new run dir "
                        "(hydra.run.dir=...) or pass trainer.resume=PATH of a complete checkpoints/step-* folder")
    path = Path(os.path.expanduser(resume))
    missing = missing_checkpoint_files(path)
    if missing:
        raise RlkdError(f"cannot resume from '{path}': not a complete rlkd checkpoint (missing "
                        f"{'the folder' if not path.is_dir() else ', '.join(missing)}); use trainer.resume=auto "
                        "in the run dir or a checkpoints/step-* folder")
    return path


def _load_state_file(path: Path, **kwargs) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code."""
    import pickle

    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise RlkdError(f"refusing to load {path}: it holds pickled Python objects, not plain tensors "
                            "(rlkd loads trainer state with torch.load(weights_only=True) only); resume from a "
                            "checkpoint written by rlkd") from e
        raise RlkdError(f"checkpoint file {path} is corrupt ({_first_line(e)}); resume from an earlier "
                        "checkpoints/step-* folder") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RlkdError(f"checkpoint file {path} is corrupt ({_first_line(e)}); resume from an earlier "
                        "checkpoints/step-* folder") from e


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler) -> TrainState:
    """Restore weights (safetensors only), optimizer, scheduler and every RNG; return the trainer state.

    Any unreadable or inconsistent file is an :class:`RlkdError` naming it (nothing is half-restored
    silently: the caller stops).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise RlkdError(f"checkpoint {ckpt} is corrupt: model.safetensors cannot be read ({_first_line(e)}); "
                        "resume from an earlier checkpoints/step-* folder") from e
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied weights (lm_head = embed_tokens) are stored once
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    require(not missing and not unexpected, f"checkpoint {ckpt} does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same model config")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    try:
        optimizer.load_state_dict(_load_state_file(ckpt / "optimizer.pt", map_location="cpu"))
        scheduler.load_state_dict(_load_state_file(ckpt / "scheduler.pt"))
        _set_rng_state(_load_state_file(ckpt / "rng_state.pt"))
        return TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))
    except RlkdError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise RlkdError(f"checkpoint {ckpt} is corrupt or from another model/optimizer ({type(e).__name__}: "
                        f"{_first_line(e)}); resume from an earlier checkpoints/step-* folder") from e


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; +inf for a blank or torn line (a kill mid-write), so it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Evaluation on the validation split
# ----------------------------------------------------------------------------------------------

@dataclass
class Models:
    """The models as the loop uses them.

    ``student``: the module the loop calls (prepared by Accelerate): a :class:`~rlkd_cli.chunking.Trunk`
    returning final hidden states when ``head`` is the student's split-off LM head, else the causal
    LM itself (full logits). ``teacher``: a :class:`~rlkd_cli.chunking.LiveTeacher`, a
    :class:`~rlkd_cli.teacher_cache.TeacherCache`, or ``None`` (sft).
    """

    student: Any
    head: chunking.LMHead | None
    teacher: Any
    vocab: int
    chunk: int
    device: torch.device
    precision: str


def batch_objective(models: Models, objective: Objective, batch: dict[str, torch.Tensor], *, split: str,
                    align_ks: list[int] | None = None, by_modes: bool = False,
                    nll: bool = False) -> chunking.ChunkResult:
    """The objective's sums over one micro-batch's response positions (chunked; see rlkd_cli/chunking.py)."""
    idx, targets = chunking.response_index(batch["labels"])
    with autocast(models.device, models.precision):
        if models.head is not None:
            hidden = models.student(batch["input_ids"], batch["attention_mask"])
        else:
            hidden = models.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = chunking.StudentRows(chunking.gather_rows(hidden, idx), models.head, models.vocab)
        teacher = models.teacher.rows(batch, idx, split=split) if models.teacher is not None else None
        return chunking.objective_over_chunks(objective, student, teacher, targets, chunk_size=models.chunk,
                                              align_ks=align_ks, by_modes=by_modes, nll=nll)


def _sum_over_processes(sums: dict[str, float], world: int) -> dict[str, float]:
    """Key-wise sums of every process's dict (the dict itself with one process)."""
    if world <= 1:
        return sums
    from accelerate.utils import gather_object

    total: dict[str, float] = {}
    for part in gather_object([sums]):
        metrics_mod.add_sums(total, part)
    return total


@torch.no_grad()
def evaluate(models: Models, batches: list[dict[str, torch.Tensor]], objective: Objective, ks: list[int], *,
             world: int = 1, rank: int = 0) -> dict[str, float]:
    """Mean loss terms, student perplexity and CR@k/OR@k (with a teacher) over response positions.

    With several processes each takes every ``world``-th batch and the sums are added up; every
    process runs the same number of forwards (DDP broadcasts buffers and FSDP gathers parameters in
    each one), the short ones repeating their first batch and dropping its sums.
    """
    models.student.eval()
    sums: dict[str, float] = {}
    mine = batches[rank::world]
    for i in range(math.ceil(len(batches) / world)):
        batch = {k: v.to(models.device) for k, v in (mine[i] if i < len(mine) else batches[0]).items()}
        out = batch_objective(models, objective, batch, split="validation",
                              align_ks=ks if models.teacher is not None else None, by_modes=True, nll=True)
        if i < len(mine):
            metrics_mod.add_sums(sums, {"loss": float(out.total.detach()), "nll": out.nll or 0.0,
                                        "positions": out.count, **{f"loss/{k}": v for k, v in out.terms.items()},
                                        **out.align})
    models.student.train()
    sums = _sum_over_processes(sums, world)
    count = max(float(sums.pop("positions", 0.0)), 1.0)
    nll = sums.pop("nll", 0.0)
    align = {k: v for k, v in sums.items() if k.startswith(("cr@", "or@", "top1", "count"))}
    out = {k: v / count for k, v in sums.items() if k not in align}
    out["ppl"] = math.exp(min(nll / count, 50.0))
    if align:
        out.update(metrics_mod.finalize(align))
    out["positions"] = int(count)
    return out


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(cfg: DictConfig, out_dir: str | os.PathLike, *, mode: str, tokenizer=None,
          log_prefix: str | None = None, solo: bool = False) -> dict[str, Any]:
    """Run sft (``mode='sft'``) or distillation (``mode='distill'``) as configured; return the summary.

    ``solo``: train in this process alone even inside a multi-process launch (the tiny teacher,
    trained on first use by whichever process takes its lock).
    """
    require(mode in ("sft", "distill"), f"unknown engine mode {mode!r}")
    tc = cfg.trainer
    validate_trainer(tc)
    ks = validate_ks(cfg.metrics.ks)
    out_dir = ensure_writable_dir(out_dir)
    tag = f"[{log_prefix}] " if log_prefix else ""
    accelerator = make_accelerator(tc)
    device_name, precision = choose_device_and_precision(tc)
    if device_name == "cpu":
        # Subnormal floats (from tiny gradients and Adam moments) make CPU kernels several times slower;
        # flushing them to zero changes nothing that matters for training.
        torch.set_flush_denormal(True)
        tune_cpu_allocator()
    _quiet_transformers()
    world, rank = (1, 0) if solo else (accelerator.num_processes, accelerator.process_index)
    is_main = solo or accelerator.is_main_process
    device = accelerator.device

    # --- what is trained, by what -----------------------------------------------------------------
    if mode == "distill":
        trained_cfg, trained_role = cfg.student, "student"
    else:
        trained_role = str(cfg.get("model", "teacher"))
        require(trained_role in ("teacher", "student"), f"model must be teacher or student, got {trained_role!r}")
        trained_cfg = cfg[trained_role]
    cache_path = cfg.teacher.get("cache") if mode == "distill" else None
    if tokenizer is None:
        tokenizer = resolve_tokenizer(cfg, [("teacher", cfg.teacher), (trained_role, trained_cfg)]
                                      if mode == "distill" else [(trained_role, trained_cfg)])
    vocab = len(tokenizer)
    objective = Objective.from_config(cfg.loss)
    require(mode == "distill" or not objective.needs_teacher,
            f"loss '{cfg.loss.get('name', '?')}' needs a teacher but `rlkd sft` has none; use loss=ce with sft, "
            "or run rlkd distill")
    split_heads = bool(tc.get("split_head", True))
    sharded = not solo and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    require(solo or accelerator.distributed_type.value not in ("MEGATRON_LM", "XLA", "TP"),
            f"rlkd trains with DDP, FSDP or DeepSpeed, not {accelerator.distributed_type.value}; change the "
            "accelerate config")
    require(not (sharded and accelerator.distributed_type.value == "DEEPSPEED" and int(tc.grad_accum) != 1),
            "with DeepSpeed, accumulate gradients in the DeepSpeed config (gradient_accumulation_steps), and "
            "keep trainer.grad_accum=1")
    if split_heads and sharded:
        log.info("%s%s shards the model: the LM head is applied through the model's own forward",
                 tag, accelerator.distributed_type.value)
        split_heads = False

    teacher = None
    teacher_desc = None
    if mode == "distill" and cache_path:
        from rlkd_cli.teacher_cache import TeacherCache

        teacher = TeacherCache.open(cache_path, tokenizer=tokenizer)
        teacher.check_objective(objective, ks)
        teacher_desc = teacher.describe()
    elif mode == "distill":
        teacher_model, _ = models.load_teacher(cfg, tokenizer, precision=precision, device=device)
        teacher = chunking.LiveTeacher(teacher_model, vocab, split_head=split_heads)
        teacher_desc = models.describe(cfg.teacher)

    torch.manual_seed(int(cfg.seed))
    student = models.load_model(trained_cfg, tokenizer, role=trained_role, seed=int(cfg.seed))

    train_split = data_mod.build_split(cfg.dataset, tokenizer, "train")
    val_split = data_mod.build_split(cfg.dataset, tokenizer, "validation", limit=tc.get("eval_examples"))
    for name, split in (("train", train_split), ("validation", val_split)):
        st = split.stats
        log.info("%s%s split: %d examples, %d truncated at max_length=%s, %d dropped", tag, name,
                 st.get("num_examples", 0), st.get("num_truncated", 0), cfg.dataset.get("max_length"),
                 st.get("num_dropped", 0))
    if cache_path:
        teacher.check_splits({"train": train_split, "validation": val_split})

    # --- optimizer, schedule ------------------------------------------------------------------------
    from transformers import get_scheduler

    decay, no_decay = [], []
    for n, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(tc.weight_decay)},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=float(tc.lr), betas=tuple(tc.betas))
    scheduler = get_scheduler(str(tc.scheduler), optimizer, num_warmup_steps=int(tc.warmup_steps),
                              num_training_steps=int(tc.max_steps))
    student.to(device)
    head = chunking.split_lm(student, vocab) if split_heads else None
    module = chunking.Trunk(student) if head is not None else student
    micro = int(tc.batch_size) // int(tc.grad_accum)
    require(micro % world == 0, f"trainer.batch_size/grad_accum ({micro}) must be divisible by the number of "
                                f"processes ({world})")
    micro //= world
    if sharded and accelerator.distributed_type.value == "DEEPSPEED":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        require(ds.get("gradient_accumulation_steps", 1) in (1, "1", "auto", None),
                "rlkd steps the optimizer once per trainer.batch_size: set gradient_accumulation_steps: 1 in the "
                "DeepSpeed config (and keep trainer.grad_accum=1)")
        ds["gradient_accumulation_steps"] = 1
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # accelerate takes it from a dataloader
            ds["train_micro_batch_size_per_gpu"] = micro
        ds.pop("train_batch_size", None)
    if not solo:
        module, optimizer = accelerator.prepare(module, optimizer)
    if sharded:  # accelerate.save_state / load_state then carry the schedule too
        accelerator.register_for_checkpointing(scheduler)
    module.train()
    chunk = chunking.resolve_chunk_size(tc.get("chunk_size", "auto"), vocab, device)
    run_models = Models(student=module, head=head, teacher=teacher, vocab=vocab, chunk=chunk, device=device,
                        precision=precision)
    log.info("%sloss over response positions in chunks of %d; LM heads %s", tag, chunk,
             "applied per chunk" if head is not None else "through the models' full logits")

    stream = BatchStream(len(train_split.dataset), micro, int(cfg.seed), rank, world)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def make_batch(ds, ids: list[int]) -> dict[str, torch.Tensor]:
        batch = data_mod.collate([ds[i] for i in ids], pad_id)
        batch["example_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch

    n_val = len(val_split.dataset)
    val_batches = [make_batch(val_split.dataset, list(range(s, min(s + micro, n_val)))) for s in range(0, n_val, micro)]

    def unwrapped():
        m = accelerator.unwrap_model(module) if not solo else module
        return m.lm if isinstance(m, chunking.Trunk) else m

    # --- resume -------------------------------------------------------------------------------------
    state = TrainState()
    metrics_path = out_dir / "metrics.jsonl"
    from rlkd_cli.logger import MetricsLogger

    metrics_logger = MetricsLogger.from_config(cfg.get("logger"), out_dir, enabled=is_main)
    resume = tc.get("resume")
    if resume and world > 1:  # process 0 tidies a killed save's leftovers; the others then look
        if is_main:
            clean_checkpoint_leftovers(out_dir / "checkpoints")
        accelerator.wait_for_everyone()
    ckpt = find_resume_checkpoint(out_dir, str(resume), clean=world == 1) if resume else None
    if resume and ckpt is None:
        log.info("%strainer.resume=auto: no checkpoint in %s yet, starting fresh", tag, out_dir)
    if ckpt is not None:
        try:
            saved = OmegaConf.load(ckpt / "rlkd_config.yaml")
        except Exception as e:  # yaml or OmegaConf errors: the file is damaged
            raise RlkdError(f"checkpoint {ckpt} is corrupt: rlkd_config.yaml cannot be read ({_first_line(e)}); "
                            "resume from an earlier checkpoints/step-* folder") from e
        diff = config_differences(saved, cfg)
        if diff and not tc.get("force_resume", False):
            raise RlkdError(f"cannot resume from {ckpt}: the config differs in {', '.join(diff[:6])}"
                            f"{' ...' if len(diff) > 6 else ''}; run with the checkpoint's config or set "
                            "trainer.force_resume=true")
        if (ckpt / SHARDED_STATE).is_dir() != sharded:
            raise RlkdError(f"cannot resume from {ckpt}: it was written by a {'non-' if sharded else ''}sharded run "
                            f"and this one is {'' if sharded else 'not '}sharded (FSDP/DeepSpeed); resume with the "
                            "launcher config it was trained with")
        if sharded:
            accelerator.load_state(str(ckpt / SHARDED_STATE))
            state = TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))
        else:
            state = load_checkpoint(ckpt, model=unwrapped(), optimizer=optimizer, scheduler=scheduler)
        log.info("%sresumed from %s at step %d", tag, ckpt, state.step)
        if is_main and metrics_path.exists():  # drop lines logged after that checkpoint
            kept = [l for l in metrics_path.read_text().splitlines() if _logged_step(l) <= state.step]
            atomic_write_text(metrics_path, "".join(l + "\n" for l in kept))
    elif is_main and metrics_path.exists():
        metrics_path.unlink()
    if is_main:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # --- pre-emption: SIGTERM checkpoints and stops at the next step boundary -------------------------
    stop = {"signal": None}

    def _on_term(signum, frame):
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, _on_term) if _main_thread() else None

    log.info("%s%s: %s on %s (%s%s), %s, %d steps of %d examples, loss = %s", tag, mode,
             models.describe(trained_cfg), device_name, precision, f", {world} processes" if world > 1 else "",
             f"teacher {teacher_desc}" if teacher is not None else "no teacher",
             int(tc.max_steps), int(tc.batch_size), objective.describe())

    saved_at = {"step": None, "path": None}

    def save():
        if saved_at["step"] != state.step:  # one checkpoint per step (SIGTERM right after a scheduled save)
            path = None
            if sharded:
                path = save_sharded_checkpoint(out_dir, accelerator=accelerator, module=module, model=unwrapped(),
                                               tokenizer=tokenizer, cfg=cfg, state=state, keep_last=int(tc.keep_last))
            elif is_main:
                path = save_checkpoint(out_dir, model=unwrapped(), tokenizer=tokenizer,
                                       cfg=cfg, state=state, optimizer=optimizer, scheduler=scheduler,
                                       keep_last=int(tc.keep_last))
            saved_at.update(step=state.step, path=path)
        return saved_at["path"]

    def write_metrics(record: dict[str, Any]) -> None:
        if is_main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(dumps(record) + "\n")
            metrics_logger.log(record)

    def reduce_sum(x: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(x, reduction="sum") if world > 1 else x

    progress = _Progress(enabled=bool(tc.get("progress", True)) and is_main, total=int(tc.max_steps),
                         start=state.step, label=f"{log_prefix or mode}")
    window: dict[str, float] = {}
    window_steps, window_tokens, t_window = 0, 0, time.perf_counter()
    last_ckpt: Path | None = None
    val: dict[str, float] = {}
    stop_at = int(tc.max_steps)
    if tc.get("stop_after") is not None:
        require(int(tc.stop_after) >= 1, f"trainer.stop_after must be >= 1 steps, got {tc.stop_after}")
        stop_at = min(stop_at, state.step + int(tc.stop_after))
    try:
        while state.step < int(tc.max_steps):
            if state.step >= stop_at:  # time-sliced run: checkpoint and stop; trainer.resume=auto continues
                last_ckpt = save()
                log.info("%strainer.stop_after: stopped at step %d with checkpoint %s", tag, state.step, last_ckpt)
                summary = {"command": mode, "status": "stopped", "step": state.step, "max_steps": int(tc.max_steps),
                           "checkpoint": str(last_ckpt) if last_ckpt else None}
                if is_main:
                    atomic_write_json(out_dir / "summary.json", summary)
                metrics_logger.close()
                return summary
            t0 = time.perf_counter()
            # 1. the step's micro-batches and their total count of response positions
            batches = [make_batch(train_split.dataset, stream.next(state)) for _ in range(int(tc.grad_accum))]
            count = reduce_sum(torch.tensor(float(sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)),
                                            device=device))
            # DDP averages gradients over processes; scale so the update is the mean over all positions
            denom = count.clamp_min(1.0) / world
            log_step = (state.step + 1) % int(tc.log_every) == 0

            # 2. forward / backward, one micro-batch at a time (gradients all-reduced on the last one)
            step_sums: dict[str, float] = {}
            align: dict[str, float] = {}
            finite = True
            for i, batch in enumerate(batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                sync = world == 1 or i == len(batches) - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(module)):
                    out = batch_objective(run_models, objective, batch, split="train",
                                          align_ks=ks if log_step and teacher is not None else None)
                    finite = finite and bool(torch.isfinite(out.total))
                    # every process runs every backward (DDP needs that); a non-finite step is skipped below
                    loss = out.total / denom
                    accelerator.backward(loss) if not solo else loss.backward()
                metrics_mod.add_sums(step_sums, {"loss": float(out.total.detach()),
                                                 **{f"loss/{k}": v for k, v in out.terms.items()}})
                metrics_mod.add_sums(align, out.align)
            if world > 1:  # skip the step on every process if any saw a non-finite loss
                finite = bool(reduce_sum(torch.tensor(0.0 if finite else 1.0, device=device)) == 0)

            # 3. optimizer step (skipped when the loss or the gradient is not finite)
            grad_norm = None
            if finite:
                params = [p for p in student.parameters() if p.requires_grad]
                if tc.get("max_grad_norm") is not None:
                    grad_norm = (accelerator.clip_grad_norm_(module.parameters(), float(tc.max_grad_norm)) if not solo
                                 else torch.nn.utils.clip_grad_norm_(params, float(tc.max_grad_norm)))
                elif not sharded:
                    grad_norm = torch.linalg.vector_norm(torch.stack(
                        [p.grad.detach().norm() for p in params if p.grad is not None]))
                if grad_norm is not None:  # (DeepSpeed clips inside its engine and reports no norm)
                    finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
            if finite:
                optimizer.step()
                scheduler.step()
                state.bad_steps = 0
            else:
                state.bad_steps += 1
                state.skipped_steps += 1
                log.warning("%sstep %d: non-finite loss or gradient, optimizer step skipped (%d in a row)",
                            tag, state.step + 1, state.bad_steps)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            n_pos = int(count.item())
            state.tokens += n_pos
            state.train_time_s += time.perf_counter() - t0
            if state.bad_steps >= int(tc.max_bad_steps):
                write_metrics({"step": state.step, "split": "train", "skipped_steps": state.skipped_steps,
                               "error": "non-finite loss"})
                raise RlkdError(f"{state.bad_steps} consecutive steps had a non-finite loss or gradient (last at "
                                f"step {state.step}); lower trainer.lr, check the data, or raise trainer.max_bad_steps")

            # 4. log (sums over all processes; n_pos is already global)
            if world > 1:  # every process has the same keys (the same objective)
                keys = sorted(step_sums)
                summed = reduce_sum(torch.tensor([step_sums[k] for k in keys], device=device, dtype=torch.float64))
                step_sums = dict(zip(keys, summed.tolist()))
            if finite:
                for key, value in step_sums.items():
                    window[key] = window.get(key, 0.0) + value / max(n_pos, 1)
                window_steps += 1
                window_tokens += n_pos
            if state.step % int(tc.log_every) == 0 or state.step == int(tc.max_steps):
                elapsed = time.perf_counter() - t_window
                record: dict[str, Any] = {"step": state.step, "split": "train"}
                record.update({k: v / max(window_steps, 1) for k, v in window.items()})
                align = _sum_over_processes(align, world)
                if align:
                    record.update(metrics_mod.finalize(align))
                record.update({"lr": scheduler.get_last_lr()[0],
                               "grad_norm": float(grad_norm) if grad_norm is not None else None,
                               "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                               "skipped_steps": state.skipped_steps, "epoch": state.epoch,
                               "elapsed_s": round(state.train_time_s, 3)})
                write_metrics(record)
                progress.update(state.step, record)
                window, window_steps, window_tokens, t_window = {}, 0, 0, time.perf_counter()
            else:
                progress.update(state.step, None)

            # 5. validate, checkpoint
            if int(tc.eval_every) > 0 and state.step % int(tc.eval_every) == 0 and state.step < int(tc.max_steps):
                val = evaluate(run_models, val_batches, objective, ks, world=world, rank=rank)
                write_metrics({"step": state.step, "split": "validation", **val})
                progress.update(state.step, val, validation=True)
            if int(tc.save_every) > 0 and state.step % int(tc.save_every) == 0 and state.step < int(tc.max_steps):
                last_ckpt = save()
            stopping = stop["signal"] is not None
            if world > 1:  # every process stops at the same step (a sharded checkpoint needs them all)
                stopping = bool(reduce_sum(torch.tensor(float(stopping), device=device)) > 0)
            if stopping:
                last_ckpt = save()
                log.warning("%sSIGTERM: checkpoint %s written at step %d; resume with trainer.resume=auto",
                            tag, last_ckpt, state.step)
                raise SystemExit(143)
    except BaseException:
        metrics_logger.close()
        raise
    finally:
        progress.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    # --- final validation, checkpoint, summary ---------------------------------------------------------
    val = evaluate(run_models, val_batches, objective, ks, world=world, rank=rank)
    write_metrics({"step": state.step, "split": "validation", **val})
    metrics_logger.close()
    last_ckpt = save()
    summary = {
        "command": mode, "status": "completed", "step": state.step, "max_steps": int(tc.max_steps),
        "checkpoint": str(last_ckpt) if last_ckpt else None, "loss_mix": objective.describe(),
        "trained": models.describe(trained_cfg),
        "teacher": teacher_desc,
        "device": device_name, "precision": precision, "processes": world,
        "skipped_steps": state.skipped_steps, "train_tokens": state.tokens,
        "train_time_s": round(state.train_time_s, 3),
        "val_loss": val.get("loss"), "val_ppl": val.get("ppl"),
        **{k: v for k, v in val.items() if k.startswith(("cr@", "or@", "loss/"))},
        "train_examples": train_split.stats.get("num_examples"),
        "train_truncated": train_split.stats.get("num_truncated"),
    }
    if is_main:
        atomic_write_json(out_dir / "summary.json", summary)
    if world > 1:
        accelerator.wait_for_everyone()
    log.info("%sdone: %s", tag, ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                                           if isinstance(v, float) and k.startswith(("cr@", "or@", "val_"))
                                           and "|" not in k))
    return summary


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers/hub while saving and loading (the engine has its own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Progress:
    """A rich progress bar showing the latest loss, CR@1/CR@2 and OR@5 (a no-op when disabled)."""

    def __init__(self, *, enabled: bool, total: int, start: int, label: str):
        self.enabled = enabled
        self.text = ""
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 transient=False)
        self.task = self.progress.add_task(label, total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, record: dict[str, Any] | None, validation: bool = False) -> None:
        if not self.enabled:
            return
        if record is not None:
            parts = [f"{'val ' if validation else ''}loss {record.get('loss', float('nan')):.3f}"]
            for key in ("cr@1", "cr@2", "or@5"):
                if key in record:
                    parts.append(f"{key} {record[key]:.3f}")
            self.text = "  ".join(parts)
        self.progress.update(self.task, completed=step, info=self.text)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
