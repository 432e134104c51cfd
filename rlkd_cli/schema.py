"""Typed configs: one dataclass schema per config group and per command, registered in Hydra's ConfigStore.

Each command's primary config (``conf/<command>.yaml``) starts from its schema (``<command>_schema``
in its defaults list), so Hydra types every key while it composes: ``trainer.max_steps=ten`` or
``seed=abc`` fails at the override, naming the key. What composition cannot see is checked by
:func:`validate`, from the same dataclasses:

* keys nobody declared (``+trainer.max_step=3``, a user's preset with a typo): one line with the
  nearest valid key;
* types of values that reached the config some other way (added keys, Python dicts);
* ranges (``metadata``: ``ge``, ``gt``, ``le``, ``lt``; ``choices``; ``items_ge`` for lists): every
  count, limit and size key is an integer in its valid range, or one line naming it;
* the few rules that involve two keys (batch size and accumulation, sampling settings).

The data layer checks a plain dataset dict with :func:`check` the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from rlkd_cli.errors import RlkdError, require

MISSING: Any = "???"


def _f(default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with range metadata (mutable defaults become factories)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------

@dataclass
class TokenizerConfig:
    name_or_path: Optional[str] = None
    vocab_size: int = _f(1024, ge=258)


@dataclass
class MetricsConfig:
    ks: List[int] = _f([1, 2, 3, 5], items_ge=1, nonempty=True)


@dataclass
class PeftConfig:
    r: Optional[int] = _f(None, ge=1)
    alpha: float = _f(16.0, gt=0)
    dropout: float = _f(0.0, ge=0, lt=1)
    target_modules: Any = "all-linear"


@dataclass
class TeacherConfig:
    name: str = "teacher"
    name_or_path: Optional[str] = None
    trust_remote_code: bool = False
    arch: Optional[Dict[str, Any]] = None
    cache: Optional[str] = None
    seed: int = 0
    dtype: str = _f("auto", choices=("auto", "fp32", "bf16", "fp16"))
    device: Optional[str] = None
    train_if_missing: Optional[Dict[str, Any]] = None
    allow_tiny_on_real_data: bool = False  # train the tiny (arch) teacher on a data set other than the embedded one


@dataclass
class StudentConfig:
    name: str = "student"
    name_or_path: Optional[str] = None
    trust_remote_code: bool = False
    arch: Optional[Dict[str, Any]] = None
    peft: PeftConfig = field(default_factory=PeftConfig)


@dataclass
class DatasetConfig:
    name: str = "dataset"
    kind: str = _f("prompt_response", choices=("synthetic_math", "prompt_response", "text"))
    path: Optional[str] = None
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    splits: Dict[str, Optional[str]] = _f({"train": "train", "validation": "validation", "test": "test"})
    validation_size: int = _f(200, ge=0)
    test_size: Optional[int] = _f(None, ge=0)
    fields: Dict[str, str] = _f({})
    prompt_template: Optional[str] = "{prompt}"
    prompt_template_no_input: Optional[str] = None
    response_template: Optional[str] = " {response}"
    max_length: int = _f(512, ge=2)
    skip_malformed: bool = False
    metric: str = _f("perplexity", choices=("accuracy", "rougeL", "perplexity"))
    id_field: Optional[str] = None
    limit: Optional[int] = _f(None, ge=0)
    seed: int = 0
    num_train: int = _f(20000, ge=0)
    num_validation: int = _f(256, ge=0)
    num_test: int = _f(256, ge=0)


@dataclass
class LossConfig:
    name: str = "custom"
    description: Optional[str] = None
    temperature: Optional[float] = _f(1.0, gt=0)
    terms: Dict[str, Any] = _f({})
    plugins: List[str] = _f([])


@dataclass
class TrainerConfig:
    max_steps: int = _f(300, ge=1)
    batch_size: int = _f(32, ge=1)
    grad_accum: int = _f(1, ge=1)
    lr: float = _f(3.0e-3, gt=0)
    weight_decay: float = _f(0.0, ge=0)
    betas: List[float] = _f([0.9, 0.95], items_ge=0, items_lt=1, length=2)
    scheduler: str = "cosine"
    warmup_steps: int = _f(20, ge=0)
    max_grad_norm: Optional[float] = _f(1.0, gt=0)
    chunk_size: Any = "auto"
    split_head: bool = True
    log_every: int = _f(10, ge=1)
    eval_every: int = _f(100, ge=0)
    eval_examples: Optional[int] = _f(256, ge=1)
    save_every: int = _f(200, ge=0)
    keep_last: int = _f(2, ge=1)
    resume: Optional[str] = None
    force_resume: bool = False
    on_max_steps_change: str = _f("refuse", choices=("refuse", "continue", "restart"))
    max_bad_steps: int = _f(5, ge=1)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))
    progress: bool = True
    stop_after: Optional[int] = _f(None, ge=1)
    threads: Optional[int] = _f(None, ge=1)
    gradient_checkpointing: bool = False
    merge_adapter: bool = False


@dataclass
class LoggerConfig:
    name: str = _f("jsonl", choices=("jsonl", "tensorboard", "wandb", "mlflow"))
    log_dir: Optional[str] = None
    flush_secs: int = _f(30, ge=1)
    project: Optional[str] = None
    run_name: Optional[str] = None
    mode: Optional[str] = _f(None, choices=(None, "offline", "online", "disabled"))
    tracking_uri: Optional[str] = None


@dataclass
class RolloutConfig:
    name: str = _f("off", choices=("off", "student", "mixed", "adaptive", "teacher"))
    lmbda: float = _f(0.0, ge=0, le=1)
    max_new_tokens: int = _f(64, ge=1)
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = _f(1.0, gt=0, le=1)
    top_k: int = _f(0, ge=0)
    every: int = _f(1, ge=1)
    buffer_size: int = _f(0, ge=0)
    replay_ratio: float = _f(0.5, ge=0, le=1)
    increase: float = _f(0.1, ge=0, le=1)
    max_share: float = _f(1.0, ge=0, le=1)
    loss_eps: float = _f(0.0, ge=0)
    generator: str = _f("hf", choices=("hf",))


@dataclass
class CacheConfig:
    out: Optional[str] = None
    top_k: int = _f(64, ge=1)
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    temperatures: List[float] = _f([], items_gt=0)
    splits: List[str] = _f(["train", "validation"], items_choices=("train", "validation", "test"), nonempty=True)
    shard_examples: int = _f(2048, ge=1)
    batch_size: int = _f(32, ge=1)


@dataclass
class EvalModelConfig:
    name_or_path: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class EvalConfig:
    limit: Optional[int] = _f(None, ge=1)
    batch_size: int = _f(16, ge=1)
    max_new_tokens: int = _f(128, ge=1)
    do_sample: bool = False
    temperature: float = _f(1.0, gt=0)
    top_p: float = _f(1.0, gt=0, le=1)
    seed: int = 0
    perplexity: bool = True


# ----------------------------------------------------------------------------------------------
# Commands (primary configs)
# ----------------------------------------------------------------------------------------------

@dataclass
class CommonConfig:
    command: str = MISSING
    description: str = ""
    seed: int = 0
    cache_dir: str = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass
class TrainConfig(CommonConfig):
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class ModelChoice:
    role: str = _f("teacher", choices=("teacher", "student"))
    name_or_path: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class SftConfig(TrainConfig):
    model: ModelChoice = field(default_factory=ModelChoice)


@dataclass
class DistillConfig(TrainConfig):
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class CacheTeacherConfig(TrainConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class MeasureConfig(CommonConfig):
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # set by the experiment presets (experiment=smoke, paper_sft) for the training commands; unused here
    student: Optional[StudentConfig] = None
    loss: Optional[LossConfig] = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoints: List[str] = _f([])
    split: str = _f("validation", choices=("train", "validation", "test"))
    limit: Optional[int] = _f(None, ge=1)
    batch_size: int = _f(32, ge=1)


@dataclass
class EvaluateConfig(CommonConfig):
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # set by the experiment presets (experiment=smoke, paper_sft) for the training commands; unused here
    student: Optional[StudentConfig] = None
    loss: Optional[LossConfig] = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    checkpoints: List[str] = _f([])
    include_teacher: bool = False
    predictions: Optional[str] = None
    split: str = _f("test", choices=("train", "validation", "test"))
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class GenerationConfig:
    batch_size: int = _f(16, ge=1)
    max_new_tokens: int = _f(128, ge=1)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = _f(1.0, gt=0, le=1)
    top_k: int = _f(0, ge=0)
    seed: int = 0


@dataclass
class GenerateConfig(CommonConfig):
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelChoice = field(default_factory=ModelChoice)
    checkpoints: List[str] = _f([])
    split: str = _f("test", choices=("train", "validation", "test"))
    limit: Optional[int] = _f(256, ge=1)
    resume: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)


COMMANDS: dict[str, type] = {"sft": SftConfig, "distill": DistillConfig, "cache-teacher": CacheTeacherConfig,
                             "measure-alignment": MeasureConfig, "evaluate": EvaluateConfig,
                             "generate": GenerateConfig}


def register() -> None:
    """Store every command's schema as ``<command>_schema`` in Hydra's ConfigStore (once per process)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    if all(f"{command.replace('-', '_')}_schema.yaml" in cs.repo for command in COMMANDS):
        return  # the store is a process-wide singleton: registering again only rebuilds the same nodes
    for command, schema in COMMANDS.items():
        cs.store(name=f"{command.replace('-', '_')}_schema", node=schema)


