"""Checkpoints: written atomically, resumed exactly, loaded safely; one format for every launch.

``checkpoints/step-NNNNNN/`` holds

* a Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer files) that plain
  ``transformers`` loads; for a LoRA student the adapter (``adapter_config.json``,
  ``adapter_model.safetensors``) that plain ``peft`` loads, and with ``trainer.merge_adapter=true``
  the merged model beside it in ``merged/``;
* ``rlkd_config.yaml`` (the resolved run config) and ``trainer_state.json`` (:class:`TrainState`:
  step, data position, counters, data fingerprint);
* ``accelerate_state/``: Accelerate's ``save_state`` of the optimizer, the schedule and every
  process's RNG states (and, for FSDP / DeepSpeed, the sharded model and optimizer), restored with
  ``load_state``. Its model weights are not written twice: a save hook hands them to the model
  folder above, a load hook loads them from there.

A checkpoint is assembled in ``checkpoints/.tmp-step-N`` and published with one rename, then
``checkpoints/latest`` (the newest complete checkpoint's name) is rewritten, then old ones are
pruned: a killed run never leaves a half checkpoint under a ``step-*`` name. Loading reads weights
from safetensors only and every state file with ``torch.load(weights_only=True)`` (Accelerate's
loader): pickled code is refused, never run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from rlkd_cli import models
from rlkd_cli.engine.step import Trainer
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import atomic_write_json, atomic_write_text, first_line, publish_dir, write_error

log = logging.getLogger("rlkd.engine")

STATE_DIR = "accelerate_state"
_RNG_FILE = "random_states_0.pkl"
#: What every checkpoint holds (the model files are models.WEIGHT_FILES or the adapter's).
CHECKPOINT_FILES = ("config.json", "rlkd_config.yaml", "trainer_state.json", f"{STATE_DIR}/{_RNG_FILE}")
#: What an unsharded run's accelerate_state adds.
UNSHARDED_STATE_FILES = (f"{STATE_DIR}/optimizer.bin", f"{STATE_DIR}/scheduler.bin")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # data epoch of the next micro-batch
    position: int = 0        # index into that epoch's permutation of the next micro-batch
    bad_steps: int = 0       # consecutive non-finite steps
    skipped_steps: int = 0   # all non-finite steps skipped so far
    positions: int = 0       # response (loss) positions trained on
    tokens: int = 0          # input tokens trained on (padding excluded)
    train_time_s: float = 0.0
    data_fingerprint: str = ""   # of the training split (a resume on other data is refused)
    sharded: bool = False        # written by an FSDP / DeepSpeed run
    schedule_start: int = 0      # the step the learning-rate schedule began at (trainer.on_max_steps_change=restart)
    schedule_steps: int = 0      # its length in steps (0: the checkpoint config's trainer.max_steps)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        """Parse ``trainer_state.json``; ValueError naming the field whose value has the wrong type."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, kind = data[f.name], type(f.default)
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))
                if kind in (int, float) else isinstance(value, kind))
            if not ok:
                raise ValueError(f"{f.name} is {value!r}, not {'a number' if kind in (int, float) else 'a ' + kind.__name__}")
            values[f.name] = kind(value)
        return cls(**values)


