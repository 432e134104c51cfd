"""bench/run.py runs end to end on tiny models (its figures are checked by running it, not here)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import REPO

@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def TINY(bench):
    return dict(bench.TINY)


def _param_bytes(bench, TINY) -> int:
    """fp32 bytes of the two bench models' parameters: what any distillation process must hold at least."""
    return sum(p.numel() * 4 for arch, seed in ((TINY["teacher"], 1), (TINY["student"], 2))
               for p in bench.make_model(arch, TINY["vocab"], seed).parameters())


def test_in_process_ratios_time_the_engine_step(bench, TINY, monkeypatch):
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
def test_workers_in_fresh_processes_report_steps_and_peak_memory(bench, TINY):
    pytest.importorskip("trl", reason="TRL is the bench extra (pip install -e '.[bench]')")
    out = bench.vs_trl(dict(TINY), "cpu")
    floor = _param_bytes(bench, TINY)
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


def test_memory_variants_train_the_same_first_step_and_lora_trains_a_few_weights(bench, TINY):
    out = {v: bench.scale.worker_rlkd_memory({**TINY, "variant": v}, "cpu") for v in bench.scale.MEMORY_VARIANTS}
    # LoRA starts from B = 0, a frozen head and gradient checkpointing change no value: the same first loss
    losses = {v: r["first_loss"] for v, r in out.items()}
    assert max(losses.values()) - min(losses.values()) < 1e-6, losses
    assert out["lora"]["trainable"] < out["full"]["trainable"] / 20 < out["full"]["total"]
    assert out["frozen_head"]["trainable"] == out["full"]["trainable"] - TINY["vocab"] * TINY["student"]["hidden"]
    assert all(len(r["step_s"]) == TINY["trl_steps"] for r in out.values())


def test_onpolicy_worker_generates_every_prompt_then_trains(bench, TINY):
    out = bench.scale.worker_rlkd_onpolicy(dict(TINY), "cpu")
    assert len(out["step_s"]) == TINY["trl_steps"]
    # each step generates at most new_tokens per prompt, and at least one token (EOS included) per prompt
    assert all(TINY["batch"] <= n <= TINY["batch"] * TINY["new_tokens"] for n in out["generated_tokens"])


@pytest.mark.slow
def test_trl_distillation_trainer_worker_runs_on_policy(bench, TINY):
    pytest.importorskip("trl", reason="TRL is the bench extra (pip install -e '.[bench]')")
    out = bench.scale.worker_trl_distill(dict(TINY), "cpu")  # in this process: TRL's import is the cost
    assert len(out["step_s"]) == TINY["trl_steps"] and all(n > 0 for n in out["generated_tokens"])


def test_memory_rows_measure_live_memory_on_the_cpu(bench, TINY):
    seen = []

    def fake_worker(name, spec, device, env=None):
        seen.append((name, spec["variant"], spec["live_memory"], env))
        return {"step_s": [1.0], "peak_bytes": 100 if spec["variant"] == "full" else 50, "first_loss": 1.0,
                "trainable": 1, "total": 2}

    out = bench.scale.memory({**TINY, "trl_rounds": 1}, "cpu", fake_worker)
    assert [v for _, v, _, _ in seen] == list(bench.scale.MEMORY_VARIANTS)
    assert all(live and env == bench.scale.LIVE_MEMORY_ENV for _, _, live, env in seen)
    assert out["live_memory"] and out["rows"]["lora"]["peak_vs_full"] == 0.5
    seen.clear()
    bench.scale.memory({**TINY, "trl_rounds": 1}, "cuda", fake_worker)  # on a GPU: the allocator's own figures
    assert all(not live and env is None for _, _, live, env in seen)


def test_only_some_parts_keep_the_other_parts_of_the_same_setup(bench, tmp_path):
    out = tmp_path / "results.json"
    spec, machine = {"vocab": 8}, {"device": "cpu"}
    out.write_text(json.dumps({"spec": spec, "machine": machine, "ratios": {"rank_overhead": 0.004},
                               "in_process": {"x": 1}, "memory": {"old": True}, "wall_s": 300.0}))
    new = {"spec": spec, "machine": machine, "ratios": {}, "memory": {"new": True}, "wall_s": 20.0,
           "parts": ["memory"]}
    merged = bench.merge_parts(out, new)
    assert merged["memory"] == {"new": True} and merged["in_process"] == {"x": 1}
    assert merged["ratios"] == {"rank_overhead": 0.004} and merged["wall_s"] == 300.0
    assert merged["reruns"] == [{"parts": ["memory"], "wall_s": 20.0}]
    for other in (dict(new, spec={"vocab": 16}), dict(new, machine={"device": "cpu", "torch": "other"})):
        assert bench.merge_parts(out, other) is other  # another set-up or machine: nothing of the old file kept
