"""The training loop behind ``rlkd sft`` and ``rlkd distill``: read :func:`train` top to bottom.

Set up (data, objective, student, optimizer: :func:`setup`), resume (:func:`resume`), then for each
step: the step (:func:`~rlkd_cli.engine.step.train_step`), log, validate, checkpoint, stop. The
command hands it a ready :class:`~rlkd_cli.runtime.Runtime`, tokenizer and teacher source (``None``
for sft); the loop never trains anything else.

Output (in the run dir): ``metrics.jsonl`` (one JSON object per log step and per validation; with
``trainer.eval_every > 0`` a validation at step 0 too, where the curves start),
``summary.json`` (final validation metrics as flat keys ``cr@1``, ``or@5``, ...),
``checkpoints/step-NNNNNN/`` and ``checkpoints/latest`` (:mod:`rlkd_cli.engine.checkpoint`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlkd_cli import models, rollout
from rlkd_cli.data import dataset as data_mod
from rlkd_cli.data import loader as loader_mod
from rlkd_cli.engine import checkpoint, rundir, schedule
from rlkd_cli.engine.checkpoint import TrainState
from rlkd_cli.engine.progress import Progress
from rlkd_cli.engine.step import StepResult, TeacherSource, Trainer, train_step
from rlkd_cli.engine.trackers import RunLog
from rlkd_cli.engine.validation import validate
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import atomic_write_json, atomic_write_text
from rlkd_cli.losses import Objective
from rlkd_cli.metrics import finalize
from rlkd_cli.runtime import Runtime

log = logging.getLogger("rlkd.engine")


@dataclass
class Setup:
    """What the loop runs on: the trainer (student, optimizer, teacher, objective), the data, the labels."""

    trainer: Trainer
    tokenizer: Any
    train: data_mod.TokenizedSplit
    val_batches: list
    batches: Any           # the source of each step's micro-batches (``next(state)``)
    ks: list[int]
    role: str
    label: str
    saved: tuple[int, Path | None] | None = None   # (step, path) of the last checkpoint written


def train(cfg: DictConfig, run_dir: str | Path, *, runtime: Runtime, tokenizer, teacher: TeacherSource | None = None,
          role: str = "student", label: str | None = None) -> dict[str, Any]:
    """Train ``cfg[role]`` with ``cfg.loss`` (from ``teacher`` when it reads one); return the summary."""
    tc = cfg.trainer
    run_dir = Path(run_dir)
    if runtime.is_main:
        rundir.claim(run_dir, command=str(cfg.get("command", "train")), resume=bool(tc.get("resume")))
    try:
        s = setup(cfg, runtime, tokenizer, teacher, role=role, label=label or str(cfg.get("command", role)))
        state = resume(cfg, run_dir, s)  # every check that can refuse: nothing in the run dir is written before
        done = _already_completed(run_dir, state, int(tc.max_steps))
        if done is not None:
            log.info("[%s] %s already holds the completed run (step %d); nothing to do", s.label, run_dir, state.step)
            return done
        if runtime.is_main:
            commit(cfg, run_dir, state)
        stop_at = min(int(tc.max_steps), state.step + int(tc.stop_after)) if tc.get("stop_after") else int(tc.max_steps)
        log.info("[%s] %s on %s, %s, %d steps of %d examples, loss = %s", s.label, models.describe(cfg[role]),
                 runtime.describe(), f"teacher {teacher.describe()}" if teacher is not None else "no teacher",
                 int(tc.max_steps), int(tc.batch_size), s.trainer.objective.describe())
        metrics = RunLog(run_dir, cfg.get("logger"), enabled=runtime.is_main,
                         config=OmegaConf.to_container(cfg, resolve=True))
        bar = Progress(enabled=bool(tc.get("progress", True)) and runtime.is_main, total=int(tc.max_steps),
                       start=state.step, label=s.label)
        window = _Window()
        runtime.new_memory_window()  # the memory figures are the training's (not set-up's, not a teacher's training)
        with _stop_signals(s.label) as stop, contextlib.closing(metrics), contextlib.closing(bar):
            if state.step == 0 and int(tc.eval_every) > 0:  # where the curves start: the untrained student
                val = validate(s.trainer, s.val_batches, s.ks)
                metrics.write({"step": 0, "split": "validation", **val})
                bar.update(0, val, validation=True)
            while state.step < int(tc.max_steps):
                if state.step >= stop_at:  # time-sliced run: checkpoint and stop; trainer.resume=auto goes on
                    return finish(cfg, run_dir, s, state, status="stopped")
                log_step = (state.step + 1) % int(tc.log_every) == 0 or state.step + 1 == int(tc.max_steps)
                t0 = time.perf_counter()
                batches = s.batches.next(state)  # the dataset's, or generated (rollout)
                result = train_step(s.trainer, batches, align_ks=s.ks if log_step and teacher is not None else None)
                result.seconds = time.perf_counter() - t0  # the whole step, generation included
                try:
                    advance(state, result, max_bad=int(tc.max_bad_steps), metrics=metrics)
                except RlkdError as e:  # too many non-finite steps in a row: a failed run, said so in summary.json
                    fail(cfg, run_dir, s, state, str(e))
                window.add(result)
                if log_step:
                    record = window.record(state, s.trainer, s.batches)
                    metrics.write(record)
                    bar.update(state.step, record)
                else:
                    bar.update(state.step)
                if _due(state.step, tc.eval_every, tc.max_steps):
                    val = validate(s.trainer, s.val_batches, s.ks)
                    metrics.write({"step": state.step, "split": "validation", **val})
                    bar.update(state.step, val, validation=True)
                    getattr(s.batches, "on_validation", lambda v: None)(val)
                if _due(state.step, tc.save_every, tc.max_steps):
                    save(cfg, run_dir, s, state)
                if runtime.any(stop.is_set()):  # every process stops at the same step
                    summary = finish(cfg, run_dir, s, state, status="stopped", reason=stop.reason)
                    log.warning("[%s] %s: checkpoint %s written at step %d; resume with trainer.resume=auto "
                                "hydra.run.dir=%s", s.label, stop.reason, summary["checkpoint"], state.step, run_dir)
                    raise SystemExit(130 if stop.reason == "SIGINT" else 143)
            val = validate(s.trainer, s.val_batches, s.ks)
            metrics.write({"step": state.step, "split": "validation", **val})
        return finish(cfg, run_dir, s, state, status="failed" if state.skipped_steps >= state.step else "completed",
                      val=val, reason=f"no step trained: all {state.step} steps had a non-finite loss or gradient "
                                      "and were skipped")
    finally:
        if runtime.is_main:
            rundir.release(run_dir)
        runtime.release()


# ----------------------------------------------------------------------------------------------
# Set-up and resume
# ----------------------------------------------------------------------------------------------

def setup(cfg: DictConfig, runtime: Runtime, tokenizer, teacher: TeacherSource | None, *, role: str,
          label: str) -> Setup:
    """Data (tokenized once, cached), objective, student and its optimizer, the step's batch source."""
    tc = cfg.trainer
    objective = Objective.from_config(cfg.loss)
    require(teacher is not None or not objective.needs_teacher,
            f"loss '{cfg.loss.get('name', '?')}' needs a teacher but `rlkd sft` has none; use loss=ce with sft, "
            "or run rlkd distill")
    objective.check(len(tokenizer))
    cache = Path(str(cfg.cache_dir)).expanduser() / "datasets"
    train_split = data_mod.build_split(cfg.dataset, tokenizer, "train", cache_dir=cache)
    val_split = data_mod.build_split(cfg.dataset, tokenizer, "validation", limit=tc.get("eval_examples"),
                                     cache_dir=cache)
    for name, split in (("train", train_split), ("validation", val_split)):
        st = split.stats
        log.info("[%s] %s split: %d examples, %d truncated at max_length=%s, %d dropped", label, name,
                 st.get("num_examples", 0), st.get("num_truncated", 0), cfg.dataset.get("max_length"),
                 st.get("num_dropped", 0))
    ks = sorted(set(int(k) for k in cfg.metrics.ks))
    if teacher is not None:
        teacher.check(objective, ks, {"train": train_split, "validation": val_split})
    micro = int(tc.batch_size) // int(tc.grad_accum)
    require(micro % runtime.world == 0, f"trainer.batch_size/grad_accum ({micro}) must be divisible by the number "
                                        f"of processes ({runtime.world})")
    micro //= runtime.world
    torch.manual_seed(int(cfg.seed))
    model = student_model(cfg, tokenizer, role=role, runtime=runtime, label=label)
    trainer = Trainer.create(runtime, model, objective=objective, teacher=teacher, vocab=len(tokenizer), tc=tc,
                             micro_batch=micro)
    log.info("[%s] loss over response positions in chunks of %d; LM heads %s", label, trainer.chunk,
             "applied per chunk" if trainer.head is not None else "through the models' full logits")
    pad = loader_mod.pad_id(tokenizer)
    loader, sampler = loader_mod.train_loader(train_split.dataset, micro_batch=micro, seed=int(cfg.seed),
                                              rank=runtime.rank, world=runtime.world, pad_token_id=pad)
    val_batches = loader_mod.eval_batches(val_split.dataset, batch_size=micro, pad_token_id=pad)
    rc = cfg.get("rollout") or {"name": "off"}
    rollout.check(rc, teacher_cache=teacher is not None and not hasattr(teacher, "model"),
                  dataset_kind=str(cfg.dataset.kind), sharded=runtime.sharded)
    batches = rollout.make_source(rc, DatasetBatches(loader, sampler, int(tc.grad_accum)), trainer=trainer,
                                  tokenizer=tokenizer, seed=int(cfg.seed), max_length=int(cfg.dataset.max_length),
                                  prompts=train_split.dataset)
    return Setup(trainer=trainer, tokenizer=tokenizer, train=train_split, val_batches=val_batches, batches=batches,
                 ks=ks, role=role, label=label)