# ----------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


def _expected(tp: Any, meta: dict[str, Any]) -> str:
    """Words for what a field takes, e.g. ``an integer >= 1``, ``null or a number > 0``."""
    base, optional = _unwrap_optional(tp)
    if meta.get("choices"):
        words = "one of " + ", ".join("null" if c is None else str(c) for c in meta["choices"])
    elif typing.get_origin(base) in (list, List):
        item = typing.get_args(base)[0] if typing.get_args(base) else Any
        words = f"a list of {_TYPE_WORDS.get(item, 'values').split(' ', 1)[-1]}s"
        if meta.get("items_ge") == 1 and item is int:
            words = "a list of positive integers"
    else:
        words = _TYPE_WORDS.get(base, "a value")
        if base is float:
            words = "a finite number"
        bounds = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
        if bounds:
            words += " " + " and ".join(bounds)
    return f"null or {words}" if optional and not meta.get("choices") else words


def _is_type(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return isinstance(value, (list, tuple))
    if origin in (dict, Dict):
        return isinstance(value, dict)
    return True


def _example(key: str, meta: dict[str, Any], tp: Any) -> str:
    low = meta.get("ge", meta.get("gt"))
    if low is None or _unwrap_optional(tp)[0] is not int:
        return ""
    return f"; e.g. {key}={max(int(low) + (1 if 'gt' in meta else 0), 1)}"


def _check_range(key: str, value: Any, meta: dict[str, Any], tp: Any) -> None:
    base, _ = _unwrap_optional(tp)
    if "choices" in meta and value not in meta["choices"]:
        raise RlkdError(f"{key} must be {_expected(tp, meta)}, got {value!r}")
    if isinstance(value, float) and base is float and not math.isfinite(value):
        raise RlkdError(f"{key} must be {_expected(base, meta)}, got {value!r}")
    for k, op, ok in (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                      ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)):
        if k in meta and isinstance(value, (int, float)) and not ok(value, meta[k]):
            if base is float:
                raise RlkdError(f"{key} must be {_expected(base, meta)}, got {value}")
            raise RlkdError(f"{key} must be {op} {meta[k]}, got {value}{_example(key, meta, tp)}")


