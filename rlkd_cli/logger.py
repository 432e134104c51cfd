"""Optional mirrors of the training metrics (the ``logger`` config group).

``metrics.jsonl`` in the run dir is always written by the engine and stays the source of truth;
a :class:`MetricsLogger` only copies each record somewhere else for live viewing:

``logger=jsonl`` (default)
    nothing besides ``metrics.jsonl``.
``logger=tensorboard``
    every numeric value of a record becomes a TensorBoard scalar with tag ``<split>/<key>`` at
    ``global_step = record["step"]`` (e.g. ``train/loss``, ``validation/cr@2``,
    ``validation/cr@2|modes=1``), written by :class:`torch.utils.tensorboard.SummaryWriter` into
    ``<run_dir>/<logger.log_dir>`` (default ``tensorboard/``). View with
    ``tensorboard --logdir outputs``. Needs the ``tensorboard`` package
    (``pip install rlkd[tensorboard]``).

Non-numeric values (strings, ``None``), booleans, non-finite floats and the bookkeeping keys
``step`` and ``split`` are not logged as scalars.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from rlkd_cli.errors import RlkdError

__all__ = ["MetricsLogger", "scalar_items"]

BACKENDS = ("jsonl", "tensorboard")
_SKIP_KEYS = {"step", "split"}


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


class MetricsLogger:
    """Mirror metrics records to the configured backend; a no-op for ``jsonl`` or when disabled.

    The TensorBoard writer is created on the first :meth:`log` (so a run that fails during set-up
    leaves no empty events file) and again after :meth:`close` if more records come; TensorBoard
    reads every events file of the folder. :meth:`close` is idempotent.
    """

    def __init__(self, backend: str = "jsonl", log_dir: str | os.PathLike | None = None, *,
                 enabled: bool = True, flush_secs: int = 30):
        if backend not in BACKENDS:
            raise RlkdError(f"unknown logger '{backend}'; available: {', '.join(BACKENDS)}")
        self.backend = backend if enabled else "jsonl"
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.flush_secs = int(flush_secs)
        self._writer = None
        self._writer_cls = None
        if self.backend == "tensorboard":
            if self.log_dir is None:
                raise RlkdError("logger=tensorboard needs logger.log_dir (a folder, relative to the run dir)")
            try:
                import tensorboard  # noqa: F401  (SummaryWriter needs it; torch alone is not enough)
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RlkdError("logger=tensorboard needs the tensorboard package; pip install rlkd[tensorboard] "
                                "(or use logger=jsonl)") from None
            self._writer_cls = SummaryWriter

    @classmethod
    def from_config(cls, logger_cfg: Mapping[str, Any] | None, run_dir: str | os.PathLike, *,
                    enabled: bool = True) -> "MetricsLogger":
        """Build from the ``logger`` config node (``None``: no mirror); ``log_dir`` is relative to ``run_dir``."""
        if logger_cfg is None:
            return cls("jsonl", enabled=enabled)
        backend = str(logger_cfg.get("name", "jsonl"))
        log_dir = logger_cfg.get("log_dir")
        if log_dir is not None:
            log_dir = Path(run_dir) / os.path.expanduser(str(log_dir))
        flush = logger_cfg.get("flush_secs", 30)
        if isinstance(flush, bool) or not isinstance(flush, int) or flush < 1:
            raise RlkdError(f"logger.flush_secs must be an integer >= 1, got {flush!r}")
        return cls(backend, log_dir, enabled=enabled, flush_secs=flush)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write the record's numeric values as scalars at ``record['step']``."""
        if self._writer_cls is None:
            return
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        step = int(record.get("step", 0))
        for tag, value in scalar_items(record):
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
