"""``rlkd cache-teacher``: run the teacher once and store its top-K logits per response position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rlkd_cli import preflight, schema
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.runtime import Runtime
from rlkd_cli import teachers
from rlkd_cli.teachers import cache


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    schema.validate(cfg)
    cache.plan(cfg)  # every setting checked before the teacher is loaded or anything is written
    teachers.prepare(cfg)  # the data set checked, the teacher settled (a generations file's writer)
    runtime = Runtime.create(cfg.trainer)
    tokenizer = tok_mod.for_run(cfg, [("teacher", cfg.teacher)])
    preflight.before_training(cfg, tokenizer, ["teacher"])
    return cache.build(cfg, run_dir, runtime=runtime, tokenizer=tokenizer)