def _check_list(key: str, value: list, meta: dict[str, Any], tp: Any) -> None:
    item_tp = (typing.get_args(_unwrap_optional(tp)[0]) or (Any,))[0]
    if meta.get("nonempty") and not value:
        raise RlkdError(f"{key} must list at least one value, e.g. {key}=[1,2,5]")
    if "length" in meta and len(value) != meta["length"]:
        raise RlkdError(f"{key} must hold {meta['length']} values, got {list(value)!r}")
    item_meta = {k[len("items_"):]: v for k, v in meta.items() if k.startswith("items_")}
    ops = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b),
           "lt": ("<", lambda v, b: v < b)}
    each = " and ".join(f"{ops[k][0]} {b}" for k, b in item_meta.items() if k in ops)
    words = _expected(tp, meta) + (f" (each {each})" if each and _expected(tp, meta) != "a list of positive integers"
                                   else "")
    for v in value:
        bad = not _is_type(v, item_tp) or (isinstance(v, float) and not math.isfinite(v))
        bad = bad or any(not ops[k][1](v, b) for k, b in item_meta.items() if k in ops)
        if bad:
            raise RlkdError(f"{key} must be {words}, got {v!r}")
        if "choices" in item_meta and v not in item_meta["choices"]:
            raise RlkdError(f"{key} must list some of {', '.join(item_meta['choices'])}, got {v!r}")


