"""Checks before loading: what a command's config says that can be refused before any model loads or trains.

A teacher can take minutes to load (or, the tiny one, to train on first use); a mistake found after that
costs the user the wait. Everything that needs only the config, the tokenizer and the models' config
files is checked here, right after the tokenizer is known:

* keys that depend on the vocabulary (``metrics.ks``, the loss terms' ``k``): the vocabulary size is the
  tokenizer's, known before any model loads;
* model and checkpoint folders (``student.name_or_path``, ``checkpoints=[...]``, ``trainer.resume=PATH``):
  they exist and hold what a load needs, and the checkpoint a resume continues was written with this config;
* each model's context (``max_position_embeddings`` of its config) against ``dataset.max_length``,
  the longest sequence it will be given (prompts plus generated responses are capped at it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlkd_cli import models
from rlkd_cli.errors import RlkdError, require

log = logging.getLogger("rlkd.preflight")

#: Config attributes that hold a model's maximum sequence length, in the order transformers uses them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def check_vocab_keys(cfg: DictConfig, vocab: int) -> None:
    """``metrics.ks`` and the loss terms' ``k`` fit the run's vocabulary of ``vocab`` tokens."""
    ks = [int(k) for k in (cfg.get("metrics") or {}).get("ks") or []]
    big = [k for k in ks if k > vocab]
    if big:
        raise RlkdError(f"metrics.ks holds {big[0]}, more than the vocabulary's {vocab} tokens (the run's "
                        f"tokenizer); use values 1 <= k <= {vocab}, e.g. metrics.ks=[1,2,3,5]")
    if cfg.get("loss"):
        from rlkd_cli.losses import Objective

        Objective.from_config(cfg.loss).check(vocab)


def model_config(model_cfg: Any):
    """A model config's transformers config, read without loading weights (``None`` where it cannot be read:
    a hub id that is not cached; the load itself then says what is wrong)."""
    from transformers import AutoConfig

    if model_cfg.get("name_or_path"):
        name = str(model_cfg.get("name_or_path"))
        local = Path(os.path.expanduser(name))
        try:
            return AutoConfig.from_pretrained(str(local) if local.exists() else name,
                                              trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
        except Exception:  # noqa: BLE001 - not cached, remote code, a damaged file: the load reports it
            return None
    arch = model_cfg.get("arch")
    if not arch:
        return None
    spec = OmegaConf.to_container(arch, resolve=True) if OmegaConf.is_config(arch) else dict(arch)
    try:
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    except Exception:  # noqa: BLE001 - a bad arch spec is reported when the model is built
        return None


def context_length(config) -> tuple[int, str] | None:
    """``(length, key)``: the longest sequence a model config takes, and the attribute that says so."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_context(model_cfg: Any, *, key: str, max_length: int) -> None:
    """The model named by ``key`` (e.g. ``student``) takes sequences of ``dataset.max_length`` tokens."""
    config = model_config(model_cfg)
    found = context_length(config) if config is not None else None
    if found is None:
        return
    length, attr = found
    where = f"{key}.arch.{attr}" if not model_cfg.get("name_or_path") else f"a {key} with a longer context"
    require(length >= max_length, f"the {key} takes at most {length} positions ({attr} in its config) but "
                                  f"dataset.max_length={max_length}; set dataset.max_length<={length}, or use "
                                  f"{where}")


def check_resume(cfg: DictConfig, run_dir: Path | None, *, sharded: bool = False) -> None:
    """``trainer.resume=PATH`` names a complete checkpoint, and the one it (or ``auto``, in ``run_dir``) resumes
    from was written with this config (unless ``trainer.force_resume``). Read-only: the training loop finds it
    again once it holds the run dir, and tidies a killed save's leftovers then."""
    tc = cfg.get("trainer") or {}
    resume = tc.get("resume")
    if not resume or (str(resume) == "auto" and run_dir is None):
        return
    from rlkd_cli.engine import checkpoint

    try:
        ckpt = checkpoint.find_resume(Path(run_dir or "."), str(resume), clean=False)
    except RlkdError:
        if str(resume) != "auto":
            raise
        return  # tidying a killed save's leftovers (the loop's, later) may restore a complete checkpoint
    if ckpt is not None:
        checkpoint.check_resumable(ckpt, cfg, sharded=sharded, force=bool(tc.get("force_resume", False)))


def before_training(cfg: DictConfig, tokenizer, roles: list[str], *, run_dir: Path | None = None,
                    sharded: bool = False) -> None:
    """Every check above for a training command (``rlkd distill``, ``rlkd sft``, ``rlkd cache-teacher``)."""
    check_vocab_keys(cfg, len(tokenizer))
    check_resume(cfg, run_dir, sharded=sharded)
    max_length = int(cfg.dataset.max_length)
    for role in roles:
        mc = cfg.get(role)
        if mc is None or (role == "teacher" and mc.get("cache")):
            continue
        check_context(mc, key=role, max_length=max_length)


def check_checkpoints(checkpoints: list[str], *, max_length: int | None = None) -> None:
    """Each of ``checkpoints=[...]`` is a model folder rlkd can load, with a context for ``max_length``."""
    for c in checkpoints:
        path = Path(os.path.expanduser(str(c)))
        if not path.is_dir():
            raise RlkdError(f"checkpoint '{c}' is not a folder; pass model folders written by rlkd "
                            "(checkpoints/step-*) or save_pretrained")
        models.check_source(str(c), key="checkpoints")
        if max_length is not None:
            check_context({"name_or_path": str(c)}, key=f"checkpoint '{c}'", max_length=max_length)
