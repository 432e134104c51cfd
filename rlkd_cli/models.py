"""The ``teacher`` and ``student`` config groups: load a causal LM, or build one from an architecture spec.

A model config (``conf/teacher/*.yaml``, ``conf/student/*.yaml``) takes either

- ``name_or_path``: any Hugging Face hub id or local folder, loaded with ``AutoModelForCausalLM``
  (weights from safetensors only, ``trust_remote_code`` off unless the config turns it on); or
- ``arch``: keyword arguments of a transformers config (``model_type`` plus sizes) for a model built
  from scratch, its vocabulary sized to the tokenizer.

A teacher built from an ``arch`` spec must be trained before it can teach: :mod:`rlkd_cli.teachers.tiny`
does that on first use. This module depends on nothing else in rlkd but its error type: it is what
every other part uses to load, build, save and check models.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlkd_cli.errors import RlkdError, require

log = logging.getLogger(__name__)

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
# Saving and loading weights (checkpoints)
# ----------------------------------------------------------------------------------------------

def has_weights(path: Path) -> bool:
    """Whether ``path`` holds model weights rlkd can read (safetensors: a model or a PEFT adapter)."""
    return any((Path(path) / f).is_file() for f in (*_WEIGHT_FILES, "adapter_model.safetensors"))


def is_complete_model(path: Path) -> bool:
    """A finished Hugging Face model folder: ``config.json`` and safetensors weights."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def save_model(model, folder: Path, *, state_dict: dict | None = None, merge_adapter: bool = False) -> None:
    """``save_pretrained`` into ``folder`` as one safetensors file (the full ``state_dict`` of a sharded run)."""
    model.save_pretrained(folder, state_dict=state_dict, max_shard_size="1000GB")


def load_weights(model, folder: Path) -> None:
    """Load ``folder/model.safetensors`` into ``model`` in place (tied weights stored once); one line if it does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(Path(folder) / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise RlkdError(f"checkpoint {folder} is corrupt: model.safetensors cannot be read ({_first_line(e)}); "
                        "resume from an earlier checkpoints/step-* folder") from e
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and tied)]
    require(not missing and not unexpected, f"checkpoint {folder} does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same model config")
    if tied:
        model.tie_weights()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
