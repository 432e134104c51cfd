"""The ``teacher`` and ``student`` config groups: load a causal LM, or build one from an architecture spec.

A model config (``conf/teacher/*.yaml``, ``conf/student/*.yaml``) takes either

- ``name_or_path``: any Hugging Face hub id or local folder, loaded with ``AutoModelForCausalLM``
  (weights from safetensors only, ``trust_remote_code`` off unless the config turns it on); or
- ``arch``: keyword arguments of a transformers config (``model_type`` plus sizes) for a model built
  from scratch, its vocabulary sized to the tokenizer.

A student config's ``peft`` block (``r``, ``alpha``, ``dropout``, ``target_modules``) turns the
student into a LoRA model (:func:`apply_peft`, with ``peft``): only the adapters train, the base
weights and the LM head stay frozen. A LoRA checkpoint folder holds the adapter
(``adapter_config.json``, ``adapter_model.safetensors``: plain ``peft`` loads it), the base model's
``config.json``, the base weights in ``base/`` when the base has no other source (a student built
from an ``arch`` spec), and with ``merge_adapter`` the merged model in ``merged/``. Every loader here
(:func:`load_pretrained`, :func:`load_weights`) accepts such a folder.

A teacher built from an ``arch`` spec must be trained before it can teach: :mod:`rlkd_cli.teachers.tiny`
does that on first use. This module depends on nothing else in rlkd but its error type: it is what
every other part uses to load, build, save and check models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
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


def check_source(name_or_path: str, *, key: str) -> None:
    """What can be checked of a model's ``name_or_path`` without loading it: a local path must be a model
    folder (``config.json`` and safetensors weights, or a LoRA adapter); ``key`` is the config key naming it."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if is_adapter(path):
        require((path / ADAPTER_WEIGHTS).is_file(), f"'{name_or_path}' has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; "
                                                    "it is an incomplete adapter checkpoint: use another checkpoints/step-*")
        return
    if _looks_local(str(name_or_path)) and not path.exists():
        raise RlkdError(f"{key} '{name_or_path}' does not exist; set {key} to a model folder (saved with "
                        "save_pretrained, e.g. a checkpoint's step-* folder) or a hub id")
    if path.exists() and not path.is_dir():
        raise RlkdError(f"{key} '{name_or_path}' is a file, not a model folder; set {key} to a folder written by "
                        "save_pretrained")
    if path.is_dir() and not (path / "config.json").exists():
        raise RlkdError(f"'{name_or_path}' is not a model folder (no config.json); point {key} at "
                        "a folder written by save_pretrained, e.g. a checkpoint's step-* folder")
    if path.is_dir() and not any((path / f).exists() for f in _WEIGHT_FILES):
        raise RlkdError(f"'{name_or_path}' has no safetensors weights (model.safetensors); rlkd loads weights "
                        "from safetensors only: re-save the model with save_pretrained")


def check_finite(tensors: Any, *, what: str) -> None:
    """Every floating-point tensor of a model (or a name -> tensor mapping) must be finite: NaN or Inf weights
    make every loss and logit NaN, so the run would skip every step and metrics would mean nothing."""
    # a model's parameters only: a buffer may hold -inf on purpose (an attention mask)
    items = tensors.items() if isinstance(tensors, dict) else tensors.named_parameters()
    for name, t in items:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise RlkdError(f"{what} has non-finite weights: tensor '{name}' holds {bad} NaN or Inf value(s) of "
                            f"{t.numel()}; use an earlier checkpoint (or retrain the model): it cannot teach, "
                            "train or be measured")


def load_pretrained(name_or_path: str, *, role: str, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, key: str | None = None) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with one-line errors for the usual mistakes; the weights are
    checked to be finite. ``key``: the config key that named the model (default ``<role>.name_or_path``)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(os.path.expanduser(str(name_or_path)))
    key = key or f"{role}.name_or_path"
    if is_adapter(path):
        return load_adapter_model(path, role=role, dtype=dtype, trust_remote_code=trust_remote_code)
    check_source(str(name_or_path), key=key)
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
                        f"({_first_line(e)}); set {key} to a local model folder") from e
    check_finite(model, what=f"{role} model '{name_or_path}'")
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