def student_model(cfg: DictConfig, tokenizer, *, role: str, runtime: Runtime, label: str):
    """The model to train: loaded or built, LoRA-wrapped per ``<role>.peft``, gradient checkpointing per the trainer."""
    mc, tc = cfg[role], cfg.trainer
    # fp32 weights, so AdamW updates fp32 masters (transformers keeps a checkpoint's saved dtype, bf16 for most
    # hub models, when none is given); bf16 training computes in bf16 through autocast
    model = models.load_model(mc, tokenizer, role=role, seed=int(cfg.seed), dtype=torch.float32)
    if (mc.get("peft") or {}).get("r"):
        require(not runtime.sharded, f"{role}.peft (LoRA) runs under DDP or on one process; FSDP/DeepSpeed shard the "
                                     f"model and rlkd does not save sharded adapters: use DDP or {role}.peft.r=null")
        model = models.apply_peft(model, mc.peft, seed=int(cfg.seed), role=role)
    if tc.get("gradient_checkpointing"):
        models.enable_gradient_checkpointing(model, role=role)
    trainable, total = models.parameter_counts(model)
    log.info("[%s] %s: %s of %s parameters trainable (%.2f %%)%s", label, role, f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(total, 1), ", gradient checkpointing" if tc.get("gradient_checkpointing") else "")
    return model


