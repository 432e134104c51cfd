"""Reliability and safety: exact resume after SIGKILL, SIGTERM pre-emption, atomic checkpoints, safe loading.

The subprocess tests run the real ``python -m rlkd_cli distill`` and interrupt it from outside;
the "killed during a save" tests stop a save in-process at a chosen point (deterministic, no race)
and leave on disk exactly what a killed process would leave.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, REPO, compose, tokenizer_of, train
from rlkd_cli import models
from rlkd_cli.engine import checkpoint
from rlkd_cli.errors import RlkdError
from rlkd_cli.runtime import Runtime
from rlkd_cli.teachers import tiny

# 12 steps, a checkpoint every 2 steps, no validation until the end: the run has many save points.
RUN = QUICK + ["loss=kl+rank", "trainer.max_steps=12", "trainer.save_every=2", "trainer.eval_every=0",
               "trainer.log_every=1"]


class _Killed(BaseException):
    """Stands for SIGKILL in-process: not an Exception, so nothing on the way catches it."""


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run's final checkpoint (also makes sure the session's tiny teacher is cached)."""
    out = tmp_path_factory.mktemp("reference")
    return Path(train("distill", RUN, out)["checkpoint"])


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # RLKD_CACHE_DIR (the session cache) comes from conftest
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "rlkd_cli", "distill", *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path} appeared: "
                                 f"{proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.005)


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


# ----------------------------------------------------------------------------------------------
# Real processes, killed from outside
# ----------------------------------------------------------------------------------------------