def save_model(model, folder: Path, *, state_dict: dict | None = None, merge_adapter: bool = False,
               base_source: str | None = None) -> None:
    """``save_pretrained`` into ``folder`` as one safetensors file (the full ``state_dict`` of a sharded run).

    A LoRA model saves its adapter (see the module docstring): ``base_source`` is where its base
    weights come from (the student's ``name_or_path``); ``None`` writes them into ``folder/base``.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in rlkd's output
    if is_peft(model):
        return save_adapter_model(model, Path(folder), merge=merge_adapter, base_source=base_source)
    model.save_pretrained(folder, state_dict=state_dict, max_shard_size="1000GB")


def load_weights(model, folder: Path) -> None:
    """Load ``folder/model.safetensors`` into ``model`` in place (tied weights stored once); one line if it does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if is_peft(model):
        return load_adapter_weights(model, folder)
    require((Path(folder) / "model.safetensors").is_file() or not is_adapter(folder),
            f"checkpoint {folder} holds a LoRA adapter but this run's student is not a LoRA model; resume with "
            "the checkpoint's student.peft settings")
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
    check_finite(model, what=f"checkpoint {folder}")


# ----------------------------------------------------------------------------------------------
# LoRA students (peft)
# ----------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_peft(model) -> bool:
    """Whether ``model`` is a ``peft`` model (a LoRA student)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def is_adapter(path: Path) -> bool:
    """Whether ``path`` is a folder holding a ``peft`` adapter (``adapter_config.json``)."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def apply_peft(model, peft_cfg: Any, *, seed: int = 0, role: str = "student"):
    """Wrap ``model`` in LoRA adapters per ``peft_cfg`` (``r: null``: ``model`` unchanged, full fine-tuning).

    The adapters are initialised from ``seed`` (``B = 0``, so the wrapped model computes what the
    base does); every base weight, the embeddings and the LM head are frozen.
    """
    pc = OmegaConf.to_container(peft_cfg, resolve=True) if isinstance(peft_cfg, DictConfig) else dict(peft_cfg or {})
    if not pc.get("r"):
        return model
    from peft import LoraConfig, get_peft_model

    require(int(pc["r"]) > 0, f"{role}.peft.r must be a positive rank, got {pc['r']}; or null for full fine-tuning")
    targets = pc.get("target_modules", "all-linear")
    config = LoraConfig(r=int(pc["r"]), lora_alpha=float(pc.get("alpha", 16)), lora_dropout=float(pc.get("dropout", 0)),
                        target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), _quiet_peft():
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as e:  # target modules that match nothing in this architecture
            raise RlkdError(f"cannot apply LoRA to the {role}: {_first_line(e)}; set {role}.peft.target_modules to "
                            "module names of this model (e.g. [q_proj,v_proj]) or all-linear") from e
    return wrapped


@contextlib.contextmanager
def _quiet_peft():
    """peft's ``PeftModel`` reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning in every
    LoRA run and adapter load); it is the same value as ``is_activation_checkpointing``, so only that one
    warning is dropped, only around peft's calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        yield


def enable_gradient_checkpointing(model, *, role: str = "student") -> None:
    """Recompute each decoder layer's activations in backward (``trainer.gradient_checkpointing``): the
    same loss and gradients, less memory, one more forward's time. Non-reentrant, so LoRA works too."""
    require(getattr(model, "supports_gradient_checkpointing", False) or is_peft(model),
            f"trainer.gradient_checkpointing: the {role} ({type(model).__name__}) does not support it; set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parameter_counts(model) -> tuple[int, int]:
    """``(trainable, total)`` parameters (shared tensors counted once)."""
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    return (sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values()))


