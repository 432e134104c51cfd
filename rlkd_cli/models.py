"""The ``teacher`` and ``student`` config groups: load a causal LM, or build one from an architecture spec.

A model config (``conf/teacher/*.yaml``, ``conf/student/*.yaml``) takes either

- ``name_or_path``: any Hugging Face hub id or local folder, loaded with ``AutoModelForCausalLM``
  (weights from safetensors only, ``trust_remote_code`` off unless the config turns it on); or
- ``arch``: keyword arguments of a transformers config (``model_type`` plus sizes) for a model built
  from scratch, its vocabulary sized to the tokenizer.

A teacher built from an ``arch`` spec must be trained before it can teach: its ``train_if_missing``
block holds the ``trainer`` settings with which ``rlkd distill`` trains it on first use (through the
same engine as ``rlkd sft``) and caches it under ``<cache_dir>/teachers/``. Concurrent jobs of a
sweep take a file lock, so it is trained once, and it is written through an atomic rename, so no
job ever loads half of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import atomic_dir, file_lock

log = logging.getLogger(__name__)

# How long the other processes of a multi-process launch wait for process 0 to train the tiny teacher.
TEACHER_WAIT_S = 3600

# Files that mark a folder as a finished Hugging Face model.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(name: str) -> bool:
    """True for an existing path or anything that cannot be a hub id (``org/name`` or ``name``)."""
    return Path(name).expanduser().exists() or not _HUB_ID.match(name)


def describe(model_cfg: DictConfig) -> str:
    """A short human name for a model config: its path, or ``arch:<type>-<layers>x<hidden>``."""
    if model_cfg.get("name_or_path"):
        return str(model_cfg.name_or_path)
    arch = model_cfg.get("arch") or {}
    return f"arch:{arch.get('model_type', '?')}-{arch.get('num_hidden_layers', '?')}x{arch.get('hidden_size', '?')}"


def load_pretrained(name_or_path: str, *, role: str, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with one-line errors for the usual mistakes."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(os.path.expanduser(str(name_or_path)))
    if _looks_local(str(name_or_path)) and not path.exists():
        raise RlkdError(f"{role} model folder '{name_or_path}' does not exist; set {role}.name_or_path to a "
                        "model folder (saved with save_pretrained) or a hub id")
    if path.is_dir() and not (path / "config.json").exists():
        raise RlkdError(f"'{name_or_path}' is not a model folder (no config.json); point {role}.name_or_path at "
                        "a folder written by save_pretrained, e.g. a checkpoint's step-* folder")
    if path.is_dir() and not any((path / f).exists() for f in _WEIGHT_FILES):
        raise RlkdError(f"'{name_or_path}' has no safetensors weights (model.safetensors); rlkd loads weights "
                        "from safetensors only: re-save the model with save_pretrained")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-file bars in rlkd's output
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": bool(trust_remote_code)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else str(name_or_path), **kwargs)
    except SafetensorError as e:
        raise RlkdError(f"{role} model '{name_or_path}' is corrupt: its safetensors weights cannot be read "
                        f"({_first_line(e)}); re-save it with save_pretrained (a cached tiny teacher: delete "
                        "the folder and it is trained again)") from e
    except ValueError as e:
        raise RlkdError(f"cannot load {role} model '{name_or_path}': {_first_line(e)}") from e
    except OSError as e:
        where = "not in the local hub cache (HF_HUB_OFFLINE is set)" if _offline() else "not reachable on the hub"
        raise RlkdError(f"cannot load {role} model '{name_or_path}': no such local folder, and {where} "
                        f"({_first_line(e)}); set {role}.name_or_path to a local model folder") from e
    return model


def build_from_arch(arch: DictConfig | dict, tokenizer, *, seed: int) -> torch.nn.Module:
    """A freshly initialised causal LM from a transformers config spec, vocabulary = the tokenizer's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else dict(arch)
    model_type = spec.pop("model_type", None)
    require(model_type is not None, "an arch spec needs model_type (e.g. llama, gpt2, qwen2); set it in the model config")
    spec.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, key, None)
        spec.setdefault(key, value)
    try:
        config = AutoConfig.for_model(model_type, **spec)
    except (ValueError, TypeError, KeyError) as e:
        raise RlkdError(f"bad arch spec for model_type '{model_type}': {_first_line(e)}") from e
    require(config.vocab_size >= len(tokenizer),
            f"arch vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens); "
            "drop vocab_size from the arch spec so it follows the tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def check_vocab(model: torch.nn.Module, tokenizer, *, role: str) -> None:
    """The model's output rows must cover the tokenizer; extra rows (vocabulary padding) are fine."""
    rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.vocab_size
    if rows < len(tokenizer):
        raise RlkdError(f"{role} has {rows} vocabulary rows but the tokenizer has {len(tokenizer)} tokens: they do "
                        "not belong together; use the tokenizer the model was trained with (tokenizer.name_or_path)")


def load_model(model_cfg: DictConfig, tokenizer, *, role: str, seed: int = 0,
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load ``name_or_path`` or build ``arch`` from scratch; check the vocabulary against the tokenizer."""
    if model_cfg.get("name_or_path"):
        model = load_pretrained(model_cfg.name_or_path, role=role, dtype=dtype,
                                trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    elif model_cfg.get("arch"):
        model = build_from_arch(model_cfg.arch, tokenizer, seed=seed)
        if dtype is not None:
            model = model.to(dtype)
    else:
        raise RlkdError(f"the {role} config has neither name_or_path nor arch; set {role}.name_or_path=PATH_OR_HUB_ID")
    check_vocab(model, tokenizer, role=role)
    return model


# ----------------------------------------------------------------------------------------------
# The tiny teacher: trained on first use, cached, shared by concurrent jobs.
# ----------------------------------------------------------------------------------------------

def teacher_cache_key(cfg: DictConfig) -> str:
    """A hash of everything that decides the cached teacher's weights."""
    from rlkd_cli import synthetic

    payload = {
        "arch": OmegaConf.to_container(cfg.teacher.arch, resolve=True),
        "train": OmegaConf.to_container(cfg.teacher.train_if_missing, resolve=True),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
        "seed": cfg.teacher.get("seed", 0),
        "generator": synthetic.GENERATOR_VERSION,
        "format": 1,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached_teacher_path(cfg: DictConfig) -> Path:
    name = cfg.teacher.get("name") or "teacher"
    return Path(os.path.expanduser(str(cfg.cache_dir))) / "teachers" / f"{name}-{teacher_cache_key(cfg)}"


def ensure_teacher(cfg: DictConfig, tokenizer) -> str:
    """Return a folder holding the teacher; train and cache it first if it is an arch spec.

    Training happens under a file lock (concurrent sweep jobs wait for the first one, then load
    its result) and is written through :func:`atomic_dir` (a killed run leaves no half folder).
    """
    if cfg.teacher.get("name_or_path"):
        return str(cfg.teacher.name_or_path)
    require(bool(cfg.teacher.get("arch")),
            "the teacher config has neither name_or_path nor arch; set teacher.name_or_path=PATH_OR_HUB_ID")
    require(cfg.teacher.get("train_if_missing") is not None,
            "a teacher built from an arch spec needs a train_if_missing block (an untrained teacher teaches "
            "nothing); set teacher.name_or_path to a trained model, or use teacher=tiny")
    path = cached_teacher_path(cfg)
    if _is_complete(path):
        return str(path)
    from rlkd_cli.config import launch_rank, launch_world

    if launch_world() > 1 and launch_rank() != 0:
        # a multi-process launch: process 0 trains it (transformers saves models on rank 0 only)
        log.info("waiting for process 0 to train the tiny teacher into %s", path)
        deadline = time.monotonic() + TEACHER_WAIT_S
        while not _is_complete(path):
            require(time.monotonic() < deadline,
                    f"process {launch_rank()} waited {TEACHER_WAIT_S // 60} min for process 0 to train the tiny "
                    f"teacher into {path}; on several machines put cache_dir on a shared disk, or train it first "
                    "(rlkd sft) and pass teacher.name_or_path")
            time.sleep(1.0)
        return str(path)
    with file_lock(str(path) + ".lock"):
        if _is_complete(path):  # another job finished it while we waited
            log.info("Using the tiny teacher trained by another job: %s", path)
            return str(path)
        from rlkd_cli import engine

        # Under the lock nobody else is writing: a .tmp-* sibling is what a killed training left behind.
        for leftover in path.parent.glob(f".tmp-{path.name}-*"):
            log.warning("Removing %s, left by an interrupted teacher training", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        log.warning("The teacher checkpoint %s is missing: training it now with the sft engine "
                    "(first use only; later runs and sweep jobs reuse it).", path)
        with atomic_dir(path) as tmp:
            sub = teacher_training_config(cfg)
            # solo: in a multi-process launch only the process holding the lock trains it
            result = engine.train(sub, tmp / "run", mode="sft", tokenizer=tokenizer, log_prefix="teacher",
                                  solo=True)
            final = Path(result["checkpoint"])
            for item in final.iterdir():
                if item.is_file() and item.name not in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
                    os.replace(item, tmp / item.name)
            (tmp / "teacher_summary.json").write_text(json.dumps(result, indent=2) + "\n")
            shutil.rmtree(tmp / "run", ignore_errors=True)
        log.info("Teacher trained and cached at %s", path)
    return str(path)


def load_teacher(cfg: DictConfig, tokenizer, *, precision: str, device) -> tuple[torch.nn.Module, str]:
    """The teacher ready to teach: trained first if it is the tiny one, loaded (bf16 for ``precision='bf16'``),
    checked against the tokenizer, frozen, in eval mode, on ``device``. Returns ``(model, path)``."""
    path = ensure_teacher(cfg, tokenizer)
    model = load_pretrained(path, role="teacher", dtype=torch.bfloat16 if precision == "bf16" else None,
                            trust_remote_code=bool(cfg.teacher.get("trust_remote_code", False)))
    check_vocab(model, tokenizer, role="teacher")
    model.requires_grad_(False).eval().to(device)
    return model, path


def teacher_training_config(cfg: DictConfig) -> DictConfig:
    """The sft config that trains the tiny teacher: the run's dataset, the teacher's train_if_missing."""
    from rlkd_cli.config import load_group_option

    trainer = OmegaConf.merge(load_group_option("trainer", "default"), cfg.teacher.train_if_missing)
    trainer.resume = None
    trainer.progress = cfg.trainer.get("progress", True)
    trainer.device = cfg.trainer.get("device", "auto")
    trainer.precision = cfg.trainer.get("precision", "auto")
    sub = OmegaConf.create({
        "command": "sft",
        "model": "teacher",
        "seed": cfg.teacher.get("seed", 0),
        "cache_dir": cfg.cache_dir,
        "tokenizer": cfg.tokenizer,
        "metrics": cfg.metrics,
        "teacher": {k: v for k, v in cfg.teacher.items() if k != "train_if_missing"},
        "dataset": cfg.dataset,
        "loss": load_group_option("loss", "ce"),
        "trainer": trainer,
    })
    return sub


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any((path / f).exists() for f in _WEIGHT_FILES)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
