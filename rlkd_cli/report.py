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

Grouping. Runs of different commands are never one group (``command`` is then a column). Within a
command, the *swept parameters* are the override keys whose value differs between runs, then any key
of the runs' resolved ``config.yaml`` that still tells runs apart (a config edited between runs).
Seed, resume, progress, logging, device and Hydra keys (:data:`EXCLUDED_KEYS`) say how a run ran,
not what it trained, and never split replicates. A key a run did not override counts as the value
its config had (its resolved ``config.yaml``, or the group option Hydra chose, e.g. ``k=5`` from the
``kl+rank`` preset), and as ``default`` only when no record of the run says. Runs with the same
values of the swept parameters form a group; the seeds of a group are its replicates. Which runs
are read, and every job of a sweep with its status: :mod:`rlkd_cli.report_runs`.

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

from rlkd_cli.report_runs import DEFAULT_VALUE, Run, _finite, discover_runs, load_run, parse_overrides  # noqa: F401

__all__ = ["Run", "Group", "discover_runs", "group_runs", "aggregate", "metric_order", "render_csv",
           "render_markdown"]

# Keys that say how a run ran, not what it trained: never a reason to split replicates.
EXCLUDED_KEYS = {"seed", "cache_dir", "description", "logger", "trainer.resume", "trainer.force_resume",
                 "trainer.stop_after", "trainer.progress", "trainer.log_every", "trainer.save_every",
                 "trainer.keep_last", "trainer.device", "trainer.threads"}
_MODES_RE = re.compile(r"^(?P<prefix>(?:align/(?:[^|]*/)?)?)(?P<kind>cr|or)@(?P<k>\d+)\|(?P<bucket>.+)$")


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
    """Seed, resume, progress, logging and device keys, and Hydra's own: not settings of the run."""
    return (key in EXCLUDED_KEYS or key == "hydra" or key.startswith(("hydra.", "hydra/", "logger."))
            or key.endswith(".device"))


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """What tells the groups apart: ``command`` when runs of several commands are read, the override keys
    whose value varies among runs of one command, then any other config key that still splits a group
    (a config edited between runs); minus seed, resume, progress, logging, device and Hydra keys."""
    by_command: dict[str, list[Run]] = {}
    for run in runs:
        by_command.setdefault(run.command or DEFAULT_VALUE, []).append(run)
    keys: list[str] = ["command"] if len({r.command for r in runs if r.command}) > 1 else []
    for run in runs:
        for key in run.overrides:
            if key not in keys and not _excluded(key) and any(
                    len({value_of(r, key) for r in rs}) > 1 for rs in by_command.values()):
                keys.append(key)
    for key in sorted({k for r in runs for k in r.settings if not _excluded(k)} - set(keys)):
        if _splits(runs, keys, key):
            keys.append(key)
    return keys


def _splits(runs: Sequence[Run], keys: list[str], key: str) -> bool:
    """Whether runs that agree on ``keys`` and all record ``key`` hold different values of it."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(value_of(run, k) for k in keys), []).append(run)
    return any(all(key in r.settings for r in rs) and len({r.settings[key] for r in rs}) > 1
               for rs in groups.values())


def value_of(run: Run, key: str) -> str:
    """The run's value of ``key``: its command, its override, else its config's value, else ``default``."""
    if key == "command":
        return run.command or DEFAULT_VALUE
    if key in run.overrides:
        return run.overrides[key]
    return run.settings.get(key, DEFAULT_VALUE)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group ``runs`` by the values of :func:`swept_keys`; groups in order of first appearance."""
    keys = swept_keys(runs)
    groups: dict[tuple, Group] = {}
    for run in runs:
        params = {k: value_of(run, k) for k in keys}
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


_COUNT_RE = re.compile(r"(tokens|positions|sequences|examples|count|params/\w+)$")


def _cell(stat: tuple[float | None, float | None, int] | None, key: str = "") -> str:
    """``mean ± std``: rates with 4 decimals; counts (``rollout/generated_tokens``, ``params/*``) as whole
    numbers (one decimal when a mean over seeds is not whole), never ``43695.0000``."""
    if stat is None or stat[0] is None:
        return ""
    mean, std, _ = stat
    if _COUNT_RE.search(key.split("|")[0]):
        show = lambda x: f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"  # noqa: E731
        return show(mean) if std is None else f"{show(mean)} ± {std:.1f}"
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
                      *[_cell(row["metrics"].get(k), k) for k in metric_keys]])
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
                    plots: list[str], skipped: Sequence[tuple[Path, str]] = ()) -> str:
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
    if skipped:
        out.write("\n## Skipped folders\n\n")
        out.write(_markdown_table(["folder", "why"], [[_show(p), why] for p, why in skipped]))
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