def resume(cfg: DictConfig, run_dir: Path, s: Setup) -> TrainState:
    """A fresh :class:`TrainState`, or the one of the checkpoint ``trainer.resume`` names (weights, optimizer,
    schedule, RNG and data position restored; the config and the training data must be the same)."""
    tc, rt = cfg.trainer, s.trainer.runtime
    state = TrainState(data_fingerprint=s.train.fingerprint, schedule_steps=int(tc.max_steps))
    if tc.get("resume"):
        if rt.distributed:  # process 0 tidies a killed save's leftovers; the others then look
            if rt.is_main:
                checkpoint.clean_leftovers(run_dir / "checkpoints")
            rt.barrier()
        ckpt = checkpoint.find_resume(run_dir, str(tc.resume), clean=not rt.distributed)
        if ckpt is None:
            log.info("[%s] trainer.resume=auto: no checkpoint in %s yet, starting fresh", s.label, run_dir)
        else:
            force = bool(tc.get("force_resume", False))
            saved = checkpoint.check_resumable(ckpt, cfg, sharded=rt.sharded, force=force)
            state = checkpoint.load(ckpt, s.trainer)
            state.schedule_start, state.schedule_steps = schedule.decide(state, saved, cfg, s.label)
            schedule.apply(s.trainer.scheduler, tc, state.schedule_start, state.schedule_steps)
            if state.data_fingerprint and state.data_fingerprint != s.train.fingerprint and not force:
                raise RlkdError(f"cannot resume from {ckpt}: it was trained on other data (training split fingerprint "
                                f"{state.data_fingerprint}, this run's {s.train.fingerprint}); use the data it was "
                                "trained on, or set trainer.force_resume=true")
            state.data_fingerprint = s.train.fingerprint
            s.batches.load_state(state)
            if hasattr(s.batches, "load"):
                s.batches.load(ckpt, rt.rank)
            log.info("[%s] resumed from %s at step %d", s.label, ckpt, state.step)
    return state


