"""``rlkd report PATH... [--out DIR]``: tables and plots over runs and sweeps (see :mod:`rlkd_cli.report`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from rlkd_cli.io import atomic_write_text, ensure_writable_dir
from rlkd_cli.plots import plot_curves, plot_final_bars, plot_modes
from rlkd_cli.report import _main_keys, _show, _table, aggregate, group_runs, render_csv, render_markdown
from rlkd_cli.report_runs import discover


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
                 console=None) -> dict[str, Any]:
    """Discover, group and aggregate runs; write report.md, report.csv and the plots; print the table.

    Returns ``{"out": folder, "runs": [...], "groups": [...], "rows": aggregate(...), "files": [...],
    "skipped": [(folder, why), ...]}``.
    """
    runs, skipped = discover(paths)
    groups = group_runs(runs)
    rows = aggregate(groups)
    out_dir = ensure_writable_dir(Path(os.path.expanduser(str(out if out is not None else paths[0]))),
                                  "report folder (--out)")
    plots = []
    for name, fn, arg in (("curves.png", plot_curves, groups), ("final_bars.png", plot_final_bars, rows),
                          ("modes.png", plot_modes, rows)):
        if fn(arg, out_dir / name):
            plots.append(name)
    param_keys = list(groups[0].params) if groups else []
    atomic_write_text(out_dir / "report.md", render_markdown(runs, groups, rows, [str(p) for p in paths], plots,
                                                                     skipped=skipped))
    atomic_write_text(out_dir / "report.csv", render_csv(rows, param_keys))
    files = ["report.md", "report.csv", *plots]
    if console is not None:
        print_table(rows, param_keys, console)
        from rich.text import Text

        skipped_text = f"; skipped {len(skipped)} folder(s) without a run (listed above and in report.md)" \
            if skipped else ""
        console.print(Text(f"{len(runs)} run(s) in {len(groups)} group(s){skipped_text}; wrote "
                           f"{', '.join(str(out_dir / f) for f in files)}"))
    return {"out": out_dir, "runs": runs, "groups": groups, "rows": rows, "files": files,
            "skipped": [(_show(p), why) for p, why in skipped]}


def print_table(rows: list[dict[str, Any]], param_keys: list[str], console) -> None:
    """The final-metrics table on the console (CR/OR, val_ppl, eval and align keys; loss terms in report.md)."""
    from rich.table import Table
    from rich.text import Text

    # val_loss is not comparable across loss mixes: the console shows the perplexity (report.md has both)
    keys = [k for k in _main_keys(rows) if not k.startswith(("loss/", "rollout/")) and k != "val_loss"]
    header, cells = _table(rows, keys, param_keys)
    table = Table(title="rlkd report: final metrics (mean ± std over seeds)")
    for h in header:
        table.add_column(h, overflow="fold")
    for line in cells:
        style = "red" if line[max(len(param_keys), 1) + 1].startswith(("failed", "stopped", "no completed")) else None
        table.add_row(*(Text(c) for c in line), style=style)  # cells are text, never markup ("[/path]")
    console.print(table)
