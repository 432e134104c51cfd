"""bench/run.py runs end to end on tiny models (its figures are checked by running it, not here)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from conftest import REPO

TINY = {
    "vocab": 4096,
    "teacher": {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 128},
    "student": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64},
    "batch": 2, "seq": 24, "prompt": 8, "repeats": 1, "warmup": 1, "trl_rounds": 1, "trl_steps": 1,
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _param_bytes(bench) -> int:
    """fp32 bytes of the two bench models' parameters: what any distillation process must hold at least."""
    return sum(p.numel() * 4 for arch, seed in ((TINY["teacher"], 1), (TINY["student"], 2))
               for p in bench.make_model(arch, TINY["vocab"], seed).parameters())


def test_in_process_ratios_time_the_engine_step(bench, monkeypatch):
    from rlkd_cli import engine

    calls = []
    real = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = bench.in_process(dict(TINY), "cpu")
    for key in ("rank_overhead", "step_vs_floor", "cached_vs_student_only"):
        assert math.isfinite(out[key]), key
    assert set(out["median_s"]) == {"kl", "kl+rank", "ce", "teacher_forward", "kl+rank_cached"}
    assert all(v > 0 for v in out["median_s"].values())
    # 2 rounds (1 warm-up + 1 timed) x 4 step variants, each one call of the engine's train_step
    assert len(calls) == 8


@pytest.mark.slow
def test_workers_in_fresh_processes_report_steps_and_peak_memory(bench):
    pytest.importorskip("trl", reason="TRL is the bench extra (pip install -e '.[bench]')")
    out = bench.vs_trl(dict(TINY), "cpu")
    floor = _param_bytes(bench)
    for system in ("rlkd", "trl"):
        run = out["runs"][system][0]
        assert len(run["step_s"]) == TINY["trl_steps"] and all(t > 0 for t in run["step_s"])
        assert run["peak_bytes"] > floor, (system, run["peak_bytes"], floor)  # both models were in memory
    assert math.isfinite(out["vs_trl_speedup"]) and out["vs_trl_memory_ratio"] > 0


def test_table_marks_goals(bench):
    text = bench.table({"ratios": {"rank_overhead": 0.005, "step_vs_floor": 1.2, "vs_trl_speedup": 2.0}})
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert lines["rank_overhead"].endswith("yes") and lines["step_vs_floor"].endswith("NO")
    assert lines["vs_trl_speedup"].endswith("yes") and "not measured" in lines["cached_vs_student_only"]