def _already_completed(run_dir: Path, state: TrainState, max_steps: int) -> dict[str, Any] | None:
    """The summary of a completed run resumed at its last step with nothing left to do (left as it is)."""
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(summary, dict) and summary.get("status") == "completed" and summary.get("step") == state.step \
            and state.step >= max_steps:
        rundir.restore(run_dir)  # not run: Hydra's record stays the completed run's
        return summary
    return None


def commit(cfg: DictConfig, run_dir: Path, state: TrainState) -> None:
    """The run is accepted: from here on it writes into the run dir (the previous summary goes; metrics logged
    after the checkpoint's step are dropped, as they are logged again; the resolved config)."""
    rundir.accept(run_dir)
    rundir.trim_metrics(run_dir, state.step)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


# ----------------------------------------------------------------------------------------------
# The pieces of one iteration
# ----------------------------------------------------------------------------------------------

class DatasetBatches:
    """Each step's ``grad_accum`` micro-batches from the dataset's responses (off-policy)."""

    def __init__(self, loader, sampler: loader_mod.StepSampler, grad_accum: int):
        self.sampler, self.grad_accum = sampler, grad_accum
        self.iterator = iter(loader)

    def next(self, state: TrainState) -> list[dict[str, torch.Tensor]]:
        batches = [next(self.iterator) for _ in range(self.grad_accum)]
        state.epoch, state.position = self.sampler.epoch, self.sampler.position
        return batches

    def load_state(self, state: TrainState) -> None:
        self.sampler.load_state_dict({"epoch": state.epoch, "position": state.position})


def advance(state: TrainState, result: StepResult, *, max_bad: int, metrics: RunLog) -> None:
    """Count the step; stop the run after ``max_bad`` non-finite steps in a row."""
    state.step += 1
    state.positions += result.positions
    state.tokens += result.tokens
    state.train_time_s += result.seconds
    if result.finite:
        state.bad_steps = 0
        return
    state.bad_steps += 1
    state.skipped_steps += 1
    log.warning("step %d: non-finite loss or gradient, optimizer step skipped (%d in a row)", state.step,
                state.bad_steps)
    if state.bad_steps >= max_bad:
        metrics.write({"step": state.step, "split": "train", "skipped_steps": state.skipped_steps,
                       "error": "non-finite loss"})
        raise RlkdError(f"{state.bad_steps} consecutive steps had a non-finite loss or gradient (last at step "
                        f"{state.step}); lower trainer.lr, check the data, or raise trainer.max_bad_steps")


