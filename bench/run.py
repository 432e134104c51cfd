"""rlkd's speed and memory against its goals (issue 6): a table on stdout and ``bench/results.json``.

    python bench/run.py --quick          # a few minutes on 2 CPU cores: bench/results.json
    python bench/run.py                  # larger models, more repeats: bench/results-full.json
    python bench/run.py --device cuda    # on a GPU (bf16 autocast): bench/results-full-cuda.json

Every ratio is a median of repeated steps measured side by side in this one run: the variants of
one comparison take turns step by step (A B C A B C ...), so a slow patch of the machine hits all
of them alike.

* ``rank_overhead`` = step(kl+rank) / step(kl) - 1, vocabulary 32000 (goal <= 0.01);
* ``step_vs_floor`` = step(kl+rank) / (teacher forward + student cross-entropy step) (goal <= 1.05),
  where the floor is the least any distillation step must do: run the teacher over the batch and
  train the student with the cheapest loss (both as rlkd runs them);
* ``vs_trl_speedup`` = rlkd tokens/s / TRL GKDTrainer tokens/s, off-policy (``lmbda=0``), forward KL
  (``beta=0``), same models, data and batch (goal >= 1.5);
* ``vs_trl_memory_ratio`` = rlkd peak memory / TRL's (goal <= 0.5): on the CPU the peak resident
  memory of a fresh process above what it held after its imports (models, optimizer state,
  activations, logits); on a GPU ``torch.cuda.max_memory_allocated``;
* ``cached_vs_student_only`` = step(kl+rank from a teacher cache on disk) / step(student-only
  cross-entropy) (goal <= 1.1).

The models are Llama-architecture models initialised at random (no download): their speed does
not depend on their weights. Each sequence is a prompt (no loss) followed by a response, as in
instruction data. TRL and rlkd each run in their own fresh processes, taking turns, so that their
peak memories are measured apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import scale  # noqa: E402  (bench/scale.py: on-policy, memory and large-model rows)
from common import (Memory, RlkdRunner, _preload, collate, make_examples, make_model, objective,  # noqa: E402,F401
                    response_tokens, sync, timed, trl_models)

QUICK = {
    "vocab": 32000,
    "teacher": {"hidden": 768, "layers": 4, "heads": 12, "intermediate": 2048},
    "student": {"hidden": 384, "layers": 2, "heads": 6, "intermediate": 1024},
    "batch": 8, "seq": 256, "prompt": 96, "new_tokens": 32,
    "repeats": 9, "warmup": 2, "trl_rounds": 2, "trl_steps": 4,
}
FULL = {
    "vocab": 32000,
    "teacher": {"hidden": 1024, "layers": 8, "heads": 16, "intermediate": 2816},
    "student": {"hidden": 512, "layers": 4, "heads": 8, "intermediate": 1408},
    "batch": 8, "seq": 512, "prompt": 192, "new_tokens": 64,
    "repeats": 9, "warmup": 2, "trl_rounds": 3, "trl_steps": 6,
}
TINY = {  # seconds per measurement: what the tests and bench/gpu_check.sh's CPU part run (the figures mean little)
    "vocab": 4096,
    "teacher": {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 128},
    "student": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64},
    "batch": 2, "seq": 24, "prompt": 8, "new_tokens": 6,
    "repeats": 1, "warmup": 1, "trl_rounds": 1, "trl_steps": 2,
}
GOALS = {"rank_overhead": ("<=", 0.01), "step_vs_floor": ("<=", 1.05), "vs_trl_speedup": (">=", 1.5),
         "vs_trl_memory_ratio": ("<=", 0.5), "cached_vs_student_only": ("<=", 1.1)}


# ----------------------------------------------------------------------------------------------
# In one process: the engine's train_step with several objectives and teachers, taking turns
# ----------------------------------------------------------------------------------------------

def build_cache(runner: RlkdRunner, examples: list[dict], folder: Path):
    """A real on-disk teacher cache of the bench examples (top-64, float32), opened as distill opens it."""
    import datasets

    from rlkd_cli.teachers import cache as tc

    ds = datasets.Dataset.from_list(examples)
    meta = {"format": tc.FORMAT, "status": "complete", "top_k": 64, "temperatures": [1.0], "shard_examples": 64,
            "splits": {"train": {}}}
    opts = {"shard_examples": 64, "batch_size": runner.spec["batch"], "top_k": 64, "dtype": "float32",
            "identity": tc.expected_identity(meta, "train")}  # (what opening the cache checks every shard against)
    meta["splits"]["train"] = tc.cache_split(runner.live, ds, out=folder, split="train", opts=opts,
                                             temperatures=(1.0,), chunk=runner.chunk, pad_token_id=0,
                                             runtime=runner.runtime)
    (folder / tc.META).write_text(json.dumps(meta))
    return tc.TeacherCache.open(folder)


def in_process(spec: dict, device: str) -> dict:
    """rank_overhead, step_vs_floor, cached_vs_student_only: variants interleaved step by step."""
    import torch

    runner = RlkdRunner(spec, device)
    examples = make_examples(spec, spec["batch"] * 4)
    batches = [{k: v.to(runner.dev) for k, v in collate(examples[i:i + spec["batch"]]).items()}
               for i in range(0, len(examples), spec["batch"])]
    for b, i in zip(batches, range(0, len(examples), spec["batch"])):
        b["example_ids"] = torch.arange(i, i + spec["batch"], device=runner.dev)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_cache(runner, examples, Path(tmp))
        cache_s = time.perf_counter() - t0
        kl, klrank, ce = objective("kl"), objective("kl+rank"), objective("ce")
        variants = {
            "kl": lambda b: runner.step(kl, b, runner.live),
            "kl+rank": lambda b: runner.step(klrank, b, runner.live),
            "ce": lambda b: runner.step(ce, b, None),
            "teacher_forward": runner.teacher_forward,
            "kl+rank_cached": lambda b: runner.step(klrank, b, cache),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(spec["warmup"] + spec["repeats"]):
            for name, fn in variants.items():
                dt = timed(lambda: fn(batches[r % len(batches)]), device)
                if r >= spec["warmup"]:
                    times[name].append(dt)
                print(f"  [{r + 1}/{spec['warmup'] + spec['repeats']}] {name:16s} {dt * 1e3:8.1f} ms", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": med, "all_s": times, "cache_build_s": cache_s, "chunk": runner.chunk,
        "rank_overhead": med["kl+rank"] / med["kl"] - 1.0,
        "step_vs_floor": med["kl+rank"] / (med["teacher_forward"] + med["ce"]),
        "cached_vs_student_only": med["kl+rank_cached"] / med["ce"],
    }


# ----------------------------------------------------------------------------------------------
# rlkd vs TRL: one fresh process per measurement
# ----------------------------------------------------------------------------------------------


def worker_rlkd(spec: dict, device: str) -> dict:
    _preload()
    from rlkd_cli import engine, losses  # noqa: F401

    memory = Memory(device)
    memory.reset()
    runner = RlkdRunner(spec, device)
    examples = make_examples(spec, spec["batch"] * (spec["trl_steps"] + 1), seed=1)
    kl = objective("kl")
    times = []
    for s in range(spec["trl_steps"] + 1):
        batch = {k: v.to(runner.dev) for k, v in collate(examples[s * spec["batch"]:(s + 1) * spec["batch"]]).items()}
        dt = timed(lambda: runner.step(kl, batch, runner.live), device)
        if s > 0:  # the first step allocates the optimizer state
            times.append(dt)
    return {"step_s": times, "peak_bytes": memory.peak()}


def worker_trl(spec: dict, device: str, peft_config=None, liger: bool = False) -> dict:
    """TRL's GKDTrainer, off-policy (``lmbda=0``), forward KL (``beta=0``), on the bench models and data."""
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    from transformers import TrainerCallback
    try:  # TRL >= 1.0 keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer

    memory, teacher, student = trl_models(spec, device)
    examples = make_examples(spec, spec["batch"] * (spec["trl_steps"] + 1), seed=1)
    ds = datasets.Dataset.from_list(examples)
    timer = scale._Times(device, TrainerCallback)
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=spec["trl_steps"] + 1,
                         learning_rate=1e-5, lmbda=0.0, beta=0.0, temperature=1.0, max_length=spec["seq"],
                         logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=device == "cpu",
                         bf16=device == "cuda", dataloader_num_workers=0, max_grad_norm=1.0, seed=0,
                         lr_scheduler_type="constant", disable_tqdm=True, use_liger_kernel=liger,
                         gradient_checkpointing=False)  # TRL's configs default to True; rlkd's step runs without
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                             data_collator=collate, processing_class=scale.word_tokenizer(8), callbacks=[timer],
                             peft_config=peft_config)
        trainer.train()
    return {"step_s": timer.times[1:], "peak_bytes": memory.peak()}


