"""``rlkd distill``: distil the teacher into the student with the configured loss mix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rlkd_cli import engine, preflight, schema, teachers
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.runtime import Runtime


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    schema.validate(cfg)
    teachers.prepare(cfg)  # the data set checked, the teacher settled (a generations file's writer)
    runtime = Runtime.create(cfg.trainer)
    tokenizer = tok_mod.for_run(cfg, [("teacher", cfg.teacher), ("student", cfg.student)])
    if cfg.student.get("name_or_path"):
        tok_mod.check_model_tokenizer(cfg.student.name_or_path, tokenizer, role="student")
    # every check that needs no model weights, before the teacher loads (or trains, the tiny one)
    preflight.before_training(cfg, tokenizer, ["teacher", "student"], run_dir=run_dir, sharded=runtime.sharded)
    teacher = teachers.resolve(cfg, tokenizer, runtime)
    return engine.train(cfg, run_dir, runtime=runtime, tokenizer=tokenizer, teacher=teacher, role="student")