class _Window:
    """Means of the train metrics over the steps since the last log step."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.align: dict[str, float] = {}
        self.steps = self.positions = self.tokens = 0
        self.seconds = 0.0
        self.grad_norm: float | None = None

    def add(self, r: StepResult) -> None:
        if r.finite:
            for key, value in r.sums.items():
                self.sums[key] = self.sums.get(key, 0.0) + value / max(r.positions, 1)
            self.steps += 1
        for key, value in r.align.items():
            self.align[key] = self.align.get(key, 0.0) + value
        self.positions += r.positions
        self.tokens += r.tokens
        self.seconds += r.seconds
        self.grad_norm = r.grad_norm

    def record(self, state: TrainState, trainer: Trainer, batches: Any = None) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": state.step, "split": "train",
                               **{k: v / max(self.steps, 1) for k, v in self.sums.items()}}
        if self.align:
            rec.update(finalize(self.align))
        if hasattr(batches, "stats"):  # on-policy runs: what was generated in this window
            rec.update(batches.stats(self.seconds))
        rec.update(trainer.runtime.peak_memory())  # this window's peak (CUDA allocator or RSS), then reset
        rec.update({"lr": trainer.lr, "grad_norm": self.grad_norm,
                    "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
                    "positions_per_s": self.positions / max(self.seconds, 1e-9),
                    "skipped_steps": state.skipped_steps, "epoch": state.epoch,
                    "elapsed_s": round(state.train_time_s, 3)})
        self.__init__()
        return rec


def _due(step: int, every: Any, max_steps: Any) -> bool:
    return int(every) > 0 and step % int(every) == 0 and step < int(max_steps)


class _Stop(threading.Event):
    """Set by SIGTERM (a scheduler's pre-emption) or a first Ctrl-C; ``reason`` names the signal."""

    reason = "SIGTERM"


@contextlib.contextmanager
def _stop_signals(label: str):
    """SIGTERM and SIGINT set a flag: the loop finishes its step, checkpoints and stops. A second Ctrl-C aborts
    at once (``KeyboardInterrupt``; the steps since the last checkpoint are lost)."""
    flag = _Stop()
    main = threading.current_thread() is threading.main_thread()

    def on_signal(signum, frame):
        if signum == signal.SIGINT and flag.is_set():
            raise KeyboardInterrupt
        if not flag.is_set():
            flag.reason = signal.Signals(signum).name
        flag.set()
        if signum == signal.SIGINT:
            log.warning("[%s] SIGINT: stopping after this step with a checkpoint (Ctrl-C again to abort at once)",
                        label)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        yield flag
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# Checkpoints and the end of a run
# ----------------------------------------------------------------------------------------------

def save(cfg: DictConfig, run_dir: Path, s: Setup, state: TrainState) -> Path | None:
    """A checkpoint of this step (once per step: a SIGTERM right after a scheduled save reuses it)."""
    if s.saved is not None and s.saved[0] == state.step:
        return s.saved[1]
    extra = None
    if hasattr(s.batches, "save"):  # a rollout source's RNG, replay buffer and reused batches, per process
        def extra(folder: Path) -> None:
            s.batches.save(folder, s.trainer.runtime.rank)
    path = checkpoint.save(run_dir, s.trainer, tokenizer=s.tokenizer, cfg=cfg, state=state,
                           keep_last=int(cfg.trainer.keep_last), merge_adapter=bool(cfg.trainer.get("merge_adapter")),
                           base_source=_base_source(cfg[s.role]), extra=extra)
    s.saved = (state.step, path)
    return path


def _base_source(model_cfg: DictConfig) -> str | None:
    """Where a LoRA student's base weights come from: its ``name_or_path`` (absolute when local), else ``None``
    (built from an ``arch`` spec, or itself a LoRA checkpoint: the checkpoint stores them in ``base/``)."""
    name = model_cfg.get("name_or_path")
    if not name:
        return None
    local = Path(str(name)).expanduser()
    if models.is_adapter(local):  # a LoRA checkpoint, merged on load: plain peft could not load it as a base
        return None
    return str(local.resolve()) if local.exists() else str(name)


def fail(cfg: DictConfig, run_dir: Path, s: Setup, state: TrainState, message: str) -> None:
    """End a run that cannot go on (non-finite steps): ``summary.json`` with status ``failed`` and the reason,
    so no earlier summary or report takes it for a finished run, then the error line (exit 2)."""
    rt = s.trainer.runtime
    if rt.is_main:
        atomic_write_json(run_dir / "summary.json", {
            "command": cfg.get("command"), "status": "failed", "error": message, "step": state.step,
            "max_steps": int(cfg.trainer.max_steps), "skipped_steps": state.skipped_steps,
            "checkpoint": str(s.saved[1]) if s.saved and s.saved[1] else None})
    raise RlkdError(message)


def finish(cfg: DictConfig, run_dir: Path, s: Setup, state: TrainState, *, status: str,
           val: dict[str, float] | None = None, reason: str = "trainer.stop_after") -> dict[str, Any]:
    """The last checkpoint and ``summary.json``: ``completed`` with the final validation, ``stopped``
    (``trainer.stop_after`` or SIGTERM; ``trainer.resume=auto`` continues it), or ``failed`` (no step was
    trained: every update was skipped as non-finite; no checkpoint, and an error line, exit 2)."""
    tc, rt = cfg.trainer, s.trainer.runtime
    if status == "failed":  # no final checkpoint of a model that was never trained
        fail(cfg, run_dir, s, state, f"{reason} (the teacher's or student's logits are NaN/Inf, or trainer.lr is "
                                     "far too high); nothing was trained, summary.json says status 'failed'")
    path = save(cfg, run_dir, s, state)
    summary: dict[str, Any] = {"command": cfg.get("command"), "status": status, "step": state.step,
                               "max_steps": int(tc.max_steps), "checkpoint": str(path) if path else None}
    if status == "stopped":
        summary.update(reason=reason, resumable=True)
        if reason not in ("SIGTERM", "SIGINT"):
            log.info("[%s] %s: stopped at step %d with checkpoint %s", s.label, reason, state.step, path)
    else:
        val = val or {}
        teacher = s.trainer.teacher
        summary.update({
            "loss_mix": s.trainer.objective.describe(), "trained": models.describe(cfg[s.role]),
            "teacher": teacher.describe() if teacher is not None else None,
            "device": rt.device_name, "precision": rt.precision, "processes": rt.world,
            "skipped_steps": state.skipped_steps, "train_positions": state.positions, "train_tokens": state.tokens,
            "train_time_s": round(state.train_time_s, 3), "val_loss": val.get("loss"), "val_ppl": val.get("ppl"),
            **{k: v for k, v in val.items() if k.startswith(("cr@", "or@", "loss/"))},
            "train_examples": s.train.stats.get("num_examples"), "train_truncated": s.train.stats.get("num_truncated"),
            "rollout": str((cfg.get("rollout") or {}).get("name", "off")),
        })
        trainable, total = models.parameter_counts(s.trainer.model)
        summary.update({"params/trainable": trainable, "params/total": total, **rt.peaks})
        if hasattr(s.batches, "stats"):
            summary.update(s.batches.stats(state.train_time_s, total=True))
        log.info("[%s] done: %s", s.label, ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                                                   if isinstance(v, float) and k.startswith(("cr@", "or@", "val_"))
                                                   and "|" not in k))
    if rt.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    rt.barrier()
    return summary