WORKERS = {"rlkd": worker_rlkd, "trl": worker_trl, "trl-liger": lambda spec, device: worker_trl(spec, device, liger=True),
           **scale.WORKERS}


def liger_available(device: str) -> bool:
    """Whether TRL can use Liger's fused JSD here (liger-kernel installed, a CUDA device)."""
    import importlib.util

    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def run_worker(name: str, spec: dict, device: str, env: dict | None = None) -> dict:
    """``WORKERS[name](spec, device)`` in a fresh process (its peak memory its own; ``env`` added to its
    environment); its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec),
           "--device", device]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"bench: the {name} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def vs_trl(spec: dict, device: str) -> dict:
    systems = ("rlkd", "trl", "trl-liger") if liger_available(device) else ("rlkd", "trl")
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(spec["trl_rounds"]):
        for system in systems:
            out = run_worker(system, spec, device)
            runs[system].append(out)
            print(f"  round {r + 1}: {system:5s} median step {statistics.median(out['step_s']) * 1e3:8.1f} ms, "
                  f"peak {out['peak_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    step = {s: statistics.median([t for run in runs[s] for t in run["step_s"]]) for s in runs}
    peak = {s: statistics.median([run["peak_bytes"] for run in runs[s]]) for s in runs}
    tokens = response_tokens(spec)
    return {
        "median_step_s": step, "peak_bytes": peak, "runs": runs,
        "tokens_per_s": {s: tokens / step[s] for s in step},
        "vs_trl_speedup": step["trl"] / step["rlkd"],
        "vs_trl_memory_ratio": peak["rlkd"] / peak["trl"],
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def machine(device: str) -> dict:
    import accelerate
    import torch
    import transformers

    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "cpu_threads": torch.get_num_threads(), "os_cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(results: dict) -> str:
    lines = [f"{'ratio':24s} {'value':>8s}  {'goal':>8s}  met", "-" * 50]
    for key, (op, goal) in GOALS.items():
        value = results["ratios"].get(key)
        if value is None:
            lines.append(f"{key:24s} {'-':>8s}  {op}{goal:<6g}  (not measured)")
            continue
        ok = value <= goal if op == "<=" else value >= goal
        lines.append(f"{key:24s} {value:8.3f}  {op}{goal:<6g}  {'yes' if ok else 'NO'}")
    return "\n".join(lines)


def scale_table(results: dict) -> str:
    """The on-policy, memory and large-model rows (absolute figures and ratios; no goals)."""
    lines = []
    op = results.get("onpolicy")
    if op:
        lines += ["", f"on-policy step ({op['new_tokens']} generated tokens per prompt), rlkd rollout=student vs TRL "
                      "DistillationTrainer:"]
        for s in ("rlkd", "trl"):
            lines.append(f"  {s:5s} {op['median_step_s'][s] * 1e3:9.1f} ms/step  {op['generated_tokens_per_s'][s]:8.1f} "
                         f"generated tok/s  peak {op['peak_bytes'][s] / 2**20:8.0f} MiB")
        lines.append(f"  rlkd/TRL: {op['onpolicy_vs_trl_speedup']:.2f}x tokens/s, "
                     f"{op['onpolicy_vs_trl_memory_ratio']:.2f}x peak memory")
    mem = results.get("memory")
    if mem:
        lines += ["", f"{'student':24s} {'trainable':>12s} {'ms/step':>9s} {'vs full':>8s} {'peak MiB':>9s} "
                      f"{'vs full':>8s} {'first loss':>11s}"]
        for v, r in mem["rows"].items():
            lines.append(f"{v:24s} {r['trainable']:12,d} {r['median_step_s'] * 1e3:9.1f} {r['step_vs_full']:8.2f} "
                         f"{r['peak_bytes'] / 2**20:9.0f} {r['peak_vs_full']:8.2f} {r['first_loss']:11.6f}")
    big = results.get("large")
    if big:
        lines += ["", "large models (1.1B student, 3.2B teacher, seq 1024):"]
        for k, r in big.items():
            lines.append(f"  {k:12s} {r['median_step_s'] * 1e3:9.0f} ms/step  peak {r['peak_bytes'] / 2**30:6.1f} GiB")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer repeats (a few minutes on 2 CPU cores)")
    ap.add_argument("--tiny", action="store_true", help="tiny models: checks that every part runs (seconds each)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--skip-trl", action="store_true", help="leave out the comparisons with TRL")
    ap.add_argument("--only", choices=["ratios", "onpolicy", "memory", "large"], action="append",
                    help="run only these parts (repeatable); default: ratios, onpolicy, memory (+ large on CUDA)")
    ap.add_argument("--out", help="where the JSON results go (default: bench/results.json for --quick, "
                    "bench/results-full.json for the default size, outputs/bench-tiny.json for --tiny; "
                    "-cuda before .json on a GPU)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is visible; use --device cpu")
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec), device)))
        return
    parts = set(args.only or ["ratios", "onpolicy", "memory"] + (["large"] if device == "cuda" else []))
    if "large" in parts and device != "cuda":
        raise SystemExit("bench: the large-model rows (a 1.1B student, a 3.2B teacher) need a GPU: --device cuda")
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("bench: TRL is not installed (the comparison needs it): pip install -e '.[bench]', "
                             "or pass --skip-trl") from None
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    spec = dict({"tiny": TINY, "quick": QUICK, "full": FULL}[mode])
    print(f"bench ({mode}) on {device}: V={spec['vocab']}, teacher {spec['teacher']}, "
          f"student {spec['student']}, batch {spec['batch']}x{spec['seq']} ({spec['prompt']} prompt tokens)",
          file=sys.stderr)
    results = run_parts(spec, device, parts, skip_trl=args.skip_trl)
    results["mode"] = mode
    suffix = "-cuda" if device == "cuda" else ""  # GPU figures never overwrite the CPU ones
    out = Path(args.out or {"quick": HERE / f"results{suffix}.json", "full": HERE / f"results-full{suffix}.json",
                            "tiny": REPO / "outputs" / f"bench-tiny{suffix}.json"}[mode])
    out.parent.mkdir(parents=True, exist_ok=True)
    wall = results["wall_s"]
    if args.only:  # a re-run of some parts: keep the other parts of an earlier run of the same set-up
        results = merge_parts(out, results)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    if results.get("in_process"):
        med = results["in_process"]["median_s"]
        print("\nmedian step (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in med.items()))
    trl_part = results.get("vs_trl")
    if trl_part:
        print("vs TRL GKDTrainer: " + ", ".join(
            f"{s} {trl_part['median_step_s'][s] * 1e3:.1f} ms/step, {trl_part['tokens_per_s'][s]:.0f} tok/s, "
            f"peak {trl_part['peak_bytes'][s] / 2**20:.0f} MiB" for s in ("rlkd", "trl")))
    print()
    print(table(results))
    print(scale_table(results))
    print(f"\n{out} written ({wall} s)")


def merge_parts(out: Path, results: dict) -> dict:
    """``results`` (some parts) over the parts of ``out`` when ``out`` holds a run of the same spec on the
    same machine and software (else ``results`` alone); ``reruns`` records which parts were measured again."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return results
    if old.get("spec") != results["spec"] or old.get("machine") != results["machine"]:
        return results
    merged = {**old, **{k: v for k, v in results.items() if k not in ("ratios", "wall_s", "parts")}}
    merged["ratios"] = {**old.get("ratios", {}), **results["ratios"]}
    merged["wall_s"] = old.get("wall_s")
    merged["reruns"] = [*old.get("reruns", []), {"parts": results["parts"], "wall_s": results["wall_s"]}]
    return merged


