"""The plots of ``rlkd report``: training and validation curves, final CR/OR bars per group, CR/OR by teacher modality."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

from rlkd_cli.report import DEFAULT_VALUE, _MODES_RE, Group, _finite, _main_keys, _modes_keys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ks(keys: Iterable[str], kind: str, prefix: str = "") -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}{kind}@(\d+)$")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def plot_curves(groups: list[Group], path: Path) -> bool:
    """Write :func:`curves_figure` to ``path``; ``False`` when no run has a curve."""
    fig = curves_figure(groups)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


def curves_figure(groups: list[Group]):
    """CR@k (top row) and OR@k (bottom row) against step: one colour per group, one line style per seed; the
    training values logged every ``trainer.log_every`` steps (thin lines) and the validation points (markers,
    from step 0); the panels of a row share their y axis, so one metric's panels compare at a glance; the
    legend sits below the panels, never on one."""
    runs = [(gi, ri, g, r) for gi, g in enumerate(groups) for ri, r in enumerate(g.runs)]
    keys = {k for *_, r in runs for rec in (*r.curve, *r.train_curve) for k in rec}
    rows = [(kind, _ks(keys, kind)) for kind in ("cr", "or") if _ks(keys, kind)]
    if not rows:
        rows = [("loss", [0])] if "loss" in keys else []
    if not rows:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    ncols = max(len(ks) for _, ks in rows)
    legend_cols = max(1, min(len(runs) + 2, 4))
    legend_h = 0.25 * math.ceil((len(runs) + 2) / legend_cols) + 0.3  # inches below the panels
    fig, axes = plt.subplots(len(rows), ncols, figsize=(max(3.6 * ncols, 6.5), 3.0 * len(rows) + 0.8 + legend_h),
                             squeeze=False, sharey="row")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, (kind, ks) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(ks):
                ax.axis("off")
                continue
            key = "loss" if kind == "loss" else f"{kind}@{ks[j]}"
            for gi, ri, g, r in runs:
                look = {"color": colors[gi % len(colors)], "linestyle": styles[ri % len(styles)]}
                for curve, extra in ((r.train_curve, {"lw": 1.0, "alpha": 0.55}),
                                     (r.curve, {"lw": 1.8, "marker": "o", "markersize": 4})):
                    pts = sorted((rec["step"], rec[key]) for rec in curve if _finite(rec.get(key)))
                    if pts:
                        ax.plot(*zip(*pts), **look, **extra)
            ax.set_title("loss" if kind == "loss" else f"{kind.upper()}@{ks[j]}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[gi % len(colors)], linestyle=styles[ri % len(styles)], marker="o",
                      markersize=4, label=f"{g.label} (seed {r.seed or DEFAULT_VALUE})") for gi, ri, g, r in runs]
    handles += [Line2D([], [], color="0.4", lw=1.0, alpha=0.55, label="training (every log_every steps)"),
                Line2D([], [], color="0.4", lw=1.8, marker="o", markersize=4, label="validation")]
    fig.suptitle("CR@k / OR@k against step" if rows[0][0] != "loss" else "Loss against step")
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 0.95))
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize="small", frameon=False)
    return fig


def _bars(ax, rows: list[dict[str, Any]], keys: list[str], xticklabels: list[str], colors) -> None:
    width = 0.8 / max(len(rows), 1)
    for gi, row in enumerate(rows):
        means = [row["metrics"].get(k, (None, None, 0))[0] for k in keys]
        stds = [row["metrics"].get(k, (None, None, 0))[1] for k in keys]
        xs = [x + (gi - (len(rows) - 1) / 2) * width for x in range(len(keys))]
        ax.bar(xs, [m if m is not None else 0.0 for m in means], width,
               yerr=[s if s is not None else math.nan for s in stds], capsize=3,
               label=f"{row['label']} (n={row['n']})", color=colors[gi % len(colors)])
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(xticklabels)
    ax.grid(axis="y", alpha=0.3)


def plot_final_bars(rows: list[dict[str, Any]], path: Path) -> bool:
    """Final CR@k and OR@k per group (mean over seeds, error bars = sample std)."""
    rows = [r for r in rows if r["n"]]
    keys = _main_keys(rows)
    for prefix in ("", "align/"):
        chosen = [f"{prefix}cr@{k}" for k in _ks(keys, "cr", prefix)] + [f"{prefix}or@{k}" for k in _ks(keys, "or", prefix)]
        if chosen:
            break
    else:
        chosen = [k for k in keys if k.startswith("eval/")]
    if not chosen:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(chosen) * max(1, len(rows)) ** 0.5 + 2) + 3, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    _bars(ax, rows, chosen, [k.upper().replace("ALIGN/", "") if "@" in k else k for k in chosen], colors)
    ax.set_ylabel("final value (mean ± std over seeds)")
    ax.set_title("Final CR@k / OR@k per group" if "@" in chosen[0] else "Final evaluation metrics per group")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_modes(rows: list[dict[str, Any]], path: Path) -> bool:
    """Final CR@k (top row) / OR@k (bottom row) per group, split by the teacher's number of modes (x axis)."""
    rows = [r for r in rows if r["n"]]
    parsed = [(k, _MODES_RE.match(k)) for k in _modes_keys(rows)]
    parsed = [(k, m) for k, m in parsed if m]
    if not parsed:
        return False
    prefix = "" if any(m["prefix"] == "" for _, m in parsed) else parsed[0][1]["prefix"]
    parsed = [(k, m) for k, m in parsed if m["prefix"] == prefix]
    buckets: list[str] = []
    for _, m in parsed:
        if m["bucket"] not in buckets:
            buckets.append(m["bucket"])
    buckets.sort(key=lambda b: [int(x) for x in re.findall(r"\d+", b)] + [1 if ">=" in b else 0])
    panels = [(kind, sorted({int(m["k"]) for _, m in parsed if m["kind"] == kind})) for kind in ("cr", "or")]
    panels = [(kind, ks) for kind, ks in panels if ks]
    plt = _pyplot()
    ncols = max(len(ks) for _, ks in panels)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(max(4.2 * ncols, 5.0) + 3, 3.2 * len(panels) + 0.8),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (kind, ks) in enumerate(panels):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(ks):
                ax.axis("off")
                continue
            keys = [f"{prefix}{kind}@{ks[j]}|{b}" for b in buckets]
            _bars(ax, rows, keys, buckets, colors)
            ax.set_title(f"{kind.upper()}@{ks[j]} by teacher modes")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle("Final CR@k / OR@k split by the teacher's number of modes\n(mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0, 1 - 2.9 / fig.get_figwidth(), 0.93))
    fig.legend(handles, labels, loc="center right", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


