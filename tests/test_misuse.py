"""Misuse that used to end silently wrong, or destroy a finished run's data (issue 12; docs/errors.md, 2nd table).

The cases that end in one ``error:`` line are in tests/test_errors.py's catalogue; these are the
ones where the right behaviour is something else than an error: data left out with a count, a
resume refused or allowed, a report row, a file mode, a signal.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, REPO, compose, run_cli, tokenizer_of, train
from rlkd_cli.data import dataset as D
from rlkd_cli.errors import RlkdError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _rlkd(*args: str, cwd: Path = REPO, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "rlkd_cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


# ----------------------------------------------------------------------------------------------
# 1. the tiny teacher is keyed on the tokenizer in use
# ----------------------------------------------------------------------------------------------

def test_tiny_teacher_is_keyed_on_the_tokenizer_actually_used(tmp_path):
    from rlkd_cli.data.tokenizer import embedded_tokenizer
    from rlkd_cli.teachers import tiny

    cfg = compose("distill", QUICK)
    default, other = tokenizer_of(cfg), embedded_tokenizer(tmp_path / "tok", 600)
    assert tiny.cached_path(cfg, default) != tiny.cached_path(cfg, other)
    assert tiny.cached_path(cfg, default) == tiny.cached_path(compose("distill", QUICK + ["metrics.ks=[1,2]"]),
                                                               default)  # what does not change its weights


# ----------------------------------------------------------------------------------------------
# 4. resume on changed data; 9. a stale summary; 14. a pointer out of the run
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_on_changed_data_is_refused_unless_forced(tmp_path, rlkd_cache):
    rows = [{"prompt": f"Question: {i} plus {i}?", "response": f"{2 * i}"} for i in range(80)]
    data = _jsonl(tmp_path / "data.jsonl", rows)
    from rlkd_cli.data.tokenizer import embedded_tokenizer, embedded_tokenizer_dir

    embedded_tokenizer(rlkd_cache)  # one tokenizer for both runs (a tokenizer trained on the data would change too)
    over = QUICK + ["dataset=jsonl", f"dataset.path={data}", "dataset.validation_size=8", "trainer.max_steps=4",
                    "trainer.eval_every=0", f"tokenizer.name_or_path={embedded_tokenizer_dir(rlkd_cache)}"]
    run = tmp_path / "run"
    assert train("distill", over + ["trainer.stop_after=2"], run)["status"] == "stopped"
    rows[5]["response"] = "a different answer"
    _jsonl(data, rows)  # the same path, other contents: the config is unchanged
    with pytest.raises(RlkdError, match="it was trained on other data"):
        train("distill", over + ["trainer.resume=auto"], run)
    assert train("distill", over + ["trainer.resume=auto", "trainer.force_resume=true"], run)["status"] == "completed"


def test_claiming_a_run_dir_to_continue_it_removes_its_stale_summary(tmp_path):
    from rlkd_cli.engine import rundir

    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "summary.json").write_text('{"status": "completed"}')
    with pytest.raises(RlkdError, match="already holds a run"):
        rundir.claim(tmp_path, command="distill", resume=False)
    assert (tmp_path / "summary.json").exists()  # a refused run changes nothing
    rundir.claim(tmp_path, command="distill", resume=True)
    try:
        assert (tmp_path / "summary.json").exists()  # claimed, not yet accepted: its checks may still refuse it
        rundir.accept(tmp_path)
        assert not (tmp_path / "summary.json").exists()
    finally:
        rundir.release(tmp_path)


def test_latest_naming_a_folder_outside_the_run_is_ignored(tmp_path):
    from rlkd_cli.engine import checkpoint

    def fake(path: Path) -> Path:
        for name in (*checkpoint.CHECKPOINT_FILES, *checkpoint.UNSHARDED_STATE_FILES, "model.safetensors"):
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text('{"step": 2}' if name == "trainer_state.json" else "x")
        return path

    mine = fake(tmp_path / "run" / "checkpoints" / "step-000002")
    other = fake(tmp_path / "other" / "checkpoints" / "step-000009")
    latest = tmp_path / "run" / "checkpoints" / "latest"
    for pointer in (str(other), "../../other/checkpoints/step-000009", "step-000002/../../../other"):
        latest.write_text(pointer + "\n")
        assert checkpoint.find_resume(tmp_path / "run", "auto") == mine, pointer


# ----------------------------------------------------------------------------------------------
# 6. missing, null and empty responses
# ----------------------------------------------------------------------------------------------

def test_rows_without_a_response_are_left_out_with_a_count(tmp_path, caplog):
    rows = [{"prompt": "a", "response": "one"}, {"prompt": "b"}, {"prompt": "c", "response": None},
            {"prompt": "d", "response": "  "}, {"prompt": "e", "response": "5"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = {**D.DEFAULTS, "name": "jsonl", "path": str(path), "validation_size": 0}
    with caplog.at_level(logging.WARNING, logger="rlkd.data"):
        examples = D.load_examples(cfg, "test")
    assert [e["id"] for e in examples] == ["0", "4"] and examples[1]["reference"] == "5"  # ids stay the rows'
    assert "left out 3 of 5 rows without a response (1 missing, 1 null, 1 empty)" in caplog.text


# ----------------------------------------------------------------------------------------------
# 8. a cache folder whose cache.json is gone
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cache_folder_without_cache_json_rebuilds_another_teachers_shards(tmp_path):
    from safetensors import safe_open

    from rlkd_cli.teachers import cache as teacher_cache

    common = QUICK + ["cache.top_k=8", "cache.shard_examples=256", "trainer.eval_examples=16", "loss=kl",
                      "metrics.ks=[1,2]", f"cache.out={tmp_path / 'cache'}"]
    first = train("cache-teacher", common, tmp_path / "a")
    (tmp_path / "cache" / "cache.json").unlink()
    # another tiny teacher (5 training steps instead of 30): none of the first teacher's shards may be reused
    again = train("cache-teacher", common + ["teacher.train_if_missing.max_steps=5"], tmp_path / "b")
    assert again["shards_reused"] == 0 and again["shards_written"] == first["shards_written"] == 4
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    for split, info in meta["splits"].items():
        ident = teacher_cache.shard_identity({k: meta[k] for k in ("format", "top_k", "dtype", "temperatures",
                                                                   "shard_examples", "teacher_signature", "tokenizer",
                                                                   "vocab_size")}, split, info["fingerprint"])
        for shard in (tmp_path / "cache" / split).glob("shard-*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                assert f.metadata()["identity"] == ident
    # and without cache.json, a rerun of the same settings reuses every shard
    (tmp_path / "cache" / "cache.json").unlink()
    third = train("cache-teacher", common + ["teacher.train_if_missing.max_steps=5"], tmp_path / "c")
    assert third["shards_reused"] == 4 and third["shards_written"] == 0


# ----------------------------------------------------------------------------------------------
# 10. two runs in one run dir at once
# ----------------------------------------------------------------------------------------------

def test_a_second_run_in_a_busy_run_dir_names_the_process_holding_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from rlkd_cli.engine import rundir\n"
        f"rundir.claim({str(tmp_path / 'run')!r}, command='distill', resume=False)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run_cli(["distill", *QUICK, f"hydra.run.dir={tmp_path / 'run'}", "trainer.resume=auto"])
        assert res.exit_code == 2
        line = [l for l in res.output.splitlines() if l.startswith("error:")][0]
        assert f"is in use by process {holder.pid}" in line and "rlkd distill" in line
        assert not (tmp_path / "run" / ".hydra").exists()  # refused before Hydra wrote anything
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------
# 11. every job of a sweep is a row; 16. damaged files; 22. labels show the value
# ----------------------------------------------------------------------------------------------

def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    shutil.copytree(Path(__file__).parent / "fixtures" / "runs" / "sweep", sweep)
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n  overrides:\n    task:\n"
                                         "    - loss=kl,kl+rank,rank\n    - seed=1,2,3\ncommand: distill\n")
    return sweep


def test_report_counts_every_job_of_a_sweep(tmp_path):
    from rlkd_cli.report import discover_runs

    sweep = _sweep(tmp_path)
    (sweep / "3" / "summary.json").unlink()  # killed: metrics and .hydra/, no summary
    shutil.rmtree(sweep / "5")               # this one and the jobs after it never started
    runs = discover_runs([sweep])
    status = {r.path.name: r.status for r in runs}
    assert len(runs) == 9  # 3 losses x 3 seeds
    assert status["3"] == "incomplete" and status["5"] == "not started" and status["8"] == "not started"
    assert status["4"] == "failed" and status["0"] == "completed"
    res = run_cli(["report", str(sweep), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "9 run(s)" in res.output
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Runs: 9 (3 completed, 6 not completed)" in md and "not started" in md and "incomplete" in md


def test_report_survives_damaged_files(tmp_path, caplog):
    from rlkd_cli.report import discover_runs

    sweep = _sweep(tmp_path)
    (sweep / "1" / "summary.json").write_text("[]")
    (sweep / "2" / "summary.json").write_text("null")
    metrics = sweep / "0" / "metrics.jsonl"
    lines = metrics.read_bytes().split(b"\n")
    metrics.write_bytes(b"\n".join([lines[0], b'{"step": "two", "split": "validation"}', b"\xff\xfe bad",
                                    *lines[1:]]))
    report_log = logging.getLogger("rlkd.report")
    report_log.propagate = True  # (the report command sends them to stderr instead)
    with caplog.at_level(logging.WARNING, logger="rlkd.report"):
        runs = {r.path.name: r for r in discover_runs([sweep])}
    assert runs["1"].status == "incomplete" and "holds list, not a JSON object" in runs["1"].error
    assert runs["2"].status == "incomplete" and "holds null" in runs["2"].error
    assert [rec["step"] for rec in runs["0"].curve] == [2, 4] and "skipped 2 unreadable line(s)" in caplog.text
    res = run_cli(["report", str(sweep), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert "warning: " in res.output and "skipped 2 unreadable line(s)" in res.output


def test_report_to_an_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = run_cli(["report", str(_sweep(tmp_path)), "--out", str(blocker / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().startswith("error: cannot write to the report folder (--out)")


def test_report_labels_a_preset_value_by_its_value_and_prints_the_perplexity(tmp_path):
    from rlkd_cli.commands.report import write_report

    sweep = tmp_path / "sweep"
    for i, k in enumerate((None, "15")):
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("- loss=kl+rank\n" + (f"- loss.terms.rank.k={k}\n" if k else ""))
        (job / "config.yaml").write_text(f"loss:\n  terms:\n    rank:\n      k: {k or 5}\n")
        (job / "summary.json").write_text(json.dumps({"status": "completed", "cr@1": 0.5, "val_loss": 1.0 + i,
                                                      "val_ppl": 3.0 + i}))
    result = write_report([sweep], tmp_path / "out")
    assert [g.label for g in result["groups"]] == ["loss.terms.rank.k=5", "loss.terms.rank.k=15"]
    from io import StringIO

    from rich.console import Console

    from rlkd_cli.commands.report import print_table

    buf = StringIO()
    print_table(result["rows"], list(result["groups"][0].params), Console(file=buf, width=200))
    assert "val_ppl" in buf.getvalue() and "val_loss" not in buf.getvalue()


# ----------------------------------------------------------------------------------------------
# 12. SIGTERM during a sweep
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_a_sweep_stops_it_and_marks_the_job_stopped(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _rlkd("distill", "-m", *QUICK, "loss=kl,kl+rank", "trainer.max_steps=400", "trainer.save_every=5",
                 "trainer.eval_every=0", f"hydra.sweep.dir={sweep}")
    deadline = time.monotonic() + 120
    while not (sweep / "0" / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["resumable"] and summary["reason"] == "SIGTERM"
    assert not (sweep / "1" / "summary.json").exists()  # the sweep stopped: job 1 never ran
    from rlkd_cli.report import discover_runs

    assert [r.status for r in discover_runs([sweep])] == ["stopped", "not started"]


# ----------------------------------------------------------------------------------------------
# 13. nothing is written before everything is checked
# ----------------------------------------------------------------------------------------------

def test_cache_settings_are_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "cache"
    res = run_cli(["cache-teacher", *QUICK, "cache.temperatures=[inf]", f"cache.out={out}",
                   f"hydra.run.dir={tmp_path / 'r1'}"])
    assert res.exit_code == 2 and not (out / "cache.json").exists()
    res = run_cli(["cache-teacher", *QUICK, "cache.temperatures=[2.0]", "cache.top_k=8", "cache.shard_examples=512",
                   "trainer.eval_examples=8", "loss=kl", "metrics.ks=[1,2]", f"cache.out={out}",
                   f"hydra.run.dir={tmp_path / 'r2'}"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "cache.json").read_text())["status"] == "complete"


# ----------------------------------------------------------------------------------------------
# 15. a real full disk
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 640 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # lazy: a log handler may still hold a file


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_disk):
    res = run_cli(["distill", *QUICK, "trainer.save_every=2", "trainer.keep_last=1", f"hydra.run.dir={tiny_disk}/run"])
    assert res.exit_code == 2, res.output
    line = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "the disk is full" in line[0] and "Traceback" not in res.output
    ckpts = tiny_disk / "run" / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]  # no half checkpoint left


# ----------------------------------------------------------------------------------------------
# 18. JSON Lines per the format
# ----------------------------------------------------------------------------------------------

def test_json_lines_split_at_newlines_only_and_accept_a_bom(tmp_path):
    rows = [{"prompt": "Line\u2028separator and\u0085next\x0cline", "response": "kept whole"},
            {"prompt": "b", "response": "two"}]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    cfg = {**D.DEFAULTS, "name": "jsonl", "path": str(path), "validation_size": 0}
    examples = D.load_examples(cfg, "test")
    assert [e["prompt"] for e in examples] == [rows[0]["prompt"], "b"]
    from rlkd_cli.scoring import read_predictions

    preds = tmp_path / "p.jsonl"
    preds.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": 0, "prediction": "a\u2028b"}, ensure_ascii=False).encode()
                      + b"\n")
    assert read_predictions(preds, default_label="p") == {"p": {"0": "a\u2028b"}}


# ----------------------------------------------------------------------------------------------
# 21. files follow the umask
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_outputs_follow_the_umask(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    old = os.umask(0o002)
    try:  # a fresh cache too: the tokenizer, the tiny teacher and the tokenized data are written under this umask
        res = run_cli(["distill", *QUICK, f"hydra.run.dir={run}", f"cache_dir={cache}", "trainer.max_steps=2",
                       "trainer.eval_every=0"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    checked = 0
    for root in (run, cache):
        for path in root.rglob("*"):
            if path.name.endswith((".lock", "-owner.json")) or path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            expected = 0o775 if path.is_dir() else 0o664
            assert mode & expected == expected and not mode & 0o002, (str(path), oct(mode))
            checked += 1
    assert checked > 20
    assert stat.S_IMODE((run / "checkpoints" / "step-000002" / "model.safetensors").stat().st_mode) == 0o664


# ----------------------------------------------------------------------------------------------
# 22. numbers named for what they count
# ----------------------------------------------------------------------------------------------

def test_text_limits_count_blocks_not_documents(tmp_path):
    docs = [{"text": f"Document {i} " + "word " * 30} for i in range(20)]
    path = _jsonl(tmp_path / "t.jsonl", docs)
    tok = tokenizer_of(compose("distill", []))
    cfg = {**D.DEFAULTS, "name": "text", "kind": "text", "path": str(path), "validation_size": 5, "max_length": 16,
           "response_template": "{text}", "prompt_template": None, "fields": {"text": "text"}}
    whole = D.build_split(cfg, tok, "validation")
    three = D.build_split(cfg, tok, "validation", limit=3)
    assert whole.stats["num_documents"] == 5 and len(whole.dataset) > 5
    assert len(three.dataset) == 3 and three.dataset["input_ids"] == whole.dataset["input_ids"][:3]
    assert three.fingerprint != whole.fingerprint
