"""Reading runs for ``rlkd report``: run folders, their files, and every job of a sweep.

A *run* is any folder under the given paths that holds ``summary.json`` (written by ``rlkd sft`` /
``rlkd distill``, and by the sweep wrapper for a failed job), ``results.json`` (``rlkd evaluate``) or
``alignment.json`` (``rlkd measure-alignment``); folders are searched recursively (``checkpoints/``,
``.hydra/`` and ``tensorboard/`` are skipped).

A sweep (a folder with Hydra's ``multirun.yaml``) accounts for every one of its jobs: the jobs are
the combinations of its sweep overrides (``hydra.overrides.task``, expanded as Hydra's basic sweeper
does), each in its numbered folder. A job folder without a summary (killed, or still running) is a
run with status ``incomplete``; a job without a folder, ``not started``. Statuses: ``completed``,
``failed``, ``stopped`` (SIGTERM or ``trainer.stop_after``; resumable), ``incomplete``, ``not started``.

A single run folder (Hydra's ``.hydra/`` record) without a summary is a run too, ``incomplete``, with
what it holds (its last checkpoint): a killed run is listed as a sweep's killed job is. Folders that
hold files but no run (a ``rlkd generate`` or ``rlkd cache-teacher`` folder without a summary, stray
files) are *skipped*, each with the reason, so a report never drops a folder silently.

Damaged files do not stop a report: a ``summary.json`` that is not a JSON object makes its run
``incomplete`` (with the reason), and a ``metrics.jsonl`` line that is torn, not UTF-8, or has no
numeric step is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlkd_cli.errors import RlkdError

log = logging.getLogger("rlkd.report")

RUN_FILES = ("summary.json", "results.json", "alignment.json")
SKIP_DIRS = {"checkpoints", ".hydra", "tensorboard", "wandb", "mlruns", "__pycache__"}
DEFAULT_VALUE = "default"
EVAL_METRICS = ("accuracy", "rougeL", "perplexity", "coverage")


@dataclass
class Run:
    """One run folder: its status, overrides, final metrics and validation curve."""

    path: Path
    status: str = "completed"
    error: str | None = None
    command: str | None = None
    loss_mix: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)  # validation records of metrics.jsonl
    train_curve: list[dict[str, Any]] = field(default_factory=list)  # training records (every log_every steps)
    settings: dict[str, str] = field(default_factory=dict)  # dotted key -> value of the run's resolved config

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def seed(self) -> str | None:
        return self.overrides.get("seed")


def _natural_key(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _read_object(path: Path) -> tuple[dict | None, str | None]:
    """``(object, None)`` for a JSON object file, else ``(None, why)``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        return None, f"{path.name} cannot be read ({' '.join(str(ex).split())[:120]})"
    if not isinstance(obj, dict):
        return None, f"{path.name} holds {type(obj).__name__ if obj is not None else 'null'}, not a JSON object"
    return obj, None


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["loss=kl", "+x.y=1", "~z"]`` -> ``{"loss": "kl", "x.y": "1", "~z": ""}`` (leading ``+``/``++`` dropped)."""
    out: dict[str, str] = {}
    for item in items or []:
        item = str(item)
        key, sep, value = item.partition("=")
        key = key.lstrip("+")
        out[key] = value if sep else ""
    return out


def _yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as ex:  # a damaged file: say which
        raise RlkdError(f"cannot read {path}: {' '.join(str(ex).split())[:200]}; fix or delete it") from None


def _read_overrides(run_dir: Path, summary: dict | None) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.exists():
        return parse_overrides(_yaml(path) or [])
    if summary and isinstance(summary.get("overrides"), list):
        return parse_overrides(summary["overrides"])
    return {}


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif prefix:
        out[prefix[:-1]] = str(node) if not isinstance(node, (list, dict)) else json.dumps(node)
    return out


def _read_settings(run_dir: Path) -> dict[str, str]:
    """The run's values: its resolved ``config.yaml`` (dotted keys) and Hydra's group choices (``loss: kl``)."""
    settings: dict[str, str] = {}
    for path in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        if path.exists():
            try:
                settings.update(_flatten(_yaml(path)))
            except RlkdError:
                pass
    hydra = run_dir / ".hydra" / "hydra.yaml"
    if hydra.exists():
        try:
            choices = ((_yaml(hydra) or {}).get("hydra") or {}).get("runtime", {}).get("choices", {}) or {}
            settings.update({str(k): str(v) for k, v in choices.items() if not str(k).startswith("hydra")})
        except (RlkdError, AttributeError):
            pass
    return settings


def _summary_metrics(summary: dict) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items()
            if (k.startswith(("cr@", "or@", "loss/", "rollout/")) or k in ("val_loss", "val_ppl")) and _finite(v)}


def _results_metrics(results: dict) -> dict[str, float]:
    rows = [r for r in results.get("models") or [] if isinstance(r, dict)]
    out = {}
    for i, row in enumerate(rows):
        label = "eval/" if len(rows) == 1 else f"eval/{row.get('model', i)}/"
        for key in EVAL_METRICS:
            if _finite(row.get(key)):
                out[f"{label}{key}"] = float(row[key])
    return out


def _alignment_metrics(alignment: dict) -> dict[str, float]:
    rows = [r for r in alignment.get("checkpoints") or [] if isinstance(r, dict)]
    names = [Path(str(r.get("checkpoint", i))).name for i, r in enumerate(rows)]
    out = {}
    for i, row in enumerate(rows):
        name = names[i] if names.count(names[i]) == 1 else f"{i}:{names[i]}"
        label = "align/" if len(rows) == 1 else f"align/{name}/"
        for key, value in row.items():
            if (key.startswith(("cr@", "or@")) or key == "ppl") and _finite(value):
                out[f"{label}{key}"] = float(value)
    return out


def read_curve(path: Path, split: str = "validation") -> list[dict[str, Any]]:
    """The ``split`` records of a ``metrics.jsonl``; bad lines (torn, not UTF-8, no numeric step) skipped."""
    if not path.exists():
        return []
    records, bad = [], 0
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            step = rec["step"] if isinstance(rec, dict) else None
            if not _finite(step):
                raise ValueError("no numeric step")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            bad += 1  # a line cut short by a killed job, a damaged byte: the rest is still usable
            continue
        if rec.get("split") == split:
            records.append(rec)
    if bad and split == "validation":  # warned once per file
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    return records


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read one run folder (see the module docstring for what is read)."""
    run_dir = Path(run_dir)
    run = Run(path=run_dir, status="incomplete")
    summary, why = _read_object(run_dir / "summary.json") if (run_dir / "summary.json").exists() else (None, None)
    if summary is not None:
        run.status = _text(summary.get("status")) or "completed"
        run.error = _text(summary.get("error"))
        run.command = _text(summary.get("command"))
        run.loss_mix = _text(summary.get("loss_mix"))
        run.final.update(_summary_metrics(summary))
    elif why:
        run.error = why
    for name, metrics_of, command in (("results.json", _results_metrics, "evaluate"),
                                      ("alignment.json", _alignment_metrics, "measure-alignment")):
        if (run_dir / name).exists():
            obj, why = _read_object(run_dir / name)
            if obj is None:
                run.error = run.error or why
                continue
            run.status = run.status if summary is not None else "completed"
            run.command = run.command or _text(obj.get("command")) or command
            run.final.update(metrics_of(obj))
    run.overrides = _read_overrides(run_dir, summary)
    run.settings = _read_settings(run_dir)
    run.command = run.command or run.settings.get("command")
    run.curve = read_curve(run_dir / "metrics.jsonl")
    run.train_curve = read_curve(run_dir / "metrics.jsonl", split="train")
    if run.status == "incomplete" and not run.error:
        run.error = _incomplete_reason(run_dir)
    return run


