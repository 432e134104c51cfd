r"""``rlkd report``: tables and plots over runs and sweeps.

A *run* is any folder under the given paths that holds ``summary.json`` (written by ``rlkd sft`` /
``rlkd distill``, and by the sweep wrapper for a failed job), ``results.json`` (``rlkd evaluate``) or
``alignment.json`` (``rlkd measure-alignment``); folders are searched recursively (``checkpoints/``,
``.hydra/`` and ``tensorboard/`` are skipped). For each run the report reads

* ``summary.json``: ``status`` (``completed`` / ``failed`` / ``stopped``), ``error`` and the final
  validation metrics ``cr@k``, ``or@k``, ``val_loss``, ``val_ppl``, ``loss/<term>`` and the
  multi-modality splits ``cr@k|modes=...`` / ``or@k|modes=...``;
* ``.hydra/overrides.yaml`` (or the ``overrides`` list of a failed job's summary): the command-line
  overrides, e.g. ``loss=kl+rank``, ``seed=2``;
* ``metrics.jsonl``: the validation records (``split == "validation"``) for the learning curves;
* ``results.json``: the downstream metrics ``accuracy`` / ``rougeL`` / ``perplexity`` of each model
  row, as ``eval/<metric>`` (one row) or ``eval/<model>/<metric>`` (several);
* ``alignment.json``: each checkpoint row's ``cr@k``, ``or@k``, ``ppl`` and by-modes keys, as
  ``align/<key>`` (one checkpoint) or ``align/<checkpoint folder name>/<key>`` (several).

Grouping. The *swept parameters* are the override keys whose value differs between runs (a key
absent from a run counts as the value ``default``), except ``seed`` and Hydra's own keys
(``hydra.*``, ``hydra/...``). Runs with the same values of the swept parameters form a group; the
seeds of a group are its replicates.

Aggregation. For every metric of a group, over its *completed* runs where the value is finite:

.. math::  \bar x = \frac1n\sum_i x_i, \qquad s = \sqrt{\frac{1}{n-1}\sum_i (x_i-\bar x)^2}

(the sample standard deviation; undefined, shown blank, for ``n = 1``). Failed and stopped runs are
never averaged and never dropped: they are counted per group and listed with their error.

Output (in ``--out``, default the first path): ``report.md``, ``report.csv`` (one row per group,
columns ``<metric>_mean``, ``<metric>_std``, ``<metric>_n``), ``curves.png`` (validation CR@k / OR@k
against step, one line per run), ``final_bars.png`` (final CR@k / OR@k per group, error bars = std)
and, when by-modes keys exist, ``modes.png`` (final CR@k / OR@k per group split by the teacher's
number of modes, see :func:`rlkd_cli.metrics.alignment_sums_by_modes`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlkd_cli.errors import RlkdError

__all__ = ["Run", "Group", "discover_runs", "group_runs", "aggregate", "metric_order", "render_csv",
           "render_markdown"]

RUN_FILES = ("summary.json", "results.json", "alignment.json")
SKIP_DIRS = {"checkpoints", ".hydra", "tensorboard", "__pycache__"}
EXCLUDED_KEYS = {"seed"}
DEFAULT_VALUE = "default"
EVAL_METRICS = ("accuracy", "rougeL", "perplexity")
_MODES_RE = re.compile(r"^(?P<prefix>(?:align/(?:[^|]*/)?)?)(?P<kind>cr|or)@(?P<k>\d+)\|(?P<bucket>.+)$")


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

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
    curve: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def seed(self) -> str | None:
        return self.overrides.get("seed")


def _natural_key(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise RlkdError(f"cannot read {path}: {ex}; delete or fix the file and rerun rlkd report") from None


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["loss=kl", "+x.y=1", "~z"]`` -> ``{"loss": "kl", "x.y": "1", "~z": ""}`` (leading ``+``/``++`` dropped)."""
    out: dict[str, str] = {}
    for item in items or []:
        item = str(item)
        key, sep, value = item.partition("=")
        key = key.lstrip("+")
        out[key] = value if sep else ""
    return out


