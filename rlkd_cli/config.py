"""Where the config tree lives, what its groups offer, and the launch facts every process agrees on.

The tree is ``conf/`` at the repository root (an editable install) or ``rlkd_cli/conf`` inside an
installed wheel. Primary configs: ``sft.yaml``, ``distill.yaml``, ``cache-teacher.yaml``,
``measure-alignment.yaml``, ``evaluate.yaml``; groups: ``teacher``, ``student``, ``dataset``,
``loss``, ``trainer``, ``logger`` and the ``experiment`` presets. The schemas that type them are in
:mod:`rlkd_cli.schema`.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlkd_cli.errors import RlkdError

GROUPS = ("teacher", "student", "dataset", "loss", "trainer", "logger", "rollout", "model", "experiment")


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
    """``${rlkd_now:FORMAT}``: like Hydra's ``${now:...}``, but the same for every process of a launch;
    ``${rlkd_groups:COMMAND}``: the config groups that command composes, for its ``--help``."""
    if not OmegaConf.has_resolver("rlkd_now"):
        OmegaConf.register_new_resolver("rlkd_now", lambda fmt: launch_time().strftime(fmt), use_cache=True)
    if not OmegaConf.has_resolver("rlkd_groups"):
        OmegaConf.register_new_resolver("rlkd_groups", lambda command: groups_help(command_groups(str(command))))
    if not OmegaConf.has_resolver("rlkd_config_help"):
        OmegaConf.register_new_resolver("rlkd_config_help", _config_help_resolver)




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


def command_groups(command: str) -> list[str]:
    """The groups ``conf/<command>.yaml`` composes (its defaults list; ``optional`` entries, filled only by
    a preset, left out), e.g. ``evaluate`` has no ``student`` or ``loss`` to choose."""
    path = conf_dir() / f"{command}.yaml"
    if not path.exists():
        return list(GROUPS)
    entries = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    names = [str(k) for e in entries if isinstance(e, dict) for k in e]
    return [g for g in GROUPS if g in names]


def groups_help(groups=GROUPS) -> str:
    """Lines ``group: opt1, opt2, ...`` for the CLI's help."""
    return "\n".join(f"  {g}: {', '.join(group_options(g))}" for g in groups)


# ----------------------------------------------------------------------------------------------
# --help: the composed config, each key with its one-line description
# ----------------------------------------------------------------------------------------------

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w+@-]*):(?P<rest>.*)$")


def _keyed_lines(lines, prefix: str = ""):
    """``(dotted key, text after the colon)`` of each ``key:`` line of a YAML text (indentation nests keys)."""
    stack: list[tuple[int, str]] = []
    for line in lines:
        m = _KEY_LINE.match(line)
        if not m:
            yield None, line
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        yield prefix + ".".join(k for _, k in stack), m["rest"]


def _comment(rest: str) -> str | None:
    """The ``# comment`` after a YAML value (a ``#`` inside a quoted value is not one)."""
    text = rest.strip()
    start = 0
    if text[:1] in ("'", '"'):
        close = text.find(text[0], 1)
        start = close + 1 if close > 0 else len(text)
    at = text.find("#", start)
    return text[at + 1:].strip() or None if at >= 0 and (at == 0 or text[at - 1] == " ") else None


def key_descriptions(command: str, choices: dict | None = None) -> dict[str, str]:
    """Each key's one-line description: the comment after it in conf/ (``conf/<command>.yaml``, ``common.yaml``,
    then the chosen preset of each group, ``choices`` as Hydra records them), e.g. ``trainer.max_steps ->
    'optimizer steps'``."""
    root = conf_dir()
    sources = [(root / f"{command}.yaml", ""), (root / "common.yaml", "")]
    for group, option in (choices or {}).items():
        if group in GROUPS and group != "experiment" and option:
            sources.append((root / str(group) / f"{option}.yaml", f"{group}."))
    out: dict[str, str] = {}
    for path, prefix in sources:
        if not path.exists():
            continue
        for key, rest in _keyed_lines(path.read_text(encoding="utf-8").splitlines(), prefix):
            if key and not key.startswith(("hydra", "defaults")) and key not in out and _comment(rest):
                out[key] = _comment(rest)
    return out


def config_help(cfg) -> str:
    """The composed config as YAML (Hydra's own keys left out), each key followed by ``# its description``."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    described = key_descriptions(str(plain.get("command")),
                                 OmegaConf.to_container(choices) if choices is not None else None)
    text = OmegaConf.to_yaml(OmegaConf.create(plain)).splitlines()
    return "\n".join(f"{line}  # {described[key]}" if key in described else line
                     for line, (key, _) in zip(text, _keyed_lines(text)))


def _config_help_resolver(*, _root_) -> str:
    # the help template is a string.Template: a literal $ (the ${oc.env:...} of cache_dir) is written $$
    return config_help(_root_).replace("$", "$$")


register_resolvers()
