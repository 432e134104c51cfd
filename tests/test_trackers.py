"""The ``logger`` group: metrics.jsonl always, and TensorBoard, W&B (offline) and MLflow (local store) mirrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import QUICK, run_cli
from rlkd_cli.engine import trackers
from rlkd_cli.errors import RlkdError

RUN = QUICK + ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.log_every=1", "trainer.save_every=0"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory) -> Path:
    pytest.importorskip("tensorboard", reason="pip install rlkd[tensorboard]")
    run = tmp_path_factory.mktemp("tb") / "run"
    res = run_cli(["distill", *RUN, "logger=tensorboard", f"hydra.run.dir={run}"])
    assert res.exit_code == 0, res.output
    return run


@pytest.mark.slow
def test_tensorboard_logger_writes_events(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tensorboard_run
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "validation/loss", "validation/cr@1"} <= tags
    # the JSONL is still written, and TensorBoard holds the same numbers
    records = _records(run)
    val = [r for r in records if r["split"] == "validation"][-1]
    # by-modes keys: a tag for every non-empty bucket (empty buckets are NaN in the JSONL, not logged)
    buckets = [k.partition("|")[2] for k in val if k.startswith("count|")]
    assert buckets == ["modes=1", "modes=2", "modes>=3"]
    for b in buckets:
        assert (f"validation/cr@1|{b}" in tags) == (val[f"count|{b}"] > 0)
    assert sum(val[f"count|{b}"] for b in buckets) == val["positions"]
    assert acc.Scalars("validation/cr@1")[-1].value == pytest.approx(val["cr@1"], abs=1e-6)
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in records if r["split"] == "train"]
    summary = json.loads((run / "summary.json").read_text())
    assert "cr@2|modes=1" in summary and "or@5|modes>=3" in summary


def _wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records have a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += payload
        if kind in (1, 4):
            yield pending
            pending = b""


@pytest.mark.slow
def test_wandb_offline_writes_its_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install rlkd[wandb]")
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: the preset's mode is offline already
    run = tmp_path / "run"
    res = run_cli(["distill", *RUN, "logger=wandb", f"hydra.run.dir={run}"])
    assert res.exit_code == 0, res.output
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    data = list(offline[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0
    # the run's history, read back from the offline file: the logged losses at their steps
    from wandb.proto import wandb_internal_pb2

    history = []
    for raw in _wandb_records(data[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append(items)
    losses = [(int(h["_step"]), h["train/loss"]) for h in history if "train/loss" in h]
    expected = [(r["step"], r["loss"]) for r in _records(run) if r["split"] == "train"]
    assert [s for s, _ in losses] == [s for s, _ in expected]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-6)


@pytest.mark.slow
def test_mlflow_local_store_holds_the_metrics(tmp_path):
    pytest.importorskip("mlflow", reason="pip install rlkd[mlflow]")
    run = tmp_path / "run"
    res = run_cli(["distill", *RUN, "logger=mlflow", f"hydra.run.dir={run}"])
    assert res.exit_code == 0, res.output
    store = run / "mlruns"
    metric_files = {p.relative_to(p.parents[2]).as_posix(): p for p in store.glob("*/*/metrics/**/*") if p.is_file()}
    assert any(k.endswith("metrics/train/loss") for k in metric_files), sorted(metric_files)
    assert any(k.endswith("metrics/validation/cr_at2") for k in metric_files)
    assert any(k.endswith("metrics/train/loss.rank") for k in metric_files)  # "loss/rank" cannot nest under "loss"
    loss_file = next(p for k, p in metric_files.items() if k.endswith("metrics/train/loss"))
    # each line: timestamp value step
    logged = [(int(step), float(value)) for _, value, step in (line.split() for line in loss_file.read_text().splitlines())]
    expected = [(r["step"], r["loss"]) for r in _records(run) if r["split"] == "train"]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    params = {p.name for p in store.glob("*/*/params/*")}
    assert "trainer.max_steps" in params and "loss.name" in params


def test_mlflow_names_and_flat_config():
    assert trackers.mlflow_name("validation/cr@2|modes>=3") == "validation/cr_at2.modes_ge3"
    assert trackers.mlflow_name("validation/or@5|modes=1") == "validation/or_at5.modes_1"
    assert trackers.mlflow_name("train/loss/rank") == "train/loss.rank"
    assert trackers.flat_config({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null"}
    assert trackers.scalar_items({"step": 3, "split": "validation", "loss": 1.5, "flag": True, "x": float("nan"),
                                  "name": "s"}) == [("validation/loss", 1.5)]


def test_missing_tracker_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RlkdError, match=r"logger=tensorboard needs the tensorboard package; pip install 'rlkd\[tensorboard\]'"):
        trackers.make_tracker({"name": "tensorboard", "log_dir": "tensorboard"}, tmp_path)
    with pytest.raises(RlkdError, match="unknown logger 'neptune'"):
        trackers.make_tracker({"name": "neptune"}, tmp_path)