def test_sigkill_then_resume_auto_is_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(run_dir / "checkpoints" / "latest", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((_latest(run_dir) / "trainer_state.json").read_text())["step"]
    assert 2 <= killed_at < 12, "the kill must land mid-run"
    assert not (run_dir / "summary.json").exists()

    summary = train("distill", RUN + ["trainer.resume=auto"], run_dir)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["checkpoint"] == summary["checkpoint"] and on_disk["status"] == "completed"
    assert summary["status"] == "completed" and summary["step"] == 12
    _assert_same_weights(reference, Path(summary["checkpoint"]))
    # keep_last=2: only the two newest checkpoints remain, and no leftovers of any save
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step-000010", "step-000012"], names
    # metrics.jsonl holds each train step exactly once, as an uninterrupted run's does
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert steps == list(range(1, 13))


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(run_dir / "checkpoints" / "latest", proc)
    first = _latest(run_dir).name
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: checkpoint" in out + err and "Traceback" not in out + err
    ckpt = _latest(run_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert ckpt.name == f"step-{state['step']:06d}" and ckpt.name >= first and state["step"] < 12
    assert not checkpoint.missing_files(ckpt)
    # the SIGTERM checkpoint may be at an odd step (no scheduled save there): it was written for the signal
    done = train("distill", RUN + ["trainer.resume=auto"], run_dir)
    assert done["status"] == "completed"
    _assert_same_weights(reference, Path(done["checkpoint"]))


# ----------------------------------------------------------------------------------------------
# A kill during a save (in-process, at a chosen point)
# ----------------------------------------------------------------------------------------------

def test_kill_mid_save_leaves_previous_checkpoint_and_resume_uses_it(reference, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        path = Path(path)
        if path.name == "optimizer.bin" and path.parent.parent.name == ".tmp-step-000004":
            # what SIGKILL leaves: the half-written temporary folder stays on disk
            shutil.copytree(path.parent.parent, path.parent.parent.parent / ".tmp-step-000004-killed")
            raise _Killed()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(_Killed):
        train("distill", RUN, run_dir)
    monkeypatch.setattr(torch, "save", real_save)

    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000002"
    assert not (root / "step-000004").exists()
    assert (root / ".tmp-step-000004-killed" / "accelerate_state").is_dir()  # the simulated leftover
    prev = root / "step-000002"
    assert not checkpoint.missing_files(prev)
    assert _weights(prev)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        checkpoint._safe_load(prev / "accelerate_state" / name)

    done = train("distill", RUN + ["trainer.resume=auto"], run_dir)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    _assert_same_weights(reference, Path(done["checkpoint"]))


def test_kill_between_rename_and_pointer_resumes_from_pointer(reference, tmp_path, monkeypatch):
    """step-000004 renamed into place but ``latest`` not yet updated: the pointer's checkpoint is used."""
    run_dir = tmp_path / "run"
    real_write = checkpoint.atomic_write_text

    def dying_write(path, text):
        if Path(path).name == "latest" and text.strip() == "step-000004":
            raise _Killed()
        return real_write(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", dying_write)
    with pytest.raises(_Killed):
        train("distill", RUN, run_dir)
    monkeypatch.setattr(checkpoint, "atomic_write_text", real_write)
    assert (run_dir / "checkpoints" / "step-000004").is_dir()
    assert checkpoint.find_resume(run_dir, "auto").name == "step-000002"
    done = train("distill", RUN + ["trainer.resume=auto"], run_dir)
    _assert_same_weights(reference, Path(done["checkpoint"]))


FAKE_FILES = (*checkpoint.CHECKPOINT_FILES, *checkpoint.UNSHARDED_STATE_FILES, "model.safetensors")


def _fake_checkpoint(path: Path, files=FAKE_FILES) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text('{"step": 1}' if name == "trainer_state.json" else "x")
    return path


def test_resume_auto_falls_back_to_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.find_resume(tmp_path, "auto") is None  # nothing yet: a fresh start
    _fake_checkpoint(root / "step-000002")
    _fake_checkpoint(root / "step-000004")
    _fake_checkpoint(root / "step-000006", files=FAKE_FILES[:3])  # damaged after the fact
    (root / "latest").write_text("step-000006\n")
    (root / ".tmp-step-000008-ab12").mkdir()
    (root / ".tmp-latest-xy").write_text("step-0000")
    assert checkpoint.find_resume(tmp_path, "auto").name == "step-000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004", "step-000006"]
    # a pointer naming a folder that is gone, or no pointer at all: the newest complete one
    (root / "latest").write_text("step-000010\n")
    assert checkpoint.find_resume(tmp_path, "auto").name == "step-000004"
    (root / "latest").unlink()
    assert checkpoint.find_resume(tmp_path, "auto").name == "step-000004"
    # nothing complete at all: a clear error, not a silent fresh start over the old run
    for name in ("step-000002", "step-000004"):
        (root / name / "accelerate_state" / "optimizer.bin").unlink()
    with pytest.raises(RlkdError, match="holds no complete checkpoint"):
        checkpoint.find_resume(tmp_path, "auto")


def test_replacement_killed_between_renames_is_restored(tmp_path):
    """atomic_dir replacing step-N moves the old folder to .old-step-N-PID first; a kill there is undone."""
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root / ".old-step-000004-4242")
    (root / "latest").write_text("step-000004\n")
    assert checkpoint.find_resume(tmp_path, "auto").name == "step-000004"
    assert not (root / ".old-step-000004-4242").exists()


def test_atomic_dir_failure_leaves_target_untouched(tmp_path):
    from rlkd_cli.io import atomic_dir

    target = tmp_path / "thing"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(_Killed):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("new, half")
            raise _Killed()
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


# ----------------------------------------------------------------------------------------------
# The cached tiny teacher
# ----------------------------------------------------------------------------------------------

def test_teacher_cache_survives_leftovers_and_stale_lock(tmp_path, monkeypatch):
    # a teacher nobody has trained yet in this session (5 steps: seconds)
    cfg = compose("distill", QUICK + ["teacher.train_if_missing.max_steps=5", "teacher.seed=11"])
    tokenizer = tokenizer_of(cfg)
    runtime = Runtime.create(cfg.trainer)
    path = tiny.cached_path(cfg, tokenizer)
    assert not path.exists()
    # what a job killed while training it leaves: a half temporary folder and the lock file
    leftover = path.parent / f".tmp-{path.name}-dead1"
    (leftover / "run").mkdir(parents=True)
    (leftover / "config.json").write_text("{")
    Path(str(path) + ".lock").write_text("")

    # first a training that dies half-way (inside the atomic folder): nothing appears at `path`
    real_train = tiny.train

    def dying_train(*args, **kwargs):
        raise _Killed()

    monkeypatch.setattr(tiny, "train", dying_train)
    with pytest.raises(_Killed):
        tiny.ensure_trained(cfg, tokenizer, runtime)
    assert not path.exists()
    monkeypatch.setattr(tiny, "train", real_train)

    got = tiny.ensure_trained(cfg, tokenizer, runtime)
    assert got == path and models.is_complete_model(path)
    assert not leftover.exists()
    assert not list(path.parent.glob(f".tmp-{path.name}-*"))
    teacher = models.load_pretrained(str(path), role="teacher")
    models.check_vocab(teacher, tokenizer, role="teacher")
    # the second call just reuses it
    assert tiny.ensure_trained(cfg, tokenizer, runtime) == path


# ----------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs code (creates a marker file): what weights_only=True must refuse."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_in_trainer_state_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, bad)
    with pytest.raises(RlkdError, match="pickled Python objects, not plain tensors"):
        checkpoint._safe_load(bad)
    assert not marker.exists()
    # a torn file is "corrupt", not a crash
    torn = tmp_path / "scheduler.pt"
    torch.save({"a": torch.ones(3)}, torn)
    torn.write_bytes(torn.read_bytes()[:40])
    with pytest.raises(RlkdError, match="is corrupt"):
        checkpoint._safe_load(torn)
    # plain tensors load
    ok = tmp_path / "rng.pt"
    torch.save({"a": torch.ones(3), "n": 4}, ok)
    assert checkpoint._safe_load(ok)["n"] == 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from rlkd_cli.data import tokenizer as tok_mod

    root = tmp_path_factory.mktemp("model")
    tok = tok_mod.embedded_tokenizer(Path(os.environ["RLKD_CACHE_DIR"]), 1024)
    model = models.build_from_arch({"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 32}, tok, seed=0)
    model.save_pretrained(root)
    return root


def test_weights_only_from_safetensors(model_dir, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(model_dir / "config.json", legacy / "config.json")
    torch.save(models.load_pretrained(str(model_dir), role="teacher").state_dict(), legacy / "pytorch_model.bin")
    with pytest.raises(RlkdError, match="has no safetensors weights .* safetensors only"):
        models.load_pretrained(str(legacy), role="teacher")
    # both present: the safetensors file is what is read (the .bin is never unpickled)
    both = tmp_path / "both"
    shutil.copytree(model_dir, both)
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(tmp_path / "code-ran"))))
    models.load_pretrained(str(both), role="teacher")
    assert not (tmp_path / "code-ran").exists()


def test_trust_remote_code_is_off_unless_set(model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    from omegaconf import OmegaConf

    from rlkd_cli.data import tokenizer as tok_mod

    tok = tok_mod.embedded_tokenizer(Path(os.environ["RLKD_CACHE_DIR"]), 1024)
    models.load_model(OmegaConf.create({"name_or_path": str(model_dir)}), tok, role="student")
    models.load_model(OmegaConf.create({"name_or_path": str(model_dir), "trust_remote_code": True}), tok,
                      role="student")
    assert [k["trust_remote_code"] for k in seen] == [False, True]
    assert all(k["use_safetensors"] is True for k in seen)
    for group in ("teacher", "student"):
        cfg = compose("distill", [])
        assert cfg[group].trust_remote_code is False


def test_offline_hub_ids_fail_without_any_network_call(monkeypatch):
    attempts: list[object] = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)

    from rlkd_cli.data import dataset as data_mod
    from rlkd_cli.data import tokenizer as tok_mod

    with pytest.raises(RlkdError, match="some-org/some-model.*HF_HUB_OFFLINE"):
        models.load_pretrained("some-org/some-model", role="teacher")
    with pytest.raises(RlkdError, match="cannot load tokenizer 'some-org/some-model'"):
        tok_mod.load_tokenizer("some-org/some-model")
    tok = tok_mod.embedded_tokenizer(Path(os.environ["RLKD_CACHE_DIR"]), 1024)
    gsm8k = compose("distill", ["dataset=gsm8k"]).dataset
    with pytest.raises(RlkdError, match="cannot load dataset 'openai/gsm8k' from the hub"):
        data_mod.build_split(gsm8k, tok, "train")
    assert attempts == []