def run_parts(spec: dict, device: str, parts: set[str], *, skip_trl: bool = False) -> dict:
    """The chosen parts of the benchmark on ``spec``; the results as ``bench/results.json`` holds them."""
    started = time.perf_counter()
    results: dict = {"spec": spec, "machine": machine(device), "ratios": {},
                     "goals": {k: f"{op} {g}" for k, (op, g) in GOALS.items()},
                     "response_tokens_per_step": response_tokens(spec)}
    if "ratios" in parts:
        inproc = results["in_process"] = in_process(spec, device)
        results["ratios"].update({k: inproc[k] for k in ("rank_overhead", "step_vs_floor", "cached_vs_student_only")})
        if not skip_trl:
            trl_part = results["vs_trl"] = vs_trl(spec, device)
            results["ratios"].update({k: trl_part[k] for k in ("vs_trl_speedup", "vs_trl_memory_ratio")})
    if "onpolicy" in parts and not skip_trl:
        results["onpolicy"] = scale.onpolicy(spec, device, run_worker)
    if "memory" in parts:
        results["memory"] = scale.memory(spec, device, run_worker)
    if "large" in parts:
        results["large"] = scale.large({**scale.LARGE, "trl_rounds": 1}, device, run_worker)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["parts"] = sorted(parts)
    return results


if __name__ == "__main__":
    main()