def read_state(ckpt: Path) -> TrainState:
    """The checkpoint's :class:`TrainState`; one line naming the file when it is missing or damaged."""
    try:
        return TrainState.from_json((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError, TypeError, OverflowError) as e:
        raise RlkdError(f"checkpoint {ckpt} is corrupt: trainer_state.json cannot be read ({first_line(e)}); "
                        "resume from an earlier checkpoints/step-* folder") from e


def step_of(path: Path) -> int:
    """The step a ``step-N`` folder name stands for (-1 for any other name): checkpoints sort by it, not by name
    (``step-1000000`` sorts before ``step-999999`` as a string)."""
    digits = path.name[len("step-"):]
    return int(digits) if path.name.startswith("step-") and digits.isdigit() else -1


def step_folders(root: Path) -> list[Path]:
    """The ``step-N`` folders of ``checkpoints/``, oldest first (by step)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and step_of(p) >= 0), key=step_of)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def _skip_weights_hook(models_, weights, output_dir):
    """Accelerate's save hook: the model weights go to the Hugging Face folder, not into accelerate_state."""
    weights.clear()


def _skip_models_hook(models_, input_dir):
    """Accelerate's load hook: the model weights come from the Hugging Face folder (see :func:`load`)."""
    models_.clear()


def save(run_dir: Path, trainer: Trainer, *, tokenizer, cfg: DictConfig, state: TrainState, keep_last: int,
         merge_adapter: bool = False, base_source: str | None = None,
         extra: Callable[[Path], None] | None = None) -> Path | None:
    """Write ``checkpoints/step-N`` (every process must call it); return its path on process 0.

    A save that fails leaves the previous checkpoints as they were (the half folder is removed); a
    full disk is one line saying so, whichever library's write noticed it.
    """
    tmp = Path(run_dir) / "checkpoints" / f".tmp-step-{state.step:06d}"
    try:
        return _save(run_dir, trainer, tokenizer=tokenizer, cfg=cfg, state=state, keep_last=keep_last,
                     merge_adapter=merge_adapter, base_source=base_source, extra=extra)
    except Exception as ex:
        error = write_error(ex, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from ex
        raise


def _save(run_dir: Path, trainer: Trainer, *, tokenizer, cfg: DictConfig, state: TrainState, keep_last: int,
          merge_adapter: bool, base_source: str | None, extra: Callable[[Path], None] | None) -> Path | None:
    rt = trainer.runtime
    root = Path(run_dir) / "checkpoints"
    name = f"step-{state.step:06d}"
    tmp = root / f".tmp-{name}"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()
    if extra is not None:  # every process's own state beside the model (the rollout source's, for instance)
        extra(tmp)
    handle = rt.accelerator.register_save_state_pre_hook(_skip_weights_hook) if not rt.sharded else None
    try:
        rt.accelerator.save_state(str(tmp / STATE_DIR))
    finally:
        if handle is not None:
            handle.remove()
    rt.barrier()  # every process's RNG file is written before process 0 publishes the folder
    full = rt.accelerator.get_state_dict(trainer.module) if rt.sharded else None  # a collective when sharded
    path = None
    if rt.is_main:
        models.save_model(trainer.model, tmp, state_dict=full, merge_adapter=merge_adapter, base_source=base_source)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "rlkd_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        state.sharded = rt.sharded
        atomic_write_json(tmp / "trainer_state.json", asdict(state))
        path = root / name
        publish_dir(tmp, path)
        atomic_write_text(root / "latest", name + "\n")
        _prune(root, name, keep_last)
    rt.barrier()
    return path


def _prune(root: Path, keep: str, keep_last: int) -> None:
    steps = step_folders(root)
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from
# ----------------------------------------------------------------------------------------------

def missing_files(path: Path) -> list[str]:
    """The files of a complete rlkd checkpoint that ``path`` lacks (all of them if it is no folder)."""
    if not path.is_dir():
        return ["the folder"]
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if not models.has_weights(path):
        missing.append("model weights (model.safetensors or adapter_model.safetensors)")
    try:
        sharded = TrainState.from_json((path / "trainer_state.json").read_text()).sharded
    except (OSError, ValueError, TypeError, OverflowError):
        return missing or ["a readable trainer_state.json"]
    if not sharded:
        missing += [f for f in UNSHARDED_STATE_FILES if not (path / f).is_file()]
    return missing


def clean_leftovers(root: Path) -> list[str]:
    """Tidy ``checkpoints/`` after a killed save; return the names removed.

    A save killed before its rename leaves a ``.tmp-*`` folder (or file): never complete, removed.
    A replacement killed between its two renames leaves ``.old-<name>-<pid>`` with ``<name>`` gone:
    that folder is the complete previous version and is renamed back; otherwise it is removed.
    """
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for item in sorted(root.iterdir()):
        if item.name.startswith(".old-"):
            original = root / item.name[len(".old-"):].rsplit("-", 1)[0]
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


def _pointer(root: Path) -> Path | None:
    """The checkpoint ``latest`` names: only a ``step-*`` name inside this ``checkpoints/`` counts."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not name.startswith("step-") or Path(name).name != name:
        log.warning("trainer.resume=auto: ignoring %s (it names %r, not a step-* folder of this run)", pointer, name)
        return None
    return root / name


def find_resume(run_dir: Path, resume: str, clean: bool = True) -> Path | None:
    """The checkpoint to resume from.

    ``auto``: the folder ``checkpoints/latest`` names if it is complete, else (a pointer lost, damaged
    or naming something else than a ``step-*`` folder of this run; a folder damaged after the fact)
    the newest complete ``checkpoints/step-*``; ``None`` when the run dir has no checkpoint yet.
    Leftovers of a killed save are cleaned first. Any other value is a path that must be a complete
    checkpoint.
    """
    if resume != "auto":
        path = Path(os.path.expanduser(resume))
        missing = missing_files(path)
        if missing:
            raise RlkdError(f"cannot resume from '{path}': not a complete rlkd checkpoint (missing "
                            f"{', '.join(missing)}); use trainer.resume=auto in the run dir or a checkpoints/step-* "
                            "folder")
        return path
    root = Path(run_dir) / "checkpoints"
    removed = clean_leftovers(root) if clean else []
    if removed:
        log.warning("trainer.resume=auto: removed leftovers of an interrupted save: %s", ", ".join(removed))
    candidates = [p for p in [_pointer(root)] if p is not None]
    candidates += step_folders(root)[::-1]
    if not candidates:
        return None
    for path in candidates:
        if not missing_files(path):
            if path != candidates[0]:
                log.warning("trainer.resume=auto: %s is missing or incomplete; using %s", candidates[0], path)
            return path
    why = f"{candidates[0].name} lacks {', '.join(missing_files(candidates[0]))}"
    raise RlkdError(f"cannot resume: {root} holds no complete checkpoint ({why}); start afresh in a new run dir "
                    "(hydra.run.dir=...) or pass trainer.resume=PATH of a complete checkpoints/step-* folder")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _safe_load(path: Path) -> Any:
    """Accelerate's ``load`` (``torch.load(weights_only=True)``, numpy arrays allowed); one line on failure."""
    import pickle

    from accelerate.utils import load as accelerate_load

    try:
        return accelerate_load(str(path), map_location="cpu")
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise RlkdError(f"refusing to load {path}: it holds pickled Python objects, not plain tensors "
                            "(rlkd loads trainer state with torch.load(weights_only=True) only); resume from a "
                            "checkpoint written by rlkd") from e
        raise RlkdError(f"checkpoint file {path} is corrupt ({first_line(e)}); resume from an earlier "
                        "checkpoints/step-* folder") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RlkdError(f"checkpoint file {path} is corrupt ({first_line(e)}); resume from an earlier "
                        "checkpoints/step-* folder") from e


def load(ckpt: Path, trainer: Trainer) -> TrainState:
    """Restore weights (safetensors only), optimizer, schedule and every RNG; return the trainer state.

    Any unreadable or inconsistent file is an :class:`RlkdError` naming it (nothing is half-restored
    silently: the caller stops). Accelerate would skip an unreadable RNG file with a log line, so
    this process's RNG file is checked first.
    """
    rt = trainer.runtime
    state = read_state(ckpt)
    rng = ckpt / STATE_DIR / f"random_states_{rt.rank}.pkl"
    require(rng.is_file(), f"checkpoint {ckpt} has no RNG state for process {rt.rank} ({rng.name}); it was written "
                           f"by a run with fewer processes: resume with the launcher config it was trained with")
    rng_state = _safe_load(rng)
    require(isinstance(rng_state, dict) and "torch_manual_seed" in rng_state,
            f"checkpoint file {rng} is corrupt (no RNG states in it); resume from an earlier checkpoints/step-* folder")
    if not rt.sharded:
        models.load_weights(trainer.model, ckpt)
    handle = rt.accelerator.register_load_state_pre_hook(_skip_models_hook) if not rt.sharded else None
    try:
        rt.accelerator.load_state(str(ckpt / STATE_DIR))
    except RlkdError:
        raise
    except Exception as e:  # an optimizer or schedule of another model, or a damaged file
        import pickle

        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise RlkdError(f"refusing to load {ckpt / STATE_DIR}: it holds pickled Python objects, not plain "
                            "tensors (rlkd loads trainer state with torch.load(weights_only=True) only); resume "
                            "from a checkpoint written by rlkd") from e
        raise RlkdError(f"checkpoint {ckpt} is corrupt or from another model/optimizer ({type(e).__name__}: "
                        f"{first_line(e)}); resume from an earlier checkpoints/step-* folder") from e
    finally:
        if handle is not None:
            handle.remove()
    return state


# ----------------------------------------------------------------------------------------------
# Which config changes a resume accepts
# ----------------------------------------------------------------------------------------------

#: Keys that may change between a run and its resumption without changing what is computed.
#: ``trainer.max_steps`` sets the schedule's length: :mod:`rlkd_cli.engine.schedule` decides on it
#: (``trainer.on_max_steps_change``).
RESUME_FREE_KEYS = {"trainer.resume", "trainer.force_resume", "trainer.progress", "trainer.max_steps",
                    "trainer.on_max_steps_change", "trainer.stop_after", "trainer.threads",
                    "trainer.eval_every", "trainer.save_every", "trainer.keep_last", "trainer.log_every",
                    "trainer.eval_examples", "checkpoints", "cache_dir", "logger"}
#: Validation drives ``rollout=adaptive``'s schedule (its share of generated steps grows when the
#: validation loss stalls): there, when and on what it validates changes what is computed.
VALIDATION_KEYS = {"trainer.eval_every", "trainer.eval_examples"}


def resume_free_keys(cfg: DictConfig) -> set[str]:
    """The keys a resume of ``cfg``'s run may change (which ones depends on the mode: see VALIDATION_KEYS)."""
    adaptive = str((cfg.get("rollout") or {}).get("name", "off")) == "adaptive"
    return RESUME_FREE_KEYS - VALIDATION_KEYS if adaptive else set(RESUME_FREE_KEYS)


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
    """Keys (dotted) whose values differ between two run configs, ignoring the resume-free keys of ``current``'s
    mode (:func:`resume_free_keys`)."""
    a, b = _flat(saved), _flat(current)
    free = resume_free_keys(current) & resume_free_keys(saved)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in free)]