def check(node: Any, schema: type, path: str) -> None:
    """Check the mapping ``node`` (plain or OmegaConf) against the dataclass ``schema``; one line per problem."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    require(isinstance(node, dict), f"{path} must be a mapping of keys, got {node!r}")
    hints = _hints(schema)
    meta = {f.name: dict(f.metadata) for f in dataclasses.fields(schema)}
    dotted = (lambda k: f"{path}.{k}") if path else str
    for key in node:
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"; did you mean {dotted(close[0])}?" if close else f"; valid keys: {', '.join(hints)}"
            raise RlkdError(f"unknown key {dotted(key)}{hint}")
    for key, value in node.items():
        full, tp = dotted(key), hints[key]
        base, optional = _unwrap_optional(tp)
        if dataclasses.is_dataclass(base):
            if value is not None or not optional:
                check(value, base, full)
            continue
        if value is None:
            if not optional and base is not Any and value != MISSING:
                raise RlkdError(f"{full} must be {_expected(tp, meta[key])}, got null")
            continue
        if not _is_type(value, base):
            raise RlkdError(f"{full} must be {_expected(tp, meta[key])}, got {value!r}")
        if isinstance(value, (list, tuple)):
            _check_list(full, list(value), meta[key], tp)
        else:
            _check_range(full, value, meta[key], tp)


def _check_trainer(tc: dict[str, Any]) -> None:
    require(tc["batch_size"] % tc["grad_accum"] == 0,
            f"trainer.batch_size ({tc['batch_size']}) must be a multiple of trainer.grad_accum ({tc['grad_accum']})")
    chunk = tc.get("chunk_size", "auto")
    if chunk is not None and str(chunk) != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, int)
                                                        or chunk < 1):
        raise RlkdError(f"trainer.chunk_size must be auto or an integer >= 1 (response positions per loss chunk), "
                        f"got {chunk!r}; e.g. trainer.chunk_size=1024")
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    require(str(tc["scheduler"]) in names, f"trainer.scheduler '{tc['scheduler']}' is not a transformers schedule; "
            f"choose one of {', '.join(names)}")


def check_rollout(rc: Mapping[str, Any], *, teacher_cache: bool, dataset_kind: str, sharded: bool = False) -> None:
    """What a rollout setting cannot be combined with, as one line naming the keys."""
    name = str(rc.get("name", "off"))
    if name == "off":
        return
    require(not teacher_cache, f"rollout={name} trains on generated responses, but teacher.cache holds the teacher's "
                               "logits for the dataset's responses only; drop teacher.cache (a live teacher scores "
                               "the generated tokens), or use rollout=off")
    require(dataset_kind != "text", f"rollout={name} generates responses to prompts, and dataset kind 'text' has no "
                                    "prompts; use a prompt/response data set or rollout=off")
    require(not sharded, f"rollout={name} generates with the whole student on each process; FSDP/DeepSpeed shard it, "
                         "so use DDP (accelerate launch --multi_gpu) or rollout=off")
    if rc.get("do_sample", True):
        require(float(rc.get("temperature", 1.0)) > 0, f"rollout.temperature must be > 0 when sampling, got "
                f"{rc.get('temperature')}; use rollout.do_sample=false for greedy decoding")


def validate(cfg: Any) -> None:
    """Check a composed command config (see the module docstring); raise :class:`RlkdError` on the first problem."""
    from omegaconf import OmegaConf

    command = str(cfg.get("command"))
    schema = COMMANDS.get(command)
    require(schema is not None, f"unknown command config {command!r}; expected one of {', '.join(COMMANDS)}")
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    plain.pop("hydra", None)
    check(plain, schema, "")
    if "rollout" in plain:
        check_rollout(plain["rollout"], teacher_cache=bool((plain.get("teacher") or {}).get("cache")),
                      dataset_kind=str((plain.get("dataset") or {}).get("kind", "prompt_response")))
    gen = plain.get("generation") or {}
    if gen.get("do_sample") and not float(gen.get("temperature", 1.0)) > 0:
        raise RlkdError(f"generation.temperature must be > 0 when sampling, got {gen.get('temperature')}; use "
                        "generation.do_sample=false for greedy decoding")
    if plain.get("loss"):  # the loss mix's own checks (terms, options, weights) before any model is loaded
        from rlkd_cli.losses import Objective

        Objective.from_config(plain["loss"])
    if "trainer" in plain:
        _check_trainer(plain["trainer"])
        teacher = plain.get("teacher") or {}
        if teacher.get("train_if_missing"):
            check(teacher["train_if_missing"], TrainerConfig, "teacher.train_if_missing")


def lookup(command: str, key: str) -> tuple[Any, dict[str, Any]] | None:
    """``(type, metadata)`` of the dotted ``key`` (list indices dropped) in ``command``'s schema, or ``None``."""
    cls: Any = COMMANDS.get(command)
    parts = [p for p in re.sub(r"\[\d+\]", "", key).split(".") if p]
    for i, part in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        hints = _hints(cls)
        if part not in hints:
            return None
        tp = hints[part]
        base, _ = _unwrap_optional(tp)
        if i == len(parts) - 1:
            return tp, dict(next(f.metadata for f in dataclasses.fields(cls) if f.name == part))
        cls = base
    return None


