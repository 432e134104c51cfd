"""The embedded tiny teacher: built from an ``arch`` spec, trained with the sft engine on first use, cached.

A teacher config with ``arch`` (and no ``name_or_path``) names a model that must be trained before
it can teach: its ``train_if_missing`` block holds the ``trainer`` settings with which it is trained,
on the run's dataset (all of it: ``dataset.limit`` is the run's, not its teacher's), with
cross-entropy, by the same engine as ``rlkd sft``. The result is cached
under ``<cache_dir>/teachers/<name>-<key>``, the key hashing everything that decides its weights:
the architecture, the whole training config, the dataset config, the seed and the tokenizer in use
(its fingerprint, not its config), so another tokenizer never reuses a teacher trained on other ids.

Concurrent jobs of a sweep take a file lock, so it is trained once, and it is written through an
atomic rename, so no job ever loads half of it. In a multi-process launch process 0 trains it in a
fresh single-process Python (``python -m rlkd_cli.teachers.tiny``), so the launch's process group is
never used for it, while the other processes wait for the folder to appear.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlkd_cli import models
from rlkd_cli.data import dataset
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import atomic_dir, file_lock

log = logging.getLogger("rlkd.teachers")

#: How long the other processes of a multi-process launch wait for process 0 to train the tiny teacher.
WAIT_S = 3600
FORMAT = 2
_VOLATILE = ("progress", "threads", "resume", "force_resume", "stop_after")


def training_config(cfg: DictConfig) -> DictConfig:
    """The sft config that trains the tiny teacher: the run's dataset, the teacher's ``train_if_missing``."""
    from rlkd_cli.config import load_group_option

    trainer = OmegaConf.merge(load_group_option("trainer", "default"), cfg.teacher.train_if_missing)
    trainer.resume = None
    trainer.stop_after = None
    for key in ("progress", "device", "precision", "threads"):
        if key in cfg.trainer:
            trainer[key] = cfg.trainer[key]
    return OmegaConf.create({
        "command": "sft",
        "model": "teacher",
        "seed": cfg.teacher.get("seed", 0),
        "cache_dir": cfg.cache_dir,
        "tokenizer": cfg.tokenizer,
        "metrics": cfg.metrics,
        "teacher": {k: v for k, v in cfg.teacher.items()
                    if k not in ("train_if_missing", "cache", "allow_tiny_on_real_data")},
        # the task's whole training data: dataset.limit chooses what a run uses, not what its teacher learned
        "dataset": OmegaConf.merge(cfg.dataset, {"limit": None}),
        "loss": load_group_option("loss", "ce"),
        "trainer": trainer,
        "logger": {"name": "jsonl"},
    })


def cache_key(cfg: DictConfig, tokenizer) -> str:
    """A hash of everything that decides the cached teacher's weights (see the module docstring)."""
    from rlkd_cli.data.synthetic import GENERATOR_VERSION
    from rlkd_cli.data.tokenizer import fingerprint

    sub = OmegaConf.to_container(training_config(cfg), resolve=True)
    for key in _VOLATILE:
        sub["trainer"].pop(key, None)
    for key in ("dtype", "device"):  # how it is loaded later, not how it is trained
        sub["teacher"].pop(key, None)
    payload = {"config": {k: v for k, v in sub.items() if k not in ("cache_dir", "tokenizer", "metrics", "logger")},
               "tokenizer": fingerprint(tokenizer), "generator": GENERATOR_VERSION, "format": FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_path(cfg: DictConfig, tokenizer) -> Path:
    """Where the tiny teacher of ``cfg`` trained with ``tokenizer`` is cached."""
    name = cfg.teacher.get("name") or "teacher"
    return Path(os.path.expanduser(str(cfg.cache_dir))) / "teachers" / f"{name}-{cache_key(cfg, tokenizer)}"


def check_allowed(cfg: DictConfig) -> None:
    """The tiny teacher teaches the embedded task; on any other data set it is refused unless asked for
    (``teacher.allow_tiny_on_real_data=true``): 1.5M parameters and a few hundred steps make a teacher whose
    students look like a failed method."""
    if dataset.is_embedded(cfg) or bool(cfg.teacher.get("allow_tiny_on_real_data", False)):
        return
    name = cfg.dataset.get("name", "?")
    raise RlkdError(f"dataset '{name}' needs a teacher: without teacher.name_or_path the embedded tiny teacher "
                    f"(a toy for the synthetic task) would be trained on it; pass teacher.name_or_path=PATH (a model "
                    f"folder or hub id; `rlkd sft dataset={name} teacher.name_or_path=BASE` fine-tunes one), or set "
                    "teacher.allow_tiny_on_real_data=true to train the tiny teacher on it anyway")


def ensure_trained(cfg: DictConfig, tokenizer, runtime) -> Path:
    """The folder of the trained tiny teacher; trained and cached first if it is missing."""
    check_allowed(cfg)
    require(cfg.teacher.get("train_if_missing") is not None,
            "a teacher built from an arch spec needs a train_if_missing block (an untrained teacher teaches "
            "nothing); set teacher.name_or_path to a trained model, or use teacher=tiny")
    path = cached_path(cfg, tokenizer)
    if models.is_complete_model(path):
        return path
    if runtime.distributed and not runtime.is_main:
        return _wait_for(path, runtime.rank)
    with file_lock(str(path) + ".lock"):
        if models.is_complete_model(path):  # another job finished it while we waited
            log.info("Using the tiny teacher trained by another job: %s", path)
            return path
        # Under the lock nobody else is writing: a .tmp-* sibling is what a killed training left behind.
        for leftover in path.parent.glob(f".tmp-{path.name}-*"):
            log.warning("Removing %s, left by an interrupted teacher training", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        dataset.check(cfg)  # a missing, empty or malformed data set is one line now, not after "training it now"
        log.warning("The teacher checkpoint %s is missing: training it now with the sft engine "
                    "(first use only; later runs and sweep jobs reuse it).", path)
        with atomic_dir(path) as tmp:
            if runtime.distributed:
                summary = _train_in_subprocess(cfg, tokenizer, tmp)
            else:
                summary = train(training_config(cfg), tmp, tokenizer=tokenizer, runtime=runtime)
            (tmp / "teacher_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("Teacher trained and cached at %s", path)
    return path


def train(sub: DictConfig, folder: Path, *, tokenizer, runtime) -> dict:
    """Train the teacher of ``sub`` (:func:`training_config`) into ``folder`` (its model files only)."""
    from rlkd_cli.engine import train as engine_train

    summary = engine_train(sub, folder / "run", runtime=runtime, tokenizer=tokenizer, role="teacher", label="teacher")
    final = Path(summary["checkpoint"])
    for item in final.iterdir():
        if item.is_file() and item.name not in ("trainer_state.json",):
            os.replace(item, folder / item.name)
    shutil.rmtree(folder / "run", ignore_errors=True)
    return summary


def _train_in_subprocess(cfg: DictConfig, tokenizer, folder: Path) -> dict:
    """Train in a fresh single-process Python (the launch's process group stays out of it)."""
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(training_config(cfg), resolve=True))
    tokenizer.save_pretrained(folder / "tokenizer")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "ACCELERATE_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-m", "rlkd_cli.teachers.tiny", str(folder)], env=env, text=True,
                         capture_output=True)
    if res.returncode != 0:
        raise RlkdError(f"training the tiny teacher failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}")
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    (folder / "config.yaml").unlink(missing_ok=True)
    return json.loads((folder / "teacher_summary.json").read_text())


def _wait_for(path: Path, rank: int) -> Path:
    log.info("waiting for process 0 to train the tiny teacher into %s", path)
    deadline = time.monotonic() + WAIT_S
    while not models.is_complete_model(path):
        require(time.monotonic() < deadline,
                f"process {rank} waited {WAIT_S // 60} min for process 0 to train the tiny teacher into {path}; on "
                "several machines put cache_dir on a shared disk, or train it first (rlkd sft) and pass "
                "teacher.name_or_path")
        time.sleep(1.0)
    return path


def _main(folder: str) -> None:
    """``python -m rlkd_cli.teachers.tiny FOLDER``: train the teacher of FOLDER/config.yaml into FOLDER."""
    from rlkd_cli.data.tokenizer import load_tokenizer
    from rlkd_cli.runtime import Runtime

    out = Path(folder)
    sub = OmegaConf.load(out / "config.yaml")
    summary = train(sub, out, tokenizer=load_tokenizer(str(out / "tokenizer")), runtime=Runtime.create(sub.trainer))
    (out / "teacher_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    _main(sys.argv[1])