def check_resumable(ckpt: Path, cfg: DictConfig, *, sharded: bool, force: bool) -> DictConfig:
    """Refuse to resume under a changed config (unless ``force``) or across sharded/unsharded launches; return
    the checkpoint's config."""
    try:
        saved = OmegaConf.load(ckpt / "rlkd_config.yaml")
    except Exception as e:  # yaml or OmegaConf errors: the file is damaged
        raise RlkdError(f"checkpoint {ckpt} is corrupt: rlkd_config.yaml cannot be read ({first_line(e)}); "
                        "resume from an earlier checkpoints/step-* folder") from e
    diff = config_differences(saved, cfg)
    if diff and not force:
        why = " (under rollout=adaptive validation drives the schedule)" if set(diff) & VALIDATION_KEYS else ""
        raise RlkdError(f"cannot resume from {ckpt}: the config differs in {', '.join(diff[:6])}"
                        f"{' ...' if len(diff) > 6 else ''}{why}; run with the checkpoint's config or set "
                        "trainer.force_resume=true")
    state = read_state(ckpt)
    if state.sharded != sharded:
        raise RlkdError(f"cannot resume from {ckpt}: it was written by a {'' if state.sharded else 'non-'}sharded run "
                        f"and this one is {'' if sharded else 'not '}sharded (FSDP/DeepSpeed); resume with the "
                        "launcher config it was trained with")
    return saved