def save_adapter_model(model, folder: Path, *, merge: bool, base_source: str | None) -> None:
    """The adapter, the base's ``config.json``, the base weights (``base/``) when needed, ``merged/`` when asked."""
    base = model.get_base_model()
    config = model.peft_config["default"]
    keep = config.base_model_name_or_path
    config.base_model_name_or_path = base_source or str(folder.resolve().parent / folder.name.removeprefix(".tmp-")
                                                        / "base")
    try:
        model.save_pretrained(folder, save_embedding_layers=False)  # LoRA leaves the embeddings frozen
    finally:
        config.base_model_name_or_path = keep
    base.config.save_pretrained(folder)
    if base_source is None:  # a base built from an arch spec: its (frozen) weights have no other source
        base.save_pretrained(folder / "base", state_dict=plain_state_dict(model), max_shard_size="1000GB")
    else:  # the base is named (a folder or hub id that may change): record what it was (checked on resume)
        import json

        (folder / BASE_RECORD).write_text(json.dumps({"source": base_source,
                                                      "fingerprint": base_fingerprint(model)}) + "\n")
    if merge:
        base.save_pretrained(folder / "merged", state_dict=plain_state_dict(model, merge=True),
                             max_shard_size="1000GB")


def plain_state_dict(model, *, merge: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA model's base weights under the plain model's names, on the CPU; ``merge`` adds each adapter's
    ``BA`` update (what ``merge_and_unload`` computes), without copying the model or touching its weights."""
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    if merge:
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                deltas[f"{name}.weight"] = module.get_delta_weight("default").detach().cpu()
    out: dict[str, torch.Tensor] = {}
    for key, value in _base_tensors(model).items():
        value = value.detach().cpu()
        out[key] = value + deltas[key].to(value.dtype) if key in deltas else value
    return out


def _base_tensors(model) -> dict[str, torch.Tensor]:
    """A LoRA model's base weights under the plain model's names, where they are (no copy)."""
    return {key.replace(".base_layer.", "."): value for key, value in model.get_base_model().state_dict().items()
            if "lora_" not in key}


def _same_base(model, saved: Path) -> bool:
    """Whether the LoRA ``model``'s base weights equal the ``saved`` safetensors file's, read one tensor at a
    time (never a second copy of the base in memory). Names the file and the model do not share (a
    format that renames weights on save) cannot be compared and are left out; with none shared, ``True``."""
    from safetensors import safe_open

    current = _base_tensors(model)
    with safe_open(str(saved), framework="pt") as f:
        shared = [k for k in f.keys() if k in current]
        if not shared:
            log.warning("cannot check the base weights against %s: it shares no weight names with the model", saved)
        return all(torch.equal(f.get_tensor(k), current[k].detach().cpu()) for k in shared)


def load_adapter_model(folder: Path, *, role: str, dtype: torch.dtype | None = None,
                       trust_remote_code: bool = False, merge: bool = True):
    """A LoRA checkpoint as a model: its base (``folder/base``, else the adapter's ``base_model_name_or_path``)
    with the adapter loaded, merged into the weights unless ``merge=False``."""
    import json

    from peft import PeftModel

    folder = Path(folder)
    require((folder / ADAPTER_WEIGHTS).is_file(), f"'{folder}' has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; it is "
                                                  "an incomplete adapter checkpoint: use another checkpoints/step-*")
    try:
        source = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise RlkdError(f"'{folder / ADAPTER_CONFIG}' cannot be read ({_first_line(e)}); use another checkpoint") from e
    base_dir = folder / "base"
    key = f"base_model_name_or_path in {folder / ADAPTER_CONFIG}"
    source = str(base_dir) if is_complete_model(base_dir) else source
    require(bool(source), f"the adapter in '{folder}' does not say which base model it belongs to "
                          "(base_model_name_or_path); load it with peft and its base model yourself")
    if _looks_local(str(source)) and not Path(str(source)).expanduser().exists():  # e.g. base/ not copied along
        raise RlkdError(f"the LoRA checkpoint '{folder}' has no complete base/ folder and the base model its adapter "
                        f"names does not exist ({key}: '{source}'); copy the checkpoint together with its base/ "
                        "folder, or set base_model_name_or_path to the base model's folder or hub id")
    base = load_pretrained(source, role=f"{role} (base of the adapter in {folder})", dtype=dtype,
                           trust_remote_code=trust_remote_code, key=key)
    try:
        with _quiet_peft():
            model = PeftModel.from_pretrained(base, str(folder))
    except (ValueError, RuntimeError, KeyError) as e:
        raise RlkdError(f"the adapter in '{folder}' does not fit its base model {source} ({_first_line(e)}); "
                        "use the base model it was trained on") from e
    check_finite(model, what=f"{role} model '{folder}' (adapter and base)")
    return model.merge_and_unload() if merge else model


def load_adapter_weights(model, folder: Path) -> None:
    """Load ``folder``'s adapter weights into the LoRA ``model`` in place (a resume)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    require(path.is_file(), f"checkpoint {folder} has no LoRA adapter ({ADAPTER_WEIGHTS}) but this run's student "
                            "is a LoRA model; resume with the checkpoint's student.peft settings")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RlkdError(f"checkpoint {folder} is corrupt: {ADAPTER_WEIGHTS} cannot be read ({_first_line(e)}); "
                        "resume from an earlier checkpoints/step-* folder") from e
    check_finite(weights, what=f"checkpoint {folder}'s adapter")
    _check_base(model, Path(folder))
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # size mismatches: an adapter of another rank or other target modules
        raise RlkdError(f"checkpoint {folder}'s adapter does not fit this run's LoRA student "
                        f"({_adapter_settings(Path(folder))} there, r={_rank(model)} here: {_first_line(e)[:160]}); "
                        "resume with the student.peft settings it was trained with (trainer.force_resume does not "
                        "change the adapter's shape)") from e
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    require(not missing and not unexpected, f"checkpoint {folder}'s adapter does not match the model (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); resume with the same student.peft settings")


BASE_RECORD = "rlkd_base.json"


def base_fingerprint(model) -> str:
    """A hash of a LoRA model's base weights (names, dtypes, shapes, bytes), computed once per model: the
    base is frozen, so it identifies what the adapter was trained on whatever folder or hub id it came from."""
    import hashlib

    cached = getattr(model, "_rlkd_base_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for name, t in sorted(_base_tensors(model).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    model._rlkd_base_fingerprint = h.hexdigest()[:32]
    return model._rlkd_base_fingerprint


def _check_base(model, folder: Path) -> None:
    """The frozen base this adapter was trained on (its ``base/`` copy, else its recorded fingerprint) must be
    this run's: an adapter on other base weights computes something it was never trained for."""
    import json

    saved = folder / "base" / "model.safetensors"
    if saved.is_file():
        same = _same_base(model, saved)
    elif (folder / BASE_RECORD).is_file():
        try:
            record = json.loads((folder / BASE_RECORD).read_text())
        except (OSError, ValueError) as e:
            raise RlkdError(f"checkpoint {folder} is corrupt: {BASE_RECORD} cannot be read ({_first_line(e)}); "
                            "resume from an earlier checkpoints/step-* folder") from e
        same = record.get("fingerprint") == base_fingerprint(model)
    else:  # written before the base was recorded: nothing to compare
        log.warning("checkpoint %s does not record its base weights; cannot check them", folder)
        return
    require(same, f"checkpoint {folder} was trained on other base weights (its base differs from this run's "
                  "student's, e.g. the student.name_or_path folder was changed); resume with the base it was "
                  "trained on")


def _adapter_settings(folder: Path) -> str:
    import json

    try:
        pc = json.loads((folder / ADAPTER_CONFIG).read_text())
        return f"r={pc.get('r')}, target_modules={pc.get('target_modules')}"
    except (OSError, ValueError):
        return "another shape"


def _rank(model) -> Any:
    return getattr(model.peft_config.get("default"), "r", "?")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
