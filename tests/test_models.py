"""Models and numerics (issues 18, 19, 23): finite weights, runs that train nothing, LoRA bases, dtypes, checks
before loading."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import QUICK, TEACHER_ONLY, compose, run_cli, tokenizer_of, train
from test_chunking import tiny_lm

from rlkd_cli import metrics, models
from rlkd_cli.errors import RlkdError

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A finished 2-step distill run's final checkpoint (the run's tokenizer, finite weights)."""
    run = tmp_path_factory.mktemp("models-run")
    return Path(train("distill", QUICK + ["trainer.max_steps=2", "trainer.eval_every=0"], run)["checkpoint"])


def _with_nan(checkpoint: Path, folder: Path, name: str = "model.layers.0.self_attn.q_proj.weight") -> Path:
    shutil.copytree(checkpoint, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights[name][1, 2] = float("inf")
    weights[name][0, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_non_finite_weights_are_refused_when_loaded_naming_the_tensor(checkpoint, tmp_path):
    bad = _with_nan(checkpoint, tmp_path / "nan")
    with pytest.raises(RlkdError, match=r"teacher model '.*nan' has non-finite weights: tensor "
                                        r"'model\.layers\.0\.self_attn\.q_proj\.weight' holds 2 NaN or Inf value"):
        models.load_pretrained(str(bad), role="teacher")
    models.load_pretrained(str(checkpoint), role="teacher")  # the same model, finite: loads


@pytest.mark.slow
def test_a_run_that_trains_no_step_fails_and_its_nan_metrics_are_not_numbers(checkpoint, tmp_path, monkeypatch):
    """A teacher whose logits are NaN (its weights let through here) makes every step non-finite: fewer steps
    than trainer.max_bad_steps used to end "completed" with CR/OR computed from NaN logits."""
    monkeypatch.setattr(models, "check_finite", lambda *a, **k: None)
    bad = _with_nan(checkpoint, tmp_path / "nan-teacher")
    run = tmp_path / "run"
    res = run_cli(["distill", *QUICK, f"teacher.name_or_path={bad}", "trainer.max_steps=3", "trainer.eval_every=0",
                   f"hydra.run.dir={run}"])
    assert res.exit_code == 2, res.output
    assert "error: no step trained: all 3 steps had a non-finite loss or gradient" in res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["skipped_steps"] == 3 and summary["checkpoint"] is None
    assert "no step trained" in summary["error"]
    assert not (run / "checkpoints").exists()
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "validation"][-1]
    assert val["cr@1"] is None and val["or@5"] is None and val["cr@2|modes=1"] is None  # null, never a number


def test_rates_from_non_finite_logits_are_nan_not_agreement():
    """topk ranks NaN first: two NaN models used to "agree" (CR = 1)."""
    t = torch.randn(2, 5, 11)
    s = t.clone()
    assert metrics.consistency_rate(s, t, 2).item() == 1.0
    s[0, 3, 4] = float("nan")
    t2 = t.clone()
    t2[0, 3, 4] = float("nan")
    assert math.isnan(metrics.consistency_rate(s, t2, 2).item())
    assert math.isnan(metrics.overlap_rate(s, t, 2).item())
    sums = metrics.alignment_sums(s, t, [1, 2])
    assert sums["count"] == 10 and all(math.isnan(sums[k]) for k in ("cr@1", "cr@2", "or@2", "top1"))
    total = metrics.add_sums(metrics.alignment_sums(t, t, [1, 2]), sums)
    assert math.isnan(metrics.finalize(total)["cr@1"])
    by = metrics.finalize(metrics.alignment_sums_by_modes(s, t, [1, 2]))
    assert all(math.isnan(v) for k, v in by.items() if k.startswith(("cr@", "or@")))
    masked = torch.ones(2, 5, dtype=torch.bool)
    masked[0, 3] = False  # the bad position not counted: a number again
    assert metrics.consistency_rate(s, t, 2, mask=masked).item() == 1.0
    t[0, 0, 0] = -math.inf  # a masked-out token is a valid logit
    assert metrics.alignment_sums(t, t, [1])["cr@1"] == 10.0


def _lora_model(seed: int = 0):
    torch.manual_seed(seed)
    return models.apply_peft(tiny_lm(2, 32), LORA, seed=0)


def test_lora_resume_checks_a_named_base_by_its_fingerprint(tmp_path):
    model = _lora_model()
    models.save_adapter_model(model, tmp_path / "ckpt", merge=False, base_source="some-org/base-model")
    assert not (tmp_path / "ckpt" / "base").exists()
    record = json.loads((tmp_path / "ckpt" / models.BASE_RECORD).read_text())
    assert record["source"] == "some-org/base-model" and record["fingerprint"] == models.base_fingerprint(model)
    models.load_adapter_weights(_lora_model(), tmp_path / "ckpt")  # the same base weights: loads
    changed = _lora_model()
    with torch.no_grad():
        changed.get_base_model().model.layers[0].self_attn.v_proj.base_layer.weight[0, 0] += 1e-3
    with pytest.raises(RlkdError, match="was trained on other base weights"):
        models.load_adapter_weights(changed, tmp_path / "ckpt")


def test_lora_resume_with_another_rank_is_one_line(tmp_path):
    models.save_adapter_model(_lora_model(), tmp_path / "ckpt", merge=False, base_source=None)
    torch.manual_seed(0)
    other = models.apply_peft(tiny_lm(2, 32), {**LORA, "r": 8}, seed=0)
    with pytest.raises(RlkdError, match=r"adapter does not fit this run's LoRA student \(r=4, .* there, r=8 here"):
        models.load_adapter_weights(other, tmp_path / "ckpt")


def test_a_lora_checkpoint_without_its_base_names_the_adapter_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    models.save_adapter_model(_lora_model(), ckpt, merge=False, base_source=None)
    shutil.rmtree(ckpt / "base")
    with pytest.raises(RlkdError) as e:
        models.load_pretrained(str(ckpt), role="checkpoint")
    assert f"base_model_name_or_path in {ckpt / 'adapter_config.json'}" in str(e.value)
    assert ".name_or_path to" not in str(e.value)  # no key that does not exist


def test_lora_wrapping_and_loading_leak_no_future_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _lora_model()
        models.save_adapter_model(model, tmp_path / "ckpt", merge=False, base_source=None)
        models.load_pretrained(str(tmp_path / "ckpt"), role="checkpoint")
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_a_bf16_student_checkpoint_trains_in_fp32_and_the_teacher_keeps_its_dtype(checkpoint, tmp_path):
    from rlkd_cli.engine.loop import student_model
    from rlkd_cli.runtime import Runtime
    from rlkd_cli.teachers import live

    folder = tmp_path / "bf16"
    model = models.load_pretrained(str(checkpoint), role="student").to(torch.bfloat16)
    model.save_pretrained(folder)
    shutil.copy(checkpoint / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(checkpoint / "tokenizer_config.json", folder / "tokenizer_config.json")
    assert next(models.load_pretrained(str(folder), role="student").parameters()).dtype == torch.bfloat16
    cfg = compose("distill", QUICK + [f"student.name_or_path={folder}", f"teacher.name_or_path={folder}"])
    tok, runtime = tokenizer_of(cfg), Runtime.create(cfg.trainer)
    student = student_model(cfg, tok, role="student", runtime=runtime, label="test")
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    cfg.teacher.dtype = "bf16"
    assert {p.dtype for p in live.load(cfg, tok, runtime)[0].parameters()} == {torch.bfloat16}
    cfg.teacher.dtype = "fp32"
    assert {p.dtype for p in live.load(cfg, tok, runtime)[0].parameters()} == {torch.float32}


@pytest.mark.parametrize("command, args, expected", [
    ("distill", ["metrics.ks=[1,5000]"], "metrics.ks holds 5000"),
    ("distill", ["trainer.resume=/nonexistent/ckpt"], "not a complete rlkd checkpoint"),
    ("distill", ["trainer.resume={ckpt}", "trainer.lr=0.1"], "the config differs in trainer.lr"),
    ("distill", ["trainer.resume=auto", "trainer.lr=0.1", "hydra.run.dir={run}"], "the config differs in trainer.lr"),
    ("distill", ["student.name_or_path=./missing"], "student.name_or_path './missing' does not exist"),
    ("distill", ["dataset.max_length=1024"], "the teacher takes at most 512 positions"),
    ("sft", ["metrics.ks=[5000]"], "metrics.ks holds 5000"),
    ("measure-alignment", ["checkpoints=[{no_weights}]"], "has no safetensors weights"),
    ("measure-alignment", ["checkpoints=[{nan}]"], "has non-finite weights"),
    ("measure-alignment", ["metrics.ks=[5000]", "checkpoints=[{ckpt}]"], "metrics.ks holds 5000"),
    ("evaluate", ["model.name_or_path={ckpt}", "checkpoints=[{no_weights}]"], "has no safetensors weights"),
])
def test_refused_before_the_teacher_loads_or_trains(command, args, expected, checkpoint, tmp_path, monkeypatch):
    from rlkd_cli.teachers import live, tiny

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded or trained before the refusal")

    monkeypatch.setattr(tiny, "ensure_trained", no_teacher)
    monkeypatch.setattr(live, "load", no_teacher)
    if command == "evaluate":  # it loads the models in turn: the last one's folder is checked before the first loads
        monkeypatch.setattr(models, "load_pretrained", no_teacher)
    (tmp_path / "no-weights").mkdir()
    shutil.copy(checkpoint / "config.json", tmp_path / "no-weights" / "config.json")
    nan = _with_nan(checkpoint, tmp_path / "nan")
    args = [a.format(no_weights=tmp_path / "no-weights", nan=nan, ckpt=checkpoint, run=checkpoint.parent.parent)
            for a in args]
    base = QUICK if command in ("distill", "sft") else TEACHER_ONLY
    monkeypatch.chdir(tmp_path)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path}/run")
    res = run_cli([command, *base, *args])
    assert res.exit_code == 2, res.output
    assert expected in res.output, res.output