def _read_overrides(run_dir: Path, summary: dict | None) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.exists():
        from omegaconf import OmegaConf

        try:
            items = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as ex:  # a damaged file: say which
            raise RlkdError(f"cannot read {path}: {' '.join(str(ex).split())}; fix or delete it") from None
        return parse_overrides(items or [])
    if summary and isinstance(summary.get("overrides"), list):
        return parse_overrides(summary["overrides"])
    return {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _summary_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for key, value in summary.items():
        if (key.startswith(("cr@", "or@", "loss/")) or key in ("val_loss", "val_ppl")) and _finite(value):
            out[key] = float(value)
    return out


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


def _read_curve(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed job; the rest is still usable
        if isinstance(rec, dict) and rec.get("split") == "validation" and "step" in rec:
            records.append(rec)
    return records


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read one run folder (see the module docstring for what is read)."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else None
    run = Run(path=run_dir)
    if summary is not None:
        run.status = str(summary.get("status", "completed"))
        run.error = summary.get("error")
        run.command = summary.get("command")
        run.loss_mix = summary.get("loss_mix")
        run.final.update(_summary_metrics(summary))
    if (run_dir / "results.json").exists():
        results = _read_json(run_dir / "results.json")
        run.command = run.command or results.get("command", "evaluate")
        run.final.update(_results_metrics(results))
    if (run_dir / "alignment.json").exists():
        run.command = run.command or "measure-alignment"
        run.final.update(_alignment_metrics(_read_json(run_dir / "alignment.json")))
    run.overrides = _read_overrides(run_dir, summary)
    run.curve = _read_curve(run_dir / "metrics.jsonl")
    return run


def discover_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Every run folder under ``paths`` (a run dir itself, or any folder above runs), in natural path order."""
    if not paths:
        raise RlkdError("give at least one run or sweep folder, e.g. rlkd report outputs/multirun/distill/<time>")
    found: set[Path] = set()
    for p in paths:
        root = Path(os.path.expanduser(str(p)))
        if not root.exists():
            raise RlkdError(f"'{p}' does not exist; pass a run or sweep folder (e.g. outputs/multirun/distill/<time>)")
        if not root.is_dir():
            raise RlkdError(f"'{p}' is not a folder; pass a run or sweep folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".tmp-")]
            if any(f in filenames for f in RUN_FILES):
                found.add(Path(dirpath).resolve())
    if not found:
        raise RlkdError(f"no runs found under {', '.join(str(p) for p in paths)}: no folder holds summary.json, "
                        "results.json or alignment.json; pass a run dir or a sweep dir of finished rlkd runs")
    return [load_run(d) for d in sorted(found, key=_natural_key)]


# ----------------------------------------------------------------------------------------------
# Groups and aggregation
# ----------------------------------------------------------------------------------------------

@dataclass
class Group:
    """Runs sharing the swept parameters' values (``params``, in swept-key order)."""

    params: dict[str, str]
    runs: list[Run]
    label: str


def _excluded(key: str) -> bool:
    return key in EXCLUDED_KEYS or key.startswith(("hydra.", "hydra/")) or key == "hydra"


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value varies across ``runs`` (absent = ``default``), minus seed and hydra keys."""
    keys: list[str] = []
    for run in runs:
        for key in run.overrides:
            if key not in keys and not _excluded(key):
                keys.append(key)
    return [k for k in keys if len({r.overrides.get(k, DEFAULT_VALUE) for r in runs}) > 1]


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group ``runs`` by the values of :func:`swept_keys`; groups in order of first appearance."""
    keys = swept_keys(runs)
    groups: dict[tuple, Group] = {}
    for run in runs:
        params = {k: run.overrides.get(k, DEFAULT_VALUE) for k in keys}
        ident = tuple(params.items())
        if ident not in groups:
            groups[ident] = Group(params=params, runs=[], label=", ".join(f"{k}={v}" for k, v in params.items()))
        groups[ident].runs.append(run)
    out = list(groups.values())
    if not keys and out:  # one group: name it by what it is
        mixes = {r.loss_mix for r in runs if r.loss_mix}
        commands = {r.command for r in runs if r.command}
        out[0].label = (f"loss={next(iter(mixes))}" if len(mixes) == 1 else
                        next(iter(commands)) if len(commands) == 1 else "all runs")
    return out


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """``(mean, sample std with n-1, n)`` of the finite values; ``None`` where undefined."""
    xs = [float(v) for v in values if _finite(v)]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n == 1:
        return mean, None, 1
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)), n


def _metric_sort_key(key: str) -> tuple:
    m = re.match(r"^(?P<pre>.*?)(?P<kind>cr|or)@(?P<k>\d+)(?P<rest>.*)$", key)
    if m:
        return (1 if m["pre"] else 0, m["pre"], m["rest"], 0 if m["kind"] == "cr" else 1, int(m["k"]))
    order = {"val_loss": 0, "val_ppl": 1}
    if key in order:
        return (2, "", "", order[key], 0)
    return (3, key, "", 0, 0)


def metric_order(keys: Iterable[str]) -> list[str]:
    """CR@k then OR@k (k ascending), then val_loss, val_ppl, loss terms, eval/* and align/* keys."""
    return sorted(set(keys), key=_metric_sort_key)


