"""rlkd's speed and memory against its goals (issue 6): a table on stdout and ``bench/results.json``.

    python bench/run.py --quick          # a few minutes on 2 CPU cores
    python bench/run.py                  # larger models, more repeats
    python bench/run.py --device cuda    # on a GPU (bf16 autocast)

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

QUICK = {
    "vocab": 32000,
    "teacher": {"hidden": 768, "layers": 4, "heads": 12, "intermediate": 2048},
    "student": {"hidden": 384, "layers": 2, "heads": 6, "intermediate": 1024},
    "batch": 8, "seq": 256, "prompt": 96,
    "repeats": 9, "warmup": 2, "trl_rounds": 2, "trl_steps": 4,
}
FULL = {
    "vocab": 32000,
    "teacher": {"hidden": 1024, "layers": 8, "heads": 16, "intermediate": 2816},
    "student": {"hidden": 512, "layers": 4, "heads": 8, "intermediate": 1408},
    "batch": 8, "seq": 512, "prompt": 192,
    "repeats": 9, "warmup": 2, "trl_rounds": 3, "trl_steps": 6,
}
GOALS = {"rank_overhead": ("<=", 0.01), "step_vs_floor": ("<=", 1.05), "vs_trl_speedup": (">=", 1.5),
         "vs_trl_memory_ratio": ("<=", 0.5), "cached_vs_student_only": ("<=", 1.1)}


# ----------------------------------------------------------------------------------------------
# Shared set-up: models, data, memory probes
# ----------------------------------------------------------------------------------------------

def make_model(arch: dict, vocab: int, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=arch["hidden"],
                               num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                               num_key_value_heads=arch["heads"], intermediate_size=arch["intermediate"],
                               max_position_embeddings=4096, tie_word_embeddings=False,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # peaked next-token distributions, like a trained LM's, not a flat random init
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def make_examples(spec: dict, n: int, seed: int = 0) -> list[dict]:
    """``n`` sequences of ``seq`` random tokens; the first ``prompt`` positions carry no loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, spec["vocab"], (spec["seq"],), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * spec["prompt"] + ids[spec["prompt"]:]})
    return out


def collate(examples: list[dict]):
    import torch

    ids = torch.tensor([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([e["labels"] for e in examples])}


def response_tokens(spec: dict) -> int:
    return spec["batch"] * (spec["seq"] - spec["prompt"] - 1)


class Memory:
    """Peak memory from a reset point: CUDA allocator stats, or the process's resident-set high-water mark."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key} in /proc/self/status")

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return self._status("VmHWM") - self.base


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# rlkd steps: the engine's train_step (forward, backward, clip, AdamW)
# ----------------------------------------------------------------------------------------------

class RlkdRunner:
    """The engine's own step (``rlkd_cli.engine.train_step``) on the bench models, with any objective and teacher."""

    def __init__(self, spec: dict, device: str, *, teacher=None, student=None):
        import torch

        from rlkd_cli.engine import Trainer
        from rlkd_cli.runtime import Runtime
        from rlkd_cli.teachers.live import LiveTeacher

        self.spec, self.device = spec, device
        self.runtime = Runtime.create({"device": device})  # what a command does: CPU allocator, denormals, ...
        self.dev = self.runtime.device
        self.teacher = teacher if teacher is not None else make_model(spec["teacher"], spec["vocab"], 1)
        self.teacher.requires_grad_(False).eval().to(self.dev)
        if self.runtime.precision == "bf16":
            self.teacher.to(torch.bfloat16)
        self.student = student if student is not None else make_model(spec["student"], spec["vocab"], 2)
        self.live = LiveTeacher(self.teacher, spec["vocab"])
        tc = {"lr": 1e-5, "betas": [0.9, 0.999], "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0,
              "max_steps": 10**9, "max_grad_norm": 1.0, "split_head": True, "chunk_size": "auto"}
        self.trainer = Trainer.create(self.runtime, self.student, objective=objective("kl"), teacher=self.live,
                                      vocab=spec["vocab"], tc=tc, micro_batch=spec["batch"])
        assert self.trainer.head is not None and self.live.head is not None
        self.chunk = self.trainer.chunk

    def step(self, objective, batch: dict, teacher) -> None:
        """One optimizer step of the engine (forward, backward, clip, AdamW) with this objective and teacher."""
        import dataclasses

        from rlkd_cli.engine import train_step

        train_step(dataclasses.replace(self.trainer, objective=objective, teacher=teacher), [batch])

    def teacher_forward(self, batch: dict) -> None:
        """What the teacher costs in a distillation step: its trunk, and its head at every response position."""
        import torch

        from rlkd_cli.engine import chunking

        idx, _ = chunking.response_index(batch["labels"])
        with torch.no_grad(), self.runtime.autocast():
            rows = self.live.rows(batch, idx)
            for sl in chunking.chunk_slices(len(rows), self.chunk):
                rows[sl]


def objective(name: str):
    from rlkd_cli.config import load_group_option
    from rlkd_cli.losses import Objective

    return Objective.from_config(load_group_option("loss", name))


def build_cache(runner: RlkdRunner, examples: list[dict], folder: Path):
    """A real on-disk teacher cache of the bench examples (top-64, float32), opened as distill opens it."""
    import datasets

    from rlkd_cli.teachers import cache as tc

    ds = datasets.Dataset.from_list(examples)
    opts = {"shard_examples": 64, "batch_size": runner.spec["batch"], "top_k": 64, "dtype": "float32"}
    entry = tc.cache_split(runner.live, ds, out=folder, split="train", opts=opts, temperatures=(1.0,),
                           chunk=runner.chunk, pad_token_id=0, runtime=runner.runtime)
    meta = {"format": tc.FORMAT, "status": "complete", "top_k": 64, "temperatures": [1.0], "shard_examples": 64,
            "splits": {"train": entry}}
    (folder / tc.META).write_text(json.dumps(meta))
    return tc.TeacherCache.open(folder)


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


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

def _preload() -> None:
    """Import what both systems use before the memory baseline, so import costs count for neither."""
    import datasets  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401


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


def worker_trl(spec: dict, device: str) -> dict:
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    try:  # TRL >= 1.0 keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer

    _preload()
    memory = Memory(device)
    memory.reset()
    teacher = make_model(spec["teacher"], spec["vocab"], 1)
    student = make_model(spec["student"], spec["vocab"], 2)
    if device == "cuda":
        teacher.to(torch.bfloat16)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    examples = make_examples(spec, spec["batch"] * (spec["trl_steps"] + 1), seed=1)
    ds = datasets.Dataset.from_list(examples)

    class Times(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=spec["trl_steps"] + 1,
                         learning_rate=1e-5, lmbda=0.0, beta=0.0, temperature=1.0, max_length=spec["seq"],
                         logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=device == "cpu",
                         bf16=device == "cuda", dataloader_num_workers=0, max_grad_norm=1.0, seed=0,
                         lr_scheduler_type="constant", disable_tqdm=True)
        timer = Times()
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                             data_collator=collate, processing_class=tok, callbacks=[timer])
        trainer.train()
    return {"step_s": timer.times[1:], "peak_bytes": memory.peak()}


