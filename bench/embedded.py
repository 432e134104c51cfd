"""Measured grids on the embedded default: rollout off / mixed / student x loss kl / kl+rank, and LoRA.

Every run has the same steps and seed (the defaults: 300 steps of 32 examples, seed 0); each final
checkpoint is then scored by ``rlkd evaluate`` (greedy generation) on the test split. Two starting
points for the student: ``scratch`` (the embedded default, a randomly initialised student) and
``sft`` (the student first fine-tuned on the data with ``rlkd sft model=student`` for
``--sft-steps`` steps, the setting GKD and DistiLLM assume). For each starting point one more row
trains a LoRA student (``student.peft.r=8``, rollout off, kl+rank) against the full fine-tuning
row above it, and the teacher is evaluated once. Prints a table and writes ``bench/embedded.json``
(the README's results table and the on-policy and LoRA tables of docs/on-policy.md and
docs/scale.md come from it). Run from the repository root, on an otherwise idle machine (the step
times are compared):

    python bench/embedded.py [--steps 300] [--init scratch sft] [--rollouts off mixed student] [--no-lora]
                             [--out outputs/bench-embedded] [--results bench/embedded.json]

(``--init scratch --rollouts off --no-lora`` measures the README's table alone, in about 4 minutes.)

It drives the ``rlkd`` command line (what a user runs), one run after the other; about 18 minutes
on 2 CPU cores for both starting points.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROLLOUTS = {"off": [], "mixed": ["rollout=mixed", "rollout.lmbda=0.5"], "student": ["rollout=student"]}
LOSSES = ("kl", "kl+rank")


def _rlkd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rlkd_cli", *args], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--init", nargs="+", choices=["scratch", "sft"], default=["scratch", "sft"])
    ap.add_argument("--rollouts", nargs="+", choices=list(ROLLOUTS), default=list(ROLLOUTS))
    ap.add_argument("--no-lora", action="store_true", help="leave out the LoRA rows")
    ap.add_argument("--out", default="outputs/bench-embedded")
    ap.add_argument("--results", default="bench/embedded.json")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    rows = []
    for init in args.init:
        start: list[str] = []
        if init == "sft":
            sft = out / "sft-student"
            if not (sft / "summary.json").is_file():
                _rlkd("sft", "model=student", f"trainer.max_steps={args.sft_steps}", f"hydra.run.dir={sft}")
            start = [f"student.name_or_path={_final(sft)}"]
        for loss in LOSSES:
            for rollout in args.rollouts:
                extra = ROLLOUTS[rollout]
                rows.append(_cell(out / init, rollout, loss, [f"trainer.max_steps={args.steps}", *start, *extra]))
                rows[-1]["init"] = init
        if not args.no_lora:
            rows.append(_cell(out / init, "off", "kl+rank", [f"trainer.max_steps={args.steps}", *start,
                                                             "student.peft.r=8"], name="lora-off-kl+rank"))
            rows[-1].update(init=init, student="lora r=8")
    teacher_eval = out / "eval-teacher"
    if not (teacher_eval / "results.json").is_file():
        _rlkd("evaluate", "include_teacher=true", "split=test", "eval.perplexity=false", "trainer.progress=false",
              f"hydra.run.dir={teacher_eval}")
    teacher_acc = json.loads((teacher_eval / "results.json").read_text())["models"][0]["accuracy"]
    for row in rows:
        row.setdefault("student", "full")
        base = next(r for r in rows if r["init"] == row["init"] and r["loss"] == row["loss"] and r["rollout"] == "off"
                    and r["student"] == "full")
        row["step_time_vs_off"] = row["train_time_s"] / base["train_time_s"]
    print(f"{'init':8} {'student':9} {'rollout':8} {'loss':8} {'CR@1':>6} {'CR@2':>6} {'OR@2':>6} {'OR@5':>6} "
          f"{'acc':>6} {'time/off':>8}")
    for r in rows:
        print(f"{r['init']:8} {r['student']:9} {r['rollout']:8} {r['loss']:8} {r['cr@1']:6.3f} {r['cr@2']:6.3f} "
              f"{r['or@2']:6.3f} {r['or@5']:6.3f} {r['accuracy']:6.3f} {r['step_time_vs_off']:8.2f}")
    print(f"teacher accuracy (test): {teacher_acc:.3f}")
    import torch
    import transformers

    from importlib.metadata import version

    meta = {"steps": args.steps, "sft_steps": args.sft_steps, "seed": 0, "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "packages": {name: version(name) for name in ("tokenizers", "accelerate", "datasets", "peft",
                                                          "safetensors", "numpy", "hydra-core")}}
    Path(args.results).write_text(json.dumps({"meta": meta, "teacher_accuracy": teacher_acc, "rows": rows}, indent=2)
                                  + "\n")
    print(f"wrote {args.results}")


def _final(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _cell(root: Path, rollout: str, loss: str, overrides: list[str], name: str | None = None) -> dict:
    """One distill run and the evaluation of its final checkpoint (each skipped when already done)."""
    name = name or f"{rollout}-{loss}"
    run = root / name
    if not (run / "summary.json").is_file():
        _rlkd("distill", f"loss={loss}", f"hydra.run.dir={run}", *overrides)
    summary = json.loads((run / "summary.json").read_text())
    ev = root / f"eval-{name}"
    if not (ev / "results.json").is_file():
        _rlkd("evaluate", f"model.name_or_path={_final(run)}", "split=test", "eval.perplexity=false",
              "trainer.progress=false", f"hydra.run.dir={ev}")
    result = json.loads((ev / "results.json").read_text())["models"][0]
    return {"rollout": rollout, "loss": loss, "cr@1": summary["cr@1"], "cr@2": summary["cr@2"],
            "or@2": summary["or@2"], "or@5": summary["or@5"], "params_trainable": summary.get("params/trainable"),
            "peak_rss_mb": summary.get("mem/peak_rss_mb"),
            "val_ppl": summary.get("val_ppl"), "accuracy": result["accuracy"], "train_time_s": summary["train_time_s"],
            "generation_time_share": summary.get("rollout/generation_time_share", 0.0),
            "eos_share": summary.get("rollout/eos_share"), "mean_length": summary.get("rollout/mean_length")}


if __name__ == "__main__":
    main()
