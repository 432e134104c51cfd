"""Where the config tree lives, what its groups offer, and checks of values Hydra cannot type-check.

The tree is ``conf/`` at the repository root (an editable install) or ``rlkd_cli/conf`` inside an
installed wheel. Primary configs: ``sft.yaml``, ``distill.yaml``, ``cache-teacher.yaml``, ``measure-alignment.yaml``,
``evaluate.yaml``; groups:
``teacher``, ``student``, ``dataset``, ``loss``, ``trainer``, ``logger``.
"""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlkd_cli.errors import RlkdError, require

GROUPS = ("teacher", "student", "dataset", "loss", "trainer", "logger")


# ----------------------------------------------------------------------------------------------
# Multi-process launches (torchrun, accelerate launch): one run dir for all processes
# ----------------------------------------------------------------------------------------------

def launch_rank() -> int:
    """This process's global rank in a torchrun/accelerate launch (0 when launched alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def launch_world() -> int:
    """The number of processes of the launch (1 when launched alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def has_launcher_store() -> bool:
    """Whether torchrun's agent store (a key-value server every process can reach) is available."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" and "MASTER_PORT" in os.environ


_LAUNCH_TIME: list[datetime.datetime] = []


def launch_time() -> datetime.datetime:
    """Now; in a multi-process launch, rank 0's start time, shared through torchrun's store (computed once)."""
    if launch_world() <= 1 or not has_launcher_store():
        return datetime.datetime.now()
    if not _LAUNCH_TIME:
        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(minutes=10))
        key = f"rlkd/launch_time/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if launch_rank() == 0:
            store.set(key, datetime.datetime.now().isoformat())
        _LAUNCH_TIME.append(datetime.datetime.fromisoformat(store.get(key).decode()))
    return _LAUNCH_TIME[0]


def register_resolvers() -> None:
    """``${rlkd_now:FORMAT}``: like Hydra's ``${now:...}``, but the same for every process of a launch."""
    if not OmegaConf.has_resolver("rlkd_now"):
        OmegaConf.register_new_resolver("rlkd_now", lambda fmt: launch_time().strftime(fmt), use_cache=True)


register_resolvers()


def conf_dir() -> Path:
    """The config tree: packaged copy first, else the source checkout's ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "distill.yaml").exists():
            return candidate
    raise RlkdError("rlkd's config tree (conf/) is missing from the installation; reinstall with pip install -e .")


def group_options(group: str) -> list[str]:
    """The presets of a config group, e.g. ``group_options('loss') -> ['kl', 'kl+rank', ...]``."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_group_option(group: str, option: str) -> DictConfig:
    """Load one preset of a group as a plain config (no Hydra composition needed)."""
    path = conf_dir() / group / f"{option}.yaml"
    if not path.exists():
        raise RlkdError(f"unknown {group} '{option}'; available: {', '.join(group_options(group))}")
    cfg = OmegaConf.load(path)
    cfg.pop("defaults", None)
    return cfg


def groups_help() -> str:
    """Lines ``group: opt1, opt2, ...`` for the CLI's help."""
    return "\n".join(f"  {g}: {', '.join(group_options(g))}" for g in GROUPS)


# ----------------------------------------------------------------------------------------------
# Value checks: one line naming the key, the bad value and what is allowed.
# ----------------------------------------------------------------------------------------------

def _int(cfg: DictConfig, key: str, *, minimum: int, path: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RlkdError(f"{path}.{key} must be an integer >= {minimum}, got {value!r}; e.g. {path}.{key}={max(minimum, 1)}")
    require(value >= minimum, f"{path}.{key} must be >= {minimum}, got {value}; e.g. {path}.{key}={max(minimum, 1)}")
    return value


def _float(cfg: DictConfig, key: str, *, minimum: float, path: str, strict: bool = False) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise RlkdError(f"{path}.{key} must be a finite number, got {value!r}")
    ok = value > minimum if strict else value >= minimum
    require(ok, f"{path}.{key} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def validate_trainer(tc: DictConfig) -> None:
    """Check the trainer group's values before anything expensive starts."""
    _int(tc, "max_steps", minimum=1, path="trainer")
    _int(tc, "batch_size", minimum=1, path="trainer")
    _int(tc, "grad_accum", minimum=1, path="trainer")
    _float(tc, "lr", minimum=0.0, path="trainer", strict=True)
    _float(tc, "weight_decay", minimum=0.0, path="trainer")
    _int(tc, "warmup_steps", minimum=0, path="trainer")
    _int(tc, "log_every", minimum=1, path="trainer")
    _int(tc, "eval_every", minimum=0, path="trainer")
    _int(tc, "save_every", minimum=0, path="trainer")
    _int(tc, "keep_last", minimum=1, path="trainer")
    _int(tc, "max_bad_steps", minimum=1, path="trainer")
    if tc.get("max_grad_norm") is not None:
        _float(tc, "max_grad_norm", minimum=0.0, path="trainer", strict=True)
    require(tc.batch_size % tc.grad_accum == 0,
            f"trainer.batch_size ({tc.batch_size}) must be a multiple of trainer.grad_accum ({tc.grad_accum})")
    require(str(tc.device) in ("auto", "cpu", "cuda"), f"trainer.device must be auto, cpu or cuda, got {tc.device!r}")
    require(str(tc.precision) in ("auto", "fp32", "bf16"),
            f"trainer.precision must be auto, fp32 or bf16, got {tc.precision!r}")
    chunk = tc.get("chunk_size", "auto")
    if chunk is not None and str(chunk) != "auto":
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise RlkdError(f"trainer.chunk_size must be auto or an integer >= 1 (response positions per loss "
                            f"chunk), got {chunk!r}; e.g. trainer.chunk_size=1024")
    if not isinstance(tc.get("split_head", True), bool):
        raise RlkdError(f"trainer.split_head must be true or false, got {tc.get('split_head')!r}")
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    require(str(tc.scheduler) in names, f"trainer.scheduler '{tc.scheduler}' is not a transformers schedule; "
            f"choose one of {', '.join(names)}")


def validate_ks(ks, path: str = "metrics.ks") -> list[int]:
    require(ks is not None and len(ks) > 0, f"{path} must list at least one k, e.g. {path}=[1,2,5]")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise RlkdError(f"{path} must hold positive integers, got {k!r}; e.g. {path}=[1,2,5]")
        out.append(int(k))
    return sorted(set(out))
