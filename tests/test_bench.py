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


def test_in_process_ratios(bench):
    out = bench.in_process(dict(TINY), "cpu")
    for key in ("rank_overhead", "step_vs_floor", "cached_vs_student_only"):
        assert math.isfinite(out[key]), key
    assert set(out["median_s"]) == {"kl", "kl+rank", "ce", "teacher_forward", "kl+rank_cached"}
    assert all(v > 0 for v in out["median_s"].values())


def test_rlkd_worker_reports_steps_and_peak_memory(bench):
    out = bench.worker_rlkd(dict(TINY), "cpu")
    assert len(out["step_s"]) == TINY["trl_steps"] and out["peak_bytes"] >= 0  # (0: memory reused in-process)


def test_trl_worker_runs_gkd(bench):
    pytest.importorskip("trl", reason="TRL is the bench extra (pip install -e '.[bench]')")
    out = bench.worker_trl(dict(TINY), "cpu")
    assert len(out["step_s"]) == TINY["trl_steps"] and out["peak_bytes"] >= 0  # (0: memory reused in-process)


def test_table_marks_goals(bench):
    text = bench.table({"ratios": {"rank_overhead": 0.005, "step_vs_floor": 1.2, "vs_trl_speedup": 2.0}})
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert lines["rank_overhead"].endswith("yes") and lines["step_vs_floor"].endswith("NO")
    assert lines["vs_trl_speedup"].endswith("yes") and "not measured" in lines["cached_vs_student_only"]