def vs_trl(spec: dict, device: str) -> dict:
    runs: dict[str, list[dict]] = {"rlkd": [], "trl": []}
    for r in range(spec["trl_rounds"]):
        for system in ("rlkd", "trl"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--spec", json.dumps(spec),
                   "--device", device]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if res.returncode != 0:
                raise SystemExit(f"bench: the {system} worker failed:\n{res.stderr[-3000:]}")
            out = json.loads(res.stdout.strip().splitlines()[-1])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer repeats (a few minutes on 2 CPU cores)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--skip-trl", action="store_true", help="leave out the comparison with TRL")
    ap.add_argument("--out", default=str(HERE / "results.json"), help="where the JSON results go")
    ap.add_argument("--worker", choices=["rlkd", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is visible; use --device cpu")
    if args.worker:
        spec = json.loads(args.spec)
        result = worker_rlkd(spec, device) if args.worker == "rlkd" else worker_trl(spec, device)
        print(json.dumps(result))
        return
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("bench: TRL is not installed (the comparison needs it): pip install -e '.[bench]', "
                             "or pass --skip-trl") from None
    spec = dict(QUICK if args.quick else FULL)
    print(f"bench ({'quick' if args.quick else 'full'}) on {device}: V={spec['vocab']}, teacher {spec['teacher']}, "
          f"student {spec['student']}, batch {spec['batch']}x{spec['seq']} ({spec['prompt']} prompt tokens)",
          file=sys.stderr)
    started = time.perf_counter()
    inproc = in_process(spec, device)
    trl_part = None if args.skip_trl else vs_trl(spec, device)
    ratios = {k: inproc[k] for k in ("rank_overhead", "step_vs_floor", "cached_vs_student_only")}
    if trl_part:
        ratios.update({k: trl_part[k] for k in ("vs_trl_speedup", "vs_trl_memory_ratio")})
    results = {"mode": "quick" if args.quick else "full", "spec": spec, "machine": machine(device), "ratios": ratios,
               "goals": {k: f"{op} {g}" for k, (op, g) in GOALS.items()}, "in_process": inproc, "vs_trl": trl_part,
               "response_tokens_per_step": response_tokens(spec), "wall_s": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    med = inproc["median_s"]
    print("\nmedian step (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in med.items()))
    if trl_part:
        print("vs TRL GKDTrainer: " + ", ".join(
            f"{s} {trl_part['median_step_s'][s] * 1e3:.1f} ms/step, {trl_part['tokens_per_s'][s]:.0f} tok/s, "
            f"peak {trl_part['peak_bytes'][s] / 2**20:.0f} MiB" for s in ("rlkd", "trl")))
    print()
    print(table(results))
    print(f"\n{out} written ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
