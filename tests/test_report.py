"""rlkd report: discovery, grouping, mean ± std, files, plots."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

from conftest import QUICK, run_cli
from rlkd_cli import report
from rlkd_cli.commands.report import write_report
from rlkd_cli.errors import RlkdError

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
SWEEP = FIXTURES / "sweep"


def _summaries() -> dict[str, list[dict]]:
    """Completed fixture summaries by loss, read independently of rlkd_cli.report."""
    out: dict[str, list[dict]] = {}
    for job in sorted(SWEEP.iterdir()):
        if not (job / "summary.json").exists():
            continue
        s = json.loads((job / "summary.json").read_text())
        if s["status"] == "completed":
            out.setdefault(s["loss_mix"], []).append(s)
    return out


def test_discover_runs_finds_every_job_and_skips_checkpoints():
    runs = report.discover_runs([SWEEP])
    assert [r.path.name for r in runs] == ["0", "1", "2", "3", "4", "5"]
    assert [r.status for r in runs] == ["completed"] * 4 + ["failed", "completed"]
    assert runs[0].overrides["loss"] == "kl" and runs[0].seed == "1"
    assert runs[0].final["cr@1"] == 0.5 and runs[0].final["cr@1|modes=2"] == 0.25
    assert [rec["step"] for rec in runs[0].curve] == [2, 4]  # validation records only
    assert "non-finite" in runs[4].error
    # the evaluate run (results.json, no summary) is a run too
    all_runs = report.discover_runs([FIXTURES])
    ev = [r for r in all_runs if r.path.name == "evaluate_run"]
    assert len(ev) == 1 and ev[0].final == {"eval/accuracy": 0.25, "eval/perplexity": 3.5}


def test_group_runs_by_swept_keys_only():
    groups = report.group_runs(report.discover_runs([SWEEP]))
    # trainer=debug etc. are the same in every job, seed and hydra.* are excluded
    assert [g.params for g in groups] == [{"loss": "kl"}, {"loss": "kl+rank"}, {"loss": "rank"}]
    assert [len(g.runs) for g in groups] == [2, 3, 1]
    assert report.swept_keys(report.discover_runs([SWEEP])) == ["loss"]


def test_aggregate_mean_and_sample_std_exactly():
    rows = {r["params"]["loss"]: r for r in report.aggregate(report.group_runs(report.discover_runs([SWEEP])))}
    expected = _summaries()
    for loss, summaries in expected.items():
        row = rows[loss]
        assert row["n"] == len(summaries)
        for key in ("cr@1", "cr@2", "or@1", "or@2", "val_loss", "cr@1|modes=1", "or@2|modes>=3"):
            values = [s[key] for s in summaries]
            mean, std, n = row["metrics"][key]
            assert n == len(values)
            assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
            if n > 1:
                assert std == pytest.approx(statistics.stdev(values), abs=1e-12)  # n-1 denominator
            else:
                assert std is None
    # hand-computed: kl cr@1 over seeds {0.5, 0.7}: mean 0.6, std sqrt(0.02) ~ 0.1414
    assert rows["kl"]["metrics"]["cr@1"][0] == pytest.approx(0.6)
    assert rows["kl"]["metrics"]["cr@1"][1] == pytest.approx(math.sqrt(0.02))
    # the failed job is counted and listed, not averaged
    assert rows["kl+rank"]["n"] == 2 and rows["kl+rank"]["failed"] == 1
    assert len(rows["kl+rank"]["errors"]) == 1 and "non-finite" in rows["kl+rank"]["errors"][0][2]
    assert "loss/kl" not in rows["rank"]["metrics"]


def test_mean_std_edge_cases():
    assert report.mean_std([]) == (None, None, 0)
    assert report.mean_std([2.0, float("nan")]) == (2.0, None, 1)
    mean, std, n = report.mean_std([1.0, 2.0, 4.0])
    assert (mean, n) == (pytest.approx(7 / 3), 3) and std == pytest.approx(math.sqrt(((4 / 3) ** 2 + (1 / 3) ** 2 + (5 / 3) ** 2) / 2))


def test_write_report_files_and_plots(tmp_path):
    import matplotlib.image as mpimg

    result = write_report([SWEEP], tmp_path / "out")
    out = tmp_path / "out"
    assert set(result["files"]) == {"report.md", "report.csv", "curves.png", "final_bars.png", "modes.png"}
    md = (out / "report.md").read_text()
    assert "| loss | n | status |" in md
    assert "0.6000 ± 0.1414" in md  # kl cr@1
    assert "failed: 2 consecutive steps had a non-finite loss" in md
    assert "By teacher modality" in md and "cr@1\\|modes=1" in md
    with open(out / "report.csv", newline="") as f:
        rows = {r["loss"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"kl", "kl+rank", "rank"}
    assert float(rows["kl"]["cr@1_mean"]) == pytest.approx(0.6)
    assert float(rows["kl"]["cr@1_std"]) == pytest.approx(math.sqrt(0.02))
    assert rows["rank"]["cr@1_std"] == "" and rows["rank"]["cr@1_n"] == "1"
    assert rows["kl+rank"]["failed"] == "1" and "non-finite" in rows["kl+rank"]["errors"]
    for name in ("curves.png", "final_bars.png", "modes.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.shape[2] in (3, 4)
        assert img[..., :3].std() > 0.05  # something was drawn


def test_no_modes_plot_without_modes_keys(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SWEEP / "0", run)
    s = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({k: v for k, v in s.items() if "|" not in k}))
    result = write_report([run])
    assert "modes.png" not in result["files"] and (run / "final_bars.png").exists()
    assert result["groups"][0].label == "loss=kl"  # nothing swept: named by its loss mix


def test_cli_report_and_errors(tmp_path):
    res = run_cli(["report", str(SWEEP), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "kl+rank" in res.output and "failed" in res.output
    assert (tmp_path / "rep" / "report.md").exists()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    res = run_cli(["report", str(empty)])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: no runs found under") and str(empty) in res.output
    assert "Traceback" not in res.output
    with pytest.raises(RlkdError, match="does not exist"):
        report.discover_runs([tmp_path / "missing"])


# ----------------------------------------------------------------------------------------------
# What a report holds: groups by command and config, every run listed, every skipped folder said
# ----------------------------------------------------------------------------------------------

def _fake_run(path: Path, command: str, overrides: list[str], config: dict | None = None, summary: dict | None = None,
              cr1: float = 0.5) -> Path:
    """A run folder as rlkd writes it (summary.json, .hydra/overrides.yaml, config.yaml), without training."""
    import yaml

    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = {"command": command, "seed": 0, "trainer": {"lr": 0.003, "resume": None, "progress": True}, **(config or {})}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if summary is not False:
        (path / "summary.json").write_text(json.dumps({"command": command, "status": "completed", "cr@1": cr1,
                                                       "val_ppl": 9.0, **(summary or {})}))
    return path


def test_report_groups_by_command_and_config_not_only_overrides(tmp_path):
    _fake_run(tmp_path / "sft", "sft", ["seed=0"], summary={"loss_mix": "ce"}, cr1=0.1)
    _fake_run(tmp_path / "d0", "distill", ["seed=0"], cr1=0.5)
    # a resumed replicate, its progress bar off: the same setting, another seed
    _fake_run(tmp_path / "d1", "distill", ["seed=1", "trainer.resume=auto", "trainer.progress=false"],
              config={"seed": 1, "trainer": {"lr": 0.003, "resume": "auto", "progress": False}}, cr1=0.7)
    # the same overrides, but the config was edited between the runs (another lr)
    _fake_run(tmp_path / "d2", "distill", ["seed=2"], config={"seed": 2, "trainer": {"lr": 0.1}}, cr1=0.9)
    groups = report.group_runs(report.discover_runs([tmp_path]))
    assert [g.params for g in groups] == [
        {"command": "distill", "trainer.lr": "0.003"}, {"command": "distill", "trainer.lr": "0.1"},
        {"command": "sft", "trainer.lr": "0.003"}]
    assert [sorted(r.path.name for r in g.runs) for g in groups] == [["d0", "d1"], ["d2"], ["sft"]]
    rows = report.aggregate(groups)
    assert rows[0]["metrics"]["cr@1"][:1] == (pytest.approx(0.6),) and rows[2]["metrics"]["cr@1"][0] == 0.1


def test_report_lists_a_killed_single_run_and_says_what_it_skipped(tmp_path):
    killed = _fake_run(tmp_path / "killed", "distill", ["seed=0"], summary=False)
    (killed / "metrics.jsonl").write_text(json.dumps({"step": 2, "split": "validation", "cr@1": 0.3}) + "\n")
    (killed / "checkpoints" / "step-000002").mkdir(parents=True)
    _fake_run(tmp_path / "done", "distill", ["seed=1"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    gen = tmp_path / "gen"
    (gen / ".hydra").mkdir(parents=True)
    (gen / "config.yaml").write_text("command: generate\n")
    (gen / "generations.jsonl").write_text("{}\n")
    result = write_report([tmp_path], tmp_path / "out")
    runs = {r.path.name: r for r in result["runs"]}
    assert set(runs) == {"killed", "done"}
    assert runs["killed"].status == "incomplete" and "step-000002" in runs["killed"].error
    assert [rec["step"] for rec in runs["killed"].curve] == [2]
    skipped = dict((Path(p).name, why) for p, why in result["skipped"])
    assert set(skipped) == {"notes", "gen"}
    assert "holds todo.txt" in skipped["notes"] and "rlkd generate" in skipped["gen"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Skipped folders" in md and "todo.txt" in md and "incomplete" in md


def test_report_table_cells_are_text_and_odd_summary_fields_are_shown(tmp_path):
    _fake_run(tmp_path / "a", "distill", ["seed=0"],
              summary={"status": "failed", "error": "cannot read [/data/x] [bold]", "loss_mix": ["kl", "rank"]})
    _fake_run(tmp_path / "b", "distill", ["seed=1"], summary={"loss_mix": {"kl": 1}, "command": ["distill"]})
    res = run_cli(["report", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "cannot read [/data/x] [bold]" in " ".join(res.output.split())


def test_curves_show_training_and_validation_with_shared_axes_and_the_legend_off_the_panels(tmp_path):
    from rlkd_cli.plots import curves_figure

    for seed, (loss, cr) in enumerate([("kl", 0.59), ("kl+rank", 0.63)]):
        run = _fake_run(tmp_path / f"r{seed}", "distill", [f"loss={loss}", f"seed={seed}"], cr1=cr)
        recs = [{"step": s, "split": "train", "cr@1": 0.1 * s / 10, "cr@2": 0.3, "or@2": 0.5}
                for s in (10, 20, 30, 40, 50, 60)]
        recs += [{"step": s, "split": "validation", "cr@1": c, "cr@2": c / 2, "or@2": 0.6}
                 for s, c in ((0, 0.05), (60, cr))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    groups = report.group_runs(report.discover_runs([tmp_path]))
    fig = curves_figure(groups)
    cr_ax, cr2_ax, or_ax = fig.axes[0], fig.axes[1], fig.axes[2]
    # per run: the training line (6 points) and the validation points from step 0
    assert sorted(len(line.get_xdata()) for line in cr_ax.get_lines()) == [2, 2, 6, 6]
    assert min(min(line.get_xdata()) for line in cr_ax.get_lines()) == 0
    # one row per metric kind, sharing its y axis; 0.59 vs 0.63 is not blown up to the full height
    assert (cr_ax.get_title(), cr2_ax.get_title(), or_ax.get_title()) == ("CR@1", "CR@2", "OR@2")
    assert cr_ax.get_shared_y_axes().joined(cr_ax, cr2_ax) and cr2_ax.get_ylim() == cr_ax.get_ylim()
    low, high = cr2_ax.get_ylim()
    assert low <= 0.05 and high >= 0.63  # CR@2 alone spans 0.025..0.315: drawn on CR@1's scale
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert all(not legend.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.get_visible())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "training (every log_every steps)" in labels and "validation" in labels


def test_counts_are_whole_numbers_in_the_report(tmp_path):
    _fake_run(tmp_path / "a", "distill", ["seed=0"], summary={"rollout/generated_tokens": 43695.0,
                                                             "rollout/mean_length": 12.3456})
    result = write_report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 43695 |" in md and "43695.0000" not in md and "12.3456" in md
    assert result["rows"][0]["metrics"]["rollout/generated_tokens"][0] == 43695.0
