"""``rlkd measure-alignment``: CR@k, OR@k, top-1 agreement and perplexities of checkpoints against the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rlkd_cli import alignment, schema
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.runtime import Runtime


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    schema.validate(cfg)
    runtime = Runtime.create(cfg.trainer)
    tokenizer = tok_mod.for_run(cfg, [("teacher", cfg.teacher)])
    return alignment.run(cfg, run_dir, runtime=runtime, tokenizer=tokenizer)
