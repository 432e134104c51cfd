"""The ``logger`` config group: ``metrics.jsonl`` always, plus an experiment tracker through Accelerate's tracker API.

``metrics.jsonl`` in the run dir holds one JSON object per log step (``split: train``) and per
validation (``split: validation``); it is the source of truth (``rlkd report`` reads it). A tracker
only mirrors each record elsewhere for live viewing, with one scalar per numeric value tagged
``<split>/<key>`` (``train/loss``, ``validation/cr@2``) at ``step``:

``logger=jsonl`` (default)
    nothing besides ``metrics.jsonl``.
``logger=tensorboard``
    ``accelerate.tracking.TensorBoardTracker`` into ``<run dir>/<logger.log_dir>`` (``tensorboard``);
    view with ``tensorboard --logdir outputs``. Needs the ``tensorboard`` package.
``logger=wandb``
    ``WandBTracker``: ``wandb.init(project=logger.project, mode=logger.mode, dir=<run dir>)``;
    ``mode: offline`` (the preset) writes ``<run dir>/wandb/offline-run-*`` with no network
    (``wandb sync`` uploads it later). Needs ``wandb``.
``logger=mlflow``
    ``MLflowTracker`` with ``logger.tracking_uri`` (default ``<run dir>/mlruns``, a local file store,
    no server or network) and experiment ``logger.project``. MLflow metric names allow letters,
    digits and ``_-. /`` only, so ``cr@2|modes>=3`` is logged as ``cr_at2.modes_ge3`` and
    ``loss/rank`` as ``loss.rank`` (:func:`mlflow_name`). Needs ``mlflow`` (or ``mlflow-skinny``).

The run's resolved config is stored as the tracker's hyper-parameters (flattened to dotted keys).
Only process 0 writes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from rlkd_cli.errors import RlkdError
from rlkd_cli.io import dumps

log = logging.getLogger("rlkd.engine")

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
_SKIP_KEYS = {"step", "split"}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def scalar_items(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """``(tag, value)`` for every finite numeric value of a record; tag = ``<split>/<key>``."""
    split = str(record.get("split", "train"))
    out = []
    for key, value in record.items():
        if key in _SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isfinite(value):
            out.append((f"{split}/{key}", value))
    return out


def mlflow_name(tag: str) -> str:
    """A metric name MLflow accepts: ``validation/cr@2|modes>=3`` -> ``validation/cr_at2.modes_ge3``.

    MLflow allows letters, digits and ``_-. /``; its file store keeps each metric in a file under
    its name, so ``train/loss`` and ``train/loss/rank`` could not both exist: below the split, ``/``
    and ``|`` become ``.``.
    """
    split, _, key = tag.partition("/")
    key = key.replace("@", "_at").replace(">=", "_ge").replace("<=", "_le").replace("=", "_")
    key = key.replace("/", ".").replace("|", ".")
    return re.sub(r"[^\w\-. /]", "_", f"{split}/{key}")


def flat_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b": value}`` with plain values (lists as JSON text), for trackers' hyper-parameters."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value if value is not None else "null"
        else:
            out[name] = json.dumps(value, default=str)
    return out


def _require_package(backend: str) -> None:
    import importlib.util

    package = _PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise RlkdError(f"logger={backend} needs the {package} package; pip install 'rlkd[{backend}]' (or use "
                        "logger=jsonl)")


def make_tracker(logger_cfg: Mapping[str, Any] | None, run_dir: Path):
    """The Accelerate tracker the ``logger`` config names, not started; ``None`` for ``jsonl``."""
    backend = str((logger_cfg or {}).get("name", "jsonl"))
    if backend not in BACKENDS:
        raise RlkdError(f"unknown logger '{backend}'; available: {', '.join(BACKENDS)}")
    if backend == "jsonl":
        return None
    _require_package(backend)
    from accelerate import tracking

    project = str(logger_cfg.get("project") or "rlkd")
    run_name = str(logger_cfg.get("run_name") or Path(run_dir).name)
    if backend == "tensorboard":
        log_dir = Path(run_dir) / os.path.expanduser(str(logger_cfg.get("log_dir") or "tensorboard"))
        return tracking.TensorBoardTracker("", log_dir, flush_secs=int(logger_cfg.get("flush_secs") or 30))
    if backend == "wandb":
        return tracking.WandBTracker(project, name=run_name, dir=str(run_dir),
                                     mode=str(logger_cfg.get("mode") or "offline"))
    uri = str(logger_cfg.get("tracking_uri") or "").strip() or (Path(run_dir) / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):  # a local file store: MLflow 3 asks for this opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    return tracking.MLflowTracker(experiment_name=project, run_name=run_name)


class RunLog:
    """``metrics.jsonl`` plus the configured tracker, written by process 0 only (a no-op elsewhere)."""

    def __init__(self, run_dir: Path, logger_cfg: Mapping[str, Any] | None, *, enabled: bool,
                 config: Mapping[str, Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.backend = str((logger_cfg or {}).get("name", "jsonl"))
        self.tracker = make_tracker(logger_cfg, run_dir) if enabled else None
        self._config = flat_config(config or {})
        self._started = False

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and mirror its numeric values to the tracker."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
        if self.tracker is None:
            return
        if not self._started:  # started on the first record, so a run that fails in set-up leaves no tracker files
            self.tracker.start()
            self.tracker.store_init_configuration(self._config)
            self._started = True
        items = scalar_items(record)
        if self.backend == "mlflow":
            items = [(mlflow_name(tag), value) for tag, value in items]
        self.tracker.log(dict(items), step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.tracker is not None and self._started:
            self.tracker.finish()
            self._started = False