def aggregate(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Per group: ``{"label", "params", "n", "failed", "stopped", "errors", "metrics": {key: (mean, std, n)}}``.

    Only completed runs enter the statistics (see the module docstring); ``errors`` lists
    ``(run path, status, error)`` of every run that did not complete.
    """
    rows = []
    for g in groups:
        ok = [r for r in g.runs if r.ok]
        keys = metric_order(k for r in ok for k in r.final)
        rows.append({
            "label": g.label, "params": dict(g.params), "n": len(ok),
            "failed": sum(r.status == "failed" for r in g.runs),
            "stopped": sum(r.status not in ("completed", "failed") for r in g.runs),
            "errors": [(_show(r.path), r.status, r.error or "") for r in g.runs if not r.ok],
            "metrics": {k: mean_std([r.final[k] for r in ok if k in r.final]) for k in keys},
        })
    return rows


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def _is_modes_key(key: str) -> bool:
    return "|" in key


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(stat: tuple[float | None, float | None, int] | None) -> str:
    if stat is None or stat[0] is None:
        return ""
    mean, std, _ = stat
    return _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std)}"


def _table(rows: list[dict[str, Any]], metric_keys: list[str], param_keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: one line per group, then one per run that did not complete."""
    lead = (lambda row: [row["params"].get(k, "") for k in param_keys]) if param_keys else (lambda row: [row["label"]])
    header = [*(param_keys or ["group"]), "n", "status", *metric_keys]
    cells = []
    for row in rows:
        status = "ok" if row["n"] else "no completed run"
        bad = row["failed"] + row["stopped"]
        if bad:
            status += f" ({bad} not completed)"
        cells.append([*lead(row), str(row["n"]), status,
                      *[_cell(row["metrics"].get(k)) for k in metric_keys]])
        for path, st, err in row["errors"]:
            cells.append([*lead(row), "", (f"{st}: {err}" if err else st),
                          *["" for _ in metric_keys]])
    return header, cells


def _show(path: Path | str) -> str:
    """A path relative to the working directory when it is below it, else as it is."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _main_keys(rows: list[dict[str, Any]]) -> list[str]:
    return metric_order(k for r in rows for k in r["metrics"] if not _is_modes_key(k))


def _modes_keys(rows: list[dict[str, Any]]) -> list[str]:
    return metric_order(k for r in rows for k in r["metrics"] if _is_modes_key(k))


def render_markdown(runs: list[Run], groups: list[Group], rows: list[dict[str, Any]], sources: Sequence[str],
                    plots: list[str]) -> str:
    param_keys = list(groups[0].params) if groups else []
    n_ok = sum(r.ok for r in runs)
    out = io.StringIO()
    out.write("# rlkd report\n\n")
    out.write(f"Sources: {', '.join(f'`{s}`' for s in sources)}  \n")
    out.write(f"Runs: {len(runs)} ({n_ok} completed, {len(runs) - n_ok} not completed)  \n")
    out.write(f"Swept parameters: {', '.join(f'`{k}`' for k in param_keys) or 'none'}; "
              "replicates (seeds) are averaged: mean ± sample std (n−1), std blank for n = 1.\n\n")
    out.write("## Final metrics\n\n")
    out.write(_markdown_table(*_table(rows, _main_keys(rows), param_keys)))
    modes = _modes_keys(rows)
    if modes:
        out.write("\n## By teacher modality\n\nFinal CR@k / OR@k over the positions whose teacher has 1, 2 or "
                  "≥3 tokens with probability ≥ 0.5 × the top probability (`modes=...`).\n\n")
        out.write(_markdown_table(*_table([r for r in rows if r["n"]], modes, param_keys)))
    bad = [r for r in runs if not r.ok]
    if bad:
        out.write("\n## Runs that did not complete\n\n")
        out.write(_markdown_table(["run", "status", "error"], [[_show(r.path), r.status, r.error or ""] for r in bad]))
    out.write("\n## Runs\n\n")
    label_of = {id(r): g.label for g in groups for r in g.runs}
    out.write(_markdown_table(["run", "group", "seed", "status"],
                              [[_show(r.path), label_of[id(r)], r.seed or DEFAULT_VALUE, r.status] for r in runs]))
    if plots:
        out.write("\n## Plots\n\n")
        for name in plots:
            out.write(f"![{name}]({name})\n\n")
    return out.getvalue()


def render_csv(rows: list[dict[str, Any]], param_keys: list[str]) -> str:
    keys = metric_order(k for r in rows for k in r["metrics"])
    header = ["group", *param_keys, "n", "failed", "stopped"]
    for k in keys:
        header += [f"{k}_mean", f"{k}_std", f"{k}_n"]
    header.append("errors")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        line = [row["label"], *[row["params"].get(k, "") for k in param_keys], row["n"], row["failed"], row["stopped"]]
        for k in keys:
            mean, std, n = row["metrics"].get(k, (None, None, 0))
            line += ["" if mean is None else repr(mean), "" if std is None else repr(std), n]
        line.append("; ".join(f"{p}: {st}: {e}" for p, st, e in row["errors"]))
        writer.writerow(line)
    return buf.getvalue()