def _text(value: Any) -> str | None:
    """A summary's text field as text (``None`` stays ``None``): a list or number there is shown, never hashed."""
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _incomplete_reason(run_dir: Path) -> str:
    """Why a run folder without a summary is incomplete, and what it holds."""
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()) \
        if (run_dir / "checkpoints").is_dir() else []
    held = f"last checkpoint {steps[-1]}; continue it with trainer.resume=auto" if steps else "no checkpoint"
    return f"no summary.json: killed, failed outside a sweep, or still running ({held})"


def sweep_jobs(sweep: Path) -> list[tuple[int, list[str]]]:
    """``(job number, overrides)`` of every job a sweep launches, from its ``multirun.yaml`` (empty if it says none)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = ((_yaml(sweep / "multirun.yaml") or {}).get("hydra") or {}).get("overrides", {}).get("task") or []
        overrides = OverridesParser.create().parse_overrides([str(o) for o in task])
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception as ex:  # noqa: BLE001 - a multirun.yaml this parser does not understand: count the folders
        log.warning("%s: cannot expand its sweep (%s); counting the job folders only", sweep, ex)
        return []
    return list(enumerate(jobs)) if task else []


def _sweep_runs(sweep: Path, found: set[Path]) -> list[Run]:
    """The sweep's jobs that have no run files: folders of killed jobs, and jobs never started."""
    out = []
    for sub in sorted((p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=_natural_key):
        if sub.resolve() not in found:
            out.append(load_run(sub))
    command = None
    for num, overrides in sweep_jobs(sweep):
        job = sweep / str(num)
        if not job.exists():
            command = command or _text((_yaml(sweep / "multirun.yaml") or {}).get("command"))
            out.append(Run(path=job, status="not started", overrides=parse_overrides(overrides), command=command,
                           error="the sweep stopped before this job started"))
    return out


NO_REPORT_COMMANDS = ("generate", "cache-teacher")  # their folders hold outputs, not metrics


def _folder_kind(dirpath: str, dirnames: list[str], filenames: list[str]) -> tuple[bool, str | None]:
    """``(is a run, why skipped)`` for one folder of the walk (``(False, None)``: nothing to say about it)."""
    if any(f in filenames for f in RUN_FILES):
        return True, None
    if ".hydra" in dirnames:
        command = _read_settings(Path(dirpath)).get("command")
        if command in NO_REPORT_COMMANDS:
            return False, f"a rlkd {command} folder without summary.json: it holds outputs, no metrics to report"
        return True, None
    shown = [f for f in filenames if not f.startswith(".")]
    if shown and "multirun.yaml" not in filenames:
        return False, (f"no summary.json, results.json, alignment.json or .hydra/ (holds {', '.join(sorted(shown)[:3])}"
                       f"{', ...' if len(shown) > 3 else ''})")
    return False, None


def discover_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Every run under ``paths`` (see :func:`discover`)."""
    return discover(paths)[0]


def discover(paths: Sequence[str | os.PathLike]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run under ``paths`` (a run dir itself, or any folder above runs) and every job of each sweep among
    them, in natural path order; and the ``(folder, why)`` of each folder with files that was skipped."""
    if not paths:
        raise RlkdError("give at least one run or sweep folder, e.g. rlkd report outputs/multirun/distill/<time>")
    found: set[Path] = set()
    sweeps: set[Path] = set()
    skipped: dict[Path, str] = {}
    for p in paths:
        root = Path(os.path.expanduser(str(p)))
        if not root.exists():
            raise RlkdError(f"'{p}' does not exist; pass a run or sweep folder (e.g. outputs/multirun/distill/<time>)")
        if not root.is_dir():
            raise RlkdError(f"'{p}' is not a folder; pass a run or sweep folder")
        for dirpath, dirnames, filenames in os.walk(root):
            is_run, why = _folder_kind(dirpath, dirnames, filenames)
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".tmp-")]
            if is_run:
                found.add(Path(dirpath).resolve())
            elif why:
                skipped[Path(dirpath)] = why
            if "multirun.yaml" in filenames:
                sweeps.add(Path(dirpath).resolve())
    runs = [load_run(d) for d in found]
    for sweep in sweeps:
        runs.extend(_sweep_runs(sweep, found))
    if not runs:
        raise RlkdError(f"no runs found under {', '.join(str(p) for p in paths)}: no folder holds summary.json, "
                        "results.json or alignment.json; pass a run dir or a sweep dir of finished rlkd runs")
    skipped = {p: why for p, why in skipped.items() if not any(q in found for q in p.resolve().parents)}
    for path, why in skipped.items():
        log.warning("skipped %s: %s", path, why)
    return sorted(runs, key=lambda r: _natural_key(r.path)), sorted(skipped.items(), key=lambda x: _natural_key(x[0]))
