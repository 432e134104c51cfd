"""Run dirs, resume and checkpoints (issues 18 and 23): a refused command changes nothing, checkpoints ordered by
step, a damaged trainer state is one line, the keys a resume may change depend on the mode, the schedule's length."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, REPO, TEACHER_ONLY, compose, run_cli, train
from rlkd_cli.engine import checkpoint
from rlkd_cli.errors import RlkdError


def record(run: Path) -> dict[str, str]:
    """What must not change when a command is refused: summary, checkpoints, .hydra/ (file -> digest)."""
    files = [run / "summary.json", *sorted((run / ".hydra").glob("*")), *sorted((run / "checkpoints").rglob("*"))]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


# ----------------------------------------------------------------------------------------------
# a refused resume keeps the run's record
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_record_as_it_was(tmp_path):
    run = tmp_path / "run"
    assert run_cli(["distill", *QUICK, f"hydra.run.dir={run}"]).exit_code == 0
    before = record(run)
    assert "summary.json" in before and ".hydra/overrides.yaml" in before
    res = run_cli(["distill", *QUICK, f"hydra.run.dir={run}", "trainer.resume=auto", "trainer.lr=0.1"])
    assert res.exit_code == 2
    assert "the config differs in trainer.lr" in error_line(res.output)
    assert record(run) == before  # summary, checkpoints and Hydra's record untouched
    log = (run / "distill.log").read_text()
    assert "error: cannot resume from" in log and "the config differs in trainer.lr" in log  # the error, on disk
    from rlkd_cli.report import discover_runs

    assert [r.status for r in discover_runs([run])] == ["completed"]
    # resuming a completed run at its last step changes nothing either
    res = run_cli(["distill", *QUICK, f"hydra.run.dir={run}", "trainer.resume=auto"])
    assert res.exit_code == 0, res.output
    assert record(run) == before


@pytest.mark.slow
def test_a_resume_sweep_keeps_finished_jobs_and_refuses_another_sweeps_dir(tmp_path):
    sweep = tmp_path / "sweep"
    base = ["distill", "-m", *QUICK, "trainer.max_steps=2", "trainer.eval_every=0", f"hydra.sweep.dir={sweep}"]
    assert run_cli([*base, "seed=0,1"]).exit_code == 0
    before = {job: record(sweep / job) for job in ("0", "1")}
    multirun = (sweep / "multirun.yaml").read_bytes()
    res = run_cli([*base, "seed=2,3", "trainer.resume=auto"])  # another sweep: job 0 would be seed 2
    assert res.exit_code == 2
    assert "seed=0,1), not this one (experiment=smoke seed=2,3)" in error_line(res.output)
    assert (sweep / "multirun.yaml").read_bytes() == multirun
    res = run_cli([*base, "seed=0,1", "trainer.resume=auto", "trainer.max_steps=4"])  # the same sweep, each job refused
    assert res.exit_code == 1 and "2 sweep job(s) failed" in res.output
    assert {job: record(sweep / job) for job in ("0", "1")} == before  # still "completed", .hydra/ as it was
    for job in ("0", "1"):
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"


# ----------------------------------------------------------------------------------------------
# checkpoints ordered by step; a damaged trainer_state.json
# ----------------------------------------------------------------------------------------------

def fake_checkpoint(path: Path, step) -> Path:
    for name in (*checkpoint.CHECKPOINT_FILES, *checkpoint.UNSHARDED_STATE_FILES, "model.safetensors"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps({"step": step}) if name == "trainer_state.json" else "x")
    return path


def test_checkpoints_are_ordered_by_their_step_not_their_name(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (999998, 999999, 1000000):
        fake_checkpoint(root / f"step-{step:06d}", step)
    assert checkpoint.find_resume(tmp_path / "run", "auto").name == "step-1000000"  # no latest: the newest step
    checkpoint._prune(root, "step-1000000", keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-1000000", "step-999999"]


def test_a_trainer_state_whose_step_is_not_a_number_is_one_line(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoints" / "step-000004", "four")
    with pytest.raises(RlkdError, match=r"trainer_state.json cannot be read \(step is 'four', not a number\)"):
        checkpoint.read_state(ckpt)
    assert checkpoint.missing_files(ckpt) == ["a readable trainer_state.json"]
    with pytest.raises(RlkdError, match="holds no complete checkpoint"):  # resume=auto finds nothing usable
        checkpoint.find_resume(tmp_path / "run", "auto")
    (ckpt / "trainer_state.json").write_text("[4]")
    with pytest.raises(RlkdError, match="holds a JSON list, not an object"):
        checkpoint.read_state(ckpt)


def test_validation_keys_are_fixed_on_resume_under_adaptive_rollout():
    plain = compose("distill", QUICK)
    assert checkpoint.config_differences(plain, compose("distill", QUICK + ["trainer.eval_every=3"])) == []
    adaptive = compose("distill", QUICK + ["rollout=adaptive"])
    changed = compose("distill", QUICK + ["rollout=adaptive", "trainer.eval_every=3", "trainer.eval_examples=8"])
    assert checkpoint.config_differences(adaptive, changed) == ["trainer.eval_every", "trainer.eval_examples"]


# ----------------------------------------------------------------------------------------------
# a resume with another trainer.max_steps: refused, or the schedule continued or restarted
# ----------------------------------------------------------------------------------------------

def _lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


@pytest.mark.slow
def test_a_changed_max_steps_is_refused_or_continues_or_restarts_the_schedule(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    import torch

    def cosine(steps: int, at: int) -> float:  # the lr transformers' cosine schedule gives after `at` steps
        sched = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=3e-3), 2, steps)
        return 3e-3 * sched.lr_lambdas[0](at)

    over = QUICK + ["trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0"]
    runs = {name: tmp_path / name for name in ("continue", "restart")}
    for run in runs.values():
        train("distill", over, run)  # 8 steps: the cosine reaches 0 at step 8
    with pytest.raises(RlkdError, match=r"trainer.max_steps changed from 8 to 12, which changes the learning-rate "
                                        r"schedule .*on_max_steps_change=continue .*on_max_steps_change=restart"):
        train("distill", over + ["trainer.resume=auto", "trainer.max_steps=12"], runs["continue"])
    for name, run in runs.items():
        done = train("distill", over + ["trainer.resume=auto", "trainer.max_steps=12",
                                        f"trainer.on_max_steps_change={name}"], run)
        assert done["status"] == "completed" and done["step"] == 12
    assert all(_lrs(runs["continue"])[k] == 0.0 for k in range(8, 13))  # the 8-step schedule, ended
    lrs = _lrs(runs["restart"])
    for k in range(9, 13):  # a new 4-step schedule (2 warmup steps) from step 8
        assert math.isclose(lrs[k], cosine(4, k - 8), rel_tol=1e-6, abs_tol=1e-12), (k, lrs[k])
    assert lrs[10] == pytest.approx(3e-3)  # warmed up again
    # the schedule in force is kept in the checkpoint: a later resume follows it, not a 12-step one
    state = checkpoint.read_state(Path(done["checkpoint"]))
    assert (state.schedule_start, state.schedule_steps) == (8, 4)


# ----------------------------------------------------------------------------------------------
# say where things are; a failed run's error in its log
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_prints_its_dir_checkpoint_and_next_commands_and_latest_points_at_it(tmp_path):
    run = tmp_path / "outputs" / "distill" / "first"
    res = run_cli(["distill", *QUICK, f"hydra.run.dir={run}"])
    assert res.exit_code == 0, res.output
    assert f"rlkd distill: run dir {run}" in res.output  # at the start
    summary = json.loads((run / "summary.json").read_text())
    printed = {line.split()[0]: line.split()[-1] for line in res.output.splitlines()
               if line.startswith("  ") and len(line.split()) == 2}
    assert Path(printed["summary.json"]) == run / "summary.json" and Path(printed["distill.log"]).is_file()
    assert printed["checkpoint"] == summary["checkpoint"] and Path(printed["checkpoint"]).is_dir()
    assert f"next: rlkd measure-alignment checkpoints=[{summary['checkpoint']}]" in res.output
    assert f"next: rlkd report {run}" in res.output
    latest = run.parent / "latest"
    assert latest.is_symlink() and latest.resolve() == run.resolve()


def test_a_failed_run_writes_its_error_line_into_its_log(tmp_path):
    run = tmp_path / "run"
    res = run_cli(["distill", *QUICK, "teacher.name_or_path=/nonexistent/teacher", f"hydra.run.dir={run}"])
    assert res.exit_code == 2
    line = error_line(res.output)
    assert "/nonexistent/teacher" in line
    assert line in (run / "distill.log").read_text()  # the same line, on disk


# ----------------------------------------------------------------------------------------------
# Ctrl-C: like SIGTERM (a checkpoint, how to resume); a second one aborts at once
# ----------------------------------------------------------------------------------------------

def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "rlkd_cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().count("\n") >= n):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_checkpoints_like_sigterm_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    over = [*QUICK, "trainer.max_steps=400", "trainer.save_every=0", "trainer.eval_every=0", "trainer.log_every=1"]
    proc = _start("distill", *over, f"hydra.run.dir={run}")
    _wait_for_lines(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "SIGINT: checkpoint" in out
    assert f"resume with trainer.resume=auto hydra.run.dir={run}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["reason"] == "SIGINT" and summary["resumable"]
    ckpt = Path(summary["checkpoint"])
    assert not checkpoint.missing_files(ckpt) and checkpoint.read_state(ckpt).step == summary["step"] >= 2
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    # and it resumes from there
    more = train("distill", over + ["trainer.resume=auto", "trainer.stop_after=2"], run)
    assert more["status"] == "stopped" and more["step"] == summary["step"] + 2


def test_a_second_ctrl_c_aborts_at_once():
    from rlkd_cli.engine.loop import _stop_signals

    before = signal.getsignal(signal.SIGINT)
    with _stop_signals("test") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.is_set() and stop.reason == "SIGINT"  # the first: stop after this step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.slow
def test_ctrl_c_stops_generate_with_how_to_continue(tmp_path):
    run = tmp_path / "gen"
    args = ["generate", *TEACHER_ONLY, "split=train", "limit=48", "dataset.limit=48", "generation.batch_size=2", f"hydra.run.dir={run}"]
    proc = _start(*args)
    _wait_for_lines(run / "generations.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and f"continue with: rlkd generate resume=true hydra.run.dir={run}" in out
    written = (run / "generations.jsonl").read_text().count("\n")
    assert 1 <= written < 48
    res = run_cli([*args, "resume=true"])
    assert res.exit_code == 0, res.output
    ids = [json.loads(line)["id"] for line in (run / "generations.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 48


# ----------------------------------------------------------------------------------------------
# the run-dir contract, as a property: random run / kill / resume / sweep / report over one folder
# ----------------------------------------------------------------------------------------------

STEPS = [*QUICK, "trainer.max_steps=2", "trainer.save_every=1", "trainer.eval_every=0", "trainer.log_every=1"]
#: resume overrides -> whether a resume with them must be refused when the run has a checkpoint
CHANGES = {(): False, ("trainer.lr=0.1",): True, ("seed=7",): True, ("trainer.max_steps=3",): True,
           ("trainer.max_steps=3", "trainer.on_max_steps_change=restart"): False, ("trainer.log_every=2",): False}



def _records(root: Path) -> dict[str, dict[str, str]]:
    """The record of every run dir under ``root`` (a folder with a .hydra/ or a summary)."""
    dirs = {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob("summary.json")}
    return {str(d.relative_to(root)): record(d) for d in dirs if "checkpoints" not in d.parts}


def _finished(root: Path) -> set[str]:
    out = set()
    for name in _records(root):
        try:
            if json.loads((root / name / "summary.json").read_text()).get("status") == "completed":
                out.add(name)
        except (OSError, ValueError):
            pass
    return out


def _kill_after_first_checkpoint(run: Path) -> None:
    proc = _start("distill", *STEPS, "trainer.max_steps=400", "trainer.save_every=2", f"hydra.run.dir={run}")
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)


def _act(root: Path, action: tuple, out: Path) -> tuple[int, set[str]]:
    """Run one action; its exit code and the run dirs it may change when it succeeds."""
    kind, target, change = action
    run, sweep = root / "runs" / target, root / "sweep"
    if kind == "kill":
        if run.exists():  # a run dir that holds a run is refused before anything: as "run"
            kind = "run"
        else:
            _kill_after_first_checkpoint(run)
            return -9, {f"runs/{target}"}
    if kind == "run":
        return run_cli(["distill", *STEPS, f"hydra.run.dir={run}"]).exit_code, {f"runs/{target}"}
    if kind == "resume":
        res = run_cli(["distill", *STEPS, *change, "trainer.resume=auto", f"hydra.run.dir={run}"])
        return res.exit_code, {f"runs/{target}"}
    if kind == "sweep":
        res = run_cli(["distill", "-m", *STEPS, "seed=0,1", *change, f"hydra.sweep.dir={sweep}"])
        return res.exit_code, {"sweep/0", "sweep/1"}
    res = run_cli(["report", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return 0, set()


#: The actions a sequence is drawn from: (kind, target run dir, overrides); each drawn sequence is a prefix of a
#: permutation (the first, unshuffled one kills a run, refuses two resumes and sweeps).
POOL = [("kill", "b", ()), ("resume", "b", ("trainer.lr=0.1",)), ("sweep", "", ()), ("resume", "a", ("seed=7",)),
        ("report", "", ()), ("sweep", "", ("trainer.resume=auto", "trainer.max_steps=3")),
        ("resume", "b", ()), ("run", "a", ()), ("resume", "a", ("trainer.max_steps=3",)),
        ("resume", "b", ("trainer.max_steps=3", "trainer.on_max_steps_change=restart")),
        ("sweep", "", ("trainer.resume=auto",)), ("resume", "a", ("trainer.log_every=2",))]


@pytest.mark.slow
def test_no_command_changes_a_finished_runs_record_unless_it_succeeds_on_it(tmp_path_factory):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hst

    @settings(max_examples=2, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hst.permutations(POOL).map(lambda p: p[:4]))
    def check(actions):
        root, out = tmp_path_factory.mktemp("folder"), tmp_path_factory.mktemp("report")
        for action in [("run", "a", ()), *actions]:  # a finished run to protect from the start
            before, finished = _records(root), _finished(root)
            had_checkpoint = (root / "runs" / action[1] / "checkpoints" / "latest").exists()
            code, targets = _act(root, action, out)
            after = _records(root)
            if action[0] == "resume" and had_checkpoint and CHANGES[action[2]]:
                assert code == 2, action  # a changed config or schedule is refused
            may_change = targets if code in (0, -9) else set()
            for name in finished | (set(before) if code not in (0, -9) else set()):
                if name not in may_change:
                    assert after.get(name) == before[name], (action, code, name)

    check()


@pytest.mark.slow
def test_ctrl_c_stops_cache_teacher_with_how_to_continue(tmp_path):
    run = tmp_path / "cache-run"
    args = ["cache-teacher", *TEACHER_ONLY, "cache.top_k=8", "cache.shard_examples=20", "cache.batch_size=1",
            f"hydra.run.dir={run}"]
    proc = _start(*args)
    deadline = time.monotonic() + 120
    while not (run / "teacher_cache" / "train" / "shard-000001.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "SIGINT: rlkd cache-teacher stopped; continue with: rlkd cache-teacher" in out
    res = run_cli(args)  # the same command finishes it, keeping the shards written
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["shards_reused"] >= 2
