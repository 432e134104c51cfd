"""``rlkd measure-alignment``: CR@k, OR@k, top-1 agreement and perplexities of checkpoints against the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rlkd_cli import alignment, preflight, schema
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.runtime import Runtime


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    schema.validate(cfg)
    runtime = Runtime.create(cfg.trainer)
    tokenizer = tok_mod.for_run(cfg, [("teacher", cfg.teacher)])
    preflight.check_vocab_keys(cfg, len(tokenizer))  # before the teacher loads (or trains, the tiny one)
    preflight.check_checkpoints([str(c) for c in (cfg.get("checkpoints") or [])],
                                max_length=int(cfg.dataset.max_length))
    preflight.check_context(cfg.teacher, key="teacher", max_length=int(cfg.dataset.max_length))
    return alignment.run(cfg, run_dir, runtime=runtime, tokenizer=tokenizer)
