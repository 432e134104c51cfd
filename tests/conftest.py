"""Shared fixtures: a session-wide cache (embedded tokenizer, tiny teacher) and quick-run overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Overrides that shrink a run to seconds: a smaller synthetic split, a 1-layer teacher trained for a
# few dozen steps (cached for the whole session), a 1-layer student, and the debug trainer.
QUICK = [
    "trainer=debug",
    "trainer.progress=false",
    "dataset.num_train=600",
    "dataset.num_validation=32",
    "dataset.num_test=32",
    "teacher.arch.hidden_size=64",
    "teacher.arch.num_hidden_layers=1",
    "teacher.arch.intermediate_size=128",
    "teacher.train_if_missing.max_steps=30",
    "teacher.train_if_missing.batch_size=16",
    "teacher.train_if_missing.eval_every=0",
    "student.arch.hidden_size=32",
    "student.arch.num_hidden_layers=1",
    "student.arch.intermediate_size=64",
]


@pytest.fixture(scope="session", autouse=True)
def rlkd_cache(tmp_path_factory) -> Path:
    """Every test shares one cache dir (tokenizer and tiny teacher are built once per session)."""
    cache = tmp_path_factory.mktemp("rlkd-cache")
    os.environ["RLKD_CACHE_DIR"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real data sets are only on CI and dev machines)")
    return SHARED_DATA


def compose(command: str, overrides: list[str]):
    """Compose a command's config exactly as the CLI does, without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlkd_cli.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=command, overrides=overrides)


def run_cli(args: list[str]):
    """Run ``rlkd ARGS`` in-process; returns the Click result (exit_code, output)."""
    from typer.testing import CliRunner

    from rlkd_cli.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=False)
