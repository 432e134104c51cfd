"""``rlkd sft``: fine-tune one model with cross-entropy (``model=teacher``, the default, or ``model=student``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rlkd_cli import engine, models, preflight, schema
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.runtime import Runtime


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    schema.validate(cfg)
    role = str(cfg.model.role)
    if cfg.model.get("name_or_path"):  # model.name_or_path=X: fine-tune that folder in the role's place
        models.check_source(str(cfg.model.name_or_path), key="model.name_or_path")
        cfg[role].name_or_path = cfg.model.name_or_path
    runtime = Runtime.create(cfg.trainer)
    tokenizer = tok_mod.for_run(cfg, [(role, cfg[role])])
    if cfg[role].get("name_or_path"):
        tok_mod.check_model_tokenizer(cfg[role].name_or_path, tokenizer, role=role)
    preflight.before_training(cfg, tokenizer, [role], run_dir=run_dir, sharded=runtime.sharded)
    return engine.train(cfg, run_dir, runtime=runtime, tokenizer=tokenizer, teacher=None, role=role)
