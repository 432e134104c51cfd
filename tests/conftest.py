"""Shared fixtures: one cache for the session (embedded tokenizer, tiny teacher, tokenized data), quick runs.

The environment is set here, at import, before any test module imports transformers or the hub
client (they read HF_HUB_OFFLINE once).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
_CACHE = Path(tempfile.mkdtemp(prefix="rlkd-test-cache-"))
os.environ["RLKD_CACHE_DIR"] = str(_CACHE)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers share the cores: one thread each (and for the processes the tests start), as
    # two processes of two threads each on two cores run slower than one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Runs of seconds: experiment=smoke (conf/experiment/smoke.yaml: a small synthetic split, a 1-layer teacher
# trained for 30 steps and cached for the whole session, a 1-layer student, the debug trainer).
QUICK = ["experiment=smoke"]
# The same teacher and data for the commands that have no student or trainer of their own to shrink.
TEACHER_ONLY = [
    "dataset.num_train=600", "dataset.num_validation=32", "dataset.num_test=32",
    "teacher.arch.hidden_size=64", "teacher.arch.num_hidden_layers=1", "teacher.arch.intermediate_size=128",
    "teacher.train_if_missing.max_steps=30", "teacher.train_if_missing.batch_size=16",
    "teacher.train_if_missing.eval_every=0",
]


@pytest.fixture(scope="session", autouse=True)
def rlkd_cache() -> Path:
    """Every test shares one cache dir (tokenizer and tiny teacher are built once per session)."""
    return _CACHE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real data sets are only on CI and dev machines)")
    return SHARED_DATA


def compose(command: str, overrides: list[str]):
    """Compose a command's config exactly as the CLI does, without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlkd_cli import schema
    from rlkd_cli.config import conf_dir

    schema.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=command, overrides=overrides)


def train(command: str, overrides: list[str], run_dir: Path) -> dict:
    """Run ``rlkd <command>`` (sft / distill / cache-teacher) in-process on a composed config; its summary."""
    import importlib

    module = importlib.import_module(f"rlkd_cli.commands.{command.replace('-', '_')}")
    return module.run(compose(command, overrides), Path(run_dir))


def run_cli(args: list[str]):
    """Run ``rlkd ARGS`` in-process; returns the Click result (exit_code, output)."""
    from typer.testing import CliRunner

    from rlkd_cli.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=False)


def tokenizer_of(cfg):
    """The run's tokenizer, resolved as the commands resolve it."""
    from rlkd_cli.data.tokenizer import for_run

    return for_run(cfg, [("teacher", cfg.teacher)])


def teacher_path(cfg) -> Path:
    """The cached tiny teacher of a config (trained first if missing)."""
    from rlkd_cli.runtime import Runtime
    from rlkd_cli.teachers import tiny

    return tiny.ensure_trained(cfg, tokenizer_of(cfg), Runtime.create(cfg.trainer))