def expected(command: str, key: str) -> str | None:
    """Words for what ``key`` takes in ``command`` (``an integer >= 1``), or ``None`` if the schema has no such key."""
    found = lookup(command, key)
    return _expected(*found) if found else None


def nearest_key(command: str, key: str) -> str | None:
    """The declared key closest to a misspelt dotted ``key`` (same parent), or ``None``."""
    parent, _, leaf = key.rpartition(".")
    cls: Any = COMMANDS.get(command)
    if parent:
        found = lookup(command, parent)
        cls = _unwrap_optional(found[0])[0] if found else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    close = difflib.get_close_matches(leaf, list(_hints(cls)), n=1)
    return f"{parent + '.' if parent else ''}{close[0]}" if close else None


def dotted_keys(command: str) -> list[str]:
    """Every dotted key of ``command``'s schema, e.g. ``trainer.max_steps`` (nested dataclasses walked)."""
    out: list[str] = []

    def walk(cls: Any, prefix: str) -> None:
        for name, tp in _hints(cls).items():
            base = _unwrap_optional(tp)[0]
            if dataclasses.is_dataclass(base):
                walk(base, f"{prefix}{name}.")
            else:
                out.append(prefix + name)

    if COMMANDS.get(command) is not None:
        walk(COMMANDS[command], "")
    return out


def dataset_defaults() -> dict[str, Any]:
    """Every dataset key with its default (:class:`DatasetConfig`)."""
    return dataclasses.asdict(DatasetConfig())
