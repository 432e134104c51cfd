"""The `rlkd` command: subcommands, Hydra pass-through, measure-alignment, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK, REPO, TEACHER_ONLY, compose, run_cli, teacher_path


def _rlkd(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rlkd_cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def test_top_level_help_lists_commands_and_groups():
    res = run_cli(["--help"])
    assert res.exit_code == 0
    for word in ("sft", "distill", "measure-alignment", "loss:", "kl+rank", "trainer:", "debug", "dataset:"):
        assert word in res.output, word


def test_command_help_is_hydras_with_groups():
    res = _rlkd("distill", "--help")
    assert res.returncode == 0, res.stderr
    assert "Config groups" in res.stdout and "loss: " in res.stdout and "kl+rank" in res.stdout
    assert "trainer: debug, default" in res.stdout


def test_help_lists_only_the_groups_a_command_takes_and_whole_descriptions():
    groups = lambda text: {line.split(":")[0].strip() for line in  # noqa: E731
                           text.split("== Config groups")[1].split("== Config (")[0].splitlines()[1:]}
    assert groups(_rlkd("distill", "--help").stdout) == {
        "teacher", "student", "dataset", "loss", "trainer", "logger", "rollout", "experiment"}  # no model=
    assert groups(_rlkd("evaluate", "--help").stdout) == {"teacher", "dataset", "trainer", "experiment"}
    assert "model" in groups(_rlkd("sft", "--help").stdout)
    res = run_cli(["--help"])
    text = " ".join(res.output.split())
    for whole in ("or the SFT baseline with model=student).", "(for distill teacher.cache=PATH).",
                  "per swept setting, curves, by-modes split."):  # not cut at Click's 45 characters
        assert whole in text, whole


def test_help_gives_each_key_its_description():
    """--help prints the composed config with each key's one-line description (the comments of conf/)."""
    text = _rlkd("distill", "--help").stdout
    assert "  max_steps: 300  # optimizer steps" in text
    assert "  resume: null  # null: fresh run; auto: continue from this run dir's latest checkpoint" in text
    assert "cache_dir: ${oc.env:RLKD_CACHE_DIR," in text  # a literal $ survives the help template
    text = _rlkd("distill", "dataset=text", "--help").stdout  # the chosen preset's own comments
    assert "  max_length: 512  # block length" in text
    assert "split: test  # dataset split to evaluate on" in _rlkd("evaluate", "--help").stdout


@pytest.mark.parametrize("command", ["evaluate", "measure-alignment"])
@pytest.mark.parametrize("experiment", ["smoke", "paper_sft", "paper_pretrain"])
def test_evaluation_commands_compose_every_experiment_preset(command, experiment):
    """The presets the configs' comments offer compose for evaluate and measure-alignment too, with the
    teacher and data the training commands get from them."""
    cfg, train_cfg = compose(command, [f"experiment={experiment}"]), compose("distill", [f"experiment={experiment}"])
    assert cfg.teacher == train_cfg.teacher and cfg.dataset == train_cfg.dataset


@pytest.mark.slow
def test_evaluate_runs_with_the_smoke_preset(tmp_path):
    res = run_cli(["evaluate", *QUICK, "include_teacher=true", "eval.limit=4", "eval.max_new_tokens=8",
                   f"hydra.run.dir={tmp_path}/ev"])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "ev" / "results.json").read_text())["models"][0]
    assert row["role"] == "teacher" and row["examples"] == 4


def test_cfg_job_prints_the_composed_config():
    res = _rlkd("distill", "loss=kl", "trainer.max_steps=7", "--cfg", "job")
    assert res.returncode == 0, res.stderr
    assert "max_steps: 7" in res.stdout and "kl:" in res.stdout and "rank:" not in res.stdout


def test_distill_then_measure_alignment(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(["distill", *QUICK, "loss=kl+rank", f"hydra.run.dir={run_dir}"])
    assert res.exit_code == 0, res.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / ".hydra" / "config.yaml").exists()
    ckpt = summary["checkpoint"]

    # the cached teacher measured against itself: perfect alignment; the checkpoint: a row of numbers
    teacher = teacher_path(compose("distill", QUICK))
    out = tmp_path / "align"
    res = run_cli(["measure-alignment", *TEACHER_ONLY, f"checkpoints=[{ckpt},{teacher}]",
                   "metrics.ks=[1,2,5]", "limit=16", f"hydra.run.dir={out}"])
    assert res.exit_code == 0, res.output
    assert f"rlkd measure-alignment: run dir {out}" in res.output and str(out / "alignment.json") in res.output
    result = json.loads((out / "alignment.json").read_text())
    rows = {r["checkpoint"]: r for r in result["checkpoints"]}
    self_row = rows[str(teacher)]
    assert self_row["cr@5"] == 1.0 and self_row["or@5"] == 1.0 and self_row["top1"] == 1.0
    assert abs(self_row["ppl"] - result["teacher_ppl"]) < 1e-6
    row = rows[ckpt]
    assert 0.0 <= row["cr@2"] <= row["cr@1"] <= 1.0 and 0.0 <= row["or@5"] <= 1.0
    # validation CR/OR in summary.json agree with measure-alignment on the same split and positions
    assert abs(row["cr@2"] - summary["cr@2"]) < 1e-6 and abs(row["or@5"] - summary["or@5"]) < 1e-6


def test_multirun_sweeps_loss_mixes(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli(["distill", "-m", *QUICK, "loss=kl,kl+rank", "trainer.max_steps=2", "trainer.eval_every=0",
                   f"hydra.sweep.dir={sweep}"])
    assert res.exit_code == 0, res.output
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert summaries[0]["loss_mix"] != summaries[1]["loss_mix"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["loss=foo"], "unknown loss 'foo'; available:"),
        (["teacher.name_or_path=/nonexistent/teacher"], "/nonexistent/teacher"),
        (["loss.terms.rank.k=0"], "k"),
        (["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
        (["trainer.device=cuda"], "no CUDA device"),
        (["trainer.lr=abc"], "trainer.lr must be a finite number"),
        (["hydra.run.dir=/proc/rlkd-cannot-write"], "/proc/rlkd-cannot-write"),
        (["trainer.maxsteps=3"], "trainer.maxsteps"),
        (["+trainer.max_step=3"], "unknown key trainer.max_step; did you mean trainer.max_steps?"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, expected, tmp_path):
    extra = [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={tmp_path}/run"]
    res = run_cli(["distill", *QUICK, *args, *extra])
    assert res.exit_code != 0
    text = res.output.strip()
    assert "Traceback" not in text
    error_lines = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1, text
    assert expected in error_lines[0], text


def test_empty_dataset_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    quick = [o for o in QUICK if not o.startswith("dataset.")]
    res = run_cli(["distill", *quick, "dataset=jsonl", f"dataset.path={empty}", f"hydra.run.dir={tmp_path}/run"])
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert "empty" in res.output.lower() or "no examples" in res.output.lower(), res.output


def test_console_script_error_exit_code():
    res = _rlkd("distill", "loss=nope")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: unknown loss 'nope'")
    assert "Traceback" not in res.stderr
